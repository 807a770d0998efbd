"""Prune scorers: what each removable unit of each dependency group is worth (higher: keep it), and, for the adapter
targets, what each LoRA module and each of its rank components is worth.

    name        data   score of a unit (a head, a neuron, a channel; a KV head for GQA blocks)
    magnitude   none   sqrt(sum of w^2 over every base parameter entry the unit removes): the L2 norm of its
                       cuts (`Unit.cuts`; buffers such as BatchNorm statistics are not weights and are left out);
                       adapters: module ||s A B||_F / ||W||_F, rank component i ||s A[:, i] B[i, :]||_F =
                       s ||A[:, i]|| ||B[i, :]||
    random      none   uniform draws from a generator seeded with `seed` (the baseline), adapters too
    loraprune   [data] LoRA-guided |G^ (.) (W + s B A)| with G^ from the LoRA gradients only, EMA, cubic schedule and
                       iterative masks while the adapters train (loraprune.py)
    light-peft  [data] trainable unit masks with an L1 term, trained with the adapters (masked early estimation);
                       module and rank importance of the adapters measured on the way (light_peft.py)

A scorer takes a `PruneScoreContext` and returns `Scores`: per group name, one score per unit (`Group.units` order)
and, for GQA groups, one per KV head (`Group.blocks` order); per adapter module path (`adapters.<owner>.<name>`)
one module score and one score per rank component. The pass removes the lowest-scored units, modules and ranks
(selection.py). A new scorer is one class and one line in `SCORERS`.
"""
from __future__ import annotations

import torch

from rewrite.coupling.groups import Unit
from rewrite.prune_scorers.base import PruneScoreContext, PruneScorer, Scores
from rewrite.prune_scorers.light_peft import LightPEFT
from rewrite.prune_scorers.loraprune import LoRAPrune


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

        modules, ranks = {}, {}
        for path, module in ctx.adapters.items():
            a, b = (t.detach().double() for t in module._matrices())
            weight = params[ctx.sites[path].weight].detach().double()
            modules[path] = float(module.delta_weight().double().norm() / weight.norm().clamp(min=1e-12))
            ranks[path] = module.scaling * a.norm(dim=0) * b.norm(dim=1)
        return Scores({g.name: torch.tensor([norm(u) for u in g.units], dtype=torch.float64) for g in ctx.groups},
                      {g.name: torch.tensor([norm(b) for b in g.blocks], dtype=torch.float64) for g in ctx.groups},
                      modules, ranks)


class RandomScores(PruneScorer):
    name = "random"

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        generator = torch.Generator().manual_seed(ctx.seed)
        units = {g.name: torch.rand(len(g.units), generator=generator, dtype=torch.float64) for g in ctx.groups}
        blocks = {g.name: torch.rand(len(g.blocks), generator=generator, dtype=torch.float64) for g in ctx.groups}
        modules = {path: float(torch.rand(1, generator=generator, dtype=torch.float64)) for path in ctx.adapters}
        ranks = {path: torch.rand(m.rank, generator=generator, dtype=torch.float64) for path, m in ctx.adapters.items()}
        return Scores(units, blocks, modules, ranks)


SCORERS: dict[str, type[PruneScorer]] = {s.name: s for s in (Magnitude, RandomScores, LoRAPrune, LightPEFT)}


def get_prune_scorer(name: str) -> PruneScorer:
    return SCORERS[name]()
