"""Benchmark: streaming merge of a LoRA into a sharded safetensors checkpoint, vs `dd` and vs PEFT.

    setup  a LLaMA-shaped checkpoint of random bf16 weights (names and shapes from a meta `LlamaForCausalLM`) in
           --shard-gib shards + index + config.json, and a PEFT LoRA directory (r = --rank on all 7 *_proj of every
           layer, random A and B), both written by the bench under --dir
    dd     `dd if=SHARD of=COPY bs=16M conv=fsync` for every shard: the disk's read + write bandwidth on the same
           bytes, 2 x bytes / seconds
    ours   fresh subprocess: `merge_checkpoint(model, adapter, out)`, then fsync of every output file
    peft   fresh subprocess: `LlamaForCausalLM.from_pretrained(dtype=bf16)` + `PeftModel.from_pretrained` +
           `merge_and_unload()` + `save_pretrained(max_shard_size=shard)`, then fsync of every output file

Before every run the checkpoint is evicted from the page cache (fsync + posix_fadvise DONTNEED) and the last
output removed, so all three read cold and count their writes reaching the disk. Times exclude imports; peak RSS
is the child's VmHWM (the interpreter and torch included: the `after import` column is VmRSS then). Runs are
interleaved round-robin; medians of --repeats. Ratios: ours' bytes per second / dd's (goal >= 0.7; also as the
median of per-repeat ratios, steadier on a shared machine), PEFT time / ours, peak RSS / largest shard (goal
<= 2). Correctness on the last outputs, for the first and last layer's merged tensors and an
untouched one: ours equals W + s (B A) computed in fp32 and rounded to bf16 once (max abs diff 0); PEFT adds its
update already rounded to bf16 (two roundings), so it may differ from ours by one bf16 ulp here and there.
Shapes: small (default; hidden 1024, intermediate 2816, 16 layers, vocab 32000: 0.54 GB in 5 shards of 128 MiB,
about 2-3 min on 2 cores) | 3b (open_llama_3b: hidden 3200, intermediate 8640, 26 layers, vocab 32000: 6.9 GB).
Run:  python bench/bench_streaming_merge.py [--shape 3b --shard-gib 1] [--repeats 3] [--rank 16] [--dir /tmp]
      [--skip-peft]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
          "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32)}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
GOAL_VS_DD, GOAL_RSS = 0.7, 2.0
GIB = 1 << 30


def status_bytes(field: str) -> int:
    """VmHWM (peak RSS) or VmRSS of this process from /proc: ru_maxrss would also count the parent's RSS, which
    Linux carries into a child across fork + exec."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def evict(directory: Path) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------ setup

def write_checkpoint(directory: Path, shape: str, shard_bytes: int) -> tuple[int, int]:
    """Random bf16 weights of a LLaMA of `shape` in shards of at most `shard_bytes`; returns (bytes, shards)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(vocab_size=32000, **SHAPES[shape], use_cache=False, dtype="bfloat16")
    with torch.device("meta"):
        names = {name: tuple(t.shape) for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for name, dims in names.items():
        nbytes = 2 * int(torch.Size(dims).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.ones(names[name], dtype=torch.bfloat16) if "norm" in name
                   else torch.empty(names[name], dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
                   for name in group}
        save_file(tensors, directory / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    return total, len(groups)


def write_adapter(directory: Path, shape: str, rank: int) -> int:
    """A PEFT LoRA directory on every *_proj; returns its parameter count."""
    import numpy as np

    from rewrite.formats.peft_dir import write_peft_dir
    from rewrite.formats.peft_lora import LoraSettings, lora_config

    dims = SHAPES[shape]
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    sizes = {"mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    rng = np.random.default_rng(1)
    modules, settings = {}, {}
    for layer in range(dims["num_hidden_layers"]):
        for proj in PROJ:
            d_in, d_out = sizes.get(proj, (hidden, hidden))
            name = f"model.layers.{layer}.{proj}"
            modules[name] = {"lora_A.weight": rng.normal(0, 0.02, (rank, d_in)).astype(np.float32),
                             "lora_B.weight": rng.normal(0, 0.02, (d_out, rank)).astype(np.float32)}
            settings[name] = LoraSettings("linear", rank, 2.0 * rank, False, 0.0)
    write_peft_dir(directory, lora_config(settings), modules)
    return sum(a.size for parts in modules.values() for a in parts.values())


# ------------------------------------------------------------------------------------------ contenders

def child(kind: str, model: Path, adapter: Path, out: Path, shard_bytes: int) -> None:
    """Runs in a fresh interpreter: one contender, its result as a JSON line on stdout."""
    if kind == "ours":
        from rewrite.streaming_merge import merge_checkpoint

        imported = status_bytes("VmRSS")
        start = time.perf_counter()
        merge_checkpoint(model, adapter, out)
    else:
        import torch
        import transformers
        from peft import PeftModel

        imported = status_bytes("VmRSS")
        start = time.perf_counter()
        base = transformers.LlamaForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out, max_shard_size=shard_bytes)
    call = time.perf_counter() - start
    fsync_tree(out)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, call=call, peak=status_bytes("VmHWM"), imported=imported)))


def run_child(kind: str, model: Path, adapter: Path, out: Path, shard_bytes: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--model", str(model), "--adapter", str(adapter),
               "--out", str(out), "--shard-bytes", str(shard_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY":
                                                                         "error", "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_dd(model: Path, out: Path) -> dict:
    out.mkdir()
    start = time.perf_counter()
    for shard in sorted(model.glob("*.safetensors")):
        subprocess.run(["dd", f"if={shard}", f"of={out / shard.name}", "bs=16M", "conv=fsync", "status=none"],
                       check=True)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, call=seconds, peak=0, imported=0)


# ------------------------------------------------------------------------------------------ correctness

def tensor(directory: Path, key: str):
    from safetensors import safe_open

    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(directory / weight_map[key], framework="pt") as handle:
        return handle.get_tensor(key)


def correctness(model: Path, adapter: Path, outs: dict[str, Path], layers: int) -> list[tuple[str, str, float, float]]:
    """(tensor, contender, max abs diff vs W + s (B A) in fp32 rounded once, share of elements that differ)."""
    import torch

    from rewrite.formats.peft_lora import read_lora_dir, scale_of

    lora = read_lora_dir(adapter)
    rows = []
    for module in (f"model.layers.0.{PROJ[0]}", f"model.layers.{layers - 1}.{PROJ[-1]}", "model.norm"):
        key = f"{module}.weight"
        want = tensor(model, key).float()
        if module in lora.modules:
            a, b = (torch.from_numpy(lora.modules[module][k]) for k in ("lora_A.weight", "lora_B.weight"))
            want += (b @ a) * scale_of(lora, module)
        want = want.bfloat16()
        for name, out in outs.items():
            got = tensor(out, key)
            rows.append((key, name, float((got.float() - want.float()).abs().max()),
                         float((got != want).float().mean())))
    return rows


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--shard-gib", type=float, default=0.125, help="shard size in GiB (default 0.125 = 128 MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.adapter, args.out, args.shard_bytes)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    shard_bytes = int(args.shard_gib * GIB)
    Path(args.dir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_streaming_merge.", dir=args.dir))
    try:
        model, adapter = root / "model", root / "adapter"
        model.mkdir()
        start = time.perf_counter()
        total, shards = write_checkpoint(model, args.shape, shard_bytes)
        params = write_adapter(adapter, args.shape, args.rank)
        largest = max(p.stat().st_size for p in model.glob("*.safetensors"))
        console.print(f"[dim]{args.shape}: {total / 1e9:.2f} GB bf16 in {shards} shards (largest {largest / GIB:.3f} "
                      f"GiB), LoRA r={args.rank} with {params:,} parameters; written in "
                      f"{time.perf_counter() - start:.0f} s under {root}[/dim]")
        kinds = ["dd", "ours"] + ([] if args.skip_peft else ["peft"])
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        load_before = os.getloadavg()[0]
        for rep in range(args.repeats):
            for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
                out = root / f"out_{kind}"
                shutil.rmtree(out, ignore_errors=True)
                evict(model)
                runs[kind].append(run_dd(model, out) if kind == "dd" else
                                  run_child(kind, model, adapter, out, shard_bytes))
            console.print(f"[dim]repeat {rep + 1}/{args.repeats}: "
                          + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()) + "[/dim]")
        load_after = os.getloadavg()[0]
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "call", "peak", "imported")}
               for k, v in runs.items()}

        table = Table(title=f"Streaming merge, {args.shape} ({total / 1e9:.2f} GB bf16, {shards} shards of "
                            f"{args.shard_gib:g} GiB): median of {args.repeats}")
        for label in ("contender", "s (with fsync)", "s (call)", "read+write MB/s", "peak RSS GiB",
                      "RSS after import GiB", "peak / shard", "(peak - import) / shard"):
            table.add_column(label, justify="left" if label == "contender" else "right")
        for kind, m in med.items():
            rss = [f"{m['peak'] / GIB:.2f}", f"{m['imported'] / GIB:.2f}", f"{m['peak'] / largest:.2f}",
                   f"{(m['peak'] - m['imported']) / largest:.2f}"] if kind != "dd" else ["-"] * 4
            table.add_row(kind, f"{m['seconds']:.2f}", f"{m['call']:.2f}", f"{2 * total / m['seconds'] / 1e6:.0f}",
                          *rss)
        console.print(table)

        ok = lambda cond: "[green]yes[/green]" if cond else "[red]no[/red]"  # noqa: E731
        ratios = Table(title="Ratios and goals")
        for label in ("ratio", "value", "goal", "met"):
            ratios.add_column(label, justify="left" if label == "ratio" else "right")
        vs_dd = med["dd"]["seconds"] / med["ours"]["seconds"]
        rss = med["ours"]["peak"] / largest
        paired = statistics.median(d["seconds"] / o["seconds"] for d, o in zip(runs["dd"], runs["ours"]))
        ratios.add_row("ours throughput / dd read+write bandwidth", f"{vs_dd:.2f}x", f">= {GOAL_VS_DD:g}x",
                       ok(vs_dd >= GOAL_VS_DD))
        ratios.add_row("the same, median of per-repeat ratios", f"{paired:.2f}x", f">= {GOAL_VS_DD:g}x",
                       ok(paired >= GOAL_VS_DD))
        ratios.add_row("ours peak RSS / largest shard", f"{rss:.2f}x", f"<= {GOAL_RSS:g}x", ok(rss <= GOAL_RSS))
        if "peft" in med:
            ratios.add_row("PEFT time / ours", f"{med['peft']['seconds'] / med['ours']['seconds']:.2f}x", "-", "-")
            ratios.add_row("ours peak RSS / PEFT peak RSS", f"{med['ours']['peak'] / med['peft']['peak']:.2f}x",
                           "-", "-")
        console.print(ratios)

        checks = Table(title="Correctness (last outputs) vs W + s (B A) in fp32, rounded to bf16 once")
        for label in ("tensor", "contender", "max abs diff", "elements that differ"):
            checks.add_column(label, justify="left" if label in ("tensor", "contender") else "right")
        outs = {k: root / f"out_{k}" for k in kinds if k != "dd"}
        for key, name, diff, share in correctness(model, adapter, outs, SHAPES[args.shape]["num_hidden_layers"]):
            checks.add_row(key, name, f"{diff:.3g}", f"{share:.2%}")
        console.print(checks)
        console.print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before / {load_after:.2f} "
                      "after; per repeat (s): " + "; ".join(f"{k} {[round(r['seconds'], 2) for r in v]}"
                                                            for k, v in runs.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
