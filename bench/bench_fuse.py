"""The `fuse` pass: unmerged LoRA latency before vs after fusing siblings, eager torch and ONNX Runtime.

    python bench/bench_fuse.py [--rounds 15] [--block 5] [--batches 1 32] [--threads 1] [--layers 4] [--profile R]

Model: a LLaMA-shaped stack of linears (tests/fuse_models.py): per layer q / k / v / o (d x d), gate / up (d x f),
down (f x d), d = 1024, f = 2816, 4 layers; LoRA r = 16 (alpha 32, random B) on all 7 projections; input
[batch, 1, d] (one decode step per row). Contenders, for each runtime and batch:

  base      no adapters (the captured model; ORT: its merged export)
  unmerged  the adapters as inserted (eager: the rewritten graph; ORT: the per-row bank export, one adapter;
            ORT custom-op: the per-row `rewrite::LoraDelta` export, one op per site)
  fused     the same graph after `fuse` (eager: 4 groups per layer, one A GEMM each; ORT: the bank export of the
            fused graph, one A bank per group; ORT custom-op: one `rewrite::LoraDeltaGroup` call per q/k/v and
            gate/up group, computing x [A_q | A_k | A_v] once per row and adding each B product into its base output)

Adapter milliseconds = contender - base. Timing: blocks of `--block` calls per contender, contenders interleaved
over `--rounds` rounds in a new random order each round; each cell is the median of the block medians. With one
thread (the default) torch and ONNX Runtime both compute in the calling thread, whose CPU time is measured: unlike
wall time it does not count preemption by other load on a shared machine; with more threads, wall time. The
ratio column is (unmerged - base) / (fused - base): how many times fewer adapter milliseconds fuse leaves.

`--profile R`: also R interleaved rounds of ONNX Runtime's profiler (a fresh session each) on the unmerged and fused
exports (bank and custom-op), summing the kernel time of the adapter nodes only (those reading `adapter_ids` or a
`lora.*` bank, up to the Add that joins each delta to its base output, or the custom op that adds it itself). That
figure leaves out the base GEMMs, whose time moves by as much as the adapters cost from one session of the same model
to another (weight placement), so it is the steadier measure.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuse_models import Stack  # noqa: E402
from timing import interleaved  # noqa: E402
from rewrite.export.onnx_merged import export_merged  # noqa: E402
from rewrite.export.onnx_unmerged import export_unmerged  # noqa: E402
from rewrite.passes import REGISTRY  # noqa: E402

from rewrite.capture import capture  # noqa: E402
from rewrite.inputs import ExampleInputs  # noqa: E402
from rewrite.load import LoadedModel  # noqa: E402
from rewrite.options import ExportOptions  # noqa: E402
from rewrite.pass_infra import PassContext  # noqa: E402
from rewrite.runtime import ops  # noqa: E402

D, F, R = 1024, 2816, 16
CONTENDERS = ("base", "unmerged", "fused")
SWITCHING = {"ort": "bank", "ort custom-op": "custom-op"}  # ONNX Runtime rows: the per-row lowering exported
JOINS = ("Add", "LoraDelta", "LoraDeltaGroup")  # nodes that add an adapter's delta into its base output


def run(gm, name: str, **options) -> None:
    REGISTRY[name](REGISTRY[name].Options(**options), PassContext(where=f"bench {name}"))(gm)


def graphs(layers: int) -> dict[str, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Stack(D, F, layers).eval()
    example = ExampleInputs({"x": torch.randn(2, 1, D)}, {"x": ["batch", None, None]})
    base, _ = capture(LoadedModel(model, None, "factory", "fuse_models:Stack", None), example)
    unmerged = copy.deepcopy(base)
    run(unmerged, "insert", adapter="a", targets=["layers.*"], rank=R, alpha=2.0 * R)
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    fused = copy.deepcopy(unmerged)
    run(fused, "fuse")
    return {"base": base, "unmerged": unmerged, "fused": fused}


def session_options(threads: int) -> ort.SessionOptions:
    options = ops.session_options_with_library()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def sessions(gms: dict, threads: int, work: Path) -> dict[tuple[str, str], ort.InferenceSession]:
    """{(runtime, contender): session}; the base is the merged export, shared by both ORT runtimes."""
    out = {}
    for runtime, switching in SWITCHING.items():
        for name, gm in gms.items():
            folder = work / (name if name == "base" else f"{name}_{switching}")
            if not folder.exists():
                folder.mkdir()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if name == "base":
                        export_merged(gm, folder / "model.onnx", ExportOptions(), None)
                    else:
                        export_unmerged(gm, folder, ExportOptions(mode="unmerged", switching=switching))
            out[(runtime, name)] = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads),
                                                        providers=["CPUExecutionProvider"])
    return out


def adapter_nodes(path: Path) -> set[str]:
    """Nodes fed (transitively) by `adapter_ids` or a bank; an Add or a LoraDelta(Group) stops the walk (it joins a
    delta to its base output)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    marked = {"adapter_ids"} | {i.name for i in graph.initializer if i.name.startswith("lora.")}
    nodes = set()
    for node in graph.node:
        if any(i in marked for i in node.input):
            nodes.add(node.name)
            if node.op_type not in JOINS:
                marked.update(node.output)
    return nodes


def profile(work: Path, batches: list[int], rounds: int, threads: int, calls: int = 40) -> dict:
    """Median over rounds of the adapter nodes' summed kernel us per run, and per op type, from ORT's profiler."""
    nodes = {(switching, name): adapter_nodes(work / f"{name}_{switching}" / "model.onnx")
             for switching in SWITCHING.values() for name in CONTENDERS[1:]}
    out = {}
    for batch in batches:
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 1, D), np.float32),
                 "adapter_ids": np.zeros(batch, np.int64)}
        totals, ops = {n: [] for n in nodes}, {n: collections.defaultdict(list) for n in nodes}
        for _ in range(rounds):
            for name in random.sample(list(nodes), len(nodes)):
                switching, contender = name
                options = session_options(threads)
                options.enable_profiling = True
                options.profile_file_prefix = str(work / f"profile_{contender}_{switching}")
                session = ort.InferenceSession(str(work / f"{contender}_{switching}" / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
                for _ in range(calls):
                    session.run(None, feeds)
                trace = session.end_profiling()
                with open(trace) as f:
                    events = json.load(f)
                os.remove(trace)
                per_op = collections.Counter()
                for e in events:
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                            e["name"][:-len("_kernel_time")] in nodes[name]:
                        per_op[e["args"]["op_name"]] += e["dur"] / calls
                totals[name].append(sum(per_op.values()))
                for op in set(per_op) | set(ops[name]):
                    ops[name][op].append(per_op[op])
        for name, names in nodes.items():
            out[(batch, name)] = (len(names), statistics.median(totals[name]),
                                  {op: statistics.median(v) for op, v in ops[name].items()})
    return out


def callers(gms: dict, onnx: dict, batches: list[int]) -> dict[tuple[str, int, str], callable]:
    out = {}
    for batch in batches:
        x = torch.randn(batch, 1, D, generator=torch.Generator().manual_seed(batch))
        feeds = {"x": x.numpy()}
        for name in CONTENDERS:
            out[("eager", batch, name)] = lambda gm=gms[name], x=x: gm(x=x)
            extra = {} if name == "base" else {"adapter_ids": np.zeros(batch, np.int64)}
            for runtime in SWITCHING:
                if name != "base" or runtime == "ort":  # (one base: the merged export)
                    out[(runtime, batch, name)] = lambda s=onnx[(runtime, name)], f={**feeds, **extra}: s.run(None, f)
    return out


def check(gms: dict, onnx: dict) -> float:
    """Max abs difference of fused vs unmerged (eager and both ORT exports) on one batch: the bench times equal
    models."""
    x = torch.randn(3, 1, D)
    with torch.no_grad():
        eager = (gms["fused"](x=x) - gms["unmerged"](x=x)).abs().max().item()
    feeds = {"x": x.numpy(), "adapter_ids": np.zeros(3, np.int64)}
    return max(eager, *(float(np.abs(onnx[(r, "fused")].run(None, feeds)[0] -
                                      onnx[(r, "unmerged")].run(None, feeds)[0]).max()) for r in SWITCHING))


def measure(calls: dict, rounds: int, block: int, clock) -> dict:
    """Median over rounds of each contender's median ms per call within a block."""
    samples = interleaved(calls, rounds, block, clock=clock, within=statistics.median)
    return {key: 1e3 * statistics.median(values) for key, values in samples.items()}


def table(ms: dict, batches: list[int], threads: int, unit: str) -> Table:
    out = Table(title=f"fuse: unmerged LoRA r={R} on 7 projections, d={D}, f={F}, {threads} thread(s); {unit}")
    for column in ("runtime", "batch", "base", "unmerged", "fused", "adapter ms before", "adapter ms after",
                   "fewer adapter ms"):
        out.add_column(column, justify="right")
    for runtime in ("eager", *SWITCHING):
        for batch in batches:
            base = ms[("ort" if runtime in SWITCHING else runtime, batch, "base")]
            before, after = (ms[(runtime, batch, n)] for n in CONTENDERS[1:])
            out.add_row(runtime, str(batch), f"{base:.2f}", f"{before:.2f}", f"{after:.2f}", f"{before - base:.3f}",
                        f"{after - base:.3f}", f"{(before - base) / (after - base):.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--profile", type=int, default=0, metavar="R",
                        help="also R rounds of ORT's profiler: adapter nodes' kernel time, unmerged vs fused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gms = graphs(args.layers)
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        onnx = sessions(gms, args.threads, Path(work))
        print(f"fused vs unmerged max abs diff (eager, ORT): {check(gms, onnx):.2g}")
        # one thread runs in the calling thread (torch and ORT alike): its CPU time ignores preemption by other load
        clock = time.thread_time if args.threads == 1 else time.perf_counter
        ms = measure(callers(gms, onnx, args.batches), args.rounds, args.block, clock)
        profiled = profile(Path(work), args.batches, args.profile, args.threads) if args.profile else {}
    Console().print(table(ms, args.batches, args.threads, "CPU ms of the calling thread" if args.threads == 1 else
                          "wall ms"))
    if profiled:
        out = Table(title=f"ORT profiler, adapter nodes only: kernel us per run, median of {args.profile} rounds")
        for column in ("batch", "export", "adapter nodes", "kernel us", "by op", "fewer adapter us"):
            out.add_column(column, justify="right")
        for batch in args.batches:
            for switching in SWITCHING.values():
                for name in CONTENDERS[1:]:
                    count, total, per_op = profiled[(batch, (switching, name))]
                    by_op = ", ".join(f"{op} {us:.0f}" for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]))
                    ratio = profiled[(batch, (switching, "unmerged"))][1] / total
                    out.add_row(str(batch), f"{switching} {name}", str(count), f"{total:.0f}", by_op, f"{ratio:.2f}x")
        Console().print(out)


if __name__ == "__main__":
    main()
