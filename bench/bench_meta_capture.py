"""Benchmark: capture + LoRA insert on a 7B-shaped LLaMA built on the `meta` device, against PEFT.

Each contender runs in its own fresh subprocess (so RSS high-water marks do not mix), repeats are
interleaved round-robin (so a noisy neighbour hits every contender alike) and medians are reported.

    ours-dynamic   build on meta -> rewrite.capture(dynamic batch/seq, the CaptureOptions default)
                   -> insert pass (rank 16 on every `model.layers.*_proj`) via PassManager
    ours-static    the same with CaptureOptions(dynamic=False)
    peft           build on meta -> peft.get_peft_model(LoraConfig(r=16, 7 proj names))

Goal (issue): <= 5 s end to end (build + capture + insert) and peak RSS <= 1 GiB.
Run:  python bench/bench_meta_capture.py [--repeats 3] [--layers 32] [--only ours-static,peft] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONTENDERS = ("ours-dynamic", "ours-static", "peft")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL_SECONDS = 5.0
GOAL_PEAK_GIB = 1.0


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def worker(name: str, layers: int) -> dict:
    """One contender, once, in this (fresh) process. Returns seconds per phase and memory in GiB."""
    import warnings
    warnings.filterwarnings("ignore")
    out: dict = {"contender": name}
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

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, use_cache=False)
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
        loaded = LoadedModel(model, None, "hf", "llama-7b-meta", cfg)
        options = CaptureOptions(device="meta", dynamic=(name == "ours-dynamic"))
        inputs = example_inputs(model, cfg, options, "<bench>").to("meta")
        gm, report = capture(loaded, inputs, device="meta")
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


def run_child(name: str, layers: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--layers", str(layers)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    ap.add_argument("--json", help="also write the raw per-run results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers)))
        return

    from rich.console import Console
    from rich.table import Table

    chosen = [c for c in args.only.split(",") if c]
    unknown = set(chosen) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; choose from {CONTENDERS}")
    console = Console(width=120)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {c: [] for c in chosen}
    for rep in range(args.repeats):  # round-robin: contenders share the machine's noise
        for name in chosen:
            result = run_child(name, args.layers)
            runs[name].append(result)
            console.print(f"[dim]repeat {rep + 1}/{args.repeats} {name}: total {result['total']:.2f} s, "
                          f"peak {result['peak_gib']:.2f} GiB[/dim]")
    load_after = os.getloadavg()[0]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    first = runs[chosen[0]][0]
    times = Table(title=f"LLaMA-7B shape on meta ({first['params_b']:.2f} B params, {args.layers} layers), "
                        f"LoRA r=16 on all *_proj: seconds, median of {args.repeats}")
    cols = [("import", "import"), ("build", "build"), ("capture", "capture"), ("insert", "insert"),
            ("total", "total"), ("total_with_import", "total+import"), ("process_wall", "process wall")]
    times.add_column("contender")
    for _, label in cols:
        times.add_column(label, justify="right")
    for name in chosen:
        times.add_row(name, *[f"{med(name, k):.2f}" for k, _ in cols])
    console.print(times)

    cpu = Table(title="CPU seconds of the same phases (time.process_time; robust to other load on the machine), "
                      "median")
    cpu.add_column("contender")
    for key, label in cols[:-1]:
        cpu.add_column(label, justify="right")
    for name in chosen:
        cpu.add_row(name, *[f"{med(name, 'cpu_' + k):.2f}" for k, _ in cols[:-1]])
    console.print(cpu)

    memory = Table(title="Memory (GiB, median) and what was built")
    for label in ("contender", "RSS after import", "peak RSS", "LoRA modules", "LoRA params", "graph nodes"):
        memory.add_column(label, justify="right" if label != "contender" else "left")
    for name in chosen:
        r0 = runs[name][0]
        nodes = f"{r0['nodes_captured']} -> {r0['nodes_after_insert']}" if "nodes_captured" in r0 else "-"
        memory.add_row(name, f"{med(name, 'rss_after_import_gib'):.2f}", f"{med(name, 'peak_gib'):.2f}",
                       str(r0["lora_modules"]), f"{r0['lora_params']:,}", nodes)
    console.print(memory)

    goal = Table(title=f"Ratios and goal (total <= {GOAL_SECONDS:g} s, peak <= {GOAL_PEAK_GIB:g} GiB)")
    for label in ("contender", "total / peft", "peak / peft", "total <= 5 s", "CPU total <= 5 s",
                  "+import <= 5 s", "peak <= 1 GiB"):
        goal.add_column(label, justify="right" if label != "contender" else "left")
    for name in chosen:
        ratio_t = f"{med(name, 'total') / med('peft', 'total'):.2f}x" if "peft" in runs else "-"
        ratio_m = f"{med(name, 'peak_gib') / med('peft', 'peak_gib'):.2f}x" if "peft" in runs else "-"
        ok = lambda cond: "[green]yes[/green]" if cond else "[red]no[/red]"  # noqa: E731
        goal.add_row(name, ratio_t, ratio_m, ok(med(name, "total") <= GOAL_SECONDS),
                     ok(med(name, "cpu_total") <= GOAL_SECONDS), ok(med(name, "total_with_import") <= GOAL_SECONDS),
                     ok(med(name, "peak_gib") <= GOAL_PEAK_GIB))
    console.print(goal)
    for name in chosen:
        spread = [round(r["total"], 2) for r in runs[name]]
        console.print(f"{name}: totals per repeat {spread}; all params on meta: "
                      f"{all(r['on_meta'] for r in runs[name])}; LoRA params {runs[name][0]['lora_params']:,}")
    console.print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before / {load_after:.2f} after")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=2)


if __name__ == "__main__":
    main()
