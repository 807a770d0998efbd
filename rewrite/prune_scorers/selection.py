"""Which units each group loses for a target (rule 2 of the prune pass), shared by the pass and by the scorers that
prune while they train (LoRAPrune's iterative masks pick with the same rules at every step of their schedule).

    choose(structure, groups, target, scores, scope, where) -> one row per group:
        removed (unit labels), index (unit or KV-head indices), atoms (fine atoms for `rewrite.coupling.remove`), ...

Per group (scope = "layer"): n = floor(f * units) for a fraction f, n for a count; a layer never loses all of its
units. GQA: query heads go evenly per KV head, r = floor(n / kv_heads) lowest-scored from each. kv_heads: the n
lowest-scored KV heads of each GQA layer go. scope = "global": the N = floor(f * total) (or count) lowest-scored
removable units of the structure go, never the last unit of a group; GQA groups then round their share as above.
Ties go to the lower index. Infeasible requests are `SpecError`s naming `where`.
"""
from __future__ import annotations

import math

from rewrite.coupling.groups import Group
from rewrite.errors import SpecError


def scaled(target: float | int, progress: float) -> float | int:
    """The part `progress` (in [0, 1]) of a target: a fraction times progress, a count rounded down."""
    return target * progress if isinstance(target, float) else math.floor(target * progress)


def choose(structure: str, groups: list[Group], target: float | int, scores, scope: str, where: str) -> list[dict]:
    """The units (kv_heads: the KV heads) each group loses; `scores` is a `Scores` (module docstring)."""
    blocks = structure == "kv_heads"
    sizes = {g.name: len(g.blocks if blocks else g.units) for g in groups}
    if scope == "global":
        table = scores.blocks if blocks else scores.units
        ranked = sorted((float(table[g.name][i]), gi, i) for gi, g in enumerate(groups)
                        for i in (range(len(g.blocks)) if blocks else g.removable))
        counts = _global_counts(structure, groups, sizes, target, ranked, where)
    else:
        counts = {name: math.floor(target * size) if isinstance(target, float) else target
                  for name, size in sizes.items()}
    return [_kv_row(g, counts[g.name], scores, where) if blocks else _row(g, counts[g.name], scores, where)
            for g in groups]


def _global_counts(structure: str, groups: list[Group], sizes: dict, target: float | int, ranked: list,
                   where: str) -> dict:
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
        raise SpecError(f"{where}: {structure} = {target!r} asks for {wanted} of {total} units, but only "
                        f"{sum(counts.values())} can go while every layer keeps one")
    return counts


def _kv_row(g: Group, n: int, scores, where: str) -> dict:
    if n >= len(g.blocks):
        raise SpecError(f"{where}: removes {n} of the {len(g.blocks)} KV heads of {g.name}; at least one must stay")
    chosen = sorted(sorted(range(len(g.blocks)), key=lambda b: (float(scores.blocks[g.name][b]), b))[:n])
    blocked = [r for b in chosen for r in g.blocks[b].blocked]
    if blocked:
        raise SpecError(f"{where}: {g.name}: {blocked[0]}")
    return dict(group=g.name, structure="kv_heads", units_before=len(g.blocks), units_after=len(g.blocks) - n,
                removed=[g.blocks[b].label for b in chosen],
                scores=[round(float(s), 6) for s in scores.blocks[g.name]],
                sites=g.sites, adapters=sorted({a.adapter for a in g.adapters}), index=chosen,
                atoms=[a for b in chosen for a in g.blocks[b].atoms])


def _row(g: Group, n: int, scores, where: str) -> dict:
    units, unit_scores = g.units, scores.units[g.name]
    if n >= len(units):
        raise SpecError(f"{where}: removes {n} of the {len(units)} {noun(g)} of {g.name}; at least one must stay")
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
            raise SpecError(f"{where}: removes {n} {noun(g)} of {g.name}, but only {len(g.removable)} of its "
                            f"{len(units)} can go ({'; '.join(dict.fromkeys(r for u in units for r in u.blocked))})")
        chosen = sorted(g.removable, key=lambda i: (float(unit_scores[i]), i))[:n]
    chosen = sorted(chosen)
    row = dict(group=g.name, structure=g.structure, units_before=len(units), units_after=len(units) - len(chosen),
               removed=[units[i].label for i in chosen], scores=[round(float(s), 6) for s in unit_scores],
               sites=g.sites, adapters=sorted({a.adapter for a in g.adapters}), index=chosen,
               atoms=[a for i in chosen for a in units[i].atoms])
    if g.blocks:
        row["kv_heads"] = len(g.blocks)
    if note:
        row["note"] = note
    return row


def noun(g: Group) -> str:
    return {"heads": "heads", "ffn": "neurons", "channels": "channels"}.get(g.structure, "units")
