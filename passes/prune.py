"""prune: remove whole attention heads, FFN neurons and conv channels, cutting every coupled tensor together.

    [[pass]]
    name = "prune"
    method = "magnitude"        # magnitude | random | loraprune | light-peft (rewrite.prune_scorers): the
                                # lowest-scored units go; loraprune and light-peft train the adapters on [data]
    heads = 0.25                # a fraction of each layer's heads (float in [0, 1)) or a count per layer (int)
    # kv_heads = 1              # instead of heads, GQA: whole KV heads, each with its query group
    ffn = 64                    # FFN neurons (plain or gated), likewise
    channels = 0.5              # conv output channels (with their BatchNorm entries and the next conv's inputs)
    adapter_modules = 0.5       # LoRA modules dropped whole (fraction of them, or a count), lowest module score
    adapter_ranks = 0.5         # LoRA rank components removed (per module with scope "layer", across all with
                                # "global": a module that loses every rank is dropped), lowest component score
    scope = "layer"             # "layer": each group loses its share; "global": the lowest-scored units across all
                                # groups of a structure go (a fraction of their total, or a count in total)
    layers = ["*.layers.1.*"]   # optional: only the groups that cut a site these selectors match
    exempt = ["*.layers.0.*"]   # groups that cut a site these selectors match are left whole
    seed = 0                    # method = "random"
    steps = 200                 # loraprune / light-peft: training steps (default: [data] steps)
    extra_params = []           # loraprune / light-peft: base parameters trained too (a classifier head)
    loraprune = { warmup = 0.1, cooldown = 0.1, every = 10, beta = 0.9 }   # the cubic schedule, the EMA
    light_peft = { l1 = 1e-4 }  # the L1 weight on the masks
    report = "prune"            # <report>.json, .md and .png (what each layer lost) in the output directory;
                                # "" writes none

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
   identity (except that loraprune / light-peft have trained the adapters).
6. Adapter targets cut LoRA adapters at the sites `layers` / `exempt` leave (other kinds are left alone), after the
   structural removal: `adapter_modules` drops the N = floor(f * modules) (or count) lowest-scored modules (never
   all of them); `adapter_ranks` then removes rank components (LoRA.resize keeps the kept components and the scale
   s). Scores: light-peft's measured importance, magnitude's norms, random draws; loraprune scores no adapters
   (an error).
7. Every request is checked before a scorer trains: an infeasible target, a positive target that removes no unit at
   all (a fraction that rounds down to 0 in every group; GQA query heads fewer than one per KV head), a data-driven
   method without [data], or a method table for another method is a SpecError naming its key.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.fx as fx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewrite.adapters.base import NotSupported
from rewrite.coupling import Group, analyze, remove
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, drop_adapter, unwire
from rewrite.pass_infra import GraphPass, PassOptions, PassResult, real_weights
from rewrite.passes.prune_report import write_prune_report
from rewrite.passes.training_allocation import options_key
from rewrite.prune_scorers import SCORERS, PruneScoreContext, Scores, get_prune_scorer
from rewrite.prune_scorers.selection import choose
from rewrite.sites import check_selector_syntax, select
from rewrite.state import state_of

STRUCTURES = ("heads", "kv_heads", "ffn", "channels")  # targets; kv_heads cut "heads" groups by KV head
ADAPTER_TARGETS = ("adapter_modules", "adapter_ranks")
MARK = "rewrite.prune"  # gm.meta: the options of every prune already applied (rule 5)


class LoRAPruneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup: float = Field(default=0.1, ge=0, lt=1)
    cooldown: float = Field(default=0.1, ge=0, lt=1)
    every: int = Field(default=10, ge=1)
    beta: float = Field(default=0.9, ge=0, lt=1)

    @model_validator(mode="after")
    def _span(self) -> "LoRAPruneOptions":
        if self.warmup + self.cooldown >= 1:
            raise ValueError(f"warmup + cooldown = {self.warmup + self.cooldown:g} leaves no steps to prune in "
                             "(they are fractions of the steps; their sum must be < 1)")
        return self


class LightPEFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1: float = Field(default=1e-4, ge=0)


class PruneOptions(PassOptions):
    method: Literal[tuple(SCORERS)] = "magnitude"  # type: ignore[valid-type]
    heads: float | int | None = None
    kv_heads: float | int | None = None
    ffn: float | int | None = None
    channels: float | int | None = None
    adapter_modules: float | int | None = None
    adapter_ranks: float | int | None = None
    scope: Literal["layer", "global"] = "layer"
    layers: list[str] | None = Field(default=None, min_length=1)
    exempt: list[str] = []
    seed: int = 0
    steps: int | None = Field(default=None, ge=1)
    extra_params: list[str] = []
    loraprune: LoRAPruneOptions | None = None
    light_peft: LightPEFTOptions | None = None
    report: str = "prune"

    @model_validator(mode="after")
    def _consistent(self) -> "PruneOptions":
        if self.heads and self.kv_heads:
            raise ValueError("give heads (query heads, evenly per KV head) or kv_heads (whole KV heads), not both")
        for table, method in (("loraprune", "loraprune"), ("light_peft", "light-peft")):
            if getattr(self, table) is not None and self.method != method:
                raise ValueError(f"{table} = {{ ... }} sets options of method = {method!r}, but method = "
                                 f"{self.method!r}")
        return self

    @field_validator("heads", "kv_heads", "ffn", "channels", "adapter_modules", "adapter_ranks")
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
        return [f"{self.options.report}.{ext}" for ext in ("json", "md", "png")] if self.options.report else []

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        real_weights(gm, self.context.where, "prune reads and slices weights")
        key = options_key(o, self.context.data if get_prune_scorer(o.method).needs_data else None)
        targets = {s: getattr(o, s) for s in STRUCTURES if getattr(o, s)}
        adapter_targets = {s: getattr(o, s) for s in ADAPTER_TARGETS if getattr(o, s)}
        if key in gm.meta.get(MARK, []) or not (targets or adapter_targets):
            return PassResult(gm, False, {"note": "already pruned with these options" if targets or adapter_targets
                                          else "no target"})
        coupling = analyze(gm) if targets else None
        chosen = self._candidates(gm, coupling.groups, targets) if targets else {}
        zero = Scores({g.name: torch.zeros(len(g.units)) for gs in chosen.values() for g in gs},
                      {g.name: torch.zeros(len(g.blocks)) for gs in chosen.values() for g in gs})
        for structure, groups in chosen.items():  # rule 7: infeasible targets fail before any training
            rows = choose(structure, groups, targets[structure], zero, o.scope, self.context.at(structure))
            if not any(row["removed"] for row in rows):
                raise SpecError(f"{self.context.at(structure)}: {structure} = {targets[structure]!r} removes nothing "
                                f"from the {len(rows)} groups it reaches ({_why_nothing(rows)}); ask for more, or 0 "
                                "to remove none")
        adapters = self._adapters(gm) if adapter_targets else {}
        scorer = get_prune_scorer(o.method)
        ctx = PruneScoreContext(gm, [g for gs in chosen.values() for g in gs], seed=o.seed,
                                data=self._data(gm, scorer), options=self._method_options(), structures=chosen,
                                targets=targets, scope=o.scope, adapters={p: m for p, (m, _) in adapters.items()},
                                sites={p: site for p, (_, site) in adapters.items()}, at=self.context.at)
        scores = scorer(ctx)
        plan = {s: choose(s, groups, targets[s], scores, o.scope, self.context.at(s)) for s, groups in chosen.items()}
        atoms = {a for rows in plan.values() for row in rows for a in row["atoms"]}
        removal = None
        if atoms:
            try:
                removal = remove(gm, coupling, atoms)
            except NotSupported as err:
                raise SpecError(f"{self.context.where}: {err}") from None
        params_before = removal.params_before if removal else sum(p.numel() for p in gm.parameters())
        adapter_rows = self._prune_adapters(gm, adapters, adapter_targets, scores) if adapter_targets else []
        changed = bool(atoms) or any(r["rank_after"] != r["rank_before"] for r in adapter_rows)
        if not changed and not scorer.needs_data:
            return PassResult(gm, False, {"note": "the targets round to nothing"})
        gm.meta.setdefault(MARK, []).append(key)
        removed = {s: sum(len(r["removed"]) for r in rows) for s, rows in plan.items()}
        removed.update(self._adapter_counts(adapter_rows, adapter_targets))
        params_after = sum(p.numel() for p in gm.parameters())
        report = dict(method=o.method, scope=o.scope, targets={**targets, **adapter_targets}, removed=removed,
                      params_before=params_before, params_after=params_after,
                      constants_rewritten=removal.constants if removal else 0,
                      groups=[{k: v for k, v in row.items() if k not in ("atoms", "index")}
                              for rows in plan.values() for row in rows],
                      adapters=adapter_rows, scorer=scores.info)
        files = []
        if o.report and self.context.write:
            stem = self.context.output_path(o.report, "report")
            files = [p.name for p in write_prune_report(report, stem.parent, stem.name)]
        stats = {"method": o.method, **{f"{s}_removed": n for s, n in removed.items()},
                 "params_before": params_before, "params_after": params_after, "report": files}
        if scores.info:
            stats.update({k: scores.info[k] for k in ("steps", "train_seconds", "scoring_seconds", "loss_final")
                          if k in scores.info})
        return PassResult(gm, True, stats)

    # ------------------------------------------------------------------------------------------ steps

    def _method_options(self) -> dict:
        o = self.options
        out = {"steps": o.steps, "extra_params": o.extra_params}
        if o.loraprune is not None:
            out["loraprune"] = o.loraprune.model_dump()
        if o.light_peft is not None:
            out["light_peft"] = o.light_peft.model_dump()
        return out

    def _data(self, gm: fx.GraphModule, scorer):
        """Rule 7: the [data] a data-driven method trains on, as a DataSource (None for the others)."""
        o = self.options
        if o.method == "loraprune" and (o.adapter_modules or o.adapter_ranks):
            key = "adapter_modules" if o.adapter_modules else "adapter_ranks"
            raise SpecError(f"{self.context.at(key)}: method = 'loraprune' scores units, not adapter modules or "
                            "ranks; use method = \"light-peft\" (measured importance) or \"magnitude\" for "
                            f"{key}")
        if not scorer.needs_data:
            return None
        if self.context.data is None:
            raise SpecError(f"{self.context.at('method')}: method = {o.method!r} trains the adapters while it "
                            "scores, and the spec has no [data] table: add [data] with path = \"file.safetensors\" "
                            "(model inputs + labels) or factory = \"package.module:function\"")
        names = dict(gm.named_parameters())
        unknown = [n for n in o.extra_params if n not in names]
        if unknown:
            raise SpecError(f"{self.context.at('extra_params')}: no parameter named {unknown} in the model")
        if not any(n.startswith("adapters.") for n in names):
            raise SpecError(f"{self.context.at('method')}: method = {o.method!r} trains the adapters while it "
                            "scores, and no adapter is attached: insert a LoRA before 'prune'")
        from rewrite.data import DataSource

        return DataSource(self.context.data, self.context.spec_dir, state_of(gm))

    def _adapters(self, gm: fx.GraphModule) -> dict:
        """Rule 6: adapter path -> (LoRA module, its site) at the sites `layers` / `exempt` leave."""
        o, table = self.options, state_of(gm).sites
        named = {s.name for s in select(table, o.layers, self.context.at("layers"))} if o.layers else None
        exempt = {s.name for s in select(table, o.exempt, self.context.at("exempt"))} if o.exempt else set()
        out = {}
        for site in table.values():
            if site.name in exempt or (named is not None and site.name not in named):
                continue
            for name, module in adapters_at(gm, site.owner).items():
                if module.kind == "lora":
                    out.setdefault(f"adapters.{site.owner}.{name}", (module, site))
        if not out:
            key = "adapter_modules" if o.adapter_modules else "adapter_ranks"
            kinds = sorted({m.kind for s in table.values() for m in adapters_at(gm, s.owner).values()})
            raise SpecError(f"{self.context.at(key)}: {key} cuts LoRA adapters, and none is attached at the sites "
                            f"this pass may touch (attached kinds: {', '.join(kinds) or 'none'})")
        return out

    def _prune_adapters(self, gm: fx.GraphModule, adapters: dict, targets: dict, scores: Scores) -> list[dict]:
        """Rule 6: drop modules, then remove rank components; one report row per module."""
        o = self.options
        rows = {p: dict(adapter=p, rank_before=m.rank, rank_after=m.rank, module_score=round(scores.modules[p], 6),
                        removed_ranks=[], rank_scores=[round(float(v), 6) for v in scores.ranks[p]])
                for p, (m, _) in adapters.items()}
        live = dict(adapters)
        if "adapter_modules" in targets:
            target = targets["adapter_modules"]
            n = math.floor(target * len(live)) if isinstance(target, float) else target
            if n >= len(live):
                raise SpecError(f"{self.context.at('adapter_modules')}: drops {n} of the {len(live)} LoRA modules; "
                                "at least one must stay")
            for path in sorted(live, key=lambda p: (scores.modules[p], p))[:n]:
                self._drop(gm, path, live.pop(path)[0], rows[path])
        if "adapter_ranks" in targets:
            target, where = targets["adapter_ranks"], self.context.at("adapter_ranks")
            gone: dict[str, list[int]] = {}
            if o.scope == "global":
                total = sum(m.rank for m, _ in live.values())
                n = math.floor(target * total) if isinstance(target, float) else target
                if n >= total:
                    raise SpecError(f"{where}: removes {n} of the {total} LoRA rank components; at least one must "
                                    "stay")
                ranked = sorted((float(scores.ranks[p][i]), p, i) for p, (m, _) in live.items() for i in range(m.rank))
                for _, path, i in ranked[:n]:
                    gone.setdefault(path, []).append(i)
            else:
                for path, (module, _) in live.items():
                    n = math.floor(target * module.rank) if isinstance(target, float) else target
                    if n >= module.rank:
                        raise SpecError(f"{where}: removes {n} of the {module.rank} rank components of {path}; at "
                                        "least one must stay (scope = \"global\" may drop a whole module)")
                    gone[path] = sorted(range(module.rank), key=lambda i: (float(scores.ranks[path][i]), i))[:n]
            for path, index in gone.items():
                module, row = live[path][0], rows[path]
                row["removed_ranks"] = sorted(index)
                keep = [i for i in range(module.rank) if i not in set(index)]
                if not keep:
                    self._drop(gm, path, module, row)
                elif index:
                    module.resize(len(keep), keep=keep)
                    row["rank_after"] = module.rank
        return list(rows.values())

    def _drop(self, gm: fx.GraphModule, path: str, module, row: dict) -> None:
        owner, _, name = path[len("adapters."):].rpartition(".")
        unwire(gm, name, owner)
        drop_adapter(gm, owner, name)
        row.update(rank_after=0, dropped=True)

    @staticmethod
    def _adapter_counts(rows: list[dict], targets: dict) -> dict:
        out = {}
        if "adapter_modules" in targets:
            out["adapter_modules"] = sum(1 for r in rows if r.get("dropped"))
        if "adapter_ranks" in targets:
            out["adapter_ranks"] = sum(len(r["removed_ranks"]) for r in rows)
        return out

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
                    and (named is None or named & set(g.sites))
                    and (structure != "kv_heads" or g.blocks)]
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


def _why_nothing(rows: list[dict]) -> str:
    """Why a positive target removes no unit: the report's rounding note (GQA), else the rounding of the fraction."""
    note = next((row["note"] for row in rows if row.get("note")), None)
    if note:
        return note
    smallest = min(rows, key=lambda row: row["units_before"])
    return f"it rounds down to 0 of {smallest['units_before']} units in {smallest['group']}"
