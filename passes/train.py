"""train: train the attached adapters on the spec's [data] (rewrite.train: AdamW, warm-up + decay, clip, seed).

    [data]
    path = "train.safetensors"   # model inputs + labels (or factory = "pkg.mod:fn")
    loss = "cross_entropy"
    steps = 200
    lr = 1e-3

    [[pass]]
    name = "train"
    adapters = ["style"]         # default: every attached adapter
    extra_params = []            # base parameters trained too, e.g. ["classifier.weight", "classifier.bias"]
    # steps, lr, warmup, weight_decay, grad_clip, seed: override [data] for this pass

With a training-time rank allocator the ranks are decided while training (METHODS.md §2.1, §2.2), the
adapter ends physically resized (plain LoRA of each site's final rank, rank 0 sites removed) and an
allocation report is written (`<report>.json/.md/.png` and `<report>_history.png`: budget and ranks over
the steps):

    [[pass]]
    name = "train"
    allocator = "adalora"        # or "increlora"
    adapter = "default"          # inserted first at the starting rank r0 (AdaLoRA) / any rank (IncreLoRA)
    budget = { params = 36864 }  # or { fraction = 0.66 } of the inserted ranks, or target_rank = 2
    adalora = { tinit = 20, tfinal = 60, delta_t = 5, orth_reg_weight = 0.5 }   # PEFT names work too
    # increlora = { init_rank = 1, warmup = 20, interval = 10, top_h = 4, rank_step = 1 }

Rules:
1. Needs a [data] table; an adapter name attached nowhere, or an unknown extra parameter, is an error.
2. Only adapter parameters (and `extra_params`) train; the base is frozen; dropout is active while training
   and off afterwards (adapters are left in eval mode for merge / export).
3. Running the pass again with the same options and data leaves the weights alone (modified=False).
Stats: steps, seconds, first and final loss (mean of the last 10%), trainable parameters.
"""
from __future__ import annotations

import hashlib
import json
import types
from typing import Any, Literal

import torch.fx as fx
from pydantic import Field, model_validator

from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.state import state_of

MARK = "_rewrite_trained"


class TrainOptions(PassOptions):
    adapters: list[str] | None = None
    extra_params: list[str] = []
    steps: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    warmup: float | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int | None = None
    allocator: Literal["adalora", "increlora"] | None = None
    adapter: str = Field(default="default", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    budget: dict[str, float] | None = None
    target_rank: int | None = Field(default=None, ge=0)
    adalora: dict[str, Any] = {}
    increlora: dict[str, Any] = {}
    report: str = "allocation"
    plot: bool = True

    @model_validator(mode="after")
    def _allocator(self) -> "TrainOptions":
        if self.allocator is None and (self.budget is not None or self.target_rank is not None or self.adalora
                                       or self.increlora):
            raise ValueError("budget, target_rank, adalora and increlora go with allocator = \"adalora\" or "
                             "\"increlora\"")
        if self.allocator is not None and self.adapters is not None and self.adapters != [self.adapter]:
            raise ValueError("with an allocator, the pass trains one adapter: set 'adapter', not 'adapters'")
        if self.budget is not None:
            keys = set(self.budget) - {"params", "fraction", "rank", "metric"}
            if keys:
                raise ValueError(f"budget: unknown key(s) {sorted(keys)} (expected params, or fraction [+ rank])")
        return self


class TrainPass(GraphPass):
    name = "train"
    Options = TrainOptions

    def call(self, gm: fx.GraphModule) -> PassResult:
        from rewrite.data import DataSource
        from rewrite.train import adapter_modules, train

        o, where = self.options, self.context.where
        state = state_of(gm)
        if state.device == "meta":
            raise SpecError(f"{where}: train needs real weights: capture on cpu, not meta")
        data = self.context.data
        if data is None:
            raise SpecError(f"{where}: pass 'train' needs training data: add a [data] table (path = a tensor file "
                            "with the model inputs and labels, or factory = \"package.module:function\")")
        owners = dict.fromkeys(s.owner for s in state.sites.values())
        attached = {name for owner in owners for name in adapters_at(gm, owner)}
        if o.adapters is not None:
            missing = [a for a in o.adapters if a not in attached]
            if missing:
                raise SpecError(f"{self.context.at('adapters')}: adapters {missing} are attached to no site "
                                f"(attached: {sorted(attached) or 'none'})")
        if not attached:
            raise SpecError(f"{where}: no adapter is attached: insert or load one before 'train'")
        names = dict(gm.named_parameters())
        unknown = [n for n in o.extra_params if n not in names]
        if unknown:
            raise SpecError(f"{self.context.at('extra_params')}: no parameter named {unknown} in the model")
        key = hashlib.sha256(json.dumps([o.model_dump(mode="json"), data.model_dump(mode="json")],
                                        sort_keys=True).encode()).hexdigest()[:16]
        modules = adapter_modules(gm, o.adapters)
        if modules and all(getattr(m, MARK, None) == key for m in modules.values()):
            return PassResult(gm, False, {"note": "already trained with these options"})
        source = DataSource(data, self.context.spec_dir, list(state.inputs.kwargs))
        settings = dict(lr=o.lr, warmup=o.warmup, weight_decay=o.weight_decay,
                        grad_clip=o.grad_clip if o.grad_clip is not None else "data", seed=o.seed,
                        extra_params=o.extra_params)
        if o.allocator is not None:
            return self._allocate(gm, source, settings, key)
        result = train(gm, source, steps=o.steps, adapters=o.adapters, **settings)
        for module in adapter_modules(gm, o.adapters).values():
            setattr(module, MARK, key)
        return PassResult(gm, True, {"steps": result.steps, "seconds": round(result.seconds, 3),
                                     "loss_first": result.losses[0], "loss_final": result.final_loss,
                                     "params": result.params, "adapters": sorted({p.rsplit('.', 1)[-1]
                                                                                   for p in modules})})


    def _allocate(self, gm: fx.GraphModule, source, settings: dict[str, Any], key: str) -> PassResult:
        from rewrite.allocators import run_training_allocator, training_report
        from rewrite.report import write_report

        o = self.options
        if o.adapter not in {n for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values())
                             for n in adapters_at(gm, owner)}:
            raise SpecError(f"{self.context.at('adapter')}: adapter {o.adapter!r} is attached to no site: insert it "
                            "before 'train' (AdaLoRA starts from its rank)")
        before = {owner: m.rank for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values())
                  for n, m in adapters_at(gm, owner).items() if n == o.adapter}
        request = types.SimpleNamespace(scorer=o.allocator, adapter=o.adapter, budget=o.budget, steps=o.steps,
                                        target_rank=o.target_rank, adalora=o.adalora, increlora=o.increlora)
        ranks, history = run_training_allocator(gm, request, source, self.context, train_options=settings)
        files = []
        if o.report:
            text = json.dumps(o.budget) if o.budget is not None else f"target_rank = {o.target_rank}"
            report = training_report(gm, ranks, history, adapter=o.adapter, scorer=o.allocator, budget_request=text,
                                     rank_before=before)
            files = [p.name for p in write_report(report, self.context.output_path("."), o.report, plot=o.plot)]
        from rewrite.train import adapter_modules

        for module in adapter_modules(gm, [o.adapter]).values():
            setattr(module, MARK, key)
        losses = [h["loss"] for h in history]
        tail = losses[-max(1, len(losses) // 10):]
        return PassResult(gm, True, {
            "allocator": o.allocator, "adapter": o.adapter, "steps": len(history),
            "seconds": round(history.summary["seconds"], 3), "loss_first": losses[0],
            "loss_final": sum(tail) / len(tail), "ranks": sum(ranks.values()),
            "dropped": sum(1 for r in ranks.values() if r == 0), "params": history.summary["params"],
            "report": files})


__all__ = ["TrainOptions", "TrainPass"]
