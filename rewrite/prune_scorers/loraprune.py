"""loraprune: LoRA-guided structured pruning while the adapters train ("LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning", aim-uofa/LoRAPrune; METHODS.md §3.2).

Per optimizer step (after the backward, the gradient average over processes and the clip; before the update), for
every site weight W with a LoRA (matmul layout A [fan_in, r], B [r, d_out], delta s A B; g_X = dL/dX):

    G^ = A g_B + g_A B - g_A g_B        the gradient of W estimated from the LoRA gradients only (no dL/dW): in
                                        PEFT's layout g_B A + B g_A - g_B g_A; g_A B + A g_B = s (A A^T G + G B^T B),
                                        G = dL/dW (in matmul layout) projected on LoRA's row and column spaces
    I_W = |G^ (.) (W + s A B)|          in W's own layout

Per group (one attention layer's heads, one MLP's neurons, one conv's channels; KV heads for a kv_heads target),
for each weight axis its units cut that has a LoRA (q / k / v rows, o columns, gate / up rows, down columns: the
grouping comes from the coupling analysis, never from a head count), with v_axis[u] = the sum of I_W over unit u's
indices on that axis (and every other dim):

    I[u] = sum_axis v_axis[u] / (||v_axis||_2 + 1e-8)      each weight's vector L2-normalised, then summed
    Ibar <- beta Ibar + (1 - beta) I                        EMA, beta = 0.9 (a step with any NaN is skipped)

Schedule (cubic, fractions w = warmup, c = cooldown of the T = `steps` training steps, t = 0-based step):

    progress(t) = 0 for t <= w T;  1 for t > T - c T;  else 1 - (1 - (t - w T) / (T - (w + c) T))^3

Every `every` steps with 0 < progress < 1, each targeted structure's masks become the selection (the pass's rules:
rewrite.prune_scorers.selection) of target x progress (a fraction times it; a count times it, rounded down) by
Ibar, masked units first: masks only grow, as the paper's Ibar (.) mask. A mask of 0 silences its unit where it is
read (rewrite.prune_scorers.masks: o / down columns; the paper masks q / k / v / gate / up outputs, the same unit
removed). The paper's target is rho = progress 1; it prunes only while progress < 1, so the last event lands below
the target and the pass removes the rest by Ibar. Scores: Ibar for unmasked units, -1 for masked ones (they go
first). The paper exempts the first 10 % of layers and the last one: here that is the pass's `exempt`. Adapters keep
their training (the pruning rides on it); a later `train` pass goes on from there.

Options (`loraprune = { ... }`): warmup = 0.1, cooldown = 0.1, every = 10 (the paper's prune_freq), beta = 0.9.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from rewrite import distributed
from rewrite.coupling.groups import Unit
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.prune_scorers.base import PruneScoreContext, PruneScorer, Scores
from rewrite.prune_scorers.masks import Masks, attach
from rewrite.prune_scorers.selection import choose, scaled
from rewrite.prune_scorers.training import entries, factors, run_training, to_weight_layout
from rewrite.state import state_of
from rewrite.train import TrainCallback

DEFAULTS = {"warmup": 0.1, "cooldown": 0.1, "every": 10, "beta": 0.9}


def progress(t: int, total: int, warmup: float, cooldown: float) -> float:
    """The cubic schedule (module docstring) at 0-based step t of `total`."""
    if t <= warmup * total:
        return 0.0
    if t > total - cooldown * total:
        return 1.0
    span = total - (warmup + cooldown) * total
    return 1.0 - (1.0 - (t - warmup * total) / span) ** 3


def site_importance(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """weight FQN -> I_W = |G^ (.) (W + s A B)| (module docstring) for every site weight with a LoRA that has
    gradients; several LoRAs at one site: their estimates averaged, W + every delta."""
    out: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    params = dict(gm.named_parameters())
    for site in state_of(gm).sites.values():
        if site.weight in seen or site.op not in ("linear", "conv1d", "conv2d"):
            continue
        seen.add(site.weight)
        loras = [m for m in adapters_at(gm, site.owner).values() if m.kind == "lora"]
        weight = params.get(site.weight)
        if not loras or weight is None:
            continue
        estimates, effective = [], weight.detach().float().clone()
        for m in loras:
            a, b, ga, gb = factors(m)
            ga = torch.zeros_like(a) if ga is None else ga
            gb = torch.zeros_like(b) if gb is None else gb
            g_hat = a.float() @ gb.float() + ga.float() @ b.float() - ga.float() @ gb.float()
            estimates.append(to_weight_layout(g_hat, m, weight.shape))
            effective += m.delta_weight().float()
        out[site.weight] = (torch.stack(estimates).mean(0) * effective).abs()
    return out


class GroupImportance:
    """Turns per-weight importance into per-entry importance for each group (module docstring), vectorised: per
    (group, weight axis) a channel -> entry index, reduced with index_add."""

    def __init__(self, gm: fx.GraphModule, groups: dict[str, list[Unit]], where: str):
        lora_weights = {s.weight for s in state_of(gm).sites.values()
                        if any(m.kind == "lora" for m in adapters_at(gm, s.owner).values())}
        self.axes: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        self.sizes = {name: len(units) for name, units in groups.items()}
        for name, units in groups.items():
            index: dict[tuple[str, int], torch.Tensor] = {}
            for e, unit in enumerate(units):
                for cut in unit.cuts:
                    if cut.tensor in lora_weights:
                        size = gm.get_parameter(cut.tensor).shape[cut.dim]
                        index.setdefault((cut.tensor, cut.dim), torch.full((size,), -1, dtype=torch.long))[
                            list(cut.index)] = e
            if not index:
                raise SpecError(f"{where}: method = 'loraprune' scores a unit by the LoRA gradients of the weights it "
                                f"cuts, and no weight of {name} carries a LoRA: insert a LoRA on its sites first, or "
                                f"exempt them (exempt = [\"{name}*\"])")
            self.axes[name] = [(t, d, i) for (t, d), i in index.items()]

    def __call__(self, per_weight: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, axes in self.axes.items():
            total = torch.zeros(self.sizes[name], dtype=torch.float64)
            for tensor, dim, index in axes:
                if tensor not in per_weight:
                    continue
                imp = per_weight[tensor]
                channels = imp.double().sum([d for d in range(imp.dim()) if d != dim]) if imp.dim() > 1 \
                    else imp.double()
                keep = index >= 0
                v = torch.zeros(self.sizes[name], dtype=torch.float64).index_add_(0, index[keep], channels[keep])
                total += v / (v.norm() + 1e-8)
            out[name] = total
        return out


class _Schedule(TrainCallback):
    def __init__(self, gm: fx.GraphModule, ctx: PruneScoreContext, masks: Masks, options: dict):
        self.gm, self.ctx, self.masks, self.o = gm, ctx, masks, options
        groups = {g.name: g for gs in ctx.structures.values() for g in gs}
        self.units = GroupImportance(gm, {n: g.units for n, g in groups.items()}, ctx.at("method"))
        self.blocks = GroupImportance(gm, {n: g.blocks for n, g in groups.items() if g.blocks}, ctx.at("method"))
        self.ibar_units = {n: torch.zeros(len(g.units), dtype=torch.float64) for n, g in groups.items()}
        self.ibar_blocks = {n: torch.zeros(len(g.blocks), dtype=torch.float64) for n, g in groups.items()}
        self.kv = {g.name for g in ctx.structures.get("kv_heads", [])}
        self.events: list[dict] = []
        self.seconds = 0.0

    def before_step(self, ctx) -> None:
        start = time.perf_counter()
        per_weight = site_importance(self.gm)
        units, blocks = self.units(per_weight), self.blocks(per_weight)
        if all(bool(torch.isfinite(v).all()) for v in [*units.values(), *blocks.values()]):
            beta = self.o["beta"]
            for table, new in ((self.ibar_units, units), (self.ibar_blocks, blocks)):
                for name, value in new.items():
                    table[name] = beta * table[name] + (1 - beta) * value
        t = ctx.step - 1
        p = progress(t, ctx.total_steps, self.o["warmup"], self.o["cooldown"])
        if t % self.o["every"] == 0 and 0 < p < 1:
            self._mask(p, t)
        self.seconds += time.perf_counter() - start

    def scores(self) -> Scores:
        """Ibar, masked entries -1 (they go first)."""
        units, blocks = {}, {}
        for name, values in self.masks.values.items():
            kept = values.detach().double() > 0
            if name in self.kv:
                blocks[name] = torch.where(kept, self.ibar_blocks[name], -1.0)
                units[name] = self.ibar_units[name]
            else:
                units[name] = torch.where(kept, self.ibar_units[name], -1.0)
                blocks[name] = self.ibar_blocks[name]
        return Scores(units, blocks)

    def _mask(self, p: float, t: int) -> None:
        current = self.scores()
        decision = {}
        for structure, groups in self.ctx.structures.items():
            target = scaled(self.ctx.targets[structure], p)
            for row in choose(structure, groups, target, current, self.ctx.scope, self.ctx.at(structure)):
                decision[row["group"]] = row["index"]
        decision = distributed.agree(decision)
        with torch.no_grad():
            for name, index in decision.items():
                values = self.masks.values[name]
                values.fill_(1.0)
                values[index] = 0.0
        self.events.append({"step": t + 1, "progress": round(p, 4),
                            "masked": sum(len(i) for i in decision.values())})


class LoRAPrune(PruneScorer):
    name = "loraprune"
    needs_data = True

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        options = {**DEFAULTS, **(ctx.options.get("loraprune") or {})}
        masks = attach(ctx.gm, entries(ctx), {g.name: g for g in ctx.groups}, trainable=False, where=ctx.at("method"))
        try:
            schedule = _Schedule(ctx.gm, ctx, masks, options)
            result = run_training(ctx, ctx.data, [schedule], [])
            scores = schedule.scores()
        finally:
            masks.detach()
        scores.info = {"steps": result.steps, "train_seconds": round(result.seconds, 3),
                       "scoring_seconds": round(schedule.seconds, 3), "loss_first": result.losses[0],
                       "loss_final": result.final_loss, "mask_events": schedule.events, **options}
        return scores
