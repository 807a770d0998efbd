"""allocate: decide every site's rank under a budget and physically resize the adapters.

    [[pass]]
    name = "allocate"
    adapter = "default"          # an adapter already attached (insert / load) sets the candidate sites;
                                 # unset: the one adapter attached, when there is exactly one
    scorer = "fisher"            # spectrum (no data) | activation (inputs) | fisher (inputs + labels)
                                 # | energy (no data: the adapter's own trained update)
                                 # | adalora | increlora (train on [data] while allocating: rewrite.allocators)
                                 # default: "energy" when the adapter carries a trained update, else "spectrum"
    budget = { params = 20000 }  # or flops = ..., bytes = ..., latency_ms = ...,
                                 # or { fraction = 0.5, metric = "params", rank = 8 }: a share of the cost of
                                 #    uniform rank `rank` (default: each adapter's current rank)
    min_rank = 0                 # 0 lets a site lose its branch
    max_rank = 16                # default: each adapter's current rank (capped at min(fan_in, d_out));
                                 # adalora: r0 (it only prunes), increlora: no cap but the budget
    max_rank_pattern = { "*.mlp.*" = 32 }   # per-site bounds: exact > glob/regex > class > the global value
    ranks = [0, 1, 2, 4, 8, 16]  # optional: allowed ranks (serving engines bucket ranks)
    batches = 8                  # calibration batches from [data] (activation, fisher)
    probe_steps = 0              # fisher: N > 0 fits the adapters for N Adam steps first (then restores them)
    whiten = "kfac"              # fisher: "kfac" | "input" | "none" (see rewrite/scorers/fisher.py)
    normalize = "site"           # "site" (each curve sums to 1) | "none"; default: per scorer
    tokens = 128                 # tokens per call for the bytes and latency metrics
    latency_cache = "cache/"     # latency table directory (default ~/.cache/rewrite/latency)
    report = "allocation"        # <report>.json / .md / .png in the output directory; "" writes none

Rules:
1. Candidates: every site carrying `adapter` (restricted by `targets` when given; a target without the
   adapter is an error). Without `targets`, trained copies of whole layers beside the adapter's other modules (PEFT's
   modules_to_save: `full`, `ln_tuning`; a SEQ_CLS adapter's head) have no rank and stay as they are. One decision
   per adapted module (calls of one module share its adapter).
2. The scorer turns each site into a value curve v(r) (rewrite.scorers); data-driven scorers read the
   spec's [data] table (a scorer that needs data without one is an error naming this pass).
3. The cost model prices every allowed rank in the budget's metric (rewrite.costmodel); the solver picks
   the ranks with the most total value within the budget (rewrite.solver: greedy by value per unit cost
   on concave envelopes, LP bound, exact DP for small instances); a budget below every site's minimum
   is an error stating both numbers.
   Without `scorer`, an adapter that carries a trained update (a non-zero s A B at any candidate site: loaded
   or trained) is scored by "energy" (its own update: a budget keeps the most of it, the global top
   singular values), any other by "spectrum". scorer = "energy" on an adapter without an update is an
   error; spectrum, activation and fisher without probe_steps warn when their ranks lose part of a trained
   update (they do not read it, and can keep little of it).
4. Each adapter is resized physically (`LoRA.resize`: kept components are the best rank-r part of the
   current delta, new ones are zero-delta, the scale s is unchanged); rank 0 sites lose the branch
   (unwired and dropped: they vanish from the graph and every export).
5. The report (`report` stem, in the output directory): <stem>.json, <stem>.md, <stem>.png
   (rewrite.report). `report = ""` writes none. For a trained adapter the report (per site and in total)
   and the result (`update_kept`) give the share of the update's energy ||s A B||_F^2 the ranks keep.
6. Running the pass again with the same options leaves the graph alone (modified=False).
   Under torch.distributed (`torchrun`; rewrite.distributed) each process scores its rows of every calibration
   batch, the scorers combine the statistics of all processes, the ranks are rank 0's solution on every process,
   and only rank 0 writes the report: the same ranks, curves and report as one process with all the data.
7. scorer = "adalora" | "increlora" trains while allocating, with the same budget, bounds and report:
   passes/training_allocation.py (shared with the `train` pass) has its rules; `steps`, `settings`,
   `adalora = {...}` and `increlora = {...}` go with these scorers only.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.fx as fx
from pydantic import Field, field_validator, model_validator

from rewrite import distributed
from rewrite.adapters import KINDS
from rewrite.allocators import TRAINING_SCORERS
from rewrite.costmodel import CostModel, LatencyTable, site_shape
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, drop_adapter, unwire
from rewrite.pass_infra import GraphPass, PassResult, real_weights
from rewrite.passes.rank_options import ABSOLUTE
from rewrite.passes.training_allocation import TrainingAllocatorOptions, allocate_while_training, options_key
from rewrite.report import new_report, site_layer, write_report
from rewrite.scorers import ScoreContext, Target, get_scorer
from rewrite.scorers.energy import update_kept, update_spectrum
from rewrite.sites import check_mapping, check_selector_syntax, resolve, select
from rewrite.solver import BudgetError, Item, solve
from rewrite.state import state_of

MARK = "_rewrite_allocation"
UPDATE_BLIND = ("spectrum", "activation", "fisher")  # fisher reads the update only with probe_steps


class AllocateOptions(TrainingAllocatorOptions):
    scorer: Literal["spectrum", "activation", "fisher", "energy", "adalora", "increlora"] | None = None
    targets: list[str] | None = None
    ranks: list[int] | None = Field(default=None, min_length=1)
    batches: int = Field(default=8, ge=1)
    normalize: Literal["site", "none"] | None = None
    whiten: Literal["kfac", "input", "none"] = "kfac"
    damping: float = Field(default=1e-3, ge=0)
    probe_steps: int = Field(default=0, ge=0)
    tokens: int = Field(default=128, ge=1)
    latency_cache: str | None = None
    latency_threads: int = Field(default=1, ge=1)
    settings: dict[str, Any] = {}  # training scorers: settings for either allocator (rewrite.allocators)

    @field_validator("targets")
    @classmethod
    def _selectors(cls, targets: list[str] | None) -> list[str] | None:
        return None if targets is None else [check_selector_syntax(t) for t in targets]

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is not None and any(r < 0 for r in ranks):
            raise ValueError("allowed ranks must be >= 0")
        return None if ranks is None else sorted(set(ranks))

    @model_validator(mode="after")
    def _scorer_keys(self) -> "AllocateOptions":
        if self.budget is None and self.scorer not in TRAINING_SCORERS:
            who = "allocate" if self.scorer is None else f"scorer = {self.scorer!r}"
            raise ValueError(f"{who} needs a budget (budget = {{ params = N }}, flops, bytes, latency_ms, or "
                             "{ fraction = f })")
        if self.scorer not in TRAINING_SCORERS and (self.steps or self.settings or self.adalora or self.increlora):
            raise ValueError("steps, settings, adalora and increlora go with the training scorers (adalora, increlora)")
        if self.whiten != "kfac" and self.scorer != "fisher":
            raise ValueError(f"whiten goes with scorer = 'fisher' (got scorer = {self.scorer!r})")
        if self.probe_steps and self.scorer != "fisher":
            raise ValueError(f"probe_steps goes with scorer = 'fisher' (got scorer = {self.scorer!r})")
        return self


def _shape(gm: fx.GraphModule, sites: list):
    site = sites[0]
    kernel = (1, 1)
    if site.op == "conv2d":
        kernel = tuple(gm.get_parameter(site.weight).shape[2:])  # (torch.export modules carry no conv attributes)
    return site_shape(site, calls=len(sites), kernel=kernel)


class AllocatePass(GraphPass):
    name = "allocate"
    Options = AllocateOptions

    def writes(self) -> list[str]:
        return self.options.report_files(history=self.options.scorer in TRAINING_SCORERS)

    def call(self, gm: fx.GraphModule) -> PassResult:
        table = real_weights(gm, self.context.where, "allocate reads weights (and data)").sites
        attached = {name for owner in dict.fromkeys(s.owner for s in table.values()) for name in adapters_at(gm, owner)}
        if "adapter" not in self.options.model_fields_set and len(attached) == 1:
            self.options = self.options.model_copy(update={"adapter": attached.pop()})
        if self.options.scorer in TRAINING_SCORERS:
            return allocate_while_training(gm, self.context, self.options, scorer=self.options.scorer, mark=MARK)
        by_owner: dict[str, list] = {}
        for site in table.values():
            by_owner.setdefault(site.owner, []).append(site)
        o = self.options
        modules = self._modules(gm, table, by_owner)
        key = options_key(o, self.context.data)
        if all(getattr(m, MARK, None) == key for m in modules.values()):
            return PassResult(gm, False, {"adapter": o.adapter, "sites": len(modules), "note": "already allocated"})

        targets, allowed, bounds = self._targets(gm, by_owner, modules)
        spectra = {t.owner: update_spectrum(t.adapter) for t in targets}
        scorer = self._scorer(spectra)
        curves = self._score(gm, targets, scorer)
        model = self._cost_model()
        items = []
        for t in targets:
            ranks = allowed[t.owner]
            items.append(Item(t.owner, ranks, [curves.values[t.owner][r] for r in ranks], model.curve(t.shape, ranks)))
        budget = self._budget_value(model, targets, modules)
        solution, sensitivity = distributed.agree(self._solve(items, budget))
        kept = update_kept(spectra, solution.ranks)
        self._warn_if_blind(scorer, kept[1])

        params_before = sum(p.numel() for m in modules.values() for p in m.parameters())
        before = {owner: m.rank for owner, m in modules.items()}
        dropped, resized = self._resize(gm, modules, solution.ranks, key)
        params_after = sum(p.numel() for owner, m in modules.items() if owner not in dropped for p in m.parameters())

        report = self._report(scorer, targets, curves, model, solution, budget, before, bounds, sensitivity,
                              params_before, kept)
        files = []
        if o.report and self.context.write:
            stem = self.context.output_path(o.report, "report")
            files = [p.name for p in write_report(report, stem.parent, stem.name, plot=o.plot)]
        update = {} if kept[1] is None else {"update_kept": round(kept[1], 4)}  # share of ||s A B||_F^2
        return PassResult(gm, bool(dropped) or resized > 0, {
            "adapter": o.adapter, "scorer": scorer, "metric": model.metric, "budget": budget,
            "spent": solution.cost, "sites": len(modules), "resized": resized, "dropped": len(dropped), **update,
            "params_before": params_before, "params_after": params_after, "solver": solution.method,
            "exact": solution.exact, "report": files})

    # ------------------------------------------------------------------------------------------ steps

    def _modules(self, gm, table, by_owner) -> dict[str, Any]:
        """Rule 1: the candidate sites' adapter modules, by owner."""
        o, where = self.options, self.context.where
        owners = [owner for owner in by_owner if o.adapter in adapters_at(gm, owner)]
        ranked = [owner for owner in owners if not adapters_at(gm, owner)[o.adapter].copies_layer]
        if o.targets is None and ranked:  # trained copies of whole layers (modules_to_save) have no rank: kept
            owners = ranked
        if o.targets is not None:
            chosen = dict.fromkeys(s.owner for s in select(table, o.targets, self.context.at("targets")))
            missing = [owner for owner in chosen if owner not in owners]
            if missing:
                raise SpecError(f"{self.context.at('targets')}: sites {missing[:5]} do not carry adapter {o.adapter!r} "
                                "(insert or load it first)")
            owners = [owner for owner in owners if owner in chosen]
        if not owners:
            attached = sorted({name for owner in by_owner for name in adapters_at(gm, owner)})
            raise SpecError(f"{where}: adapter {o.adapter!r} is attached to no site (attached: "
                            f"{', '.join(attached) or 'none'}); set adapter = one of them, or insert or load it "
                            "before allocate")
        check_mapping(table, o.min_rank_pattern, f"{self.context.at('min_rank_pattern')} min_rank_pattern")
        check_mapping(table, o.max_rank_pattern, f"{self.context.at('max_rank_pattern')} max_rank_pattern")
        modules = {owner: adapters_at(gm, owner)[o.adapter] for owner in owners}
        fixed = {owner: m.kind for owner, m in modules.items() if not m.resizable}
        if fixed:
            who = "allocate" if o.scorer is None else f"scorer = {o.scorer!r}"
            raise SpecError(f"{self.context.at('scorer')}: {who} resizes adapters freely; adapter "
                            f"{o.adapter!r} is {sorted(set(fixed.values()))} at {list(fixed)[:3]}, which cannot be: "
                            f"it resizes {', '.join(k for k, kind in KINDS.items() if kind.resizable)} adapters; "
                            "kinds without a rank have none to allocate, and SVD-form adapters (svd_lora) are "
                            "allocated by scorer = \"adalora\" or \"increlora\"")
        return modules

    def _targets(self, gm, by_owner, modules):
        o, where = self.options, self.context.where
        targets, allowed, bounds = [], {}, {}
        for owner in modules:
            site, module = by_owner[owner][0], modules[owner]
            shape = _shape(gm, by_owner[owner])
            kernel = tuple(module.conv["kernel_size"]) if site.op == "conv2d" else (1, 1)
            lo = resolve(site, o.min_rank, o.min_rank_pattern, where)
            hi = resolve(site, o.max_rank if o.max_rank is not None else module.rank, o.max_rank_pattern, where)
            hi = min(hi, shape.max_rank)
            if lo > hi:
                raise SpecError(f"{where}: site {owner}: min rank {lo} is above its max rank {hi} (max_rank, capped at "
                                f"min(fan_in, d_out) = {shape.max_rank})")
            ranks = [r for r in range(lo, hi + 1) if o.ranks is None or r in o.ranks]
            if not ranks:
                raise SpecError(f"{self.context.at('ranks')}: site {owner}: no allowed rank in [{lo}, {hi}] "
                                f"(ranks = {o.ranks})")
            targets.append(Target(owner, shape, module, gm.get_parameter(site.weight), hi, kernel))
            allowed[owner], bounds[owner] = ranks, (lo, hi)
        return targets, allowed, bounds

    def _scorer(self, spectra: dict[str, torch.Tensor]) -> str:
        """Rule 3's default: "energy" for an adapter with a trained update, else "spectrum"."""
        name, trained = self.options.scorer, any(bool(sigma.any()) for sigma in spectra.values())
        if name is None:
            return "energy" if trained else "spectrum"
        if name == "energy" and not trained:
            raise SpecError(f"{self.context.at('scorer')}: scorer = \"energy\" scores the adapter's own update, and "
                            f"adapter {self.options.adapter!r} has none (s A B = 0 at every site: freshly inserted); "
                            "load or train it first, or use scorer = \"spectrum\", \"activation\" or \"fisher\"")
        return name

    def _warn_if_blind(self, scorer: str, kept: float | None) -> None:
        """Rule 3's warning, when the ranks lose part of a trained update that the scorer did not read."""
        reads_update = scorer not in UPDATE_BLIND or (scorer == "fisher" and self.options.probe_steps > 0)
        if kept is None or kept > 1 - 1e-6 or reads_update:
            return
        warnings.warn(f"{self.context.where}: allocate {self.options.adapter!r}: scorer = {scorer!r} does not read "
                      f"the adapter's trained update, and the ranks it chose keep {100 * kept:.1f}% of the "
                      "update's energy; scorer = \"energy\" keeps the most of it that the budget allows",
                      stacklevel=2)

    def _score(self, gm, targets, name: str):
        o = self.options
        scorer = get_scorer(name)
        source = loss = None
        if scorer.needs_data:
            data = self.context.data
            if data is None:
                raise SpecError(f"{self.context.at('scorer')}: pass 'allocate' with scorer = {name!r} needs "
                                "calibration data, and the spec has no [data] table: add [data] with path = "
                                "\"file.safetensors\" (model inputs + labels) or factory = \"package.module:function\"")
            from rewrite.data import DataSource, make_loss

            if not scorer.needs_labels:  # inputs only: a calibration file needs no labels
                data = data.model_copy(update={"loss": "model"})
            source = DataSource(data, self.context.spec_dir, state_of(gm))
            loss = make_loss(data)
        options = {"normalize": o.normalize, "whiten": o.whiten, "damping": o.damping, "probe_steps": o.probe_steps}
        ctx = ScoreContext(gm, targets, source, loss, o.batches, options)
        curves = scorer()(ctx)
        for t in targets:
            values = curves.values[t.owner]
            if len(values) != t.max_rank + 1 or not all(math.isfinite(v) for v in values):
                raise SpecError(f"{self.context.where}: scorer {name!r} gave site {t.owner} an invalid value curve "
                                "(non-finite: check the data and the loss)")
        return curves

    def _solve(self, items: list[Item], budget: float):
        """The allocation within `budget`, and the one within budget -10% / +10% (None: infeasible)."""
        try:
            solution = solve(items, budget)
        except BudgetError as err:
            raise SpecError(f"{self.context.at('budget')}: budget = {self.options.budget.text()}: {err}") from None
        sensitivity = {}
        for label, factor in (("-10%", 0.9), ("+10%", 1.1)):
            try:
                other = solve(items, budget * factor, dp_limit=200_000)
                sensitivity[label] = dict(budget=budget * factor, value=other.value, ranks=other.ranks)
            except BudgetError:
                sensitivity[label] = None
        return solution, sensitivity

    def _resize(self, gm, modules, ranks: dict[str, int], key: str) -> tuple[list[str], int]:
        """Rule 4: resize every module to its rank (SVD truncation), drop rank-0 branches; (dropped, resized)."""
        dropped, resized = [], 0
        for owner, module in modules.items():
            rank = ranks[owner]
            if rank == 0:
                unwire(gm, self.options.adapter, owner)
                drop_adapter(gm, owner, self.options.adapter)
                dropped.append(owner)
            elif rank != module.rank:
                module.resize(rank)
                resized += 1
            setattr(module, MARK, key)
        return dropped, resized

    def _cost_model(self) -> CostModel:
        o = self.options
        metric = o.budget.metric_name
        latency = None
        if metric == "latency":
            latency = LatencyTable(self.context.input_path(o.latency_cache) if o.latency_cache else None,
                                   threads=o.latency_threads)
        return CostModel(metric, tokens=o.tokens, latency=latency)

    def _budget_value(self, model: CostModel, targets, modules) -> float:
        b = self.options.budget
        for key in ABSOLUTE:
            if getattr(b, key) is not None:
                return float(getattr(b, key))
        baseline = sum(model.cost(t.shape, min(b.rank or modules[t.owner].rank, t.shape.max_rank)) for t in targets)
        return b.fraction * baseline

    def _report(self, scorer, targets, curves, model, solution, budget, before, bounds, sensitivity, params_before,
                update):
        o = self.options
        sites = []
        for t in targets:
            r = solution.ranks[t.owner]
            values = curves.values[t.owner]
            breakdown = model.breakdown(t.shape, r)
            cost = model.cost(t.shape, r)
            layer, module = site_layer(t.owner)
            sites.append(dict(site=t.owner, layer=layer, module=module, op=t.shape.op, d_in=t.shape.fan_in,
                              d_out=t.shape.d_out, rank=r, rank_before=before[t.owner], min_rank=bounds[t.owner][0],
                              max_rank=bounds[t.owner][1], **breakdown, cost=cost,
                              share=cost / budget if budget > 0 else None, value=values[r], value_max=values[-1],
                              captured=values[r] / values[-1] if values[-1] > 0 else None,
                              update_kept=update[0][t.owner],
                              curve=[round(v, 10) for v in values]))
        kept = [s for s in sites if s["rank"] > 0]
        return new_report(
            adapter=o.adapter,
            scorer=dict(name=scorer, unit=curves.unit, settings=curves.settings),
            budget=dict(metric=model.metric, unit=model.unit, value=budget, spent=solution.cost,
                        minimum=solution.minimum, request=o.budget.text(), tokens=model.tokens),
            solver=dict(method=solution.method, exact=solution.exact, value=solution.value,
                        upper_bound=solution.upper_bound, gap=solution.gap, shadow_price=solution.shadow_price,
                        notes=solution.notes, nonconcave_sites=[n for n, ok in solution.concave.items() if not ok]),
            sites=sites,
            totals=dict(sites=len(sites), kept=len(kept), dropped=[s["site"] for s in sites if s["rank"] == 0],
                        params=sum(s["params"] for s in sites), flops=sum(s["flops"] for s in sites),
                        bytes=sum(s["bytes"] for s in sites), params_before=params_before, update_kept=update[1]),
            sensitivity=sensitivity,
            options=o.model_dump(mode="json"),
        )


__all__ = ["AllocateOptions", "AllocatePass"]
