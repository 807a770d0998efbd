"""What a LoRA branch of rank r costs at one site: parameters, FLOPs, bytes moved, measured latency.

One allocation unit is one adapted module (adapters are keyed by the weight's owner; a module called k
times shares one adapter, so its parameters count once and its FLOPs / bytes / latency k times).
With fan-in n (linear, Conv1D: d_in; conv2d: c_in kh kw; embedding: the vocabulary V), d_out outputs,
t tokens per call (rows; conv2d: output positions) and e bytes per element (METHODS.md §2.6):

    metric      c(r), c(0) = 0                                   unit
    params      r (n + d_out)                                    trainable parameters
    flops       2 r (n + d_out) per token, x calls               FLOPs per token (embedding: 2 r d_out, the
                                                                  A lookup is a gather)
    bytes       e [r (n + d_out) + 2 t r + 2 t d_out], x calls   bytes per forward, unmerged: the weights, the
                                                                  [t, r] intermediate written and read, and the
                                                                  extra read + write of the output for the add
    latency     measured ONNX Runtime ms per forward, x calls    ms (LatencyTable, below)

`params` and `flops` are linear in r (greedy is exact or near-exact on them, see rewrite.solver);
`bytes` and `latency` have a fixed part at r >= 1 (dropping a site saves more than one rank's worth)
and `latency` has steps at kernel tile sizes: the solver handles such non-linear costs.

Latency is measured once per (backend, tokens, fan-in, d_out, rank bucket) on a tiny ONNX graph
`Y + X @ A @ B` (embedding: `Y + Gather(A, ids) @ B`) minus the same graph without the branch, and cached
as JSON under `cache_dir` (default `$REWRITE_CACHE_DIR/latency` or `~/.cache/rewrite/latency`). Ranks
between measured buckets (1, 2, 4, 8, ... and r_max) are interpolated linearly; the curve is made
non-decreasing.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("params", "flops", "bytes", "latency")
UNITS = {"params": "parameters", "flops": "FLOPs/token", "bytes": "bytes/forward", "latency": "ms/forward"}


@dataclass(frozen=True)
class SiteShape:
    """The shape facts the cost model needs about one adapted module."""
    name: str
    op: str          # linear | conv1d | conv2d | embedding
    fan_in: int      # n: d_in, c_in*kh*kw, or V
    d_out: int
    calls: int = 1   # how many call sites share this adapter

    @property
    def max_rank(self) -> int:
        return min(self.fan_in, self.d_out)


def site_shape(site: Any, calls: int = 1, kernel: tuple[int, int] = (1, 1)) -> SiteShape:
    """From a `rewrite.sites.Site` (conv2d: pass the kernel size)."""
    fan_in = site.d_in * kernel[0] * kernel[1] if site.op == "conv2d" else site.d_in
    return SiteShape(site.owner, site.op, fan_in, site.d_out, calls)


def params(shape: SiteShape, r: int) -> int:
    return r * (shape.fan_in + shape.d_out)


def flops(shape: SiteShape, r: int) -> int:
    per_token = 2 * r * shape.d_out if shape.op == "embedding" else 2 * r * (shape.fan_in + shape.d_out)
    return per_token * shape.calls


def bytes_moved(shape: SiteShape, r: int, tokens: int, element_bytes: int = 4) -> int:
    if r == 0:
        return 0
    per_call = r * (shape.fan_in + shape.d_out) + 2 * tokens * r + 2 * tokens * shape.d_out
    return per_call * element_bytes * shape.calls


class CostModel:
    """c(r) for one metric, plus the full breakdown for reports."""

    def __init__(self, metric: str = "params", *, tokens: int = 128, element_bytes: int = 4,
                 latency: "LatencyTable | None" = None):
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r} (expected one of {', '.join(METRICS)})")
        if metric == "latency" and latency is None:
            raise ValueError("metric 'latency' needs a LatencyTable")
        self.metric, self.tokens, self.element_bytes, self.latency = metric, tokens, element_bytes, latency

    @property
    def unit(self) -> str:
        return UNITS[self.metric]

    def curve(self, shape: SiteShape, ranks: Iterable[int]) -> list[float]:
        ranks = list(ranks)
        if self.metric == "latency":
            return self.latency.curve(shape, ranks, self.tokens)
        return [float(self._analytic(shape, r)) for r in ranks]

    def cost(self, shape: SiteShape, r: int) -> float:
        return self.curve(shape, [r])[0]

    def _analytic(self, shape: SiteShape, r: int) -> int:
        if self.metric == "params":
            return params(shape, r)
        if self.metric == "flops":
            return flops(shape, r)
        return bytes_moved(shape, r, self.tokens, self.element_bytes)

    def breakdown(self, shape: SiteShape, r: int) -> dict[str, Any]:
        out: dict[str, Any] = dict(params=params(shape, r), flops=flops(shape, r),
                                   bytes=bytes_moved(shape, r, self.tokens, self.element_bytes))
        if self.latency is not None:
            out["latency_ms"] = self.latency.curve(shape, [r], self.tokens)[0]
        return out


# ---------------------------------------------------------------------------------------------- latency


def default_cache_dir() -> Path:
    root = os.environ.get("REWRITE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "rewrite") / "latency"


def rank_buckets(r_max: int) -> list[int]:
    """1, 2, 4, 8, ... below r_max, and r_max itself."""
    out, r = [], 1
    while r < r_max:
        out.append(r)
        r *= 2
    return out + [r_max] if r_max >= 1 else []


class LatencyTable:
    """Measured ms of one adapter branch per (shape, rank bucket), cached on disk.

    `measure` can be replaced (tests, other backends): measure(kind, fan_in, d_out, rank, tokens) -> ms,
    where kind is "matmul" or "gather".
    """

    def __init__(self, cache_dir: str | Path | None = None, *, backend: str = "onnxruntime-cpu", threads: int = 1,
                 repeats: int = 30, measure: Callable[[str, int, int, int, int], float] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.backend, self.threads, self.repeats = backend, threads, repeats
        self._measure = measure or self._measure_ort
        self._table: dict[str, float] | None = None
        self.measured = 0  # measurements taken by this object (cache misses)

    @property
    def path(self) -> Path:
        version = _ort_version() if self._measure == self._measure_ort else "custom"
        return self.cache_dir / f"{self.backend}-ort{version}-t{self.threads}.json"

    def _load(self) -> dict[str, float]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".latency.", dir=self.cache_dir)
            with os.fdopen(fd, "w") as handle:
                json.dump(self._table, handle, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs re-measuring

    def point(self, kind: str, fan_in: int, d_out: int, rank: int, tokens: int) -> float:
        if rank == 0:
            return 0.0
        key = f"{kind}|t{tokens}|{fan_in}x{d_out}|r{rank}"
        table = self._load()
        if key not in table:
            table[key] = max(0.0, float(self._measure(kind, fan_in, d_out, rank, tokens)))
            self.measured += 1
            self._save()
        return table[key]

    def curve(self, shape: SiteShape, ranks: list[int], tokens: int) -> list[float]:
        """ms per forward at each rank: measured at the buckets, interpolated, non-decreasing, x calls."""
        if not ranks:
            return []
        kind = "gather" if shape.op == "embedding" else "matmul"
        top = max(ranks)
        buckets = rank_buckets(top)
        ms = [self.point(kind, shape.fan_in, shape.d_out, r, tokens) for r in buckets]
        ms = list(np.maximum.accumulate(ms))
        out = []
        for r in ranks:
            if r == 0:
                out.append(0.0)
                continue
            value = float(np.interp(r, buckets, ms))
            out.append(value * shape.calls)
        return out

    def _measure_ort(self, kind: str, fan_in: int, d_out: int, rank: int, tokens: int) -> float:
        with_branch = _ort_time(kind, fan_in, d_out, rank, tokens, self.threads, self.repeats)
        without = _ort_time(kind, fan_in, d_out, 0, tokens, self.threads, self.repeats)
        return max(0.0, with_branch - without)


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:  # pragma: no cover
        return "none"


def _branch_model(kind: str, fan_in: int, d_out: int, rank: int, tokens: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [tokens, d_out])]
    if kind == "gather":
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [tokens]))
    else:
        inputs.append(helper.make_tensor_value_info("X", TensorProto.FLOAT, [tokens, fan_in]))
    output = helper.make_tensor_value_info("Z", TensorProto.FLOAT, [tokens, d_out])
    if rank == 0:  # the baseline: the same feeds, no branch
        nodes = [helper.make_node("Identity", ["Y"], ["Z"])]
        inits = []
    else:
        a = numpy_helper.from_array(rng.standard_normal((fan_in, rank)).astype(np.float32), "A")
        b = numpy_helper.from_array(rng.standard_normal((rank, d_out)).astype(np.float32), "B")
        first = (helper.make_node("Gather", ["A", "ids"], ["H"]) if kind == "gather"
                 else helper.make_node("MatMul", ["X", "A"], ["H"]))
        nodes = [first, helper.make_node("MatMul", ["H", "B"], ["D"]), helper.make_node("Add", ["Y", "D"], ["Z"])]
        inits = [a, b]
    graph = helper.make_graph(nodes, "lora_branch", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort_time(kind: str, fan_in: int, d_out: int, rank: int, tokens: int, threads: int, repeats: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = _branch_model(kind, fan_in, d_out, rank, tokens)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"Y": rng.standard_normal((tokens, d_out)).astype(np.float32)}
    if kind == "gather":
        feeds["ids"] = rng.integers(0, fan_in, size=tokens).astype(np.int64)
    else:
        feeds["X"] = rng.standard_normal((tokens, fan_in)).astype(np.float32)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def uniform_cost(model: CostModel, shapes: Iterable[SiteShape], rank: int | dict[str, int]) -> float:
    """The cost of the uniform-rank baseline (or of given per-site ranks), capped at each site's max rank."""
    total = 0.0
    for shape in shapes:
        r = rank[shape.name] if isinstance(rank, dict) else rank
        total += model.cost(shape, min(r, shape.max_rank))
    return total


__all__ = ["METRICS", "UNITS", "CostModel", "LatencyTable", "SiteShape", "bytes_moved", "default_cache_dir", "flops",
           "params", "rank_buckets", "site_shape", "uniform_cost"]
