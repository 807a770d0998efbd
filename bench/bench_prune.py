"""Structural pruning at equal training steps, on real weights and a real text task (issue 11).

Task and model: bench_allocation_quality.py's (all-MiniLM-L6-v2, real weights; stdlib docstrings -> package, 10
classes; mean pooling and a linear head trained with the adapters). LoRA rank 4 (alpha 8) on every query / key /
value / attention-output / intermediate / output projection (36 sites), AdamW lr 1e-2, 10% warm-up + linear decay,
clip 1.0; the head starts the same for every method of a seed.

Rows, each with T optimizer steps of adapter (and head) training in total:
  lora          unpruned LoRA, T steps (the reference)
  magnitude     prune at step 0 by the L2 norm of each unit's weights, then T steps
  random        prune at step 0 by seeded random scores, then T steps
  loraprune     the prune pass with method = "loraprune": T steps of training with LoRA-guided importance, the cubic
                schedule and iterative masks (warm-up 10%, cool-down 20%, a mask event every T/20 steps); removal
  light-peft    the prune pass with method = "light-peft": e T steps of masked early estimation (L1 --l1, 1e-4; e =
                --estimate, 0.25), removal, then the remaining (1 - e) T steps
Each at 25% and 50% of the heads and of the FFN neurons of every layer (scope "layer"), over seeds: test accuracy
mean ± std (min..max); with --dev F, accuracy on a held-out fraction F of the training set instead (to choose
hyperparameters such as --l1 without the test set).

Also: the merged ONNX export of the model pruned at each ratio vs the unpruned one (ONNX Runtime, CPU, 1 thread,
batch 16 x seq 24, median of --ort-runs runs, interleaved; under ONNX Runtime's default session options and under the
runtime's CPU options, which leave the slow SkipLayerNormFusion off): parameter count ratio and latency ratio
(`--latency-only` measures only these: shapes, not training, set them); and the cost of
the pruning pass against the training it rides on (wall seconds of the pass, of which training and scoring).

Usage: python bench/bench_prune.py [--steps 60] [--seeds 0 1] [--threads 1] [--json out.json]
       full run: --steps 200 --lr 3e-3 --seeds 0 1 2 --ratios 0.3 0.5 (lr 1e-2 diverges over 200 steps)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_allocation_quality import HEAD, Bench, accuracy  # noqa: E402
from rewrite.pass_infra import PassContext  # noqa: E402
from rewrite.passes import REGISTRY  # noqa: E402
from rewrite.train import seed_everything, train  # noqa: E402

TARGETS = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value", "*.attention.output.dense",
           "*.intermediate.dense", "*.output.dense"]
RANK, ALPHA = 4, 8.0
METHODS = ("lora", "magnitude", "random", "loraprune", "light-peft")
RATIOS = (0.25, 0.5)


def run_pass(gm, name: str, where: Path, data=None, **options):
    cls = REGISTRY[name]
    return cls(cls.Options(**options), PassContext(spec_dir=where, output_dir=where, where="bench", data=data))(gm)


class PruneBench:
    def __init__(self, args):
        self.args = args
        self.base = Bench(argparse.Namespace(per_class=args.per_class, seq=args.seq, batch=args.batch, lr=args.lr,
                                             steps=args.steps))
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_prune_"))
        if args.dev:
            self._hold_out(args.dev)

    def _hold_out(self, fraction: float) -> None:
        """Evaluate on every k-th training example (k = 1 / fraction) and train on the rest; the test set is unused:
        for choosing hyperparameters without looking at the test set."""
        from safetensors.torch import save_file

        train = self.base.train_t
        every = max(2, round(1 / fraction))
        dev = torch.arange(len(train["labels"])) % every == 0
        self.base.test_t = {k: v[dev] for k, v in train.items()}
        self.base.train_t = {k: v[~dev].contiguous() for k, v in train.items()}
        save_file(self.base.train_t, self.base.tmp / "train.safetensors")
        self.base.info.update(train=int((~dev).sum()), test=0, dev=int(dev.sum()))

    def fresh(self, seed: int):
        gm = copy.deepcopy(self.base.gm)
        self.base.init_head(gm.get_parameter("head.weight"), gm.get_parameter("head.bias"), seed)
        run_pass(gm, "insert", self.tmp, targets=TARGETS, rank=RANK, alpha=ALPHA, seed=seed)
        return gm

    def run(self, method: str, ratio: float, seed: int) -> dict:
        a, data = self.args, self.base.data(seed)
        gm = self.fresh(seed)
        params = sum(p.numel() for n, p in gm.named_parameters() if not n.startswith("adapters."))
        prune = dict(heads=ratio, ffn=ratio, method=method, report="", exempt=["*pooler*"])  # the unused pooler
        pass_seconds = train_in_pass = scoring = 0.0
        rest = a.steps
        if method in ("magnitude", "random"):
            start = time.perf_counter()
            run_pass(gm, "prune", self.tmp, seed=seed, **prune)
            pass_seconds = time.perf_counter() - start
        elif method in ("loraprune", "light-peft"):
            steps = a.steps if method == "loraprune" else max(1, round(a.steps * a.estimate))
            extra = {"loraprune": {"warmup": 0.1, "cooldown": 0.2, "every": max(1, a.steps // 20)}} \
                if method == "loraprune" else {"light_peft": {"l1": a.l1}}
            seed_everything(seed)
            start = time.perf_counter()
            result = run_pass(gm, "prune", self.tmp, data=data.options, steps=steps, extra_params=HEAD, **prune,
                              **extra)
            pass_seconds = time.perf_counter() - start
            train_in_pass, scoring = result.stats["train_seconds"], result.stats["scoring_seconds"]
            rest = a.steps - steps
        trained = train(gm, data, steps=rest, extra_params=HEAD) if rest else None
        after = sum(p.numel() for n, p in gm.named_parameters() if not n.startswith("adapters."))
        return dict(acc=accuracy(lambda i, m: gm(input_ids=i, attention_mask=m), self.base.test_t),
                    pass_seconds=pass_seconds, train_in_pass=train_in_pass, scoring=scoring,
                    train_seconds=(trained.seconds if trained else 0.0) + train_in_pass, base_params=params,
                    params_after=after, gm=gm if seed == a.seeds[0] and method in ("lora", "magnitude") else None)

    def latency(self, models: dict[str, object]) -> dict[str, dict]:
        """Merged ONNX of each model: parameters (initializer elements) and median ORT latency, interleaved, under
        ONNX Runtime's defaults and under the runtime's CPU options (`disabled_optimizers`: SkipLayerNormFusion off)."""
        import numpy as np
        import onnx
        import onnxruntime as ort

        from rewrite.export.onnx_merged import export_merged
        from rewrite.options import ExportOptions
        from rewrite.runtime.providers import disabled_optimizers

        configs = {"ort defaults": [], "runtime CPU options": disabled_optimizers(["CPUExecutionProvider"])}
        sessions, out = {}, {}
        feed = {k: self.base.test_t[k][:self.args.batch].numpy() for k in ("input_ids", "attention_mask")}
        for name, gm in models.items():
            merged = copy.deepcopy(gm)
            run_pass(merged, "merge", self.tmp)
            path = self.tmp / f"{name}.onnx"
            export_merged(merged, path, ExportOptions(), None)
            model = onnx.load(str(path))
            params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
            for config, disabled in configs.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = options.inter_op_num_threads = 1
                key = (name, config)
                sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                     disabled_optimizers=disabled)
                inputs = {i.name: feed[i.name] for i in sessions[key].get_inputs()}
                out[key] = {"params": params, "inputs": inputs, "ms": []}
        for key, session in sessions.items():  # warm-up
            session.run(None, out[key]["inputs"])
        for _ in range(self.args.ort_runs):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, out[key]["inputs"])
                out[key]["ms"].append((time.perf_counter() - start) * 1000)
        return {key: {"params": v["params"], "ms": statistics.median(v["ms"])} for key, v in out.items()}


def report_latency(bench: PruneBench, models: dict, console: Console) -> dict:
    lat = bench.latency(models)
    for (name, config), v in lat.items():
        base = lat[("unpruned", config)]
        console.print(f"merged ONNX {name:12s} params {v['params']:>11,} ({v['params'] / base['params']:.2f}x)  "
                      f"ORT ({config}) {v['ms']:.2f} ms ({v['ms'] / base['ms']:.3f}x)")
    return {f"{name} / {config}": v for (name, config), v in lat.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--per-class", type=int, default=138)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ort-runs", type=int, default=30)
    parser.add_argument("--latency-only", action="store_true", help="only the merged-export latency and parameter "
                        "ratios, on untrained magnitude-pruned models (shapes, not training, set them)")
    parser.add_argument("--estimate", type=float, default=0.25, help="light-peft: the fraction of the steps spent in "
                        "masked early estimation (inside the pass); the rest retrain the pruned model")
    parser.add_argument("--l1", type=float, default=1e-4, help="light-peft: the L1 weight on the masks")
    parser.add_argument("--dev", type=float, default=0.0, help="hold out this fraction of the training set and "
                        "report accuracy on it instead of the test set (to choose hyperparameters)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    wall = time.perf_counter()
    bench = PruneBench(args)
    console.print(f"setup {bench.base.setup_seconds:.1f}s: {bench.base.info}")
    if args.latency_only:  # shapes, not training, set the latency: untrained models, magnitude-pruned
        models = {"unpruned": bench.fresh(args.seeds[0])}
        for ratio in args.ratios:
            models[f"pruned {ratio:.0%}"] = gm = bench.fresh(args.seeds[0])
            run_pass(gm, "prune", bench.tmp, heads=ratio, ffn=ratio, method="magnitude", report="",
                     exempt=["*pooler*"])
        return {"ort": report_latency(bench, models, console), "args": vars(args)}
    results: dict[tuple[str, float], list[dict]] = {}
    for seed in args.seeds:  # interleaved: machine-load drift hits every method alike
        for method in args.methods:
            for ratio in ([0.0] if method == "lora" else args.ratios):
                r = bench.run(method, ratio, seed)
                results.setdefault((method, ratio), []).append(r)
                console.print(f"  seed {seed} {method:10s} {ratio:.2f}  acc {r['acc']:.3f}  "
                              f"pass {r['pass_seconds']:.1f}s  train {r['train_seconds']:.1f}s  "
                              f"params {r['params_after']:,}")
                if args.json:  # after every run, so a run cut short by a deadline keeps what it measured
                    Path(args.json).write_text(json.dumps({"partial": [
                        dict(method=m, ratio=q, runs=[{k: v for k, v in x.items() if k != "gm"} for x in rs])
                        for (m, q), rs in results.items()], "args": vars(args)}, indent=2, default=str))
    table = Table(title=f"prune at equal training steps: MiniLM-L6 (real weights), {bench.base.info['classes']} "
                        f"classes, {args.steps} steps, LoRA r{RANK} on 36 sites, seeds {args.seeds}")
    for col in ("method", "heads+FFN removed", "accuracy mean ± std", "min..max", "vs lora", "params (base)",
                "pass s", "of which training", "of which scoring", "pass / training"):
        table.add_column(col, justify="left" if col == "method" else "right")
    summary: dict = {"rows": []}
    reference = statistics.mean(r["acc"] for r in results.get(("lora", 0.0), [])) if ("lora", 0.0) in results \
        else math.nan
    for (method, ratio), runs in results.items():
        accs = [r["acc"] for r in runs]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        pass_s = statistics.mean(r["pass_seconds"] for r in runs)
        train_s = statistics.mean(r["train_seconds"] for r in runs)
        in_pass = statistics.mean(r["train_in_pass"] for r in runs)
        scoring = statistics.mean(r["scoring"] for r in runs)
        overhead = (pass_s - in_pass + scoring) / train_s if train_s else math.nan
        table.add_row(method, f"{ratio:.0%}", f"{mean:.3f} ± {std:.3f}", f"{min(accs):.3f}..{max(accs):.3f}",
                      f"{mean - reference:+.3f}", f"{runs[0]['params_after']:,}", f"{pass_s:.1f}",
                      f"{in_pass:.1f}", f"{scoring:.2f}", f"{overhead:.2f}x" if method != "lora" else "")
        summary["rows"].append(dict(method=method, ratio=ratio, mean=mean, std=std, accs=accs, pass_seconds=pass_s,
                                    train_seconds=train_s, train_in_pass=in_pass, scoring_seconds=scoring,
                                    overhead=overhead, params=runs[0]["params_after"]))
    console.print(table)
    console.print("pass / training = (pass wall time - its own training + its scoring) / the run's training time: "
                  "what pruning costs on top of the training it rides on")
    models = {"unpruned": results[("lora", 0.0)][0]["gm"]} if ("lora", 0.0) in results else {}
    for ratio in args.ratios:
        key = next(((m, ratio) for m in ("magnitude", "random", "loraprune", "light-peft") if (m, ratio) in results),
                   None)
        if key:
            models[f"pruned {ratio:.0%}"] = results[key][0]["gm"]
    if "unpruned" in models and len(models) > 1:
        summary["ort"] = report_latency(bench, models, console)
    summary["wall_seconds"] = time.perf_counter() - wall
    summary["args"] = vars(args)
    console.print(f"total {summary['wall_seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
