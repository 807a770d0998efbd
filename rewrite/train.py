"""A small real training driver for the adapters of a captured GraphModule.

Trains the parameters under `gm.adapters` (the base model is frozen for the run and restored after) on
`rewrite.data.DataSource` batches with the loss from `rewrite.data.make_loss`:

    AdamW (decoupled weight decay) . linear warm-up then linear decay, per parameter group .
    gradient clipping by global norm . seeded (data order, dropout, any init a callback does) .
    adapter dropout active while training (adapter modules in train mode); they are left in eval mode
    after (the graph goes on to merge / export), whatever mode they were in before.

One optimizer step per batch. Per step, in this order:

    loss = loss_fn(gm(**inputs), batch) + sum(cb.regularizer(ctx))     # e.g. AdaLoRA's orthogonality term
    loss.backward();  clip_grad_norm_(params, grad_clip)
    cb.before_step(ctx)         # grads present, before optimizer.step (IncreLoRA grows here)
    schedule.apply(step);  optimizer.step()
    cb.on_step(ctx)             # after optimizer.step, before zero_grad (AdaLoRA masks here, as PEFT)
    optimizer.zero_grad()

Under torch.distributed (rewrite.distributed) every process takes its rows of each batch, backpropagates its
share of the task loss (regularisers unscaled), and the gradients are averaged over the processes before the
clip: every process takes the same step as one process holding the whole batch, `ctx.loss` is the loss over the
whole batch, and callbacks see averaged gradients. Pass the same data on every process.

Callbacks are any objects with some of `on_train_begin`, `regularizer`, `before_step`, `on_step`,
`on_train_end` (all optional; `TrainCallback` is a do-nothing base). `on_step` is called exactly once per
optimizer step with `ctx.step` = 1, 2, ..., `ctx.total_steps`.

The allocators are callbacks for *your own* training loop too (one call per optimizer step):

    from rewrite.allocators import AdaLoRA, IncreLoRA
    gm.requires_grad_(False)                        # freeze the base (the allocator's parameters train)
    alloc = AdaLoRA(gm, adapter="default", target_rank=4, total_steps=T, tinit=20, tfinal=40, delta_t=5)
    alloc.install()                                 # LoRA adapters -> SVD-form adapters of rank init_rank
    opt = torch.optim.AdamW(alloc.parameters(), lr=1e-3)
    for step, batch in enumerate(batches, start=1):
        loss = loss_fn(gm(**inputs(batch)), batch) + alloc.regularizer()
        loss.backward()
        opt.step()
        alloc.update(step)                          # after optimizer.step, before zero_grad (as PEFT)
        opt.zero_grad()
    ranks = alloc.finalize()                        # physically resized LoRA adapters; rank 0 sites dropped

IncreLoRA adds parameters while training, so it is called *before* `optimizer.step()` with the optimizer
(it appends a parameter group per growth); `GroupLinearSchedule` gives each such group its own warm-up
and decay over the remaining steps (IncreLoRA's warm-up restarts):

    inc = IncreLoRA(gm, target_rank=2, total_steps=T, warmup=100, interval=50, top_h=2)
    inc.install()
    opt = torch.optim.AdamW(inc.parameters(), lr=1e-3)
    schedule = GroupLinearSchedule(opt, T, warmup_steps=T // 10)
    for step, batch in enumerate(batches, start=1):
        (loss_fn(gm(**inputs(batch)), batch) + inc.regularizer()).backward()
        inc.update(step, opt)                       # may grow ranks: new parameters join `opt`
        schedule.apply(step)
        opt.step()
        opt.zero_grad()
    ranks = inc.finalize()
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rewrite import distributed
from rewrite.errors import DataError, SpecError
from rewrite.progress import tracked

Batch = dict[str, torch.Tensor]


class TrainCallback:
    """Do-nothing base: override what you need. `ctx` is the `TrainContext` of the run."""

    def on_train_begin(self, ctx: "TrainContext") -> None:
        pass

    def regularizer(self, ctx: "TrainContext") -> torch.Tensor | None:
        return None

    def before_step(self, ctx: "TrainContext") -> None:
        pass

    def on_step(self, ctx: "TrainContext") -> None:
        pass

    def on_train_end(self, ctx: "TrainContext") -> None:
        pass


@dataclass
class TrainContext:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: "GroupLinearSchedule"
    total_steps: int
    step: int = 0                  # 1-based index of the current optimizer step (0 before the first)
    loss: float | None = None      # task loss of the current step (without regularizers)
    history: dict[str, list] = field(default_factory=lambda: {"step": [], "loss": [], "lr": []})


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float]
    lrs: list[float]
    params: int                    # trainable parameters at the end
    step_seconds: list[float] = field(default_factory=list)   # wall time of each optimizer step

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(sum(tail) / len(tail))


class GroupLinearSchedule:
    """Linear warm-up then linear decay to ~0, computed per parameter group from the step it joined.

    A group joining at global step t0 (1-based) with n = total - t0 + 1 remaining steps and w warm-up steps
    uses, at its k-th step (k = 1..n):  lr = initial_lr * min(k / w, (n - k + 1) / (n - w)), clipped to [0, 1]
    (no step runs at lr 0). Groups added after construction (by a callback) are picked up at `apply`.
    IncreLoRA's per-group warm-up restarts are this rule."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
        self.optimizer, self.total, self.warmup = optimizer, int(total_steps), int(warmup_steps)
        for group in optimizer.param_groups:
            self._adopt(group, 1)

    def _adopt(self, group: dict, start: int) -> None:
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("start_step", start)
        group.setdefault("warmup_steps", self.warmup)

    def factor(self, group: dict, step: int) -> float:
        k = step - group["start_step"] + 1
        n = max(1, self.total - group["start_step"] + 1)
        w = min(group["warmup_steps"], n - 1)
        up = k / w if w > 0 else 1.0
        down = (n - k + 1) / max(1, n - w)
        return float(min(1.0, max(0.0, min(up, down))))

    def apply(self, step: int) -> list[float]:
        out = []
        for group in self.optimizer.param_groups:
            if "start_step" not in group:
                self._adopt(group, step)
            group["lr"] = group["initial_lr"] * self.factor(group, step)
            out.append(group["lr"])
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def adapter_modules(gm: nn.Module, adapters: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """`adapters.<site>.<name>` -> module, for adapter modules (they have a `kind`), optionally by name."""
    wanted = set(adapters) if adapters is not None else None
    out = {}
    for path, module in gm.named_modules():
        if path.startswith("adapters.") and hasattr(module, "kind"):
            if wanted is None or path.rsplit(".", 1)[-1] in wanted:
                out[path] = module
    return out


def trainable_parameters(gm: nn.Module, adapters: Iterable[str] | None = None) -> list[nn.Parameter]:
    seen, out = set(), []
    for module in adapter_modules(gm, adapters).values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _batches(data: Any, steps: int) -> Iterator[Batch]:
    """Cycle through a DataSource (or any re-iterable of batches) for `steps` batches."""
    if hasattr(data, "batches"):
        yield from data.batches(limit=steps)
        return
    produced = 0
    while produced < steps:
        empty = True
        for batch in data:
            empty = False
            yield batch
            produced += 1
            if produced >= steps:
                return
        if empty:
            raise DataError("training data yielded no batches")


def _inputs(data: Any, batch: Batch) -> Batch:
    if hasattr(data, "model_inputs"):
        return data.model_inputs(batch)
    return {k: v for k, v in batch.items() if k != "labels"}


def _options(data: Any, name: str, given: Any, default: Any) -> Any:
    if given is not None:
        return given
    options = getattr(data, "options", None)
    return getattr(options, name, default) if options is not None else default


def train(gm: nn.Module, data: Any, loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None, *,
          steps: int | None = None, lr: float | None = None, warmup: float | None = None,
          weight_decay: float | None = None, grad_clip: float | None | str = "data", seed: int | None = None,
          callbacks: Iterable[Any] = (), adapters: Iterable[str] | None = None,
          extra_params: Iterable[str] = (), optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train the adapters of `gm` on `data` (a `DataSource`, or an iterable of batch dicts with `labels`).

    Settings default to the DataSource's `[data]` options (steps, lr, warmup fraction, weight_decay,
    grad_clip, seed); `loss_fn` defaults to `make_loss(data.options)`. `adapters` restricts training to
    adapters of those names; `extra_params` names base parameters to train too (e.g. a classifier head:
    `["head.weight", "head.bias"]`). Returns the per-step losses and the wall time."""
    steps = int(_options(data, "steps", steps, 100))
    lr = float(_options(data, "lr", lr, 1e-3))
    warmup = float(_options(data, "warmup", warmup, 0.1))
    weight_decay = float(_options(data, "weight_decay", weight_decay, 0.0))
    grad_clip = _options(data, "grad_clip", None, 1.0) if grad_clip == "data" else grad_clip
    seed = int(_options(data, "seed", seed, 0))
    if loss_fn is None:
        if getattr(data, "options", None) is None:
            raise ValueError("train(): pass loss_fn, or a DataSource whose [data] options name the loss")
        from rewrite.data import make_loss

        loss_fn = make_loss(data.options)
    callbacks = list(callbacks)
    adapters = list(adapters) if adapters is not None else None
    seed_everything(seed)
    for cb in callbacks:  # allocators may swap adapter modules before the optimizer sees the parameters
        if hasattr(cb, "prepare"):
            cb.prepare()
    named = dict(gm.named_parameters())
    unknown = [n for n in extra_params if n not in named]
    if unknown:
        raise SpecError(f"train: no parameter named {unknown} in the graph")
    extra = set(extra_params)
    params = trainable_parameters(gm, adapters) + [named[n] for n in extra]
    if not params:
        raise SpecError("nothing to train: the graph has no adapter parameters (insert an adapter first)")
    warmup_steps = int(round(warmup * steps)) if warmup <= 1 else int(warmup)  # a fraction, or a step count
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = GroupLinearSchedule(opt, steps, warmup_steps)
    ctx = TrainContext(gm, opt, schedule, steps)
    frozen = {name: p.requires_grad for name, p in gm.named_parameters() if not name.startswith("adapters.")}
    for name, p in gm.named_parameters():
        if not name.startswith("adapters."):
            p.requires_grad_(name in extra)
    modules = adapter_modules(gm, adapters)
    losses: list[float] = []
    lrs: list[float] = []
    step_times: list[float] = []
    start = time.perf_counter()
    try:
        for m in modules.values():
            m.train(True)
        for cb in callbacks:
            if hasattr(cb, "on_train_begin"):
                cb.on_train_begin(ctx)
        tick = time.perf_counter()
        batches = tracked(_batches(data, steps), "train", steps, lambda: {"loss": f"{ctx.loss:.4g}"})
        for step, batch in enumerate(batches, start=1):
            ctx.step = step
            part = distributed.shard(batch)
            total, ctx.loss = distributed.weighted_loss(loss_fn(gm(**_inputs(data, part.batch)), part.batch), part)
            if not math.isfinite(ctx.loss):
                raise DataError(f"training diverged at step {step}: loss is {ctx.loss} (lower [data] lr)")
            for cb in callbacks:
                term = cb.regularizer(ctx) if hasattr(cb, "regularizer") else None
                if term is not None:
                    total = total + term
            total.backward()
            live = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            distributed.all_mean([p.grad for p in live])
            if grad_clip is not None and live:
                torch.nn.utils.clip_grad_norm_(live, float(grad_clip))
            for cb in callbacks:
                if hasattr(cb, "before_step"):
                    cb.before_step(ctx)
            current = schedule.apply(step)
            opt.step()
            for cb in callbacks:
                if hasattr(cb, "on_step"):
                    cb.on_step(ctx)
            opt.zero_grad(set_to_none=True)
            losses.append(ctx.loss)
            lrs.append(current[0])
            ctx.history["step"].append(step)
            ctx.history["loss"].append(ctx.loss)
            ctx.history["lr"].append(current[0])
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
        for cb in callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(ctx)
    finally:
        for name, p in gm.named_parameters():
            if name in frozen:
                p.requires_grad_(frozen[name])
        for m in adapter_modules(gm, adapters).values():
            m.train(False)  # the graph serves inference and export after training: dropout off
    seconds = time.perf_counter() - start
    final = sum(p.numel() for p in trainable_parameters(gm, adapters))
    return TrainResult(len(losses), seconds, losses, lrs, final, step_times)


@torch.no_grad()
def evaluate(gm: nn.Module, data: Any, loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
             *, batches: int | None = None) -> float:
    """Mean loss over `batches` batches (default: one pass over the data), adapters in eval mode."""
    if loss_fn is None:
        from rewrite.data import make_loss

        loss_fn = make_loss(data.options)
    total, count = 0.0, 0
    source = data.batches(limit=batches) if hasattr(data, "batches") else iter(data)
    for batch in source:
        total += float(loss_fn(gm(**_inputs(data, batch)), batch))
        count += 1
    return total / max(1, count) if count else math.nan


__all__ = ["GroupLinearSchedule", "TrainCallback", "TrainContext", "TrainResult", "adapter_modules", "evaluate",
           "seed_everything", "train", "trainable_parameters"]
