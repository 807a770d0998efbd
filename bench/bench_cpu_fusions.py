"""ONNX Runtime's skip-LayerNorm fusion on the CPU: the fused kernel vs the Add + LayerNorm pair it replaces.

    python bench/bench_cpu_fusions.py [--rounds 15] [--block 20] [--threads 1]

ONNX Runtime's SkipLayerNormFusion (on at its default optimization level) turns `LayerNormalization(x + skip)` into
`com.microsoft.SkipLayerNormalization` and `SimplifiedLayerNormalization(x + skip)` (RMSNorm) into
`SkipSimplifiedLayerNormalization`. Each row: the fused op vs the same computation as Add + (Simplified)
LayerNormalization, both in sessions with graph optimizations off (so each runs as written), on residual shapes of
an encoder (tokens x hidden) and of decode steps; interleaved blocks, median of the block means. The runtime leaves the
fusion off on the CPU EP (runtime/providers.py: `disabled_optimizers`) because of what this measures; both forms
agree to float32 rounding (checked here, and in tests/test_cpu_fusions.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved  # noqa: E402

SHAPES = [(384, 384), (2048, 384), (32, 1024), (1, 1024), (8, 4096)]  # (rows, hidden)


def model(kind: str, fused: bool, hidden: int) -> bytes:
    simplified = kind == "RMSNorm"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "rows", hidden]) for n in ("x", "skip")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "rows", hidden])
    g = np.random.default_rng(0)
    params = ["gamma"] if simplified else ["gamma", "beta"]
    inits = [onnx.numpy_helper.from_array(g.standard_normal(hidden).astype(np.float32), n) for n in params]
    if fused:
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        nodes = [helper.make_node(op, ["x", "skip", *params], ["y"], domain="com.microsoft", epsilon=1e-6)]
    else:
        op = "SimplifiedLayerNormalization" if simplified else "LayerNormalization"
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node(op, ["sum", *params], ["y"], axis=-1, epsilon=1e-6)]
    graph = helper.make_graph(nodes, "residual_norm", io, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def session(kind: str, fused: bool, hidden: int, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model(kind, fused, hidden), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    console = Console(width=160)
    table = Table(title=f"skip + norm on ONNX Runtime {ort.__version__} CPU, {args.threads} thread(s): us per call, "
                        f"median of {args.rounds} interleaved blocks of {args.block}")
    for col in ("norm", "rows x hidden", "fused op", "Add + norm", "fused / pair", "max abs diff"):
        table.add_column(col, justify="right")
    for kind in ("LayerNorm", "RMSNorm"):
        for rows, hidden in SHAPES:
            g = np.random.default_rng(rows + hidden)
            feeds = {n: g.standard_normal((1, rows, hidden)).astype(np.float32) for n in ("x", "skip")}
            sessions = {fused: session(kind, fused, hidden, args.threads) for fused in (True, False)}
            answers = {fused: s.run(None, feeds)[0] for fused, s in sessions.items()}
            calls = {fused: (lambda s=s: s.run(None, feeds)) for fused, s in sessions.items()}
            us = {k: 1e6 * statistics.median(v) for k, v in interleaved(calls, args.rounds, args.block).items()}
            table.add_row(kind, f"{rows} x {hidden}", f"{us[True]:.0f}", f"{us[False]:.0f}",
                          f"{us[True] / us[False]:.2f}x", f"{np.abs(answers[True] - answers[False]).max():.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
