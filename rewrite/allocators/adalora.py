"""AdaLoRA: prune SVD-form triplets during training by sensitivity x uncertainty (METHODS.md §2.1).

Each step t (after `optimizer.step()`, before `zero_grad`, exactly where PEFT calls `update_and_allocate`):

    I_t = |w (.) grad_w|                         for every element w of P, lam, Q
    Ibar_t = b1 Ibar_{t-1} + (1 - b1) I_t         sensitivity, smoothed
    Ubar_t = b2 Ubar_{t-1} + (1 - b2) |I_t - Ibar_t|     uncertainty (with the fresh Ibar_t)
    S_{k,i} = e(lam_{k,i}) + (mean_j e(Q_{k,i,j}) + mean_j e(P_{k,j,i})),     e = Ibar (.) Ubar

Budget in triplets, b0 = sum_k r0_k, bT = target_rank * N (or `target_budget`):

    t <= t_init                 b(t) = b0, nothing masked
    t_init < t < T - t_final    b(t) = int((b0 - bT) (1 - (t - t_init) / (T - t_final - t_init))^3 + bT),
                                mask when t mod deltaT = 0
    t = T - t_final             final mask at bT (no score update at this step), scores reset
    t > T - t_final             the final pattern is re-applied every step (soft-pruned triplets stay 0)

Masking: tau = kthvalue(all S, b0 - b(t)) over every matrix at once; lam_{k,i} <- 0 where S_{k,i} <= tau
(ties can prune more). With per-site bounds lo_k <= r_k <= hi_k (`min_rank` / `max_rank`, hi_k also capped
by r0_k) a site always keeps its lo_k best triplets, never more than hi_k, and the rest compete for the
places left (rewrite.allocators.bounds.keep_within; without bounds this is exactly the rule above; a
budget above sum_k hi_k is then not spent).
P and Q are not zeroed; a masked triplet still gets gradients and can come back
until the final phase. The orthogonality regulariser gamma * mean(||P^T P - I||_F, ||Q Q^T - I||_F) is
`regularizer()`. This is PEFT 0.21's `RankAllocator` / `AdaLoraModel.update_and_allocate` step for step
(tests/test_adalora.py checks it against PEFT itself); one deliberate difference: where PEFT's
kthvalue would be asked for k = 0 (budget not below b0 at a masking step) and raise, nothing is masked.

Under torch.distributed (rewrite.distributed) the gradients I_t reads must be averaged over the processes
already (DDP and rewrite.train do it: |w . g| of the whole batch's gradient, not a mean of per-process |w . g|),
so every process keeps the same EMAs; each mask is process 0's, on every process.

`finalize()` physically resizes: each site keeps exactly its unmasked triplets as a plain LoRA with the
same delta (c = alpha / r0 kept, as PEFT's resize keeps ranknum = r0); sites left with none lose their
branch. If training stopped before T - t_final, the final mask is taken at bT from the current scores.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from rewrite import distributed
from rewrite.adapters.svd_lora import SvdLoRA
from rewrite.allocators.bounds import Bound, clip_keep, keep_within, resolve_bounds
from rewrite.allocators.common import SvdAllocator, finalize_svd, install_svd
from rewrite.train import TrainContext

FACTORS = ("Q", "E", "P")


class AdaLoRA(SvdAllocator):
    scorer = "adalora"

    def __init__(self, gm: fx.GraphModule, adapter: str = "default", *, total_steps: int, target_rank: int = 8,
                 init_rank: int | None = 12, target_budget: int | None = None, tinit: int = 0, tfinal: int = 0,
                 delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5,
                 alpha: float | None = None, targets: Iterable[str] | None = None, min_rank: Bound = 0,
                 max_rank: Bound = None, where: str = "<adalora>"):
        super().__init__(gm, adapter, total_steps=total_steps, target_rank=target_rank, init_rank=init_rank,
                         target_budget=target_budget, beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight,
                         alpha=alpha, targets=targets, min_rank=min_rank, max_rank=max_rank, where=where)
        if total_steps < 1 or tinit >= total_steps - tfinal:
            raise ValueError(f"{where}: the schedule leaves no budgeting phase: need tinit ({tinit}) < total_steps "
                             f"({total_steps}) - tfinal ({tfinal})")
        if delta_t < 1 or orth_reg_weight < 0:
            raise ValueError(f"{where}: need delta_t >= 1 and orth_reg_weight >= 0")
        self.tinit, self.tfinal, self.delta_t = int(tinit), int(tfinal), int(delta_t)
        self.reset_ipt()
        self.rank_pattern: dict[str, torch.Tensor] | None = None
        self.final_scores: dict[str, torch.Tensor] | None = None
        self.final_reached = False
        self.history["masked_at"] = []

    # --- setup ---------------------------------------------------------------------------------------------
    def install(self) -> dict[str, SvdLoRA]:
        """Swap the adapter's LoRA modules for SVD-form ones (idempotent); sets b0 and bT."""
        if not self.modules:
            self.modules = install_svd(self.gm, self.adapter, rank=self.init_rank, alpha=self.alpha,
                                       targets=self.targets, where=self.where)
            self._set_budget()
        return self.modules

    def attach(self, modules: dict[str, SvdLoRA]) -> None:
        """Use SVD-form modules that already exist (e.g. a model built by hand) instead of `install`."""
        self.modules = dict(modules)
        self._set_budget()

    def _set_budget(self) -> None:
        self.init_bgt = sum(m.rank for m in self.modules.values())
        self.target_bgt = (self.target_budget if self.target_budget is not None
                           else self.target_rank * len(self.modules))
        if not 0 <= self.target_bgt <= self.init_bgt:
            raise ValueError(f"{self.where}: target budget {self.target_bgt} triplets is outside [0, "
                             f"{self.init_bgt}] (the {len(self.modules)} sites start with {self.init_bgt})")
        r0 = {o: m.rank for o, m in self.modules.items()}
        self.bounds = resolve_bounds(r0, self.min_rank, self.max_rank, cap=r0, where=self.where)
        floor = sum(lo for lo, _ in self.bounds.values())
        if floor > self.target_bgt:
            raise ValueError(f"{self.where}: the min ranks add up to {floor} triplets, above the target budget of "
                             f"{self.target_bgt}")
        for owner in self.modules:
            self.history["ranks"].setdefault(owner, [])

    # --- the schedule --------------------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(b(step), whether this step masks) -- PEFT's `RankAllocator.budget_schedule`."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_steps - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.delta_t == 0

    # --- importance ----------------------------------------------------------------------------------------
    def reset_ipt(self) -> None:
        self._ipt = self._avg = self._unc = None   # flat [sum of numel] buffers, PEFT's dicts as views
        self._index: dict[tuple[str, str], tuple[int, int, torch.Size]] = {}

    def _views(self, flat: torch.Tensor | None) -> dict[tuple[str, str], torch.Tensor]:
        if flat is None:
            return {}
        return {key: flat[start:start + size].view(shape) for key, (start, size, shape) in self._index.items()}

    @property
    def ipt(self) -> dict[tuple[str, str], torch.Tensor]:
        """(owner, "Q" | "E" | "P") -> I_t, as PEFT's `RankAllocator.ipt` (views into one flat buffer)."""
        return self._views(self._ipt)

    @property
    def exp_avg_ipt(self) -> dict[tuple[str, str], torch.Tensor]:
        return self._views(self._avg)

    @property
    def exp_avg_unc(self) -> dict[tuple[str, str], torch.Tensor]:
        return self._views(self._unc)

    @staticmethod
    def _factor(module: SvdLoRA, which: str) -> torch.nn.Parameter:
        params = getattr(module, which)
        if len(params) != 1:
            raise RuntimeError("AdaLoRA works on single-block SVD-form adapters")
        return params[0]

    def _flat_params(self) -> list[tuple[tuple[str, str], torch.nn.Parameter]]:
        """[((owner, factor), parameter)], cached while the modules' parameters stay the same objects."""
        ids = tuple(id(p) for m in self.modules.values() for p in m.parameters())
        if getattr(self, "_flat_ids", None) != ids:
            self._flat = [((o, w), self._factor(m, w)) for o, m in self.modules.items() for w in FACTORS]
            self._flat_ids = ids
        return self._flat

    @torch.no_grad()
    def update_ipt(self) -> None:
        """PEFT's `update_ipt` on one flat buffer holding every P, lam, Q element: the same elementwise
        arithmetic in the same order (bit-identical values), a handful of kernels instead of ~10 per tensor."""
        flat = self._flat_params()
        if not self._index:
            start = 0
            for key, p in flat:
                self._index[key] = (start, p.numel(), p.shape)
                start += p.numel()
        values = torch.cat([p.detach().reshape(-1) for _, p in flat])
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in flat])
        ipt = (values * grads).abs()
        avg = torch.zeros_like(ipt) if self._avg is None else self._avg
        unc = torch.zeros_like(ipt) if self._unc is None else self._unc
        self._ipt = ipt
        self._avg = self.beta1 * avg + (1 - self.beta1) * ipt
        self._unc = self.beta2 * unc + (1 - self.beta2) * (ipt - self._avg).abs()

    def element_score(self, owner: str, which: str) -> torch.Tensor:
        key = (owner, which)
        if self._avg is None or key not in self._index:
            return torch.zeros_like(self._factor(self.modules[owner], which))
        start, size, shape = self._index[key]
        return (self._avg[start:start + size] * self._unc[start:start + size]).view(shape)

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """owner -> S [r]: e(lam) + (mean over d_in of e(Q) + mean over d_out of e(P))."""
        out = {}
        for owner in self.modules:
            q = torch.mean(self.element_score(owner, "Q"), dim=1, keepdim=True)
            p = torch.mean(self.element_score(owner, "P"), dim=0, keepdim=False).view(-1, 1)
            ab = torch.cat([q, p], dim=1).sum(dim=1, keepdim=False)
            out[owner] = self.element_score(owner, "E").view(-1) + ab.view(-1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero lam of every triplet scoring <= the (b0 - budget)-th smallest score (within the per-site
        bounds: `keep_within`); returns the kept masks."""
        pattern, _ = keep_within(self.triplet_scores(), budget, self.bounds)
        pattern = distributed.agree({owner: keep.cpu() for owner, keep in pattern.items()})
        self.mask_using_rank_pattern(pattern)
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern: dict[str, torch.Tensor]) -> None:
        for owner, keep in pattern.items():
            e = self._factor(self.modules[owner], "E")
            e.masked_fill_(~keep.view(-1, 1).to(e.device), 0.0)

    # --- the per-step call ---------------------------------------------------------------------------------
    def update(self, step: int) -> tuple[int, dict[str, torch.Tensor] | None]:
        """PEFT's `update_and_allocate(step)`: call once per optimizer step, after `optimizer.step()` and
        before `zero_grad()`. Returns (budget, the new pattern or None when nothing was masked)."""
        self.install()
        final_step = self.total_steps - self.tfinal
        pattern = None
        budget, mask_now = self.budget_schedule(step)
        if step < final_step:
            self.update_ipt()
            if mask_now:
                pattern = self.mask_to_budget(budget)
                self.rank_pattern = pattern
        elif step == final_step:
            pattern = self.mask_to_budget(budget)
            self.rank_pattern = pattern
            self.final_scores = self.triplet_scores()
            self.reset_ipt()
            self.final_reached = True
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern(self.rank_pattern)
        self._record(step, budget, pattern)
        return budget, pattern

    def _record(self, step: int, budget: int, pattern: dict[str, torch.Tensor] | None) -> None:
        self.history["step"].append(step)
        self.history["budget"].append(budget)
        if pattern is not None:
            self.history["masked_at"].append(step)
        if pattern is not None or not hasattr(self, "_counts"):
            self._counts = {o: int(self.rank_pattern[o].sum()) if self.rank_pattern is not None else m.rank
                            for o, m in self.modules.items()}
        for owner, rank in self._counts.items():
            self.history["ranks"][owner].append(rank)

    def on_step(self, ctx: TrainContext) -> None:
        self.update(ctx.step)

    # --- the end -------------------------------------------------------------------------------------------
    def final_pattern(self) -> dict[str, torch.Tensor]:
        if self.final_reached and self.rank_pattern is not None:
            return self.rank_pattern
        if self._avg is None:  # never scored: keep what the last mask kept (or everything), within the bounds
            pattern = self.rank_pattern or {o: torch.ones(m.rank, dtype=torch.bool) for o, m in self.modules.items()}
            return clip_keep(pattern, self.bounds)
        return self.mask_to_budget(self.target_bgt)

    def _resize(self, to_lora: bool) -> dict[str, int]:
        """Each site keeps its unmasked triplets (`final_pattern`); records the final triplet scores."""
        pattern = self.final_pattern()
        scores = self.final_scores if self.final_scores is not None else self.triplet_scores()
        self.history["scores"] = {o: s.tolist() for o, s in scores.items()}
        return finalize_svd(self.gm, self.adapter, pattern, to_lora=to_lora)

    def budgets(self) -> dict[str, int]:
        """b0 and bT, in triplets."""
        return {"init_budget": self.init_bgt, "target_budget": self.target_bgt}

    def schedule_settings(self) -> dict[str, Any]:
        return dict(tinit=self.tinit, tfinal=self.tfinal, delta_t=self.delta_t)


__all__ = ["AdaLoRA"]
