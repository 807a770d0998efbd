"""Benchmark: capture + LoRA insert on 7B- and 70B-shaped LLaMAs built on the `meta` device: the full export
against the stamped capture (two blocks exported, the rest stamped: `rewrite.stamp`), and PEFT on request.

Each contender runs in its own fresh subprocess (so RSS high-water marks do not mix), repeats are
interleaved round-robin (so a noisy neighbour hits every contender alike) and medians are reported.

    full       build on meta -> rewrite.capture(stamp=False), static shapes (the meta default)
               -> insert pass (rank 16 on every `model.layers.*_proj`) via PassManager
    stamped    the same with stamp=True (the CaptureOptions default)
    dynamic    stamp=True with dynamic batch/seq
    peft       build on meta -> peft.get_peft_model(LoraConfig(r=16, 7 proj names))

Shapes: 7b (hidden 4096, ffn 11008, 32 layers, 32 heads), 70b (hidden 8192, ffn 28672, 80 layers, GQA 64/8).
Goal (issue 14): 7B <= 2 s and 70B <= 5 s end to end (build + capture + insert), peak RSS <= 2 GiB.
Run:  python bench/bench_meta_capture.py [--repeats 3] [--shapes 7b,70b] [--only full,stamped] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONTENDERS = ("full", "stamped", "dynamic", "peft")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
GOAL_SECONDS = {"7b": 2.0, "70b": 5.0}
GOAL_PEAK_GIB = 2.0


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def worker(name: str, shape: str) -> dict:
    """One contender, once, in this (fresh) process. Returns seconds per phase and memory in GiB."""
    import warnings
    warnings.filterwarnings("ignore")
    out: dict = {"contender": name, "shape": shape}
    t0, c0 = time.perf_counter(), time.process_time()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM  # forces transformers' lazy modeling import
    if name == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from rewrite.capture import capture
        from rewrite.inputs import example_inputs
        from rewrite.load import LoadedModel
        from rewrite.pass_infra import PassManager, ScheduledPass
        from rewrite.passes import REGISTRY
        from rewrite.options import CaptureOptions
    t1, c1 = time.perf_counter(), time.process_time()
    out["import"], out["cpu_import"] = t1 - t0, c1 - c0
    out["rss_after_import_gib"] = _rss_gib()

    cfg = LlamaConfig(**SHAPES[shape], vocab_size=32000, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).eval()
    t2, c2 = time.perf_counter(), time.process_time()
    out["build"], out["cpu_build"] = t2 - t1, c2 - c1
    out["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9

    if name == "peft":
        lcfg = LoraConfig(r=16, lora_alpha=16, target_modules=PROJ)
        peft_model = get_peft_model(model, lcfg)
        t4, c4 = time.perf_counter(), time.process_time()
        out["capture"], out["cpu_capture"] = 0.0, 0.0
        out["insert"], out["cpu_insert"] = t4 - t2, c4 - c2
        out["lora_modules"] = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
        out["lora_params"] = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        out["on_meta"] = all(p.device.type == "meta" for p in peft_model.parameters())
    else:
        loaded = LoadedModel(model, None, "hf", f"llama-{shape}-meta", cfg)
        options = CaptureOptions(device="meta", dynamic=(name == "dynamic"), stamp=(name != "full"))
        inputs = example_inputs(model, cfg, options, "<bench>").to("meta")
        gm, report = capture(loaded, inputs, device="meta", stamp=options.stamp)
        out["stamped"] = report.stamped
        t3, c3 = time.perf_counter(), time.process_time()
        out["capture"], out["cpu_capture"] = t3 - t2, c3 - c2
        out["nodes_captured"] = report.nodes
        out["sites"] = report.sites
        insert = REGISTRY["insert"](REGISTRY["insert"].Options(targets=[r"re:model\.layers\..*_proj"], rank=16,
                                                               alpha=16))
        gm = PassManager([ScheduledPass(insert, "pass[0] 'insert'")]).run(gm, copy_model=False)
        t4, c4 = time.perf_counter(), time.process_time()
        out["insert"], out["cpu_insert"] = t4 - t3, c4 - c3
        stats = gm.meta["rewrite"].history[-1].stats
        out["lora_modules"] = stats["adapters"]
        out["lora_params"] = stats["params_added"]
        out["nodes_after_insert"] = len(gm.graph.nodes)
        out["on_meta"] = all(p.device.type == "meta" for p in gm.parameters())
    out["total"] = out["build"] + out["capture"] + out["insert"]
    out["total_with_import"] = out["total"] + out["import"]
    out["cpu_total"] = out["cpu_build"] + out["cpu_capture"] + out["cpu_insert"]
    out["cpu_total_with_import"] = out["cpu_total"] + out["cpu_import"]
    out["peak_gib"] = _peak_gib()
    return out


def run_child(name: str, shape: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--shape", shape],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} {shape} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="7b,70b", help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--only", default="full,stamped", help="comma-separated subset of " + ", ".join(CONTENDERS))
    ap.add_argument("--json", help="also write the raw per-run results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape)))
        return

    from rich.console import Console
    from rich.table import Table

    chosen = [c for c in args.only.split(",") if c]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = (set(chosen) - set(CONTENDERS)) | (set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown contender(s) or shape(s) {sorted(unknown)}; choose from {CONTENDERS}, {tuple(SHAPES)}")
    console = Console(width=140)
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, str], list[dict]] = {(s, c): [] for s in shapes for c in chosen}
    for rep in range(args.repeats):  # round-robin: contenders share the machine's noise
        for key in runs:
            result = run_child(key[1], key[0])
            runs[key].append(result)
            console.print(f"[dim]repeat {rep + 1}/{args.repeats} {key[0]} {key[1]}: total {result['total']:.2f} s, "
                          f"peak {result['peak_gib']:.2f} GiB[/dim]")
    load_after = os.getloadavg()[0]

    def med(key: tuple[str, str], field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    cols = [("import", "import"), ("build", "build"), ("capture", "capture"), ("insert", "insert"),
            ("total", "total"), ("cpu_total", "CPU total"), ("peak_gib", "peak GiB")]
    phases = Table(title=f"LLaMA shapes on meta, LoRA r=16 on all *_proj: seconds and peak RSS, median of "
                         f"{args.repeats}")
    for label in ("shape", "contender", "params", *(c[1] for c in cols), "nodes", "LoRA modules"):
        phases.add_column(label, justify="left" if label in ("shape", "contender") else "right")
    for (shape, name), rs in runs.items():
        r0 = rs[0]
        nodes = f"{r0['nodes_captured']} -> {r0['nodes_after_insert']}" if "nodes_captured" in r0 else "-"
        phases.add_row(shape, name, f"{r0['params_b']:.1f} B", *[f"{med((shape, name), k):.2f}" for k, _ in cols],
                       nodes, str(r0["lora_modules"]))
    console.print(phases)

    if "full" in chosen and "stamped" in chosen:
        side = Table(title=f"Old path (full export) vs new (stamped), side by side; goal: total <= "
                           f"{', '.join(f'{v:g} s ({k})' for k, v in GOAL_SECONDS.items())}, peak <= "
                           f"{GOAL_PEAK_GIB:g} GiB")
        for label in ("shape", "full s", "stamped s", "speed-up", "full peak GiB", "stamped peak GiB",
                      "same sites and params", "goal met"):
            side.add_column(label, justify="left" if label == "shape" else "right")
        for shape in shapes:
            full, new = (shape, "full"), (shape, "stamped")
            same = all(runs[full][0][k] == runs[new][0][k] for k in ("sites", "lora_modules", "lora_params"))
            ok = med(new, "total") <= GOAL_SECONDS[shape] and med(new, "peak_gib") <= GOAL_PEAK_GIB
            side.add_row(shape, f"{med(full, 'total'):.2f}", f"{med(new, 'total'):.2f}",
                         f"{med(full, 'total') / med(new, 'total'):.1f}x", f"{med(full, 'peak_gib'):.2f}",
                         f"{med(new, 'peak_gib'):.2f}", "yes" if same else "[red]no[/red]",
                         "[green]yes[/green]" if ok else "[red]no[/red]")
        console.print(side)
    for (shape, name), rs in runs.items():
        stamped = {r.get("stamped") for r in rs}
        console.print(f"{shape} {name}: totals per repeat {[round(r['total'], 2) for r in rs]}; all params on "
                      f"meta: {all(r['on_meta'] for r in rs)}; stamped: {stamped}")
    console.print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before / {load_after:.2f} after")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({f"{s} {c}": r for (s, c), r in runs.items()}, fh, indent=2)


if __name__ == "__main__":
    main()
