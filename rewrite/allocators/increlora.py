"""IncreLoRA: start small and add ranks to the most important modules on a schedule (METHODS.md §2.2).

Every site starts with `init_rank` SVD-form triplets (usually 1), scale c_k = alpha / (ranknum_k + 1e-5).
Each step t (called *before* `optimizer.step()`, as the official code does), while R_t < R_T:

    S_k = sum |dW_k (.) G_k| / sqrt(d_out d_in)       dW_k = c_k P diag(lam) Q (materialised while growing),
                                                       G_k = dL/d(dW_k), summed over the calls of the site
    Ibar_k = b1 Ibar_k + (1 - b1) S_k;   Ubar_k = b2 Ubar_k + (1 - b2) |S_k - Ibar_k|;   score_k = Ibar_k Ubar_k
    if t > t_warmup and t mod Delta == 0:
        k = min(h, R_T - R_t);  tau = the k-th largest score;  every site with score_k >= tau (ties: more)
        gets `a` ranks: ranknum_k += a, R_t += a (every existing component is rescaled by old/new ranknum)

Advance learning (default): each site carries `a` reserve triplets whose P, Q train from the start while
lam stays fixed at 1e-5; when the site is selected, those lam become trainable and a fresh reserve is
appended. Without it, reserves are frozen (lam = 0) until selected. New parameters go to the optimizer as
a new parameter group that gets its own linear warm-up and decay over the remaining steps (the official
`Multi_LambdaLR`; `rewrite.train.GroupLinearSchedule` does this). When R_t >= R_T the gradient tracking
stops and unused reserves are disabled (lam = 0); `finalize()` drops them and leaves a plain LoRA of rank
ranknum_k at each site (same delta). The orthogonality term is the official one: per parameter block.

Per-site bounds lo_k <= r_k <= hi_k (`min_rank` / `max_rank`, rewrite.allocators.bounds): a site starts
at clamp(init_rank, lo_k, hi_k) (hi_k = 0: its branch is removed before training); a site whose rank + a
would pass hi_k is not a candidate, so the k picks go to the best sites that can still grow; when no
site can grow, growth stops there (R_T is then not reached).

Under torch.distributed (rewrite.distributed): G_k is averaged over the processes before S_k is taken (the
gradient of the whole batch; parameter gradients are averaged already, by DDP or rewrite.train), so every
process keeps the same EMAs; the growth step uses process 0's scores on every process.

Deliberate difference: the official stops only at R_t == R_T exactly (ties can overshoot and then the
reserves are never disabled); here R_t >= R_T stops and disables them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from rewrite import distributed
from rewrite.adapters.svd_lora import SvdLoRA
from rewrite.allocators.bounds import Bound, resolve_bounds
from rewrite.allocators.common import SvdAllocator, drop_sites, finalize_svd, install_svd, owners_of
from rewrite.train import TrainContext

RESERVE_LAM = 1e-5
DEFAULT_STEP_RANKS = {2: 1, 4: 2, 6: 3, 8: 4}


class IncreLoRA(SvdAllocator):
    scorer = "increlora"
    blockwise = True

    def __init__(self, gm: fx.GraphModule, adapter: str = "default", *, total_steps: int, target_rank: int = 2,
                 init_rank: int = 1, target_budget: int | None = None, warmup: int = 0, interval: int = 10,
                 top_h: int = 2, rank_step: int | None = None, advance_learning: bool = True,
                 beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.1, weight_decay: float = 0.0,
                 alpha: float | None = None, targets: Iterable[str] | None = None, min_rank: Bound = 0,
                 max_rank: Bound = None, where: str = "<increlora>"):
        super().__init__(gm, adapter, total_steps=total_steps, target_rank=target_rank, init_rank=int(init_rank),
                         target_budget=target_budget, beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight,
                         alpha=alpha, targets=targets, min_rank=min_rank, max_rank=max_rank, where=where)
        if interval < 1 or top_h < 1 or init_rank < 1:
            raise ValueError(f"{where}: need interval >= 1, top_h >= 1 and init_rank >= 1")
        self.warmup, self.interval, self.top_h = int(warmup), int(interval), int(top_h)
        self.rank_step = int(rank_step if rank_step is not None
                             else DEFAULT_STEP_RANKS.get(self.target_rank, max(1, self.target_rank // 2)))
        self.advance_learning, self.weight_decay = advance_learning, weight_decay
        self.closed: list[str] = []            # sites with max rank 0: branch removed at install
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.done = False
        self.history["growth"] = []

    # --- setup ---------------------------------------------------------------------------------------------
    def install(self) -> dict[str, SvdLoRA]:
        """SVD-form adapters of rank `init_rank` at every site, each with its first reserve (idempotent)."""
        if not self.modules:
            owners = owners_of(self.gm)
            bounds = resolve_bounds(dict.fromkeys(owners, self.init_rank), self.min_rank, self.max_rank,
                                    where=self.where)
            start = {o: max(lo, self.init_rank if hi is None else min(self.init_rank, hi))
                     for o, (lo, hi) in bounds.items()}
            modules = install_svd(self.gm, self.adapter, rank={o: max(r, 1) for o, r in start.items()},
                                  alpha=self.alpha, targets=self.targets, where=self.where)
            self.closed = [o for o in modules if start[o] == 0]
            drop_sites(self.gm, self.adapter, self.closed)
            self.attach({o: m for o, m in modules.items() if o not in self.closed})
        return self.modules

    def attach(self, modules: dict[str, SvdLoRA]) -> None:
        """Use existing SVD-form modules (each gets its first reserve block here)."""
        self.modules = dict(modules)
        self.bounds = resolve_bounds({o: m.rank for o, m in self.modules.items()}, self.min_rank, self.max_rank,
                                     where=self.where)
        for owner, module in self.modules.items():
            lo, hi = self.bounds[owner]
            if module.rank < lo or (hi is not None and module.rank > hi):
                raise ValueError(f"{self.where}: site {owner} starts at rank {module.rank}, outside its bounds "
                                 f"[{lo}, {hi}]")
        for module in self.modules.values():
            module.ranknum = float(module.rank)
            if module.reserve == 0:
                self._add_reserve(module)
            module.track_product_grad = True
            self.history["ranks"].setdefault(self._owner(module), [])
        self.total_rank = sum(m.rank for m in self.modules.values())
        self.target_total = (self.target_budget if self.target_budget is not None
                             else self.target_rank * len(self.modules))
        if self.target_total < self.total_rank:
            raise ValueError(f"{self.where}: target budget {self.target_total} ranks is below the starting "
                             f"{self.total_rank} ({len(self.modules)} sites at init_rank {self.init_rank} or their "
                             "min rank)")
        if self.total_rank >= self.target_total:
            self._stop()

    def _owner(self, module: SvdLoRA) -> str:
        return next(o for o, m in self.modules.items() if m is module)

    def _add_reserve(self, module: SvdLoRA) -> list[torch.nn.Parameter]:
        q, e, p = module.add_block(self.rank_step, lam=RESERVE_LAM if self.advance_learning else 0.0,
                                   train_lam=False)
        q.requires_grad_(self.advance_learning)
        p.requires_grad_(self.advance_learning)
        module.reserve += self.rank_step
        return [q, p] if self.advance_learning else []

    # --- scores --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def module_scores(self) -> dict[str, torch.Tensor]:
        """owner -> S_k = sum |dW_k (.) G_k| / sqrt(numel) from the gradients of the last backward (0 if none)."""
        distributed.all_mean([module.product_grad for module in self.modules.values()])
        out = {}
        for owner, module in self.modules.items():
            grad = module.product_grad
            if grad is None:
                out[owner] = torch.zeros(())
                continue
            w = module.product().abs()
            out[owner] = torch.sum((w * grad).abs()) / math.sqrt(w.numel())
            module.product_grad = None
        return out

    @torch.no_grad()
    def update_ipt(self, scores: dict[str, torch.Tensor | float] | None = None) -> None:
        if scores is None:
            scores = self.module_scores()
        else:
            for module in self.modules.values():
                module.product_grad = None
        for owner in self.modules:
            value = torch.as_tensor(scores[owner], dtype=torch.float32)
            if owner not in self.ipt:
                self.ipt[owner] = torch.zeros(())
                self.exp_avg_ipt[owner] = torch.zeros(())
                self.exp_avg_unc[owner] = torch.zeros(())
            self.ipt[owner] = value
            self.exp_avg_ipt[owner] = self.beta1 * self.exp_avg_ipt[owner] + (1 - self.beta1) * value
            self.exp_avg_unc[owner] = (self.beta2 * self.exp_avg_unc[owner]
                                       + (1 - self.beta2) * (value - self.exp_avg_ipt[owner]).abs())

    def scores(self) -> dict[str, float]:
        return {o: float(self.exp_avg_ipt.get(o, 0.0) * self.exp_avg_unc.get(o, 0.0)) for o in self.modules}

    # --- growth --------------------------------------------------------------------------------------------
    def can_grow(self, owner: str) -> bool:
        hi = self.bounds[owner][1]
        return hi is None or self.modules[owner].rank + self.rank_step <= hi

    @torch.no_grad()
    def grow(self, optimizer: torch.optim.Optimizer | None = None, step: int | None = None) -> list[str]:
        """Add `rank_step` ranks to every site that may still grow (rank + a <= its max rank) and scores
        >= the k-th largest score among those, k = min(h, R_T - R_t, number of such sites)."""
        scores = distributed.agree(self.scores())
        open_sites = [o for o in self.modules if self.can_grow(o)]
        k = min(self.top_h, self.target_total - self.total_rank, len(open_sites))
        if k <= 0:
            if not open_sites:  # every site is at its max rank: nothing left to grow
                self._stop()
            return []
        threshold = torch.topk(torch.tensor([scores[o] for o in open_sites]), k)[0][-1].item()
        selected, new_params = [], []
        for owner, module in self.modules.items():
            if owner in open_sites and scores[owner] >= threshold:
                selected.append(owner)
                a = self.rank_step
                module.ranknum += a
                module.reserve -= a
                self.total_rank += a
                block = len(module.E) - 1
                module.E[block].requires_grad_(True)
                new_params.append(module.E[block])
                if not self.advance_learning:
                    module.Q[block].requires_grad_(True)
                    module.P[block].requires_grad_(True)
                    new_params += [module.Q[block], module.P[block]]
                new_params += self._add_reserve(module)
        if optimizer is not None and new_params:
            optimizer.add_param_group({"params": new_params, "weight_decay": self.weight_decay})
        self.history["growth"].append({"step": step, "threshold": threshold, "selected": selected,
                                       "scores": scores})
        if self.total_rank >= self.target_total:
            self._stop()
        return selected

    @torch.no_grad()
    def _stop(self) -> None:
        """Budget reached: stop tracking gradients of dW and disable the unused reserves (lam = 0)."""
        self.done = True
        for module in self.modules.values():
            module.track_product_grad = False
            module.product_grad = None
            if module.reserve:
                module.E[len(module.E) - 1].zero_()

    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None,
               scores: dict[str, float] | None = None) -> list[str]:
        """Once per optimizer step, after backward and before `optimizer.step()`; returns the sites grown.

        `scores` replaces the measured S_k (tests, or a scorer of your own)."""
        self.install()
        grown: list[str] = []
        if not self.done:
            self.update_ipt(scores)
            if step > self.warmup and step % self.interval == 0:
                grown = self.grow(optimizer, step)
        self._record(step)
        return grown

    def _record(self, step: int) -> None:
        self.history["step"].append(step)
        self.history["budget"].append(self.total_rank)
        for owner, module in self.modules.items():
            self.history["ranks"][owner].append(module.rank)

    def before_step(self, ctx: TrainContext) -> None:
        self.update(ctx.step, ctx.optimizer)

    # --- the end -------------------------------------------------------------------------------------------
    def _resize(self, to_lora: bool) -> dict[str, int]:
        """Drop the reserves and leave each site at its grown rank (closed sites: 0); records the final scores."""
        if not self.done:
            self._stop()
        keep = {o: torch.arange(m.rank) for o, m in self.modules.items()}
        self.history["scores"] = self.scores()
        return {**dict.fromkeys(self.closed, 0), **finalize_svd(self.gm, self.adapter, keep, to_lora=to_lora)}

    def budgets(self) -> dict[str, int]:
        """R_T, in ranks."""
        return {"target_budget": self.target_total}

    def schedule_settings(self) -> dict[str, Any]:
        return dict(warmup=self.warmup, interval=self.interval, top_h=self.top_h, rank_step=self.rank_step,
                    advance_learning=self.advance_learning)


__all__ = ["IncreLoRA"]
