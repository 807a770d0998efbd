"""Training-time rank allocators: AdaLoRA (prune while training) and IncreLoRA (grow while training).

Both are callbacks for `rewrite.train.train` and for a user's own loop (see `rewrite/train.py`), and both
end by physically resizing the adapters (plain LoRA of the final rank per site; rank 0 sites dropped).

`run_training_allocator(gm, options, data, context)` is the entry point the `allocate` pass calls for
`scorer = "adalora"` / `"increlora"`: it trains the adapter named `options.adapter` on the spec's `[data]`
and returns `(ranks, history)`: site owner -> final rank, and what `rewrite.report.render_history` plots.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from rewrite.allocators.adalora import AdaLoRA
from rewrite.allocators.increlora import IncreLoRA
from rewrite.errors import SpecError
from rewrite.state import state_of

TRAINING_SCORERS = ("adalora", "increlora")

# setting name -> accepted spellings (the first is ours; PEFT / official names follow)
_ALIASES = {
    "init_rank": ("init_rank", "init_r", "lora_r"),
    "target_rank": ("target_rank", "target_r"),
    "target_budget": ("target_budget",),
    "tinit": ("tinit", "t_init"),
    "tfinal": ("tfinal", "t_final"),
    "delta_t": ("delta_t", "deltaT", "delta_T"),
    "beta1": ("beta1",),
    "beta2": ("beta2",),
    "orth_reg_weight": ("orth_reg_weight",),
    "warmup": ("warmup", "init_warmup"),
    "interval": ("interval", "incre_interval"),
    "top_h": ("top_h",),
    "rank_step": ("rank_step", "incre_rank_num"),
    "advance_learning": ("advance_learning", "advance_learn"),
    "alpha": ("alpha", "lora_alpha"),
    "targets": ("targets",),
}
_ADALORA = ("init_rank", "target_rank", "target_budget", "tinit", "tfinal", "delta_t", "beta1", "beta2",
            "orth_reg_weight", "alpha", "targets")
_INCRELORA = ("init_rank", "target_rank", "target_budget", "warmup", "interval", "top_h", "rank_step",
              "advance_learning", "beta1", "beta2", "orth_reg_weight", "alpha", "targets")


def _lookup(source: Any, key: str) -> Any:
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(key)
    return getattr(source, key, None)


_PLAIN = ("target_rank", "targets")  # settings a pass may also give as its own keys


def settings_from(options: Any, scorer: str) -> dict[str, Any]:
    """Allocator settings from the pass options: a `[pass] adalora = {...}` / `increlora = {...}` sub-table
    first, then a generic `settings = {...}` table, then the pass's own `target_rank` / `targets` keys
    (only those: a pass's `warmup` is its learning-rate warm-up, not IncreLoRA's)."""
    names = _ADALORA if scorer == "adalora" else _INCRELORA
    plain = {name: _lookup(options, name) for name in _PLAIN}
    sources = [_lookup(options, scorer), _lookup(options, "settings"), plain]
    out: dict[str, Any] = {}
    for name in names:
        for source in sources:
            value = next((v for v in (_lookup(source, a) for a in _ALIASES[name]) if v is not None), None)
            if value is not None:
                out[name] = value
                break
    return out


def site_bounds(gm: fx.GraphModule, options: Any, where: str = "<allocate>") -> dict[str, Any]:
    """`min_rank` / `max_rank` of the pass options, with their `*_pattern` forms resolved per site owner
    (exact > glob/regex > class > the global value, as everywhere): {"min_rank": {owner: lo},
    "max_rank": {owner: hi or None}}, or {} when the options give no bound."""
    from rewrite.sites import resolve

    low, high = _lookup(options, "min_rank") or 0, _lookup(options, "max_rank")
    low_pattern = _lookup(options, "min_rank_pattern") or {}
    high_pattern = _lookup(options, "max_rank_pattern") or {}
    if not low and high is None and not low_pattern and not high_pattern:
        return {}
    sites: dict[str, Any] = {}
    for site in state_of(gm).sites.values():
        sites.setdefault(site.owner, site)
    return {"min_rank": {o: resolve(s, low, low_pattern, where) for o, s in sites.items()},
            "max_rank": {o: resolve(s, high, high_pattern, where) for o, s in sites.items()}}


def _data_source(gm: fx.GraphModule, data: Any, context: Any, scorer: str, where: str):
    from rewrite.data import DataSource
    from rewrite.options import DataOptions

    if data is None:
        data = getattr(context, "data", None)
    if data is None:
        raise SpecError(f"{where}: scorer = {scorer!r} trains the adapters and needs training data: add a [data] "
                        "table (path = tensor file or factory = 'pkg.mod:fn', loss, steps, lr)")
    if isinstance(data, DataOptions):
        inputs = state_of(gm).inputs
        names = list(inputs.kwargs) if inputs is not None else []
        spec_dir = getattr(context, "spec_dir", None)
        from pathlib import Path

        return DataSource(data, Path(spec_dir) if spec_dir is not None else Path("."), names)
    return data


def _rank_costs(gm: fx.GraphModule, adapter: str) -> dict[str, tuple[int, int]]:
    """owner -> (params per rank = d_in + d_out, current rank) for the sites carrying `adapter`."""
    from rewrite.graph_edit import adapters_at

    out: dict[str, tuple[int, int]] = {}
    for site in state_of(gm).sites.values():
        module = adapters_at(gm, site.owner).get(adapter)
        if site.owner not in out and module is not None:
            if hasattr(module, "q_width"):
                width = module.q_width
            elif site.op == "conv2d":
                width = module.lora_A[0].numel()
            else:
                width = site.d_in
            out[site.owner] = (width + site.d_out, int(module.rank))
    return out


def budget_in_ranks(gm: fx.GraphModule, budget: Any, adapter: str, where: str = "<allocate>") -> int:
    """The allocate pass's budget as a total rank (AdaLoRA / IncreLoRA count ranks, not parameters).

    `params = P` -> floor(P / mean params per rank); `fraction = f` (metric params, of uniform rank `rank`,
    default each adapter's current rank) -> floor(f * sum_k r_k (d_in + d_out) / mean params per rank).
    Exact when every site has the same shape; otherwise the final parameter count can differ (the
    allocators rank triplets globally, whatever they cost)."""
    costs = _rank_costs(gm, adapter)
    if not costs:
        raise SpecError(f"{where}: adapter {adapter!r} is attached to no site; insert it before allocate")
    mean = sum(c for c, _ in costs.values()) / len(costs)
    if isinstance(budget, (int, float)):
        return int(math.floor(float(budget) / mean))
    for key in ("flops", "bytes", "latency_ms"):
        if _lookup(budget, key) is not None:
            raise SpecError(f"{where}: the training scorers (adalora, increlora) budget parameters (ranks); "
                            f"budget.{key} is not supported with them: use params or fraction")
    params = _lookup(budget, "params")
    if params is not None:
        return int(math.floor(float(params) / mean))
    fraction = _lookup(budget, "fraction")
    if fraction is not None:
        metric = _lookup(budget, "metric") or "params"
        if metric != "params":
            raise SpecError(f"{where}: the training scorers budget parameters; budget.metric = {metric!r} is not "
                            "supported with them")
        rank = _lookup(budget, "rank")
        baseline = sum(c * (rank if rank is not None else r) for c, r in costs.values())
        return int(math.floor(float(fraction) * baseline / mean))
    raise SpecError(f"{where}: budget {budget!r}: expected params = N or fraction = f")


class TrainingHistory(list):
    """One record per optimizer step, {step, budget, ranks {site: r}, loss, lr} (what `render_history`
    plots), plus `.summary`: scorer, settings, growth / masking events, final ranks and scores, seconds."""

    def __init__(self, records: list[dict[str, Any]], summary: dict[str, Any]):
        super().__init__(records)
        self.summary = summary


def history_records(history: dict[str, Any], losses: list[float] | None = None,
                    lrs: list[float] | None = None) -> list[dict[str, Any]]:
    """The allocators' column history as per-step records."""
    records = []
    for i, step in enumerate(history["step"]):
        record = {"step": step, "budget": history["budget"][i],
                  "ranks": {o: r[i] for o, r in history["ranks"].items()}}
        if losses is not None and i < len(losses):
            record["loss"] = losses[i]
        if lrs is not None and i < len(lrs):
            record["lr"] = lrs[i]
        records.append(record)
    return records


def make_allocator(gm: fx.GraphModule, scorer: str, settings: dict[str, Any], *, adapter: str, total_steps: int,
                   weight_decay: float = 0.0, where: str = "<allocate>"):
    """The allocator, installed (SVD-form adapters in place); settings it rejects are a SpecError."""
    if scorer not in TRAINING_SCORERS:
        raise SpecError(f"{where}: unknown training scorer {scorer!r} (expected one of {TRAINING_SCORERS})")
    try:
        if scorer == "adalora":
            allocator = AdaLoRA(gm, adapter, total_steps=total_steps, where=where, **settings)
        else:
            allocator = IncreLoRA(gm, adapter, total_steps=total_steps, weight_decay=weight_decay, where=where,
                                  **settings)
        allocator.install()
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {scorer}: {err}") from None
    return allocator


def run_training_allocator(gm: fx.GraphModule, options: Any, data: Any = None, context: Any = None, *,
                           scorer: str | None = None, train_options: dict[str, Any] | None = None
                           ) -> tuple[dict[str, int], "TrainingHistory"]:
    """Train `options.adapter` with the allocator `options.scorer` on `data`; resize; return (ranks, history).

    `data`: a `rewrite.options.DataOptions` ([data]), a `rewrite.data.DataSource`, or None (then
    `context.data`). Settings come from `settings_from(options, scorer)`; without a target_rank /
    target_budget there, `options.budget` ({params} or {fraction, rank}) becomes a total rank through
    `budget_in_ranks`. `options.steps` overrides [data] steps; `options.min_rank` / `max_rank` (and their
    `*_pattern` forms) bound every site's rank (`site_bounds`); `scorer` overrides `options.scorer`.
    The returned history is a `TrainingHistory`:
    per-step records for `rewrite.report.render_history`, with `.summary` for the report's scorer section.
    `train_options` go to `rewrite.train.train` (lr, warmup, weight_decay, grad_clip, seed, extra_params)."""
    from rewrite.train import train

    scorer = scorer or _lookup(options, "scorer") or "adalora"
    where = context.where if context is not None and hasattr(context, "where") else "<allocate>"
    if scorer not in TRAINING_SCORERS:
        raise SpecError(f"{where}: scorer {scorer!r} is not a training scorer ({', '.join(TRAINING_SCORERS)})")
    adapter = _lookup(options, "adapter") or "default"
    source = _data_source(gm, data, context, scorer, where)
    data_options = getattr(source, "options", None)
    steps = int(_lookup(options, "steps") or getattr(data_options, "steps", 100))
    settings = settings_from(options, scorer)
    budget = _lookup(options, "budget")
    if "target_budget" not in settings and "target_rank" not in settings:
        if budget is None:
            raise SpecError(f"{where}: scorer = {scorer!r} needs a budget (budget = {{ params = N }} or "
                            "{ fraction = f }) or a target_rank")
        settings["target_budget"] = budget_in_ranks(gm, budget, adapter, where)
    if scorer == "adalora":
        settings.setdefault("init_rank", None)  # default: the inserted adapter's rank is r0
    settings.update(site_bounds(gm, options, where))
    allocator = make_allocator(gm, scorer, settings, adapter=adapter, total_steps=steps,
                               weight_decay=float(getattr(data_options, "weight_decay", 0.0) or 0.0), where=where)
    result = train(gm, source, steps=steps, callbacks=[allocator], **(train_options or {}))
    ranks = allocator.finalize()
    raw = allocator.history
    summary = {k: v for k, v in raw.items() if k not in ("step", "budget", "ranks")}
    summary.update(seconds=result.seconds, settings=allocator.settings(), adapter=adapter, steps=result.steps,
                   params=sum(p.numel() for m in _modules(gm, adapter) for p in m.parameters()))
    return ranks, TrainingHistory(history_records(raw, result.losses, result.lrs), summary)


def _modules(gm: fx.GraphModule, adapter: str) -> list:
    from rewrite.graph_edit import adapters_at

    owners = dict.fromkeys(site.owner for site in state_of(gm).sites.values())
    return [m for o in owners for n, m in adapters_at(gm, o).items() if n == adapter]




def training_report(gm: fx.GraphModule, ranks: dict[str, int], history: "TrainingHistory", *, adapter: str,
                    scorer: str, budget_request: str = "", rank_before: dict[str, int] | None = None,
                    params_before: int | None = None, options: dict[str, Any] | None = None,
                    tokens: int = 128) -> dict[str, Any]:
    """A `rewrite.report` allocation report for a training-time allocator: per-site rank / params / FLOPs,
    the final triplet (AdaLoRA) or module (IncreLoRA) score, the share of the budget, the rank bounds, and
    the per-step history (budget and ranks over training) that `render_history` draws. The budget in
    parameters is the allocator's budget in ranks times the mean parameters per rank."""
    from rewrite.costmodel import CostModel, site_shape
    from rewrite.report import new_report, site_layer

    model = CostModel("params", tokens=tokens)
    table = state_of(gm).sites
    by_owner: dict[str, list] = {}
    for site in table.values():
        by_owner.setdefault(site.owner, []).append(site)
    summary = history.summary
    scores = summary.get("scores") or {}
    budget_ranks = summary.get("target_budget") or summary.get("settings", {}).get("target_budget")
    sites, spent = [], 0.0
    shapes = {o: site_shape(by_owner[o][0], calls=len(by_owner[o])) for o in ranks}
    per_rank = {o: model.cost(shapes[o], 1) for o in ranks}
    budget_params = (budget_ranks * sum(per_rank.values()) / len(per_rank)) if budget_ranks and per_rank else None
    settings = {k: v for k, v in summary.get("settings", {}).items() if v is not None}
    low, high = settings.get("min_rank") or 0, settings.get("max_rank")
    for owner, rank in ranks.items():
        shape = shapes[owner]
        breakdown = model.breakdown(shape, rank)
        cost = model.cost(shape, rank)
        spent += cost
        layer, module = site_layer(owner)
        score = scores.get(owner)
        value = (sum(sorted(score, reverse=True)[:rank]) if isinstance(score, list) else score)
        sites.append(dict(site=owner, layer=layer, module=module, op=shape.op, d_in=shape.fan_in, d_out=shape.d_out,
                          rank=rank, rank_before=(rank_before or {}).get(owner),
                          min_rank=low.get(owner) if isinstance(low, dict) else low,
                          max_rank=high.get(owner) if isinstance(high, dict) else high, **breakdown, cost=cost,
                          share=cost / budget_params if budget_params else None, value=value, value_max=None,
                          captured=None))
    kept = [s for s in sites if s["rank"] > 0]
    unit = "triplet score (EMA sensitivity x uncertainty)" if scorer == "adalora" else \
        "module score (EMA of |dW . dL/dW| / sqrt(numel))"
    report = new_report(
        adapter=adapter, scorer=dict(name=scorer, unit=unit, settings=settings),
        budget=dict(metric="params", unit="parameters", value=budget_params, spent=spent, minimum=0,
                    request=budget_request or f"{budget_ranks} ranks", ranks=budget_ranks, tokens=tokens),
        sites=sites,
        totals=dict(sites=len(sites), kept=len(kept), dropped=[s["site"] for s in sites if s["rank"] == 0],
                    params=sum(s["params"] for s in sites), flops=sum(s["flops"] for s in sites),
                    bytes=sum(s["bytes"] for s in sites), params_before=params_before),
        training=dict(steps=summary.get("steps"), seconds=summary.get("seconds"),
                      loss_first=history[0].get("loss") if len(history) else None,
                      loss_final=history[-1].get("loss") if len(history) else None,
                      events=summary.get("growth") or summary.get("masked_at")),
    )
    report["history"] = list(history)
    if options is not None:
        report["options"] = options
    return report


__all__ = ["AdaLoRA", "IncreLoRA", "TRAINING_SCORERS", "TrainingHistory", "budget_in_ranks", "history_records",
           "make_allocator", "run_training_allocator", "settings_from", "site_bounds", "training_report"]
