"""prune: remove whole attention heads, FFN neurons and conv channels, cutting every coupled tensor together.

    [[pass]]
    name = "prune"
    method = "magnitude"        # magnitude | random (rewrite.prune_scorers): the lowest-scored units go
    heads = 0.25                # a fraction of each layer's heads (float in [0, 1)) or a count per layer (int)
    # kv_heads = 1              # instead of heads, GQA: whole KV heads, each with its query group
    ffn = 64                    # FFN neurons (plain or gated), likewise
    channels = 0.5              # conv output channels (with their BatchNorm entries and the next conv's inputs)
    scope = "layer"             # "layer": each group loses its share; "global": the lowest-scored units across all
                                # groups of a structure go (a fraction of their total, or a count in total)
    layers = ["*.layers.1.*"]   # optional: only the groups that cut a site these selectors match
    exempt = ["*.layers.0.*"]   # groups that cut a site these selectors match are left whole
    seed = 0                    # method = "random"
    report = "prune"            # <report>.json and <report>.md in the output directory; "" writes none

Rules:
1. Groups come from the coupling analysis (rewrite.coupling: channel labels traced through the graph): a unit is
   what one removal takes (a head: q / k / v rows, o columns and biases; a neuron: gate / up rows and the down
   column; a channel: conv rows, BatchNorm entries, the next conv's input), with every adapter tensor on those sites
   (LoRA B columns / A rows, DoRA magnitudes, (IA)^3 and BitFit entries).
2. Per group (scope = "layer"): n = floor(f * units) for a fraction f, n for a count; a layer never loses all of
   its units: n >= units is an error, as is a fraction outside [0, 1). GQA: query heads go evenly per KV head,
   r = floor(n / kv_heads) lowest-scored from each (n is rounded down to r * kv_heads; the report says so).
   kv_heads: the n lowest-scored KV heads of each GQA layer go, each with its whole query group.
   scope = "global": the N = floor(f * total) (or count) lowest-scored removable units of the structure go, never the
   last unit of a group; GQA groups then round their share as above.
3. A group a residual add ties (the residual stream, residual conv channels) is never cut: skipped, or an error
   when `layers` names it. A group whose adapter cannot be sliced (OFT, VeRA, ...; see
   rewrite/coupling/adapter_axes.py) is an error unless exempt. Units whose removal would resize a tensor the
   graph reads without labels (a normalised dim, the model outputs) are never chosen.
4. Removal slices weights, biases, norm / BatchNorm tensors and adapters, and rewrites the shape constants the
   capture baked in (view / reshape / expand sizes, split sizes, slice bounds): the pruned model equals the unpruned
   one with the same units' weights set to zero.
5. Running the pass again with the same options leaves the graph alone (modified=False); a zero target is the
   identity.
"""
from __future__ import annotations

import math
from typing import Literal

import torch.fx as fx
from pydantic import Field, field_validator, model_validator

from rewrite.adapters.base import NotSupported
from rewrite.coupling import Group, analyze, remove
from rewrite.errors import SpecError
from rewrite.pass_infra import GraphPass, PassOptions, PassResult, real_weights
from rewrite.passes.prune_report import write_prune_report
from rewrite.prune_scorers import SCORERS, PruneScoreContext, Scores, get_prune_scorer
from rewrite.sites import check_selector_syntax, select

STRUCTURES = ("heads", "kv_heads", "ffn", "channels")  # targets; kv_heads cut "heads" groups by KV head
MARK = "rewrite.prune"  # gm.meta: the options of every prune already applied (rule 5)


class PruneOptions(PassOptions):
    method: Literal[tuple(SCORERS)] = "magnitude"  # type: ignore[valid-type]
    heads: float | int | None = None
    kv_heads: float | int | None = None
    ffn: float | int | None = None
    channels: float | int | None = None
    scope: Literal["layer", "global"] = "layer"
    layers: list[str] | None = Field(default=None, min_length=1)
    exempt: list[str] = []
    seed: int = 0
    report: str = "prune"

    @model_validator(mode="after")
    def _heads_or_kv_heads(self) -> "PruneOptions":
        if self.heads and self.kv_heads:
            raise ValueError("give heads (query heads, evenly per KV head) or kv_heads (whole KV heads), not both")
        return self

    @field_validator("heads", "kv_heads", "ffn", "channels")
    @classmethod
    def _target(cls, value: float | int | None) -> float | int | None:
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError(f"a fraction must be in [0, 1) (got {value}; 1.0 would remove every unit of a layer); "
                             "give an integer for a count")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a count must be >= 0 (got {value})")
        return value

    @field_validator("layers", "exempt")
    @classmethod
    def _selectors(cls, patterns: list[str] | None) -> list[str] | None:
        return None if patterns is None else [check_selector_syntax(p) for p in patterns]


class PrunePass(GraphPass):
    name = "prune"
    Options = PruneOptions

    def writes(self) -> list[str]:
        return [f"{self.options.report}.json", f"{self.options.report}.md"] if self.options.report else []

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        real_weights(gm, self.context.where, "prune reads and slices weights")
        key = o.model_dump_json()
        targets = {s: getattr(o, s) for s in STRUCTURES if getattr(o, s)}
        if key in gm.meta.get(MARK, []) or not targets:
            return PassResult(gm, False, {"note": "already pruned with these options" if targets else "no target"})
        coupling = analyze(gm)
        chosen = self._candidates(gm, coupling.groups, targets)
        scores = get_prune_scorer(o.method)(PruneScoreContext(gm, [g for gs in chosen.values() for g in gs],
                                                              seed=o.seed, data=self.context.data))
        plan = {s: self._choose(s, groups, targets[s], scores) for s, groups in chosen.items()}
        atoms = {a for rows in plan.values() for row in rows for a in row["atoms"]}
        if not atoms:
            return PassResult(gm, False, {"note": "the targets round to nothing"})
        try:
            removal = remove(gm, coupling, atoms)
        except NotSupported as err:
            raise SpecError(f"{self.context.where}: {err}") from None
        gm.meta.setdefault(MARK, []).append(key)
        removed = {s: sum(len(r["removed"]) for r in rows) for s, rows in plan.items()}
        report = dict(method=o.method, scope=o.scope, targets=targets, removed=removed,
                      params_before=removal.params_before, params_after=removal.params_after,
                      constants_rewritten=removal.constants,
                      groups=[{k: v for k, v in row.items() if k != "atoms"} for rows in plan.values() for row in rows])
        files = []
        if o.report:
            stem = self.context.output_path(o.report, "report")
            files = [p.name for p in write_prune_report(report, stem.parent, stem.name)]
        return PassResult(gm, True, {"method": o.method, **{f"{s}_removed": n for s, n in removed.items()},
                                     "params_before": removal.params_before, "params_after": removal.params_after,
                                     "report": files})

    # ------------------------------------------------------------------------------------------ steps

    def _candidates(self, gm: fx.GraphModule, groups: list[Group], targets: dict) -> dict[str, list[Group]]:
        """Rules 1 and 3: each structure's groups, restricted by `layers`, without `exempt`, checked."""
        o, table = self.options, gm.meta["rewrite"].sites
        named = {s.name for s in select(table, o.layers, self.context.at("layers"))} if o.layers else None
        exempt = {s.name for s in select(table, o.exempt, self.context.at("exempt"))} if o.exempt else set()
        out = {}
        for structure in targets:
            where = self.context.at(structure)
            kind = "heads" if structure == "kv_heads" else structure
            mine = [g for g in groups if g.structure == kind and not exempt & set(g.sites)
                    and (named is None or named & set(g.sites)) and (structure != "kv_heads" or g.blocks)]
            for g in mine:
                if g.refused:
                    raise SpecError(f"{where}: {structure} of {g.name}: {g.refused}")
                if named is not None and g.status != "ok":
                    why = g.tied or "; ".join(dict.fromkeys(r for u in g.units for r in u.blocked))
                    raise SpecError(f"{self.context.at('layers')}: {structure} of {g.name} cannot be pruned: {why}")
            usable = [g for g in mine if g.status == "ok"]
            if not usable:
                seen = ", ".join(f"{g.name} ({g.status}{', GQA' if g.blocks else ''})" for g in groups
                                 if g.structure == kind) or "none"
                raise SpecError(f"{where}: {structure} = {targets[structure]!r}, but no group of {structure} can be "
                                f"pruned here (groups: {seen}); `rewrite inspect MODEL --groups` lists them")
            out[structure] = usable
        return out

    def _choose(self, structure: str, groups: list[Group], target: float | int, scores: Scores) -> list[dict]:
        """Rule 2: the units (kv_heads: the KV heads) each group loses."""
        where, blocks = self.context.at(structure), structure == "kv_heads"
        sizes = {g.name: len(g.blocks if blocks else g.units) for g in groups}
        if self.options.scope == "global":
            table = scores.blocks if blocks else scores.units
            ranked = sorted((float(table[g.name][i]), gi, i) for gi, g in enumerate(groups)
                            for i in (range(len(g.blocks)) if blocks else g.removable))
            counts = self._global_counts(structure, groups, sizes, target, ranked)
        else:
            counts = {name: math.floor(target * size) if isinstance(target, float) else target
                      for name, size in sizes.items()}
        return [self._kv_row(g, counts[g.name], scores, where) if blocks else self._row(g, counts[g.name], scores, where)
                for g in groups]

    def _global_counts(self, structure: str, groups: list[Group], sizes: dict, target: float | int,
                       ranked: list) -> dict:
        total = sum(sizes.values())
        wanted = math.floor(target * total) if isinstance(target, float) else target
        counts, left = {g.name: 0 for g in groups}, dict(sizes)
        for _, gi, _ in ranked:
            if sum(counts.values()) == wanted:
                break
            g = groups[gi]
            if left[g.name] > 1:
                counts[g.name] += 1
                left[g.name] -= 1
        if sum(counts.values()) < wanted:
            raise SpecError(f"{self.context.at(structure)}: {structure} = {target!r} asks for {wanted} of {total} "
                            f"units, but only {sum(counts.values())} can go while every layer keeps one")
        return counts

    def _kv_row(self, g: Group, n: int, scores: Scores, where: str) -> dict:
        if n >= len(g.blocks):
            raise SpecError(f"{where}: removes {n} of the {len(g.blocks)} KV heads of {g.name}; at least one must stay")
        chosen = sorted(sorted(range(len(g.blocks)), key=lambda b: (float(scores.blocks[g.name][b]), b))[:n])
        blocked = [r for b in chosen for r in g.blocks[b].blocked]
        if blocked:
            raise SpecError(f"{where}: {g.name}: {blocked[0]}")
        return dict(group=g.name, structure="kv_heads", units_before=len(g.blocks), units_after=len(g.blocks) - n,
                    removed=[g.blocks[b].label for b in chosen], scores=[round(float(s), 6) for s in
                                                                         scores.blocks[g.name]],
                    sites=g.sites, adapters=sorted({a.adapter for a in g.adapters}),
                    atoms=[a for b in chosen for a in g.blocks[b].atoms])

    def _row(self, g: Group, n: int, scores: Scores, where: str) -> dict:
        units, unit_scores = g.units, scores.units[g.name]
        if n >= len(units):
            raise SpecError(f"{where}: removes {n} of the {len(units)} {_noun(g)} of {g.name}; at least one must stay")
        note = ""
        if g.blocks:  # GQA: evenly per KV head
            per_block = n // len(g.blocks)
            if per_block * len(g.blocks) != n:
                note = f"{n} rounded down to {per_block * len(g.blocks)}: query heads go evenly per KV head"
            chosen = []
            for b in range(len(g.blocks)):
                mine = [i for i in g.removable if g.block_of[i] == b]
                chosen += sorted(mine, key=lambda i: (float(unit_scores[i]), i))[:per_block]
            if len(chosen) != per_block * len(g.blocks):
                raise SpecError(f"{where}: {g.name} cannot lose {per_block} query heads from every KV head "
                                "(some are blocked)")
        else:
            if n > len(g.removable):
                raise SpecError(f"{where}: removes {n} {_noun(g)} of {g.name}, but only {len(g.removable)} of its "
                                f"{len(units)} can go ({'; '.join(dict.fromkeys(r for u in units for r in u.blocked))})")
            chosen = sorted(g.removable, key=lambda i: (float(unit_scores[i]), i))[:n]
        chosen = sorted(chosen)
        row = dict(group=g.name, structure=g.structure, units_before=len(units), units_after=len(units) - len(chosen),
                   removed=[units[i].label for i in chosen], scores=[round(float(s), 6) for s in unit_scores],
                   sites=g.sites, adapters=sorted({a.adapter for a in g.adapters}),
                   atoms=[a for i in chosen for a in units[i].atoms])
        if g.blocks:
            row["kv_heads"] = len(g.blocks)
        if note:
            row["note"] = note
        return row


def _noun(g: Group) -> str:
    return {"heads": "heads", "ffn": "neurons", "channels": "channels"}.get(g.structure, "units")
