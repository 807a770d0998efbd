"""The Ray Serve deployment (runtime/ray_serve.py) on loopback, through real HTTP: 2 replicas over the bank export of
tests/serving_setup.py (PEFT adapters `support` and `style`).

1. Concurrent requests with different adapters are gathered into one batch (the replicas report batches that mixed
   several adapters) and every answer equals that request's answer from `AdapterSession` alone (and PEFT's).
2. Load (bounded, loopback): 16 clients x 200 requests with random adapters, the base model included: 0 answers
   from another adapter than asked; p50 / p99 latency and throughput printed.
3. Bad input: a 4xx with a one-line reason (unknown adapter 404, taken name 409, shapes / dtypes / fields /
   rows / adapter files 400), and every replica still healthy after.
4. The Python API (`handle.run.remote`): concurrent calls with different adapters share batches with the right
   answers; an unknown adapter or a wrong shape raises `RuntimeUseError` in the caller.
5. Hot add and remove: an adapter added through one replica answers correctly from both; a removed one is a 404 from
   both; no restart.
6. Binary bodies (runtime/tensor_body.py): a safetensors request with `?adapter=` gets a safetensors answer equal to
   the JSON answer and to PEFT's; a body that is no safetensors file, wrong names / dtypes / shapes and an adapter
   parameter on a JSON body get a 400 with the reason, an unknown adapter a 404.
Ray starts several processes (a few seconds): the module is marked slow.
"""
from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load, save

from rewrite.errors import RuntimeUseError
from rewrite.runtime.session import AdapterSession

from serving_setup import setup_fixture  # noqa: F401 - the `setup` fixture

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

ADAPTERS = [None, "support", "style"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), dict(err.headers)

    def infer(self, x: np.ndarray, adapter: str | None):
        return self.call("POST", "/v1/infer", {"adapter": adapter, "inputs": {"x": x.tolist()}})

    def binary(self, body: bytes, query: str = "") -> tuple[int, bytes, dict]:
        request = urllib.request.Request(f"{self.base}/v1/infer{query}", data=body, method="POST",
                                         headers={"content-type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)


@pytest.fixture(scope="module")
def server(setup):
    from rewrite.runtime.ray_serve import build_app

    made = setup
    out = made.export("bank")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(out, replicas=2, max_batch_size=16, batch_wait_timeout_s=0.005), route_prefix="/")
        yield Client(port), out, made
    finally:
        serve.shutdown()
        ray.shutdown()


def inputs(count: int, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.standard_normal((1, 3, 64)).astype(np.float32) for _ in range(count)]


def expected(out, xs: list[np.ndarray], adapters) -> dict[tuple[int, str | None], np.ndarray]:
    with AdapterSession(out) as session:
        return {(i, a): session.run({"x": x}, adapter=a)[0] for i, x in enumerate(xs) for a in adapters}


def closest(y: np.ndarray, answers: dict[str | None, np.ndarray]) -> str | None:
    return min(answers, key=lambda a: np.abs(answers[a] - y).max())


def test_concurrent_requests_share_mixed_batches(server):
    client, out, made = server
    xs = inputs(12, 0)
    want = expected(out, xs, ADAPTERS)
    jobs = [(i, ADAPTERS[i % 3]) for i in range(len(xs))] * 4
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: client.infer(xs[job[0]], job[1]), jobs))
    for (i, adapter), (status, body, _) in zip(jobs, results):
        assert status == 200, body
        y = np.array(body["outputs"][next(iter(body["outputs"]))], np.float32)
        assert np.abs(y - want[(i, adapter)]).max() <= 1e-5
        assert np.abs(y - made.peft(xs[i], adapter)).max() <= 1e-5
    health = [client.call("GET", "/healthz")[1] for _ in range(8)]
    assert max(h["most_adapters_in_a_batch"] for h in health) >= 2, health


def test_load_answers_every_request_with_its_own_adapter(server):
    client, out, _ = server
    xs = inputs(20, 1)
    want = expected(out, xs, ADAPTERS)
    clients, per_client = 16, 200

    def run(seed: int) -> list[tuple[float, float, bool]]:
        """(sent, answered, right) per request of one client."""
        rng, done = random.Random(seed), []
        for _ in range(per_client):
            i, adapter = rng.randrange(len(xs)), rng.choice(ADAPTERS)
            sent = time.perf_counter()
            status, body, _ = client.infer(xs[i], adapter)
            answered = time.perf_counter()
            y = np.array(body["outputs"][next(iter(body["outputs"]))], np.float32) if status == 200 else None
            right = y is not None and closest(y, {a: want[(i, a)] for a in ADAPTERS}) == adapter \
                and np.abs(y - want[(i, adapter)]).max() <= 1e-5
            done.append((sent, answered, right))
        return done

    with ThreadPoolExecutor(clients) as pool:
        results = sum(pool.map(run, range(clients)), [])
    times = np.array([(sent, answered) for sent, answered, _ in results])
    latencies, elapsed = (times[:, 1] - times[:, 0]) * 1000, times[:, 1].max() - times[:, 0].min()
    wrong = sum(not right for _, _, right in results)
    print(f"\n[ray serve] {len(results)} requests, {clients} clients, 2 replicas: {wrong} wrong; "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, "
          f"{len(results) / elapsed:.0f} requests/s")
    assert len(results) == clients * per_client and wrong == 0


def test_python_handle_calls_are_batched_and_checked(server):
    _, out, made = server
    handle = serve.get_app_handle("default")
    xs = inputs(6, 3)
    want = expected(out, xs, ADAPTERS)
    jobs = [(i, ADAPTERS[i % 3]) for i in range(len(xs))] * 3
    responses = [handle.run.remote({"x": xs[i]}, adapter) for i, adapter in jobs]
    for (i, adapter), response in zip(jobs, responses):
        y = next(iter(response.result(timeout_s=60).values()))
        assert np.abs(y - want[(i, adapter)]).max() <= 1e-5
        assert np.abs(y - made.peft(xs[i], adapter)).max() <= 1e-5
    with pytest.raises(RuntimeUseError, match="unknown adapter 'nope'"):
        handle.run.remote({"x": xs[0]}, "nope").result(timeout_s=60)
    with pytest.raises(RuntimeUseError, match="axis 2 has size 63"):
        handle.run.remote({"x": xs[0][..., :63]}, None).result(timeout_s=60)


@pytest.mark.parametrize("body, status, reason", [
    ({"adapter": "nope", "inputs": {"x": [[[0.0] * 64]]}}, 404, "unknown adapter 'nope'"),
    ({"adapter": None, "inputs": {"x": [[[0.0] * 63]]}}, 400, "axis 2 has size 63, the model takes 64"),
    ({"adapter": None, "inputs": {"x": [[["a"] * 64]]}}, 400, "inputs.x: 'U' values"),
    ({"adapter": None, "inputs": {"y": [[[0.0] * 64]]}}, 400, "inputs: unknown 'y'"),
    ({"adapter": None, "inputs": {"x": [[[0.0] * 64]] * 17}}, 400, "17 rows, at most 16 per request"),
    ({"adapter": 7, "inputs": {}}, 400, "adapter: expected an adapter name or null"),
    (None, 400, "not JSON"),
])
def test_bad_requests_get_a_4xx_with_the_reason(server, body, status, reason):
    client = server[0]
    got, answer, _ = client.call("POST", "/v1/infer", body, raw=b"{not json" if body is None else None)
    assert got == status and reason in answer["error"] and "\n" not in answer["error"]


def test_bad_adapter_changes_are_refused(server):
    client, _, made = server
    assert client.call("POST", "/v1/adapters", {"name": "style", "path": str(made.work / "peft" / "style")})[0] == 409
    status, body, _ = client.call("POST", "/v1/adapters", {"name": "x", "path": "/no/such/dir"})
    assert status == 400 and "does not exist" in body["error"]
    assert client.call("POST", "/v1/adapters", {"name": "x"})[0] == 400
    assert client.call("DELETE", "/v1/adapters/nope")[0] == 404
    assert all(client.call("GET", "/healthz")[1]["status"] == "ok" for _ in range(4))


def test_hot_add_and_remove_reach_every_replica(server):
    client, out, made = server
    status, body, _ = client.call("POST", "/v1/adapters", {"name": "tenant", "path": str(made.work / "peft" / "tenant")})
    assert status == 201 and "tenant" in body["adapters"]
    xs = inputs(4, 2)
    replicas = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            results = list(pool.map(lambda i: client.infer(xs[i % 4], "tenant"), range(16)))
            for i, (status, body, headers) in enumerate(results):
                assert status == 200, body
                y = np.array(body["outputs"][next(iter(body["outputs"]))], np.float32)
                assert np.abs(y - made.peft(xs[i % 4], "tenant")).max() <= 1e-5
                replicas.add(headers["x-rewrite-replica"])
            if len(replicas) == 2:
                break
    assert len(replicas) == 2  # both replicas served the adapter added through one of them
    assert client.call("DELETE", "/v1/adapters/style")[0] == 200
    refused = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            results = list(pool.map(lambda i: client.infer(xs[0], "style"), range(16)))
            assert {status for status, _, _ in results} == {404}
            refused |= {headers["x-rewrite-replica"] for _, _, headers in results}
            if refused == replicas:
                break
    assert refused == replicas  # both replicas dropped it
    listed = [client.call("GET", "/v1/adapters")[1]["adapters"] for _ in range(6)]
    assert all(names == ["support", "tenant"] for names in listed)


def test_binary_bodies_answer_as_json_does(server):
    client, out, made = server
    xs = inputs(4, 5)
    adapters = [None, "support"]  # loaded whichever tests ran before (the hot-add test removes "style")
    want = expected(out, xs, adapters)
    for i, x in enumerate(xs):
        for adapter in adapters:
            status, raw, headers = client.binary(save({"x": x}), "" if adapter is None else f"?adapter={adapter}")
            assert status == 200 and headers["content-type"] == "application/octet-stream", raw[:200]
            (name, y), = load(raw).items()
            _, body, _ = client.infer(x, adapter)
            assert y.dtype == np.float32 and np.array_equal(y, np.array(body["outputs"][name], np.float32))
            assert np.abs(y - want[(i, adapter)]).max() <= 1e-5
            assert np.abs(y - made.peft(x, adapter)).max() <= 1e-5


@pytest.mark.parametrize("body, query, status, reason", [
    (b"{not safetensors", "", 400, "request: not a safetensors body"),
    (b"", "", 400, "request: an empty body"),
    ("y", "", 400, "inputs: unknown 'y'"),
    ("bool", "", 400, "inputs.x: 'b' values"),
    ("short", "", 400, "axis 2 has size 63, the model takes 64"),
    ("x", "?adapter=nope", 404, "unknown adapter 'nope'"),
    ("x", "?adapter=", 400, "adapter: an empty name"),
])
def test_bad_binary_requests_get_a_4xx_with_the_reason(server, body, query, status, reason):
    client = server[0]
    x = np.zeros((1, 3, 64), np.float32)
    bodies = {"y": save({"y": x}), "bool": save({"x": x > 0}), "short": save({"x": x[..., :63]}), "x": save({"x": x})}
    got, raw, _ = client.binary(bodies.get(body, body), query)
    answer = json.loads(raw)
    assert got == status and reason in answer["error"] and "\n" not in answer["error"]


def test_an_adapter_parameter_on_a_json_body_is_refused(server):
    client = server[0]
    got, answer, _ = client.call("POST", "/v1/infer?adapter=support", {"inputs": {"x": [[[0.0] * 64] * 3]}})
    assert got == 400 and "the query parameter is for application/octet-stream bodies" in answer["error"]
