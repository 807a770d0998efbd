"""Decoding with a KV cache: tokens/s with cache vs without, and per-row adapters during decode (issue 15).

One run, two tables, on a LLaMA-shaped decoder built from a `transformers.LlamaConfig` (GQA, random seeded weights,
saved as an HF directory) and exported through `rewrite.pipeline.apply`, as `rewrite apply` does:

  1. Cache vs no cache. "with cache": `[capture] use_cache = true`, merged export, decoded by
     `rewrite.runtime.generate.generate` (one prefill call, then one token per row per call with the cache).
     "no cache": the plain export (`use_cache = false`, what every decoder export was before issue 15), decoded
     by re-running the whole sequence for every new token and taking the last position's argmax. Batch 1 and 8,
     `--new` (128) new tokens after a `--prompt`-token prompt, no stop token; both must produce the same tokens
     (the "same tokens" column). Ratio: cache tokens/s over no-cache tokens/s.
  2. Per-row adapters during decode: batch 8, 8 PEFT LoRA adapters (`init_lora_weights=False`, rank `--rank` on
     `--targets`), one per row, loaded with `load` passes. Contenders: the base with-past export (merged, no
     adapter: the floor), `AdapterSession.generate(adapters=[...])` on a bank export (float32 banks, one-hot
     standard ops) and on a custom-op export (float16 banks, `adapters::LoraDelta`), PEFT eager `generate` with
     `adapter_names=[...]`, and transformers eager `generate` on the base model. Ratios: time over the base
     export's (goal <= 1.15x), PEFT's time over ours (how much faster than PEFT), and whether each contender's
     tokens equal PEFT's, row by row (float16 banks may part from PEFT at a near tie).

Timing: each contender generates once to warm up, then `--rounds` rounds run every contender once in a random order
(interleaved); a cell is the median over rounds, a ratio the median of per-round (paired) ratios. Times include the
prefill call (one call of `--prompt` tokens, small next to 128 decode steps). ONNX Runtime and torch both use
`--threads` (default 1: the machine's second core is shared). Nothing asserts on wall time.
Usage: python bench/bench_decode.py [--threads 1] [--rounds 7] [--new 128] [--prompt 16] [--rank 16]
       [--targets q_proj,k_proj,v_proj,o_proj] [--hidden 256 --layers 4 --heads 4 --kv-heads 2 --inter 768
       --vocab 2048] [--skip-cache]
(defaults: about 10 minutes on 2 cores, most of it the no-cache batch-8 runs)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from rich.console import Console
from rich.table import Table

from rewrite.pipeline import apply
from rewrite.runtime.generate import generate
from rewrite.runtime.session import AdapterSession
from rewrite.runtime.providers import disabled_optimizers
from rewrite.spec import parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_switching import _custom_op_available  # noqa: E402
from timing import interleaved  # noqa: E402

ADAPTERS = [f"tenant{i}" for i in range(8)]


def _export(model_dir: Path, out: Path, *, use_cache: bool, passes: str = "", export: str = "") -> Path:
    spec = parse_spec(f"version = 1\n[capture]\nuse_cache = {str(use_cache).lower()}\n{passes}[export]\n{export}")
    apply(spec, str(model_dir), out)
    return out


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],  # as AdapterSession's
                                disabled_optimizers=disabled_optimizers(["CPUExecutionProvider"]))


def _no_cache_generate(session: ort.InferenceSession, prompts: np.ndarray, new: int) -> list[list[int]]:
    """Greedy decoding without a cache: the whole sequence is run again for every new token."""
    ids = prompts
    for _ in range(new):
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    return ids[:, prompts.shape[1]:].tolist()


def _timed(calls: dict[str, Callable[[], list[list[int]]]], rounds: int
           ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, list[list[int]]]]:
    """(median seconds, per-round seconds, the tokens of the warm-up call) of every contender, interleaved."""
    tokens = {key: fn() for key, fn in calls.items()}
    samples = interleaved(calls, rounds, warmup=0)
    return {k: statistics.median(v) for k, v in samples.items()}, samples, tokens


def _paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def cache_table(work: Path, model_dir: Path, args, prompts: np.ndarray) -> Table:
    cached = _session(_export(model_dir, work / "with_past", use_cache=True) / "model.onnx", args.threads)
    plain = _session(_export(model_dir, work / "no_cache", use_cache=False) / "model.onnx", args.threads)
    table = Table(title=f"Greedy decoding, {args.new} new tokens after {args.prompt} prompt tokens "
                        f"({args.threads} thread{'s' if args.threads > 1 else ''}, median of {args.rounds} rounds)")
    for column in ("batch", "with cache tok/s", "no cache tok/s", "cache speed-up", "same tokens"):
        table.add_column(column, justify="right")
    for batch in (1, 8):
        rows = prompts[:batch]
        calls = {"cache": lambda rows=rows: generate(cached, rows.tolist(), max_new_tokens=args.new),
                 "plain": lambda rows=rows: _no_cache_generate(plain, rows, args.new)}
        seconds, samples, tokens = _timed(calls, args.rounds)
        rate = {k: batch * args.new / s for k, s in seconds.items()}
        table.add_row(str(batch), f"{rate['cache']:,.0f}", f"{rate['plain']:,.0f}",
                      f"{_paired(samples, 'plain', 'cache'):.1f}x", str(tokens["cache"] == tokens["plain"]))
    return table


def _peft_model(model_dir: Path, work: Path, args):
    """PEFT model with the 8 adapters (random A and B), each saved as a PEFT directory work/peft/<name>."""
    import peft

    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","),
                             init_lora_weights=False)
    pm = peft.get_peft_model(model, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        pm.add_adapter(name, config)
    for name in ADAPTERS:
        pm.save_pretrained(work / "peft", selected_adapters=[name])
    return pm.eval()


def adapter_table(work: Path, model_dir: Path, args, prompts: np.ndarray, custom: bool) -> Table:
    pm = _peft_model(model_dir, work, args)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loads = "".join(f'[[pass]]\nname = "load"\npath = "{work / "peft" / n}"\nadapter = "{n}"\n' for n in ADAPTERS)
    if not (work / "with_past").exists():  # made by cache_table unless --skip-cache
        _export(model_dir, work / "with_past", use_cache=True)
    base = _session(work / "with_past" / "model.onnx", args.threads)
    exports = {"bank (float32 banks)": 'mode = "unmerged"\nswitching = "bank"\n'}
    if custom:
        exports["custom-op (float16 banks)"] = 'mode = "unmerged"\nswitching = "custom-op"\nbank_dtype = "float16"\n'
    sessions = {label: AdapterSession(_export(model_dir, work / label.split()[0], use_cache=True, passes=loads,
                                              export=text), intra_op_threads=args.threads)
                for label, text in exports.items()}
    rows = prompts.tolist()
    ids = torch.from_numpy(prompts)

    def eager(model, **kwargs) -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 do_sample=False, eos_token_id=None, **kwargs)
        return out[:, prompts.shape[1]:].tolist()

    calls = {"base export (no adapter)": lambda: generate(base, rows, max_new_tokens=args.new),
             **{f"{label}, 8 adapters": lambda s=s: s.generate(rows, adapters=ADAPTERS, max_new_tokens=args.new)
                for label, s in sessions.items()},
             "PEFT eager, adapter_names": lambda: eager(pm, adapter_names=ADAPTERS),
             "transformers eager, base model": lambda: eager(hf)}
    seconds, samples, tokens = _timed(calls, args.rounds)
    peft_key, base_key = "PEFT eager, adapter_names", "base export (no adapter)"
    table = Table(title=f"Per-row adapters during decode: batch 8, 8 LoRA adapters (rank {args.rank} on "
                        f"{args.targets}), {args.new} new tokens ({args.threads} thread"
                        f"{'s' if args.threads > 1 else ''}, median of {args.rounds} rounds)")
    for column in ("contender", "tok/s", "vs base export", "PEFT time / this", "rows equal to PEFT"):
        table.add_column(column, justify="right" if column != "contender" else "left")
    for key, s in seconds.items():
        same = sum(a == b for a, b in zip(tokens[key], tokens[peft_key]))
        table.add_row(key, f"{8 * args.new / s:,.0f}", f"{_paired(samples, key, base_key):.2f}x",
                      f"{_paired(samples, peft_key, key):.2f}x", f"{same}/8")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--skip-cache", action="store_true", help="only the per-row adapter table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    console = Console(width=120)
    custom = _custom_op_available()
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      intermediate_size=args.inter, vocab_size=args.vocab,
                                      max_position_embeddings=2 * (args.prompt + args.new))
    prompts = np.random.default_rng(0).integers(0, args.vocab, (8, args.prompt)).astype(np.int64)
    console.print(f"LLaMA-shaped decoder: {args.layers} layers, hidden {args.hidden}, MLP {args.inter}, "
                  f"{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}; onnxruntime "
                  f"{ort.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).eval().save_pretrained(work / "hf")
        if not args.skip_cache:
            console.print(cache_table(work, work / "hf", args, prompts))
        console.print(adapter_table(work, work / "hf", args, prompts, custom))


if __name__ == "__main__":
    main()
