"""Benchmark: merge rank-16 LoRA into 16 x Linear(4096, 4096) fp32, ours vs PEFT vs a bare in-place loop.

    ours       capture (export front-end) -> insert pass (r=16 on all 16 Linears) -> random lora_B;
               each repeat: deepcopy of that GraphModule (untimed), then time MergePass(MergePass.Options())(gm)
               (the pass body plus GraphPass.__call__'s lint + recompile)
    peft       each repeat: deepcopy of the base model + get_peft_model + copy of the same A/B (untimed),
               then time peft_model.merge_and_unload()
    bare       each repeat: clone of the base weights (untimed), then time
               `for W, A, B in ...: W.addmm_(B, A, alpha=s)` with PEFT-layout tensors B [out, r], A [r, in]
    bare-ours  the same loop over our stored tensors (W.addmm_(lora_B.T, lora_A.T)): the floor for our layout

Repeats are interleaved round-robin (the order rotates every repeat) so a noisy neighbour hits every
contender alike; medians are reported.
Correctness: merged weights of ours and PEFT vs the bare loop (max abs diff, must be <= 1e-5), and the
merged graph's output vs the unmerged graph's output.
Goal (issue): ours >= 4x faster than PEFT and within 1.2x of the bare loop.
Run:  python bench/bench_merge.py [--repeats 8] [--layers 16] [--dim 4096] [--rank 16]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import warnings

import torch
from torch import nn

from rewrite.capture import capture
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.passes import InsertPass, MergePass

GOAL_VS_PEFT = 4.0
GOAL_VS_BARE = 1.2


class Stack(nn.Module):
    """16 Linear(d, d) in a row; forward takes `x` (nn.Sequential's argument is called `input`)."""

    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    base = Stack(args.layers, args.dim).eval()
    pristine = [layer.weight.detach().clone() for layer in base.layers]
    x = torch.randn(2, args.dim)

    # --- ours: capture + insert once; lora_B random so the merge changes W
    gm, report = capture(LoadedModel(base, None, "factory", "bench-stack", None),
                         ExampleInputs({"x": x}, {"x": [None, None]}))
    result = InsertPass(InsertPass.Options(targets=["layers.*"], rank=args.rank, alpha=float(args.rank)))(gm)
    sites = [s for s in gm.meta["rewrite"].sites.values()]
    adapters = [gm.get_submodule(f"adapters.{s.owner}.default") for s in sites]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapters:
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.02)
    scaling = adapters[0].scaling
    peft_a = [m.lora_A.detach().T.contiguous() for m in adapters]  # [r, in]
    peft_b = [m.lora_B.detach().T.contiguous() for m in adapters]  # [out, r]
    with torch.no_grad():
        unmerged_out = gm(x=x)
    console.print(f"[dim]captured {report.nodes} nodes, {report.sites} sites in {report.seconds:.2f} s; "
                  f"inserted {result.stats['sites']} LoRA (r={args.rank}, scaling {scaling:g})[/dim]")

    def base_copy_without_aliasing() -> Stack:
        # capture's GraphModule shares parameters with `base`; the merges below only touch copies
        model = copy.deepcopy(base)
        with torch.no_grad():
            for layer, w in zip(model.layers, pristine):
                layer.weight.copy_(w)
        return model

    times: dict[str, list[float]] = {"ours": [], "peft": [], "bare": [], "bare-ours": []}
    merged: dict[str, list[torch.Tensor]] = {}
    info: dict = {}

    def run_ours(last: bool) -> float:
        g = copy.deepcopy(gm)  # untimed: a fresh, unmerged copy
        seconds = timed(lambda: MergePass(MergePass.Options())(g))
        if last:
            merged["ours"] = [g.get_parameter(s.weight).detach().clone() for s in sites]
            with torch.no_grad():
                info["merged_out"] = g(x=x)
            info["live"] = sum(1 for n in g.graph.nodes
                               if n.op == "call_module" and str(n.target).startswith("adapters."))
        return seconds

    def run_peft(last: bool) -> float:
        model = base_copy_without_aliasing()  # untimed: fresh PEFT model holding the same A and B
        pm = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                              target_modules=[f"layers.{i}" for i in range(args.layers)]))
        with torch.no_grad():
            for i, layer in enumerate(pm.base_model.model.layers):
                layer.lora_A["default"].weight.copy_(peft_a[i])
                layer.lora_B["default"].weight.copy_(peft_b[i])
        holder = {}
        seconds = timed(lambda: holder.setdefault("m", pm.merge_and_unload()))
        if last:
            merged["peft"] = [layer.weight.detach().clone() for layer in holder["m"].layers]
        return seconds

    def run_bare(last: bool) -> float:
        ws = [w.clone() for w in pristine]  # PEFT layout: contiguous B [out, r], A [r, in]

        def loop():
            with torch.no_grad():
                for w, a, b in zip(ws, peft_a, peft_b):
                    w.addmm_(b, a, alpha=scaling)
        seconds = timed(loop)
        merged["bare"] = ws
        return seconds

    def run_bare_ours(last: bool) -> float:
        ws = [w.clone() for w in pristine]  # our stored tensors, as transposed views

        def loop():
            with torch.no_grad():
                for w, m in zip(ws, adapters):
                    w.addmm_(m.lora_B.T, m.lora_A.T, alpha=scaling)
        seconds = timed(loop)
        merged["bare-ours"] = ws
        return seconds

    runners = [("ours", run_ours), ("peft", run_peft), ("bare", run_bare), ("bare-ours", run_bare_ours)]
    for rep in range(args.repeats):
        # round-robin, and the order rotates every repeat so no contender always runs first
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for name, run in order:
            times[name].append(run(rep == args.repeats - 1))
            gc.collect()
        console.print(f"[dim]repeat {rep + 1}/{args.repeats}: "
                      + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()) + "[/dim]")
    merged_out, live = info["merged_out"], info["live"]
    load_after = os.getloadavg()[0]
    base_untouched = all(torch.equal(layer.weight, w) for layer, w in zip(base.layers, pristine))

    med = {k: statistics.median(v) for k, v in times.items()}
    table = Table(title=f"Merge LoRA r={args.rank} into {args.layers} x Linear({args.dim}, {args.dim}) fp32: "
                        f"seconds, median of {args.repeats}")
    for label in ("contender", "median s", "min s", "max s", "vs bare", "what is timed"):
        table.add_column(label, justify="left" if label in ("contender", "what is timed") else "right")
    what = {"ours": "MergePass(...)(gm): fold + unwire + lint + recompile",
            "peft": "peft_model.merge_and_unload()",
            "bare": "W.addmm_(B, A, alpha=s), PEFT layout",
            "bare-ours": "W.addmm_(lora_B.T, lora_A.T, alpha=s), our tensors"}
    for k, v in times.items():
        table.add_row(k, f"{med[k]:.3f}", f"{min(v):.3f}", f"{max(v):.3f}", f"{med[k] / med['bare']:.2f}x", what[k])
    console.print(table)

    ref = merged["bare"]
    diff = {k: max(float((a - b).abs().max()) for a, b in zip(merged[k], ref)) for k in ("ours", "peft", "bare-ours")}
    out_diff = float((merged_out - unmerged_out).abs().max())
    ratios = Table(title=f"Ratios and goal (>= {GOAL_VS_PEFT:g}x faster than PEFT, <= {GOAL_VS_BARE:g}x bare)")
    for label in ("ratio", "value", "goal", "met"):
        ratios.add_column(label, justify="left" if label == "ratio" else "right")
    ok = lambda cond: "[green]yes[/green]" if cond else "[red]no[/red]"  # noqa: E731
    peft_over_ours = med["peft"] / med["ours"]
    ours_over_bare = med["ours"] / med["bare"]
    ours_over_best_bare = med["ours"] / min(med["bare"], med["bare-ours"])
    ratios.add_row("PEFT / ours", f"{peft_over_ours:.2f}x", f">= {GOAL_VS_PEFT:g}x", ok(peft_over_ours >= GOAL_VS_PEFT))
    ratios.add_row("ours / bare (PEFT layout)", f"{ours_over_bare:.2f}x", f"<= {GOAL_VS_BARE:g}x",
                   ok(ours_over_bare <= GOAL_VS_BARE))
    ratios.add_row("ours / best bare loop", f"{ours_over_best_bare:.2f}x", f"<= {GOAL_VS_BARE:g}x",
                   ok(ours_over_best_bare <= GOAL_VS_BARE))
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    ratios.add_row("PEFT / ours, median of per-repeat ratios", f"{paired('peft', 'ours'):.2f}x",
                   f">= {GOAL_VS_PEFT:g}x", ok(paired("peft", "ours") >= GOAL_VS_PEFT))
    ratios.add_row("ours / bare, median of per-repeat ratios", f"{paired('ours', 'bare'):.2f}x",
                   f"<= {GOAL_VS_BARE:g}x", ok(paired("ours", "bare") <= GOAL_VS_BARE))
    ratios.add_row("bare-ours / bare (same GEMM twice: the noise floor)", f"{paired('bare-ours', 'bare'):.2f}x",
                   "~1x", "-")
    console.print(ratios)

    checks = Table(title="Correctness")
    for label in ("check", "max abs diff", "ok (<= 1e-5)"):
        checks.add_column(label, justify="left" if label == "check" else "right")
    checks.add_row("ours merged W vs bare loop", f"{diff['ours']:.3g}", ok(diff["ours"] <= 1e-5))
    checks.add_row("PEFT merged W vs bare loop", f"{diff['peft']:.3g}", ok(diff["peft"] <= 1e-5))
    checks.add_row("bare-ours W vs bare loop", f"{diff['bare-ours']:.3g}", ok(diff["bare-ours"] <= 1e-5))
    checks.add_row("merged graph output vs unmerged graph output", f"{out_diff:.3g}", ok(out_diff <= 1e-5))
    console.print(checks)
    console.print(f"adapter calls left in the merged graph: {live}; user's base model untouched: {base_untouched}")
    console.print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                  f"load average {load_before:.2f} before / {load_after:.2f} after")


if __name__ == "__main__":
    main()
