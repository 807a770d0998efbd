"""`rewrite serve OUT`: a Ray Serve deployment over an unmerged export that batches requests with different adapters.

    app = build_app("out/", replicas=2)            # then serve.run(app), or serve_forever("out/", replicas=2, port=8000)

HTTP API (JSON; or binary inference, rewrite.runtime.tensor_body):
    POST   /v1/infer            {"adapter": "support" | null, "inputs": {"x": [[...]]}} -> {"outputs": {...}}
    POST   /v1/infer?adapter=support   Content-Type: application/octet-stream, a safetensors body of the inputs
                                -> a safetensors body of the outputs (no text parsing: ~9 ms less CPU per request)
    GET    /v1/adapters         the loaded adapters
    POST   /v1/adapters         {"name": "tenant", "path": "peft/tenant"} -> 201; every replica gets it
    DELETE /v1/adapters/NAME    every replica drops it
    GET    /healthz             {"status": "ok", "replica": ..., "batches", "rows", "most_adapters_in_a_batch"}

Python API (a `DeploymentHandle`: the one `serve.run` returns, or another deployment's), batched with the HTTP requests:
    outputs = await handle.run.remote({"x": array}, "support")   # {output name: array}; RuntimeUseError if refused

Rules:
  * Concurrent requests are gathered by `@serve.batch` (by rows: `max_batch_size` rows at most) and answered by
    `run_mixed`: one bank / custom-op run per input shape, one adapter per row. `serve.multiplexed` cannot do this:
    it routes by model id and splits batches per id, so here the adapter is ordinary request data.
  * Adding or removing an adapter goes to one replica, which validates it (a bad adapter is a 4xx, nothing changes)
    and records it, with its tensors (factors, row vectors), in `AdapterRegistry`, a small actor. Every replica
    brings its session up to the registry before each batch and each change, under one lock, so a request sent after
    a change was answered is served with it by any replica, and no run sees a change half applied (AdapterSession's
    snapshots).
  * Bad input is a 4xx with a one-line reason, never a crashed replica: 404 for an unknown adapter, 409 for a name
    already loaded, 400 for anything else the request got wrong (shape, dtype, rows, fields, adapter files).
  * Shutdown is graceful: replicas get `graceful_shutdown_timeout_s` to finish the requests they hold.
"""

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from ray import serve

from rewrite.errors import DeploymentError, RewriteError, RuntimeUseError, first_line
from rewrite.runtime.adapter_source import read_adapter
from rewrite.runtime import tensor_body
from rewrite.runtime.json_feeds import request_adapter, request_feeds
from rewrite.runtime.mixed_batch import Request, UnknownAdapter, run_mixed
from rewrite.runtime.model_io import read_io
from rewrite.runtime.session import AdapterSession

api = FastAPI(title="rewrite adapters")


@ray.remote(num_cpus=0)
class AdapterRegistry:
    """The adapter changes made while serving: {name: (stamp, AdapterTensors or None for removed)}, stamps
    increasing."""

    def __init__(self):
        self.stamp, self.entries = 0, {}

    def since(self, stamp: int) -> tuple[int, list[tuple[int, str, Any]]]:
        changes = sorted(((s, name, tensors) for name, (s, tensors) in self.entries.items() if s > stamp),
                         key=lambda change: change[0])
        return self.stamp, changes

    def record(self, name: str, tensors: Any) -> int:
        self.stamp += 1
        self.entries[name] = (self.stamp, tensors)
        return self.stamp


def _error(status: int, err: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": first_line(err)}, status_code=status, headers=headers)


def _replica() -> dict[str, str]:
    """The header naming the replica that answered."""
    return {"x-rewrite-replica": serve.get_replica_context().replica_id.unique_id}


@serve.deployment(graceful_shutdown_timeout_s=20, max_ongoing_requests=256)
@serve.ingress(api)
class AdapterServer:
    def __init__(self, directory: str, registry, max_batch_size: int, batch_wait_timeout_s: float,
                 intra_op_threads: int | None):
        self.session = AdapterSession(directory, intra_op_threads=intra_op_threads)
        self.inputs, outputs = read_io(self.session.model_path, skip={self.session.entry.ids_input or ""})
        self.output_names = [o.name for o in outputs]
        self.registry, self.seen, self.lock = registry, 0, asyncio.Lock()
        self.max_rows = max_batch_size
        self.stats = {"batches": 0, "rows": 0, "most_adapters_in_a_batch": 0}
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _sync(self) -> None:
        """Apply the registry's changes since the last sync (the caller holds the lock)."""
        stamp, changes = await self.registry.since.remote(self.seen)
        for _, name, tensors in changes:
            if tensors is None:
                if name in self.session.adapters:
                    self.session.remove_adapter(name)
            else:
                self.session.add_adapter(name, tensors, replace_existing=True)
        self.seen = stamp

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=lambda items: sum(r.rows for r in items))
    async def _infer(self, requests: list[Request]):
        async with self.lock:
            await self._sync()
            # on the event loop, not in a worker thread: requests that arrive during the run are read when it ends
            # and form the next batch; with the loop free, batches stayed near 1.5 rows (bench_ray_serve: 0.36x)
            answers = run_mixed(self.session, requests, self.output_names)
        self.stats["batches"] += 1
        self.stats["rows"] += sum(r.rows for r in requests)
        adapters = len({r.adapter for r in requests})
        self.stats["most_adapters_in_a_batch"] = max(self.stats["most_adapters_in_a_batch"], adapters)
        return answers

    def _request(self, body: Any) -> Request:
        adapter = request_adapter(body)  # first: it checks that the body is an object
        request = Request(request_feeds(body, self.inputs), adapter)
        if request.rows > self.max_rows:
            raise RuntimeUseError(f"inputs: {request.rows} rows, at most {self.max_rows} per request")
        return request

    @api.post("/v1/infer")
    async def infer(self, http: HttpRequest) -> Response:
        binary = http.headers.get("content-type", "").split(";")[0].strip().lower() == tensor_body.MEDIA_TYPE
        try:
            if binary:
                request = self._request(tensor_body.read_request(await http.body(), http.query_params.get("adapter")))
            elif "adapter" in http.query_params:
                raise RuntimeUseError(f"adapter: a JSON request names it in its body; the query parameter is for "
                                      f"{tensor_body.MEDIA_TYPE} bodies")
            else:
                request = self._request(await http.json())
        except RuntimeUseError as err:
            return _error(400, err)
        except ValueError as err:  # the body is not JSON
            return _error(400, ValueError(f"request: not JSON ({first_line(err)}); a binary body needs Content-Type: "
                                          f"{tensor_body.MEDIA_TYPE}"))
        answer = await self._infer(request)
        if answer.error is not None:
            return _error(404 if isinstance(answer.error, UnknownAdapter) else 400, answer.error, _replica())
        if binary:
            return Response(tensor_body.write_answer(answer.outputs), media_type=tensor_body.MEDIA_TYPE,
                            headers=_replica())
        outputs = {k: v.tolist() for k, v in answer.outputs.items()}
        return JSONResponse({"adapter": request.adapter, "outputs": outputs}, headers=_replica())

    async def run(self, inputs: dict[str, Any], adapter: str | None = None) -> dict[str, Any]:
        """One request from Python: the same checks as the HTTP route (a `RuntimeUseError` instead of a 4xx;
        `UnknownAdapter` for a name not loaded), the same batches."""
        answer = await self._infer(self._request({"inputs": inputs, "adapter": adapter}))
        if answer.error is not None:
            raise answer.error
        return answer.outputs

    @api.get("/v1/adapters")
    async def adapters(self) -> dict:
        async with self.lock:
            await self._sync()
            return {"adapters": self.session.adapters, "switching": self.session.switching,
                    "capacity": self.session.entry.capacity}

    @api.post("/v1/adapters")
    async def add(self, http: HttpRequest) -> JSONResponse:
        try:
            body = await http.json()
            if not isinstance(body, dict) or set(body) != {"name", "path"} or not isinstance(body["name"], str):
                raise RuntimeUseError("expected {\"name\": adapter name, \"path\": PEFT dir, .safetensors or "
                                      ".onnx_adapter readable by the server}")
        except (RuntimeUseError, ValueError) as err:
            return _error(400, err)
        name = body["name"]
        async with self.lock:
            await self._sync()
            if name in self.session.adapters:
                return _error(409, RuntimeUseError(f"adapter {name!r} is already loaded; DELETE it first"))
            try:
                entry = self.session.entry
                sites = {s.site: dict(s.model_dump(), rank_limit=s.rank if entry.routed else None) for s in entry.sites}
                tensors = read_adapter(str(body["path"]), sites, entry.row_sites, model_version=entry.model_version,
                                       dtype=self.session.bank_dtype, reserve=entry.reserve)
                self.session.add_adapter(name, tensors)
            except RewriteError as err:
                return _error(400, err)
            self.seen = await self.registry.record.remote(name, tensors)  # nothing else changed: we were in sync
            return JSONResponse({"added": name, "adapters": self.session.adapters}, status_code=201)

    @api.delete("/v1/adapters/{name}")
    async def remove(self, name: str) -> JSONResponse:
        async with self.lock:
            await self._sync()
            if name not in self.session.adapters:
                return _error(404, RuntimeUseError(f"unknown adapter {name!r}; loaded: {self.session.adapters}"))
            self.session.remove_adapter(name)
            self.seen = await self.registry.record.remote(name, None)
            return JSONResponse({"removed": name, "adapters": self.session.adapters})

    @api.get("/healthz")
    async def health(self) -> dict:
        return {"status": "ok", "adapters": len(self.session.adapters), "replica": _replica()["x-rewrite-replica"],
                **self.stats}


def _check(directory: str | Path, replicas: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Refuse what cannot be served before anything starts (a broken export would crash-loop its replicas)."""
    if not Path(directory).is_dir():
        raise DeploymentError(f"{directory}: not a directory (give the output directory of an unmerged export)")
    if replicas < 1 or max_batch_size < 1 or batch_wait_timeout_s < 0:
        raise RuntimeUseError(f"replicas {replicas} and max batch size {max_batch_size} must be >= 1, the batch "
                              f"wait ({batch_wait_timeout_s} s) >= 0")
    AdapterSession(directory).close()


def build_app(directory: str | Path, *, replicas: int = 1, max_batch_size: int = 32,
              batch_wait_timeout_s: float = 0.002, intra_op_threads: int | None = 1):
    """The Serve application over the export in `directory` (checked here first: a broken one never deploys)."""
    _check(directory, replicas, max_batch_size, batch_wait_timeout_s)
    registry = AdapterRegistry.remote()
    return AdapterServer.options(num_replicas=replicas).bind(str(Path(directory).resolve()), registry,
                                                             max_batch_size, batch_wait_timeout_s, intra_op_threads)


def serve_forever(directory: str | Path, *, replicas: int = 1, port: int = 8000, host: str = "127.0.0.1",
                  **options) -> None:
    """Start Ray and the deployment on host:port, block until SIGINT / SIGTERM, then shut down gracefully."""
    _check(directory, replicas, options.get("max_batch_size", 1), options.get("batch_wait_timeout_s", 0))
    if not 0 < port < 65536:
        raise RuntimeUseError(f"port {port}: expected 1..65535")
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(directory, replicas=replicas, **options), route_prefix="/")
        print(f"serving {directory} on http://{host}:{port} ({replicas} replica{'s' if replicas > 1 else ''})",
              flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
