"""Prune scorers: what each removable unit of each dependency group is worth (higher: keep it).

    name        data   score of a unit (a head, a neuron, a channel; a KV head for GQA blocks)
    magnitude   none   sqrt(sum of w^2 over every base parameter entry the unit removes): the L2 norm of its
                       cuts (`Unit.cuts`; buffers such as BatchNorm statistics are not weights and are left out)
    random      none   uniform draws from a generator seeded with `seed` (the baseline)

A scorer takes a `PruneScoreContext` and returns `Scores`: per group name, one score per unit (`Group.units` order)
and, for GQA groups, one per KV head (`Group.blocks` order). The pass removes the lowest-scored units. A new scorer
(LoRAPrune's |G (.) (W + s B A)|, Light-PEFT's masks) is one class here and one line in `SCORERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from rewrite.coupling.groups import Group, Unit


@dataclass
class PruneScoreContext:
    gm: fx.GraphModule
    groups: list[Group]
    seed: int = 0
    data: Any = None                                  # rewrite.data.DataSource, for data-driven scorers
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scores:
    units: dict[str, torch.Tensor]    # group name -> [len(group.units)]
    blocks: dict[str, torch.Tensor]   # group name -> [len(group.blocks)]


class PruneScorer:
    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        raise NotImplementedError


class Magnitude(PruneScorer):
    name = "magnitude"

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        params = dict(ctx.gm.named_parameters())
        per_index: dict[tuple[str, int], torch.Tensor] = {}  # (FQN, dim) -> sum of w^2 per index of that dim

        def norm(unit: Unit) -> float:
            total = 0.0
            for cut in unit.cuts:
                if cut.tensor not in params:
                    continue
                key = (cut.tensor, cut.dim)
                if key not in per_index:
                    w = params[cut.tensor].detach().double()
                    per_index[key] = w.pow(2).sum([d for d in range(w.dim()) if d != cut.dim]) if w.dim() > 1 \
                        else w.pow(2)
                total += float(per_index[key][list(cut.index)].sum())
            return total ** 0.5

        return Scores({g.name: torch.tensor([norm(u) for u in g.units], dtype=torch.float64) for g in ctx.groups},
                      {g.name: torch.tensor([norm(b) for b in g.blocks], dtype=torch.float64) for g in ctx.groups})


class RandomScores(PruneScorer):
    name = "random"

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        generator = torch.Generator().manual_seed(ctx.seed)
        units = {g.name: torch.rand(len(g.units), generator=generator, dtype=torch.float64) for g in ctx.groups}
        return Scores(units, {g.name: torch.rand(len(g.blocks), generator=generator, dtype=torch.float64)
                              for g in ctx.groups})


SCORERS: dict[str, type[PruneScorer]] = {s.name: s for s in (Magnitude, RandomScores)}


def get_prune_scorer(name: str) -> PruneScorer:
    return SCORERS[name]()
