"""Ray Serve, side by side in one run: our mixed-adapter batching vs Ray Serve's own `serve.multiplexed`.

Same model, adapters, replicas and traffic for both: a 4-Linear stack 1024 -> H -> H -> H -> 1024 (`--hidden` H,
default 8192: 576 MB of fp32 weights, so a run is bound by reading its weights from memory, as a decoder step is, while
a request carries only 1024 floats each way), 8 LoRA adapters of rank 16 on all four, exported per row (custom-op when
its library builds, else bank); uniform random adapters; `--clients` concurrent HTTP clients on loopback, each sending
`--requests` single-row requests per round, through HTTP (`--via http`: JSON on loopback through Serve's proxy;
`--via binary`: the same with safetensors bodies, rewrite.runtime.tensor_body, for both contenders) or Python
handles (`--via handle`: `DeploymentHandle` calls from asyncio tasks, what another deployment in the same Ray app
would do; no proxy, no JSON). Both contenders are deployed at once (route prefixes /ours and /mux) and measured in
alternating rounds (`--rounds`), so a change in the machine's load falls on both; medians are quoted.
Contenders:
  ours         runtime/ray_serve.py: `@serve.batch` gathers requests of any adapters, one run per batch, an id per row;
  multiplexed  `@serve.multiplexed` (the adapter as the model id, header `serve_multiplexed_model_id`) + `@serve.batch`,
               which splits every batch by model id: one run per adapter present, on the same AdapterSession.
Every answer is checked against the request's adapter (one AdapterSession run alone). Goal (issue 13): ours >= 2x the
multiplexed throughput at equal p99.
Usage: python bench/bench_ray_serve.py [--via http binary handle] [--hidden 8192] [--clients 32] [--requests 50]
                                      [--rounds 3] [--replicas 1] [--max-batch 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.options import ExportOptions
from rewrite.runtime import tensor_body
from rewrite.runtime.json_feeds import request_feeds
from rewrite.runtime.model_io import read_io
from rewrite.runtime.ray_serve import build_app
from rewrite.runtime.session import AdapterSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switching import _adapted, _custom_op_available  # noqa: E402

NAMES = [f"a{i}" for i in range(8)]


def wide_stack(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = [1024, hidden, hidden, hidden, 1024]
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]).eval()


def build_export(work: Path, switching: str, hidden: int) -> Path:
    loaded = LoadedModel(wide_stack(hidden), None, "factory", "wide_stack", None)
    inputs = ExampleInputs({"input": torch.randn(32, 1024)}, {"input": ["batch", None]})
    gm = _adapted(loaded, inputs, ["0", "1", "2", "3"], NAMES, 16)
    out = work / "out"
    out.mkdir()
    entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=switching, capacity=8), None)
    write_manifest(out / MANIFEST, build_manifest(gm, source="four_linear", exports=[entry]))
    return out


@serve.deployment(max_ongoing_requests=256)
class Multiplexed:
    """Ray Serve's own way: one adapter per batch (batches are split by multiplexed model id)."""

    def __init__(self, directory: str, max_batch_size: int):
        self.session = AdapterSession(directory, intra_op_threads=1)
        self.inputs, outputs = read_io(self.session.model_path, skip={self.session.entry.ids_input})
        self.output = outputs[0].name
        self.infer.set_max_batch_size(max_batch_size)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, model_id: str) -> str:
        return model_id  # every adapter is already in the session's banks: "loading" one is naming it

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def infer(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        adapter = await self.get_model(serve.get_multiplexed_model_id())
        rows = np.concatenate(feeds)
        out = self.session.run({"input": rows}, adapter=adapter, output_names=[self.output])[0]
        return [out[i:i + 1] for i in range(len(feeds))]

    async def rows(self, x: np.ndarray) -> np.ndarray:
        return await self.infer(x)

    async def __call__(self, http: HttpRequest):
        if http.headers.get("content-type") == tensor_body.MEDIA_TYPE:  # as ours: safetensors in and out
            feeds = request_feeds(tensor_body.read_request(await http.body(), None), self.inputs)
            return Response(tensor_body.write_answer({self.output: await self.infer(feeds["input"])}),
                            media_type=tensor_body.MEDIA_TYPE)
        feeds = request_feeds(await http.json(), self.inputs)
        return {"outputs": {self.output: (await self.infer(feeds["input"])).tolist()}}


def summary(results: list[tuple[float, bool]], elapsed: float) -> dict:
    ms = np.array([s for s, _ in results]) * 1000
    return dict(requests=len(results), wrong=sum(not ok for _, ok in results), throughput=len(results) / elapsed,
                p50=float(np.percentile(ms, 50)), p99=float(np.percentile(ms, 99)))


def load_handles(handle, multiplexed: bool, xs: np.ndarray, want: dict, clients: int, requests: int) -> dict:
    """One round through Python handles: `clients` asyncio tasks, each awaiting `requests` calls in turn."""
    async def one(seed: int) -> list[tuple[float, bool]]:
        rng, done = random.Random(seed), []
        for _ in range(requests):
            i, adapter = rng.randrange(len(xs)), rng.choice(NAMES)
            start = time.perf_counter()
            if multiplexed:
                y = await handle.options(multiplexed_model_id=adapter).rows.remote(xs[i:i + 1])
            else:
                y = next(iter((await handle.run.remote({"input": xs[i:i + 1]}, adapter)).values()))
            done.append((time.perf_counter() - start, float(np.abs(y - want[(i, adapter)]).max()) <= 1e-4))
        return done

    async def all_clients() -> list[tuple[float, bool]]:
        return [r for part in await asyncio.gather(*(one(seed) for seed in range(clients))) for r in part]

    start = time.perf_counter()
    results = asyncio.run(all_clients())
    return summary(results, time.perf_counter() - start)


def load(port: int, multiplexed: bool, binary: bool, xs: np.ndarray, want: dict, clients: int,
         requests: int) -> dict:
    """One round through HTTP: `clients` threads, each sending `requests` single-row requests with random adapters;
    JSON bodies, or safetensors ones (`binary`)."""
    def one(seed: int) -> list[tuple[float, bool]]:
        rng, done = random.Random(seed), []
        for _ in range(requests):
            i, adapter = rng.randrange(len(xs)), rng.choice(NAMES)
            headers = {"content-type": tensor_body.MEDIA_TYPE if binary else "application/json"}
            url = f"http://127.0.0.1:{port}/" + ("mux" if multiplexed else "ours/v1/infer")
            if multiplexed:
                headers["serve_multiplexed_model_id"] = adapter
            elif binary:
                url += f"?adapter={adapter}"
            if binary:
                data = save({"input": xs[i:i + 1]})
            else:
                data = json.dumps({"inputs": {"input": xs[i:i + 1].tolist()}, "adapter": adapter}
                                  if not multiplexed else {"inputs": {"input": xs[i:i + 1].tolist()}}).encode()
            start = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data, headers)) as r:
                raw = r.read()
            y = next(iter(load_tensors(raw).values())) if binary \
                else np.array(next(iter(json.loads(raw)["outputs"].values())), np.float32)
            seconds = time.perf_counter() - start
            done.append((seconds, float(np.abs(y - want[(i, adapter)]).max()) <= 1e-4))
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(one, range(clients)) for r in part]
    return summary(results, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--via", nargs="+", choices=["http", "binary", "handle"],
                        default=["http", "binary", "handle"])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    switching = "custom-op" if _custom_op_available() else "bank"
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as tmp:
        out = build_export(Path(tmp), switching, args.hidden)
        xs = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
        with AdapterSession(out) as session:
            want = {(i, a): session.run({"input": xs[i:i + 1]}, adapter=a)[0] for i in range(len(xs)) for a in NAMES}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rounds: dict[tuple[str, str], list[dict]] = {(via, name): [] for via in args.via
                                                     for name in ("ours", "multiplexed")}
        try:
            handles = {"ours": serve.run(build_app(out, replicas=args.replicas, max_batch_size=args.max_batch),
                                         name="ours", route_prefix="/ours"),
                       "multiplexed": serve.run(Multiplexed.options(num_replicas=args.replicas).bind(
                           str(out), args.max_batch), name="multiplexed", route_prefix="/mux")}

            def one_round(via: str, name: str, requests: int) -> dict:
                if via in ("http", "binary"):
                    return load(port, name == "multiplexed", via == "binary", xs, want, args.clients, requests)
                return load_handles(handles[name], name == "multiplexed", xs, want, args.clients, requests)

            for via, name in rounds:
                one_round(via, name, 3)  # warm up
            for _ in range(args.rounds):
                for via, name in rounds:
                    rounds[(via, name)].append(one_round(via, name, args.requests))
        finally:
            serve.shutdown()
            ray.shutdown()
    table = Table(title=f"Ray Serve, Linear stack 1024-{args.hidden}-{args.hidden}-{args.hidden}-1024, 8 adapters "
                        f"r16 ({switching}), {args.clients} clients, {args.replicas} replica(s), uniform random "
                        f"adapters, median of {args.rounds} alternating rounds")
    for column in ("via", "contender", "requests", "wrong", "requests/s", "p50 ms", "p99 ms", "ours / multiplexed"):
        table.add_column(column)
    median = {key: {k: float(np.median([r[k] for r in rs])) for k in ("throughput", "p50", "p99")}
              for key, rs in rounds.items()}
    for (via, name), rs in rounds.items():
        ratio = ""
        if name == "ours":
            per_round = [o["throughput"] / m["throughput"] for o, m in zip(rs, rounds[(via, "multiplexed")])]
            ratio = f"{float(np.median(per_round)):.2f}x ({', '.join(f'{r:.2f}' for r in per_round)})"
        m = median[(via, name)]
        table.add_row(via, name, str(sum(r["requests"] for r in rs)), str(sum(r["wrong"] for r in rs)),
                      f"{m['throughput']:.0f}", f"{m['p50']:.1f}", f"{m['p99']:.1f}", ratio)
    console.print(table)


if __name__ == "__main__":
    main()
