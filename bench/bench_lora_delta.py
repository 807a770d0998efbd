"""Per-row adapters on ONNX Runtime CPU: base Gemm vs one-hot bank (standard ops) vs Gemm + rewrite::LoraDelta.

    python bench/bench_lora_delta.py [--rounds 6] [--block 40] [--batches 32 1] [--threads 1 2] [--json out.json]

Model: 4 x Linear(d, d) (Gemm with bias, no activation), d = 1024; LoRA rank 16 on every layer, K = 8 adapters,
per-row adapter ids. Variants (all exported with torch.onnx.export(dynamo=True), ONNX.md §5 and §10):

  base          4 x Gemm, no adapters (the reference latency)
  one-hot       Gemm + MatMul(x, A_cat) * mask(ids) -> MatMul(., B_cat), standard ops only (ONNX.md §5)
  LoraDelta     Gemm -> rewrite::LoraDelta(x, A_bank, B_bank, ids, base) (this repo's custom op, the add fused in;
                ORT runs it in place on the Gemm's output) -- what `switching = "custom-op"` exports
  LoraDelta f16 the same with float16 banks (`bank_dtype = "float16"`: half the adapter bytes per call)
  delta+Add     Gemm + rewrite::LoraDelta(x, A_bank, B_bank, ids) + Add (the op's delta-only form, for comparison)

ids: "mixed" = row i uses adapter i % 8 (all 8 adapters in a batch of 32), "same" = every row adapter 3,
"none" = every row -1 (custom ops only). Timing: per-call wall time of `InferenceSession.run` from Python; blocks of
`--block` consecutive calls per variant, variants interleaved over `--rounds` rounds (a new random order each
round), median of all calls. The
table prints the wall-time median, its ratio to base of the same batch/threads and its interquartile range, and
the paired ratio: the median over rounds of (this variant's block median / base's block median in the same round),
which cancels the slow drifts of a shared machine; for 1-thread sessions (which ORT runs in the calling thread)
also the median CPU time of the calling thread per call and its ratio: unlike wall time it does not count time the
thread spent preempted on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from rewrite.export import lora_delta_op
from rewrite.runtime import ops

D, R, K, LAYERS = 1024, 16, 8, 4


class Base(nn.Module):
    def __init__(self, d: int = D, layers: int = LAYERS):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        for lin in self.lins:
            with torch.no_grad():
                lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
                lin.bias.copy_(torch.randn(d, generator=g) * 0.01)

    def forward(self, x, ids):
        for lin in self.lins:
            x = lin(x)
        return x


def _banks(d: int, layers: int, k: int, r: int):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(k, d, r, generator=g) / d**0.5, torch.randn(k, r, d, generator=g) * (2.0 / r) / r**0.5)
        for _ in range(layers)
    ]


class OneHot(Base):
    """Standard ops only: adapters side by side, a mask keeps the row's own rank slots (ONNX.md §5)."""

    def __init__(self, d: int = D, layers: int = LAYERS, k: int = K, r: int = R):
        super().__init__(d, layers)
        self.k, self.r = k, r
        for i, (a, b) in enumerate(_banks(d, layers, k, r)):
            self.register_buffer(f"a_cat{i}", a.permute(1, 0, 2).reshape(d, k * r).contiguous())  # [d, K*r]
            self.register_buffer(f"b_cat{i}", b.reshape(k * r, d).contiguous())  # [K*r, d]

    def forward(self, x, ids):
        mask = (ids[:, None] == torch.arange(self.k)).to(x.dtype)[:, :, None]  # [B, K, 1]; -1 matches nothing
        for i, lin in enumerate(self.lins):
            t = (x @ getattr(self, f"a_cat{i}")).reshape(-1, self.k, self.r) * mask
            x = lin(x) + t.reshape(-1, self.k * self.r) @ getattr(self, f"b_cat{i}")
        return x


class Custom(Base):
    """Gemm -> rewrite::LoraDelta(..., base) (fused), or Gemm + rewrite::LoraDelta (delta only) + Add."""

    def __init__(self, d: int = D, layers: int = LAYERS, k: int = K, r: int = R, fused: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__(d, layers)
        self.fused = fused
        for i, (a, b) in enumerate(_banks(d, layers, k, r)):
            self.register_buffer(f"a_bank{i}", a.to(dtype))
            self.register_buffer(f"b_bank{i}", b.to(dtype))

    def forward(self, x, ids):
        for i, lin in enumerate(self.lins):
            a, b = getattr(self, f"a_bank{i}"), getattr(self, f"b_bank{i}")
            if self.fused:
                x = torch.ops.rewrite.lora_delta(x, a, b, ids, lin(x))
            else:
                x = lin(x) + torch.ops.rewrite.lora_delta(x, a, b, ids)
        return x


def export(model: nn.Module, path: Path, table: dict | None) -> Path:
    x = torch.randn(4, D)
    ids = torch.tensor([0, 1, -1, 2])
    dyn = {"x": {0: torch.export.Dim("batch")}, "ids": {0: torch.export.Dim("batch")}}
    prog = torch.onnx.export(
        model.eval(), (x, ids), dynamo=True, dynamic_shapes=dyn, custom_translation_table=table, verbose=False
    )
    prog.save(str(path))
    return path


def session(path: Path, threads: int, custom: bool) -> ort.InferenceSession:
    so = ops.session_options_with_library() if custom else ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ids_for(kind: str, batch: int) -> np.ndarray:
    if kind == "mixed":
        return (np.arange(batch) % K).astype(np.int64)
    if kind == "same":
        return np.full(batch, 3, np.int64)
    return np.full(batch, -1, np.int64)


def _reference(x: np.ndarray, ids: np.ndarray, lins, banks) -> np.ndarray:
    """Independent per-row float64 reference: x <- x W^T + b + x A[k] B[k] (no delta where k < 0)."""
    h = x.astype(np.float64)
    for lin, (a, b) in zip(lins, banks):
        w, bias = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
        a64, b64 = a.double().numpy(), b.double().numpy()
        out = h @ w.T + bias
        for row, k in enumerate(ids):
            if k >= 0:
                out[row] += h[row] @ a64[k] @ b64[k]
        h = out
    return h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_delta_"))
    t0 = time.perf_counter()
    table = lora_delta_op.onnx_translation_table()
    paths = {
        "base": export(Base(), tmp / "base.onnx", None),
        "one-hot": export(OneHot(), tmp / "onehot.onnx", None),
        "LoraDelta": export(Custom(), tmp / "custom.onnx", table),
        "LoraDelta f16": export(Custom(dtype=torch.float16), tmp / "custom_f16.onnx", table),
        "delta+Add": export(Custom(fused=False), tmp / "delta_add.onnx", table),
    }
    custom = {"LoraDelta", "LoraDelta f16", "delta+Add"}
    lib = ops.library_path()
    export_s = time.perf_counter() - t0
    nodes = [n.op_type for n in onnx.load(str(paths["LoraDelta"]), load_external_data=False).graph.node]
    assert nodes.count("LoraDelta") == LAYERS, nodes

    # Numerics once: every variant against an independent torch reference (per row: x @ A[k] @ B[k]).
    check = {}
    xs = np.random.default_rng(0).standard_normal((32, D)).astype(np.float32)
    lins, banks = Base().lins, _banks(D, LAYERS, K, R)
    half = [(a.half().float(), b.half().float()) for a, b in banks]
    for kind in ("mixed", "same", "none"):
        ids = ids_for(kind, 32)
        ref = _reference(xs, ids, lins, banks)
        for name in ("one-hot", "LoraDelta", "LoraDelta f16", "delta+Add"):
            got = session(paths[name], 1, name in custom).run(None, {"x": xs, "ids": ids})[0]
            want = _reference(xs, ids, lins, half) if name == "LoraDelta f16" else ref  # its own rounded banks
            check[f"{name}/{kind}"] = float(np.abs(got - want).max())

    variants = [("base", "mixed"), ("one-hot", "mixed"), ("one-hot", "same"),
                ("LoraDelta", "mixed"), ("LoraDelta", "same"), ("LoraDelta", "none"),
                ("LoraDelta f16", "mixed"), ("LoraDelta f16", "same"),
                ("delta+Add", "mixed"), ("delta+Add", "same"), ("delta+Add", "none")]
    results = []
    rng = np.random.default_rng(1)
    shuffle = random.Random(0).shuffle
    for threads in args.threads:
        sessions = {name: session(p, threads, name in custom) for name, p in paths.items()}
        for batch in args.batches:
            x = rng.standard_normal((batch, D)).astype(np.float32)
            feeds = {v: {"x": x, "ids": ids_for(v[1], batch)} for v in variants}
            times: dict[tuple, list[float]] = {v: [] for v in variants}
            cpu: dict[tuple, list[float]] = {v: [] for v in variants}
            rounds: dict[tuple, list[float]] = {v: [] for v in variants}  # block medians, one per round
            for v in variants:  # warm-up
                for _ in range(5):
                    sessions[v[0]].run(None, feeds[v])
            order = list(variants)
            for _ in range(args.rounds):
                shuffle(order)  # a new order each round: no variant always follows the same neighbour
                for v in order:
                    s, f = sessions[v[0]], feeds[v]
                    block = []
                    for _ in range(args.block):
                        c = time.thread_time()
                        t = time.perf_counter()
                        s.run(None, f)
                        block.append(time.perf_counter() - t)
                        cpu[v].append(time.thread_time() - c)
                    times[v] += block
                    rounds[v].append(statistics.median(block))
            base_med = statistics.median(times[("base", "mixed")])
            base_cpu = statistics.median(cpu[("base", "mixed")])
            for v in variants:
                ts = sorted(times[v])
                med = statistics.median(ts)
                q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
                row = {
                    "threads": threads, "batch": batch, "variant": v[0], "ids": "-" if v[0] == "base" else v[1],
                    "median_us": med * 1e6, "ratio": med / base_med, "iqr_us": (q3 - q1) * 1e6, "calls": len(ts),
                    "paired": statistics.median(a / b for a, b in zip(rounds[v], rounds[("base", "mixed")])),
                }
                if threads == 1:  # ORT runs a 1-thread session in the calling thread: its CPU time is the work
                    cmed = statistics.median(cpu[v])
                    row.update(cpu_us=cmed * 1e6, cpu_ratio=cmed / base_cpu)
                results.append(row)

    _print(results, check, export_s, lib)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "max_abs_err": check}, indent=1))
    return 0


def _print(results: list[dict], check: dict, export_s: float, lib: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(120, Console().width))
    tab = Table(title=f"4 x Linear {D}, rank {R}, K = {K} adapters, ONNX Runtime {ort.__version__} CPU EP")
    for col in ("threads", "batch", "variant", "ids", "wall µs", "× base", "paired", "IQR µs", "CPU µs",
                "CPU × base"):
        tab.add_column(col, justify="right" if col not in ("variant", "ids") else "left")
    last = None
    for r in results:
        if last is not None and (r["threads"], r["batch"]) != last:
            tab.add_section()
        last = (r["threads"], r["batch"])
        ratio, paired = f"{r['ratio']:.2f}", f"{r['paired']:.2f}"
        cpu_ratio = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
        if r["variant"].startswith("LoraDelta") and r["ids"] == "mixed":
            ratio = f"[bold {'green' if r['ratio'] <= 1.10 else 'red'}]{ratio}[/]"
            paired = f"[bold {'green' if r['paired'] <= 1.10 else 'red'}]{paired}[/]"
            if "cpu_ratio" in r:
                cpu_ratio = f"[bold {'green' if r['cpu_ratio'] <= 1.10 else 'red'}]{cpu_ratio}[/]"
        tab.add_row(str(r["threads"]), str(r["batch"]), r["variant"], r["ids"], f"{r['median_us']:.0f}", ratio,
                    paired, f"{r['iqr_us']:.0f}", f"{r['cpu_us']:.0f}" if "cpu_us" in r else "-", cpu_ratio)
    con.print(tab)
    con.print("max |ORT - torch reference| at batch 32: " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()))
    con.print(f"CPU kernel build: {os.environ.get('REWRITE_LORA_ISA') or 'auto'} "
              f"(REWRITE_LORA_THREADS={os.environ.get('REWRITE_LORA_THREADS', 'unset')}); library {lib.name}; "
              f"exports {export_s:.1f} s; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.exit(main())
