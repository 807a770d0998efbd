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

With a training-time rank allocator the ranks are decided while training (METHODS.md §2.1, §2.2;
the rules are in passes/training_allocation.py, shared with `allocate`): the adapter ends physically
resized (plain LoRA of each site's final rank, rank 0 sites removed) and an allocation report is written
(`<report>.json/.md/.png` and `<report>_history.png`: budget and ranks over the steps):

    [[pass]]
    name = "train"
    allocator = "adalora"        # or "increlora"
    adapter = "default"          # inserted first at the starting rank r0 (AdaLoRA) / any rank (IncreLoRA)
    budget = { params = 36864 }  # or { fraction = 0.66 } of the inserted ranks, or target_rank = 2
    max_rank_pattern = { "head" = 2 }            # min_rank / max_rank (+ _pattern) bound each site's rank
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

from typing import Literal

import torch.fx as fx
from pydantic import Field, model_validator

from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.pass_infra import GraphPass, PassResult, real_weights
from rewrite.passes.training_allocation import TrainingAllocatorOptions, allocate_while_training, options_key

MARK = "_rewrite_trained"


class TrainOptions(TrainingAllocatorOptions):
    adapters: list[str] | None = None
    extra_params: list[str] = []
    lr: float | None = Field(default=None, gt=0)
    warmup: float | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int | None = None
    allocator: Literal["adalora", "increlora"] | None = None
    target_rank: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _allocator(self) -> "TrainOptions":
        if self.allocator is None and (self.budget is not None or self.target_rank is not None or self.adalora
                                       or self.increlora or self.has_bounds()):
            raise ValueError("budget, target_rank, min_rank, max_rank (and their patterns), adalora and increlora go "
                             "with allocator = \"adalora\" or \"increlora\"")
        if self.allocator is not None and self.adapters is not None and self.adapters != [self.adapter]:
            raise ValueError("with an allocator, the pass trains one adapter: set 'adapter', not 'adapters'")
        return self


class TrainPass(GraphPass):
    name = "train"
    Options = TrainOptions

    def writes(self) -> list[str]:
        return self.options.report_files(history=True) if self.options.allocator else []

    def call(self, gm: fx.GraphModule) -> PassResult:
        from rewrite.data import DataSource
        from rewrite.train import adapter_modules, train

        o, where = self.options, self.context.where
        state = real_weights(gm, where, "train needs real weights")
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
        settings = dict(lr=o.lr, warmup=o.warmup, weight_decay=o.weight_decay,
                        grad_clip=o.grad_clip if o.grad_clip is not None else "data", seed=o.seed,
                        extra_params=o.extra_params)
        if o.allocator is not None:
            if o.adapter not in attached:
                raise SpecError(f"{self.context.at('adapter')}: adapter {o.adapter!r} is attached to no site: insert "
                                "it before 'train' (AdaLoRA starts from its rank)")
            return allocate_while_training(gm, self.context, o, scorer=o.allocator, mark=MARK, train_options=settings)
        key = options_key(o, data)
        modules = adapter_modules(gm, o.adapters)
        if modules and all(getattr(m, MARK, None) == key for m in modules.values()):
            return PassResult(gm, False, {"note": "already trained with these options"})
        source = DataSource(data, self.context.spec_dir, state)
        result = train(gm, source, steps=o.steps, adapters=o.adapters, **settings)
        for module in adapter_modules(gm, o.adapters).values():
            setattr(module, MARK, key)
        return PassResult(gm, True, {"steps": result.steps, "seconds": round(result.seconds, 3),
                                     "loss_first": result.losses[0], "loss_final": result.final_loss,
                                     "params": result.params, "adapters": sorted({p.rsplit('.', 1)[-1]
                                                                                   for p in modules})})



__all__ = ["TrainOptions", "TrainPass"]
