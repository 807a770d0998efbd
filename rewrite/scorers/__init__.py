"""Scorers: how much each rank of each adapted site is worth, as value curves v(r), r = 0..r_max.

Every scorer returns, per site (adapter owner), a non-decreasing curve with v(0) = 0 in one unit shared by
all sites of one run, so that the solver (rewrite.solver) can trade ranks of different sites against their
costs (rewrite.costmodel). Registered scorers (METHODS.md §2.5):

    name        data          v(r)                                                     unit
    spectrum    none          sum_{i<=r} sigma_i(W)^2                                  ||W||_F^2 (share per site
                                                                                       with normalize="site")
    activation  inputs        sum_{i<=r} sigma_i(W C^{1/2})^2, C = X^T X / n: the      mean output energy
                              output energy the best rank-r approximation of W keeps   E||W x||^2 (or share)
                              (whitened SVD, SVD-LLM); discarded sigma^2 = output error
    fisher      inputs+labels 1/2 sum_{i<=r} sigma_i(Gamma^{-1/2} G C^{-1/2})^2,       Gauss-Newton loss decrease
                              G = dL/dW, Gamma = E[J^T J] at the site's output: the     (K-FAC)
                              best rank-r natural-gradient step (whiten = "kfac");
                              with probe_steps = N: the same metric on the update the
                              adapters fit in N Adam steps (see fisher.py)
    energy      none          sum_{i<=r} sigma_i(s A B)^2: the update energy that      ||s A B||_F^2 (share per
                              a rank-r SVD truncation of the adapter keeps (for a      site with
                              trained adapter; zero for a fresh one, see energy.py)    normalize="site")

Site matrices are taken as W [d_out, fan_in]: linear W, Conv1D W^T, conv2d W.flatten(1) acting on
unfolded patches, embedding E^T acting on one-hot token vectors (C is then diagonal: token frequencies).
Statistics are collected with hooks on the adapter modules of the adapter being allocated (they see the
site's input x, and the gradient of their output is dL/dy at the site), so every call of a shared module
is counted and nothing outside the adapters is touched.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from rewrite.costmodel import SiteShape


@dataclass
class Target:
    """One adapted module: its adapter, the site shape and its base weight."""
    owner: str
    shape: SiteShape
    adapter: nn.Module
    weight: torch.Tensor   # the base weight parameter in its own layout
    max_rank: int          # curve length - 1
    kernel: tuple[int, int] = (1, 1)


@dataclass
class ScoreContext:
    gm: fx.GraphModule
    targets: list[Target]
    data: Any = None                                  # rewrite.data.DataSource or None
    loss: Callable[[Any, dict], torch.Tensor] | None = None
    batches: int = 8
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Curves:
    values: dict[str, list[float]]   # owner -> v(0..max_rank)
    unit: str
    settings: dict[str, Any] = field(default_factory=dict)


class Scorer:
    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    def __call__(self, ctx: ScoreContext) -> Curves:
        raise NotImplementedError


def weight_matrix(target: Target) -> torch.Tensor:
    """The site's weight as [d_out, fan_in] (float32 copy)."""
    w = target.weight.detach().float()
    op = target.shape.op
    if op == "conv1d" or op == "embedding":
        return w.T
    if op == "conv2d":
        return w.flatten(1)
    return w


def energy_curve(sigma: torch.Tensor, max_rank: int, scale: float = 1.0) -> list[float]:
    """v(r) = scale * sum_{i<=r} sigma_i^2 for r = 0..max_rank (flat beyond the matrix rank)."""
    sq = (sigma.double().sort(descending=True).values ** 2) * scale
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), sq.cumsum(0)])
    idx = torch.clamp(torch.arange(max_rank + 1), max=len(sq))
    return [float(v) for v in cum[idx]]


def spectral_curves(ctx: ScoreContext, sigma_of: Callable[[Target], torch.Tensor], matrix: str,
                    normalize: str) -> Curves:
    """v(r) = sum_{i<=r} sigma_i^2 of each target's matrix (`sigma_of`), divided by its ||.||_F^2 with
    normalize = "site" (ctx.options["normalize"] overrides the scorer's default `normalize`)."""
    normalize = ctx.options.get("normalize") or normalize
    values = {}
    for t in ctx.targets:
        sigma = sigma_of(t)
        total = float((sigma ** 2).sum())
        scale = 1.0 / total if normalize == "site" and total > 0 else 1.0
        values[t.owner] = energy_curve(sigma, t.max_rank, scale)
    unit = f"share of ||{matrix}||_F^2" if normalize == "site" else f"||{matrix}||_F^2"
    return Curves(values, unit, {"normalize": normalize})


def _registry() -> dict[str, type[Scorer]]:
    from rewrite.scorers.activation import ActivationScorer
    from rewrite.scorers.energy import EnergyScorer
    from rewrite.scorers.fisher import FisherScorer
    from rewrite.scorers.spectrum import SpectrumScorer

    return {s.name: s for s in (SpectrumScorer, ActivationScorer, FisherScorer, EnergyScorer)}


REGISTRY: dict[str, type[Scorer]] = {}


def get_scorer(name: str) -> type[Scorer]:
    if not REGISTRY:
        REGISTRY.update(_registry())
    return REGISTRY[name]


def scorer_names() -> list[str]:
    return ["spectrum", "activation", "fisher", "energy"]


__all__ = ["Curves", "REGISTRY", "ScoreContext", "Scorer", "Target", "energy_curve", "get_scorer", "scorer_names",
           "spectral_curves", "weight_matrix"]
