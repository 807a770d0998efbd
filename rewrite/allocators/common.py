"""What the training-time allocators share: putting SVD-form adapters in, and taking plain LoRA out.

`install_svd` swaps the LoRA modules of one adapter for `SvdLoRA` modules of a chosen starting rank (same
site, alpha and dropout; the graph keeps calling `adapters.<site>.<name>`, so no re-trace; a LoRA that
already has a delta, loaded or trained, is carried over through its SVD); sites selected
by `targets` that have no such adapter yet get one wired in. `finalize_svd` physically resizes: each site
keeps exactly its chosen triplets as a plain `LoRA` of that rank (same delta), and a site left with no
triplet loses its branch: its call and join nodes are removed from the graph. `SvdAllocator` is their
common base: the settings both take, the trained parameters, the regulariser, and the end of training
(`finalize` once, `settings`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from rewrite.adapters.svd_lora import SvdLoRA, orthogonality
from rewrite.allocators.bounds import Bound
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, drop_adapter, register_adapter, unwire, wire
from rewrite.state import state_of
from rewrite.train import TrainCallback, TrainContext


def owners_of(gm: fx.GraphModule) -> list[str]:
    """Every site owner (weight-carrying module) of the captured graph, in site-table order."""
    return list(dict.fromkeys(site.owner for site in state_of(gm).sites.values()))


def drop_sites(gm: fx.GraphModule, adapter: str, owners: Iterable[str]) -> None:
    """Remove `adapter`'s branch at `owners`: its call and join nodes and its module (rank 0)."""
    owners = list(owners)
    for owner in owners:
        unwire(gm, adapter, owner)
        drop_adapter(gm, owner, adapter)
    if owners:
        gm.graph.lint()
        gm.recompile()


def svd_modules(gm: fx.GraphModule, adapter: str) -> dict[str, SvdLoRA]:
    """site owner -> SvdLoRA module of `adapter`, in site-table order."""
    out = {}
    for owner in owners_of(gm):
        module = adapters_at(gm, owner).get(adapter)
        if isinstance(module, SvdLoRA):
            out[owner] = module
    return out


def install_svd(gm: fx.GraphModule, adapter: str, *, rank: int | Mapping[str, int] | None = None,
                alpha: float | None = None, dropout: float | None = None, targets: Iterable[str] | None = None,
                where: str = "<allocator>") -> dict[str, SvdLoRA]:
    """Make `adapter` an SVD-form adapter at every site that has it; with `targets`, at exactly the selected
    sites (those without the adapter get one wired in, the others are left alone).

    `rank`: starting rank (int or per-owner mapping; default: the existing LoRA's rank). `alpha`: default
    the existing adapter's alpha (8.0 for new sites). Existing SvdLoRA modules are left as they are."""
    from rewrite.adapters.for_site import selectable_ops
    from rewrite.graph_edit import conv_settings
    from rewrite.sites import select

    state = state_of(gm)
    table = state.sites
    wanted_new: dict[str, list] = {}
    if targets:
        for site in select(table, list(targets), where, ops=selectable_ops(SvdLoRA.ops)):
            wanted_new.setdefault(site.owner, []).append(site)
    out: dict[str, SvdLoRA] = {}
    for owner in owners_of(gm):
        current = adapters_at(gm, owner).get(adapter)
        if isinstance(current, SvdLoRA):
            out[owner] = current
            continue
        if owner not in wanted_new and (targets or current is None):
            continue
        site = next(s for s in table.values() if s.owner == owner)
        if site.op == "embedding":
            raise SpecError(f"{where}: site {owner} is an embedding; SVD-form (AdaLoRA / IncreLoRA) adapters "
                            "support linear, Conv1D and conv2d sites")
        r = rank.get(owner) if isinstance(rank, Mapping) else rank
        r = int(r if r is not None else getattr(current, "rank", 8))
        a = float(alpha if alpha is not None else getattr(current, "alpha", 8.0))
        p = float(dropout if dropout is not None else getattr(getattr(current, "dropout", None), "p", 0.0))
        weight = gm.get_parameter(site.weight)
        module = SvdLoRA(site.op, site.d_in, site.d_out, r, a, dropout=p, conv=conv_settings(gm, site, where),
                         dtype=weight.dtype, device=weight.device)
        if current is not None:
            warm_start(module, current)
            holder = gm.get_submodule(f"adapters.{owner}")
            setattr(holder, adapter, module)
        else:
            register_adapter(gm, owner, adapter, module)
            for s in wanted_new[owner]:
                wire(gm, table.node_of(gm, s.name), s, adapter, module)
        out[owner] = module
    if not out:
        raise SpecError(f"{where}: adapter {adapter!r} is attached to no site; insert it first (or give targets)")
    gm.graph.lint()
    gm.recompile()
    return out


@torch.no_grad()
def warm_start(module: SvdLoRA, current) -> bool:
    """Carry a non-zero delta over: its top singular triplets become the first triplets of `module`
    (P = U, lam = S / c, Q = V^T), so the swap keeps the function; the rest keep PEFT's init with lam = 0.
    A fresh LoRA (B = 0) has no delta and nothing changes. Returns whether a delta was carried over."""
    if not hasattr(current, "delta_weight") or next(current.parameters()).device.type == "meta":
        return False
    delta = current.delta_weight().float()
    if not bool(delta.any()):
        return False
    if module.op == "conv1d":
        mat = delta.T
    elif module.op == "conv2d":
        mat = delta.flatten(1)
    else:
        mat = delta
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(module.rank, int((s > s[0] * 1e-6).sum()))
    if module.rank < int((s > s[0] * 1e-6).sum()):
        import warnings

        warnings.warn(f"SVD-form adapter of rank {module.rank} keeps only the top {k} directions of the existing "
                      f"rank-{int((s > s[0] * 1e-6).sum())} delta", stacklevel=3)
    q, e, p = module.Q[0], module.E[0], module.P[0]
    p[:, :k] = u[:, :k].to(p.dtype)
    q[:k] = vh[:k].to(q.dtype)
    e[:k, 0] = (s[:k] / module.scaling).to(e.dtype)
    return True


@torch.no_grad()
def finalize_svd(gm: fx.GraphModule, adapter: str, keep: Mapping[str, torch.Tensor | list[bool] | None], *,
                 to_lora: bool = True) -> dict[str, int]:
    """Resize every SvdLoRA of `adapter` to its kept triplets; returns site owner -> final rank.

    `keep[owner]`: bool mask over the module's ranks (None: keep all counted ranks, reserves dropped).
    With `to_lora` (default) each site ends as a plain LoRA of its final rank; rank 0 sites are removed."""
    ranks: dict[str, int] = {}
    for owner, module in svd_modules(gm, adapter).items():
        mask = keep.get(owner)
        index = module._keep_index(mask)
        rank = int(index.numel())
        ranks[owner] = rank
        if rank == 0:
            continue
        if to_lora:
            holder = gm.get_submodule(f"adapters.{owner}")
            lora = module.to_lora(index)
            lora.train(False)
            setattr(holder, adapter, lora)
        else:
            module.resize(rank, keep=index)
    drop_sites(gm, adapter, [owner for owner, rank in ranks.items() if rank == 0])
    return ranks


def ema(previous: torch.Tensor | float, value: torch.Tensor | float, beta: float):
    """beta * previous + (1 - beta) * value (the exact expression PEFT and the official code use)."""
    return beta * previous + (1 - beta) * value


class SvdAllocator(TrainCallback):
    """Base of the training-time allocators (AdaLoRA, IncreLoRA). A subclass provides `install()` (SVD-form
    modules in place, idempotent), `_resize(to_lora)` (the final ranks, sites resized), `budgets()` (its
    budgets in ranks, "target_budget" among them) and `schedule_settings()` (its own settings)."""
    scorer = ""
    blockwise = False  # orthogonality per parameter block (IncreLoRA) instead of per module

    def __init__(self, gm: fx.GraphModule, adapter: str, *, total_steps: int, target_rank: int,
                 init_rank: int | None, target_budget: int | None, beta1: float, beta2: float,
                 orth_reg_weight: float, alpha: float | None, targets: Iterable[str] | None, min_rank: Bound,
                 max_rank: Bound, where: str):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"{where}: beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        self.gm, self.adapter, self.where = gm, adapter, where
        self.total_steps, self.target_rank, self.init_rank = int(total_steps), int(target_rank), init_rank
        self.target_budget = target_budget
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.alpha, self.targets = alpha, list(targets) if targets else None
        self.min_rank, self.max_rank = min_rank, max_rank
        self.modules: dict[str, SvdLoRA] = {}
        self.finalized = False
        self.history: dict[str, Any] = {"scorer": self.scorer, "step": [], "budget": [], "ranks": {}}

    def prepare(self) -> dict[str, SvdLoRA]:
        """`rewrite.train.train` calls this before it builds the optimizer: `install()`."""
        return self.install()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.install().values() for p in m.parameters() if p.requires_grad]

    def regularizer(self, ctx: TrainContext | None = None) -> torch.Tensor | None:
        """orth_reg_weight * `orthogonality` of the modules (None when the weight is 0)."""
        if self.orth_reg_weight == 0:
            return None
        return self.orth_reg_weight * orthogonality(self.install().values(), blockwise=self.blockwise)

    def finalize(self, *, to_lora: bool = True) -> dict[str, int]:
        """Physically resize every site to its final rank (plain LoRA by default), once; returns final ranks."""
        if not self.finalized:
            self.final_ranks = self._resize(to_lora)
            self.history["final_ranks"] = dict(self.final_ranks)
            self.history.update(self.budgets())
            self.finalized = True
        return dict(self.final_ranks)

    def on_train_end(self, ctx: TrainContext) -> None:
        self.finalize()

    def settings(self) -> dict[str, Any]:
        """The settings the run used, in report order (ranks and budget, schedule, scores, bounds)."""
        return dict(init_rank=self.init_rank, target_rank=self.target_rank,
                    target_budget=self.budgets()["target_budget"], total_steps=self.total_steps,
                    **self.schedule_settings(), beta1=self.beta1, beta2=self.beta2,
                    orth_reg_weight=self.orth_reg_weight, min_rank=self.min_rank, max_rank=self.max_rank)
