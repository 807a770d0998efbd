"""Every adapter kind side by side: eager forward overhead vs PEFT, ONNX Runtime merged vs unmerged, merge time.

One run, three tables (issue 10, "Benchmarks"), one row per kind of `rewrite.adapters.KINDS`:

  1. Eager forward. A LLaMA-shaped decoder built from a `transformers.LlamaConfig` (GQA, random seeded weights),
     captured once (`rewrite.capture.capture`, static shapes); per kind, a copy of the capture gets the adapter
     through the `insert` pass on q/k/v/o and the MLP projections (ln_tuning: the RMSNorms; bottleneck: series
     adapters after o_proj and down_proj; (IA)^3: `ia3` scales the attention outputs, `ia3_ff` the MLP inputs),
     then every adapter parameter is perturbed (an adapter at the identity proves nothing). PEFT gets the very
     same adapter through our `save` pass and `PeftModel.from_pretrained` on a copy of the same HF model
     (svd_lora: PEFT's AdaLoRA with our P, lam, Q copied in; bottleneck: PEFT has no such tuner, no PEFT column).
     Contenders, in interleaved blocks (random order per round): the captured base graph, the HF base model,
     ours (the captured graph with the adapter), PEFT. Ratios are medians over rounds of per-round (paired)
     ratios: ours / graph base, PEFT / HF base (each adapter's overhead over its own base model) and ours / PEFT
     (absolute). `|ours - PEFT|` is the max abs diff of the logits, `|ours - base|` how far the adapter moves them.
  2. ONNX Runtime (CPU EP). A stack of 4 x (LayerNorm(d) -> Linear(d, d)), batch B (dynamic batch axis),
     adapters on every Linear (ln_tuning: every LayerNorm). Base: the stack without adapters, exported once.
     merged: `MergePass` + `export_merged` (bottleneck cannot be folded: exported with the adapter inline, as
     `[export] mode = "merged"` does). Unmerged: `export_unmerged` in each switching mode (ort-adapters, bank,
     custom-op) served by `AdapterSession` with the adapter active for the whole batch; a mode the kind cannot be
     lowered to prints "refused" (the reason is printed below the table). Paired medians as above; every ORT
     output is checked against the torch graph (`max |ORT - torch|`).
  3. Merge time, on the model of table 1. Ours: `MergePass()(gm)` on a fresh deepcopy (untimed) of the adapted
     capture: fold + unwire + lint + recompile. PEFT: `merge_and_unload()` on a fresh deepcopy (untimed) of the
     PEFT model. Interleaved repeats, medians; `|merged ours - merged PEFT|` compares the merged logits.

Nothing asserts on wall time. Sizes: by default (about 3-4 minutes on 2 cores) a 2-layer LLaMA of hidden 256
(MLP 768, 4 heads / 2 KV heads, vocab 2048, 2 x 32 tokens); `--full` the issue's 4-layer LLaMA of hidden 1024 (MLP
2816, 16 / 4 heads, vocab 8192, 2 x 64 tokens; 15+ minutes: PEFT's HRA alone takes seconds per forward there). The
ORT stack is the issue's 4 x d=1024 at batch 32 in both: its timing costs ~1-3 s per kind, the exports (independent of
d) are most of that table's time. Threads: torch and ONNX Runtime both use `--threads` (default 1).
Usage: python bench/bench_kinds.py [--full] [--threads 1] [--rounds N] [--merge-repeats N] [--kinds lora,dora]
       [--skip-ort]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewrite.adapters import KINDS
from rewrite.capture import capture, flat_outputs
from rewrite.errors import RewriteError
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs, example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions, ExportOptions
from rewrite.pass_infra import PassContext
from rewrite.passes import REGISTRY, MergePass
from rewrite.state import state_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

SIZES = {
    "default": dict(layers=2, hidden=256, inter=768, heads=4, kv_heads=2, vocab=2048, batch=2, seq=32,
                    ort_dim=1024, ort_batch=32, rounds=15, block=2, merge_repeats=3, ort_rounds=25, ort_block=4),
    "full": dict(layers=4, hidden=1024, inter=2816, heads=16, kv_heads=4, vocab=8192, batch=2, seq=64,
                 ort_dim=1024, ort_batch=32, rounds=9, block=1, merge_repeats=3, ort_rounds=25, ort_block=4),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
MODES = ["ort-adapters", "bank", "custom-op"]
PERTURB = 0.2  # adapter parameters += PERTURB * N(0, 1), seeded


@dataclass
class Setup:
    """How one kind is inserted: one `insert` per entry of `inserts` (targets + settings), and PEFT's counterpart:
    "save" (our save pass, `PeftModel.from_pretrained`), "adalora" (PEFT AdaLoRA, tensors copied) or None."""

    inserts: list[dict]
    peft: str | None = "save"
    ort_targets: str = "*.proj"
    note: str = ""


def setups(rank: int) -> dict[str, Setup]:
    both = ATTN + MLP
    low = dict(rank=rank, alpha=2.0 * rank)
    return {
        "lora": Setup([dict(targets=both, **low)]),
        "svd_lora": Setup([dict(targets=both, **low)], peft="adalora", note="PEFT: AdaLoRA"),
        "ia3": Setup([dict(targets=ATTN)], note="outputs of q/k/v/o"),
        "ia3_ff": Setup([dict(targets=MLP)], note="inputs of the MLP"),
        "fourierft": Setup([dict(targets=both)], note="n_frequency 1000"),
        "road": Setup([dict(targets=both)], note="road_1, group 64"),
        "dora": Setup([dict(targets=both, **low)]),
        "oft": Setup([dict(targets=both)], note="block 32, Cayley-Neumann"),
        "boft": Setup([dict(targets=both)], note="block 4, 1 butterfly"),
        "loha": Setup([dict(targets=both, rank=rank // 2, alpha=float(rank))], note=f"r {rank // 2}"),
        "lokr": Setup([dict(targets=both, rank=rank // 2, alpha=float(rank))], note=f"r {rank // 2}"),
        "vera": Setup([dict(targets=both, rank=4 * rank)], note=f"r {4 * rank}, one shared pair"),
        "hra": Setup([dict(targets=both, rank=8)], note="r 8"),
        "bitfit": Setup([dict(targets=both)], note="PEFT: BEFT"),
        "ln_tuning": Setup([dict(targets=["input_layernorm", "post_attention_layernorm"])], ort_targets="*.norm",
                           note="the RMSNorms"),
        "bottleneck": Setup([dict(targets=["o_proj", "down_proj"])], peft=None, note="series, factor 16"),
    }


def run_pass(gm, name: str, out: Path | None = None, **options):
    cls = REGISTRY[name]
    context = PassContext(spec_dir=Path(out or "."), output_dir=out, where="bench")
    return cls(cls.Options(**options), context)(gm)


def perturb(gm: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("adapters."):
                param.add_(PERTURB * torch.randn(param.shape, generator=generator))


def adapted(base_gm, kind: str, setup: Setup, ort: bool = False):
    gm = copy.deepcopy(base_gm)
    for entry in setup.inserts:
        entry = dict(entry)
        if ort:
            entry["targets"] = [setup.ort_targets]
        run_pass(gm, "insert", kind=kind, **entry)
    perturb(gm)
    return gm


def first(out) -> torch.Tensor:
    return flat_outputs(out)[0] if not isinstance(out, torch.Tensor) else out


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((first(a).double() - first(b).double()).abs().max())


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


# ---------------------------------------------------------------------------------------------------- PEFT side

def peft_model(kind: str, setup: Setup, gm, hf: nn.Module, tmp: Path):
    import peft

    if setup.peft == "save":
        out = tmp / f"peft-{kind}"
        out.mkdir()
        run_pass(gm, "save", out, path="adapter")
        return peft.PeftModel.from_pretrained(copy.deepcopy(hf), out / "adapter").eval()
    if setup.peft == "adalora":
        entry = setup.inserts[0]
        config = peft.AdaLoraConfig(init_r=entry["rank"], target_r=entry["rank"], lora_alpha=entry["alpha"],
                                    target_modules=entry["targets"], lora_dropout=0.0, total_step=1000)
        model = peft.get_peft_model(copy.deepcopy(hf), config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
                module = adapters_at(gm, owner).get("default")
                if module is not None:
                    for suffix, tensor in module.peft_state().items():
                        params[f"base_model.model.{owner}.{suffix}.default"].copy_(tensor)
        return model.eval()
    return None


# ---------------------------------------------------------------------------------------------------- tables 1, 3

def llama(size: dict):
    import transformers

    config = transformers.LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["inter"],
                                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                                      num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"],
                                      max_position_embeddings=max(128, size["seq"]), use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = example_inputs(model, config, CaptureOptions(batch=size["batch"], seq=size["seq"], dynamic=False),
                            "bench")
    gm, report = capture(LoadedModel(model, None, "hf", "llama-bench", config), inputs)
    return model, gm, inputs.kwargs, report


def eager_and_merge(kinds: list[str], size: dict, args, tmp: Path, console) -> tuple[list, list]:
    hf, base_gm, kwargs, report = llama(size)
    console.print(f"[dim]LLaMA {size['layers']} layers, hidden {size['hidden']}, MLP {size['inter']}, "
                  f"{size['heads']}/{size['kv_heads']} heads, vocab {size['vocab']}, input {size['batch']} x "
                  f"{size['seq']}: captured {report.nodes} nodes, {report.sites} sites in {report.seconds:.1f} s"
                  "[/dim]")
    rank = 16
    all_setups = setups(rank)
    eager_rows, merge_rows = [], []
    for kind in kinds:
        setup = all_setups[kind]
        start = time.perf_counter()
        gm = adapted(base_gm, kind, setup)
        theirs = peft_model(kind, setup, gm, hf, tmp)
        with torch.no_grad():
            ours_out = gm(**kwargs)
            d = diff(ours_out, theirs(**kwargs)) if theirs is not None else None
            moved = diff(ours_out, base_gm(**kwargs))
            calls = {"graph": lambda: base_gm(**kwargs), "hf": lambda: hf(**kwargs),
                     "ours": lambda g=gm: g(**kwargs)}
            if theirs is not None:
                calls["peft"] = lambda p=theirs: p(**kwargs)
            samples = interleaved(calls, args.rounds or size["rounds"], size["block"], warmup=2)
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        row = dict(kind=kind, note=setup.note, graph=med["graph"], hf=med["hf"], ours=med["ours"],
                   ours_base=paired(samples, "ours", "graph"), diff=d, moved=moved)
        if theirs is not None:
            row.update(peft=med["peft"], peft_base=paired(samples, "peft", "hf"),
                       ours_peft=paired(samples, "ours", "peft"))
        eager_rows.append(row)

        merge_rows.append(merge_times(kind, gm, theirs, kwargs, args.merge_repeats or size["merge_repeats"]))
        console.print(f"[dim]{kind}: eager + merge in {time.perf_counter() - start:.1f} s[/dim]")
        gc.collect()
    return eager_rows, merge_rows


def merge_times(kind: str, gm, theirs, kwargs, repeats: int) -> dict:
    times: dict[str, list[float]] = {"ours": [], "peft": [], "recompile": []}
    outputs = {}
    if not KINDS[kind].mergeable:
        try:
            MergePass()(copy.deepcopy(gm))
        except RewriteError as err:
            return dict(kind=kind, refused=str(err).splitlines()[0])
        return dict(kind=kind, refused="(mergeable = False, yet merge did not refuse)")

    def ours():
        g = copy.deepcopy(gm)
        gc.collect()
        start = time.perf_counter()
        MergePass()(g)
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()  # what the pass's own lint + recompile cost, timed again on the merged graph
        g.graph.lint()
        g.recompile()
        times["recompile"].append(time.perf_counter() - start)
        outputs["ours"] = g

    def peft():
        model = copy.deepcopy(theirs)
        gc.collect()
        start = time.perf_counter()
        try:
            merged = model.merge_and_unload()
        except ValueError as err:  # PEFT's BEFT on a layer without a bias
            outputs["peft_refused"] = str(err).splitlines()[0]
            return
        times["peft"].append(time.perf_counter() - start)
        outputs["peft"] = merged

    runners = [ours] + ([peft] if theirs is not None else [])
    for rep in range(repeats):
        for fn in runners[rep % len(runners):] + runners[:rep % len(runners)]:
            fn()
    row = dict(kind=kind, ours=statistics.median(times["ours"]) * 1e3, recompile=statistics.median(times["recompile"]) * 1e3)
    with torch.no_grad():
        merged_out = outputs["ours"](**kwargs)
        row["exact"] = diff(merged_out, gm(**kwargs))
        live = sum(1 for n in outputs["ours"].graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters."))
        row["live"] = live
        if "peft_refused" in outputs:
            row["peft_refused"] = outputs["peft_refused"]
        elif theirs is not None:
            row["peft"] = statistics.median(times["peft"]) * 1e3
            row["ratio"] = statistics.median(p / o for p, o in zip(times["peft"], times["ours"]))
            row["vs_peft"] = diff(merged_out, outputs["peft"](**kwargs))
    return row


# ---------------------------------------------------------------------------------------------------- table 2

class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Stack(nn.Module):
    def __init__(self, dim: int, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def custom_op_available() -> str | None:
    try:
        from rewrite.runtime.ops import library_path

        library_path()
        return None
    except Exception as err:  # noqa: BLE001 - reported in the table instead
        return f"custom-op library unavailable: {err}"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    from rewrite.runtime.providers import disabled_optimizers

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],  # as AdapterSession's
                                disabled_optimizers=disabled_optimizers(["CPUExecutionProvider"]))


def ort_table(kinds: list[str], size: dict, args, tmp: Path, console) -> tuple[list, dict[str, str]]:
    from rewrite.runtime.session import AdapterSession

    dim, batch = size["ort_dim"], size["ort_batch"]
    torch.manual_seed(0)
    stack = Stack(dim).eval()
    x = torch.randn(batch, dim)
    base_gm, _ = capture(LoadedModel(stack, None, "factory", "stack", None),
                         ExampleInputs({"x": x}, {"x": ["batch", None]}))
    feeds = {"x": x.numpy()}
    export_merged(base_gm, tmp / "base.onnx", ExportOptions())
    base = ort_session(tmp / "base.onnx", args.threads)
    no_custom = custom_op_available()
    all_setups = setups(16)
    rows, reasons = [], {}
    for kind in kinds:
        start = time.perf_counter()
        setup = all_setups[kind]
        gm = adapted(base_gm, kind, setup, ort=True)
        with torch.no_grad():
            want = gm(x=x)
        work = tmp / f"ort-{kind}"
        work.mkdir()
        merged_gm = copy.deepcopy(gm)
        inline = not KINDS[kind].mergeable
        if not inline:
            MergePass()(merged_gm)
        export_merged(merged_gm, work / "merged.onnx", ExportOptions())
        merged = ort_session(work / "merged.onnx", args.threads)
        calls = {"base": lambda: base.run(None, feeds), "merged": lambda s=merged: s.run(None, feeds)}
        checks = {"merged": diff(torch.from_numpy(merged.run(None, feeds)[0]), want)}
        sessions = []
        cells = {}
        for mode in MODES:
            if mode == "custom-op" and no_custom:
                cells[mode] = "n/a"
                continue
            out = work / mode
            out.mkdir()
            try:
                entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=mode))
            except RewriteError as err:
                cells[mode] = "refused"
                reasons.setdefault(kind, str(err).splitlines()[0])
                continue
            write_manifest(out / MANIFEST, build_manifest(gm, source="stack", exports=[entry]))
            session = AdapterSession(out, intra_op_threads=args.threads)
            sessions.append(session)
            calls[mode] = lambda s=session: s.run(feeds, adapter="default")
            checks[mode] = diff(torch.from_numpy(np.asarray(session.run(feeds, adapter="default")[0])), want)
        samples = interleaved(calls, args.rounds or size["ort_rounds"], size["ort_block"], warmup=2)
        row = dict(kind=kind, base=statistics.median(samples["base"]) * 1e6,
                   merged=paired(samples, "merged", "base"), inline=inline, check=max(checks.values()))
        for mode in MODES:
            row[mode] = paired(samples, mode, "merged") if mode in samples else cells[mode]
        rows.append(row)
        for session in sessions:
            session.close()
        console.print(f"[dim]{kind}: ORT exports + timing in {time.perf_counter() - start:.1f} s[/dim]")
    if no_custom:
        reasons["custom-op n/a"] = no_custom.splitlines()[0]
    return rows, reasons


# ---------------------------------------------------------------------------------------------------- output

def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown(eager_rows: list, ort_rows: list, merge_rows: list) -> str:
    """One row per kind: the paired ratios of the three tables (what bench/README.md shows)."""
    ort = {r["kind"]: r for r in ort_rows}
    merge = {r["kind"]: r for r in merge_rows}
    lines = ["| kind | eager ours / base | PEFT / base | **ours / PEFT** | ORT merged / base | ort-adapters | bank | "
             "custom-op | merge ours ms | PEFT ms | **PEFT / ours** |", "|---" * 11 + "|"]
    for r in eager_rows:
        o, m = ort.get(r["kind"], {}), merge[r["kind"]]
        merged = "-" if not o else f"{o['merged']:.2f}" + (" inline" if o["inline"] else "")
        peft_ms = "refused" if "peft_refused" in m else fmt(m.get("peft"), ".1f")
        lines.append("| " + " | ".join([
            r["kind"], fmt(r["ours_base"]), fmt(r.get("peft_base")), fmt(r.get("ours_peft")), merged,
            *[fmt(o.get(mode)) for mode in MODES],
            "refused" if "refused" in m else fmt(m["ours"], ".1f"), peft_ms, fmt(m.get("ratio"))]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's sizes (4 layers, hidden 1024; ORT d=1024 b32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default: 7, --full 9)")
    ap.add_argument("--merge-repeats", type=int, default=None)
    ap.add_argument("--kinds", default=",".join(setups(16)), help="comma-separated kinds (default: every site kind)")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="also print one combined markdown table (for README)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("peft").setLevel(logging.ERROR)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    kinds = [k for k in args.kinds.split(",") if k]
    benched = setups(16)
    unknown = [k for k in kinds if k not in benched]
    if unknown:
        sys.exit(f"kinds {unknown} have no setup here (prompt and prefix tuning change the sequence, not a site); "
                 f"benched: {', '.join(benched)}")
    size = SIZES["full" if args.full else "default"]
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    load_before = os.getloadavg()[0]
    wall = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-kinds-"))

    compilers = {k: os.environ.get(k) for k in ("CC", "CXX")}
    eager_rows, merge_rows = eager_and_merge(kinds, size, args, tmp, console)
    for key, value in compilers.items():  # PEFT's BOFT (loading its CUDA extension) leaves CC=CXX=gcc behind,
        if value is None:                 # with which the custom-op library would be rebuilt, and fail to link
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    ort_rows, reasons = ([], {}) if args.skip_ort else ort_table(kinds, size, args, tmp, console)

    table = Table(title=f"1. Eager forward, LLaMA {size['layers']} x hidden {size['hidden']} ({size['batch']} x "
                        f"{size['seq']} tokens), {args.threads} thread(s): ms and paired ratios, median of "
                        f"{args.rounds or size['rounds']} rounds")
    for col in ("kind", "setup", "graph base ms", "HF base ms", "ours ms", "PEFT ms", "ours / base", "PEFT / base",
                "ours / PEFT", "|ours - PEFT|", "|ours - base|"):
        table.add_column(col, justify="left" if col in ("kind", "setup") else "right")
    for r in eager_rows:
        table.add_row(r["kind"], r["note"], fmt(r["graph"]), fmt(r["hf"]), fmt(r["ours"]), fmt(r.get("peft")),
                      fmt(r["ours_base"]), fmt(r.get("peft_base")), fmt(r.get("ours_peft")),
                      fmt(r["diff"], ".1e"), fmt(r["moved"], ".1e"))
    console.print(table)

    if ort_rows:
        table = Table(title=f"2. ONNX Runtime CPU, 4 x (LayerNorm + Linear({size['ort_dim']})), batch "
                            f"{size['ort_batch']}, {args.threads} thread(s), one adapter for the whole batch: "
                            f"paired ratios, median of {args.rounds or size['ort_rounds']} rounds")
        for col in ("kind", "base µs", "merged / base", *[f"{m} / merged" for m in MODES], "max |ORT - torch|"):
            table.add_column(col, justify="left" if col == "kind" else "right")
        for r in ort_rows:
            merged = f"{r['merged']:.2f}" + (" (inline)" if r["inline"] else "")
            table.add_row(r["kind"], f"{r['base']:,.0f}", merged, *[fmt(r[m]) for m in MODES], fmt(r["check"], ".1e"))
        console.print(table)
        for kind, reason in reasons.items():
            console.print(f"[dim]{kind}: {escape(reason)}[/dim]")

    table = Table(title=f"3. Merge time on the model of table 1: ms, median of "
                        f"{args.merge_repeats or size['merge_repeats']}")
    for col in ("kind", "ours ms", "of which lint + recompile", "PEFT merge_and_unload ms", "PEFT / ours", "|merged - unmerged| ours",
                "|merged ours - merged PEFT|"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for r in merge_rows:
        if "refused" in r:
            table.add_row(r["kind"], "refused", "-", "-", "-", "-", "-")
            continue
        peft_cell = "refused" if "peft_refused" in r else fmt(r.get("peft"), ".1f")
        table.add_row(r["kind"], fmt(r["ours"], ".1f"), fmt(r["recompile"], ".1f"), peft_cell, fmt(r.get("ratio")),
                      fmt(r["exact"], ".1e"), fmt(r.get("vs_peft"), ".1e"))
    console.print(table)
    for r in merge_rows:
        if "refused" in r:
            console.print(f"[dim]{r['kind']}: {escape(r['refused'])}[/dim]")
        if "peft_refused" in r:
            console.print(f"[dim]{r['kind']}, PEFT merge_and_unload: {escape(r['peft_refused'])}[/dim]")
    if args.markdown:
        print(markdown(eager_rows, ort_rows, merge_rows))
    import peft
    import transformers

    console.print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__},"
                  f" peft {peft.__version__}; load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after;"
                  f" {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
