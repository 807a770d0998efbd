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


def settings_from(options: Any, scorer: str) -> dict[str, Any]:
    """Allocator settings from the allocate pass options: a `[pass] adalora = {...}` / `increlora = {...}`
    sub-table first, then a generic `settings = {...}` table, then plain keys of the pass."""
    names = _ADALORA if scorer == "adalora" else _INCRELORA
    sources = [_lookup(options, scorer), _lookup(options, "settings"), options]
    out: dict[str, Any] = {}
    for name in names:
        for source in sources:
            value = next((v for v in (_lookup(source, a) for a in _ALIASES[name]) if v is not None), None)
            if value is not None:
                out[name] = value
                break
    return out


def _data_source(gm: fx.GraphModule, data: Any, context: Any, scorer: str, where: str):
    from rewrite.data import DataSource
    from rewrite.spec import DataOptions

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


def _param_budget_to_triplets(gm: fx.GraphModule, budget: float, adapter: str) -> int:
    """A parameter budget as a rank budget: budget / mean per-rank cost (d_in + d_out) of the adapted sites."""
    from rewrite.graph_edit import adapters_at

    costs: dict[str, int] = {}
    for site in state_of(gm).sites.values():
        if site.owner not in costs and adapters_at(gm, site.owner).get(adapter) is not None:
            costs[site.owner] = site.d_in + site.d_out
    costs = list(costs.values())
    return int(math.floor(budget / (sum(costs) / len(costs)))) if costs else 0


def make_allocator(gm: fx.GraphModule, scorer: str, settings: dict[str, Any], *, adapter: str, total_steps: int,
                   weight_decay: float = 0.0, where: str = "<allocate>"):
    settings = dict(settings)
    if scorer == "adalora":
        return AdaLoRA(gm, adapter, total_steps=total_steps, where=where, **settings)
    if scorer == "increlora":
        return IncreLoRA(gm, adapter, total_steps=total_steps, weight_decay=weight_decay, where=where, **settings)
    raise SpecError(f"{where}: unknown training scorer {scorer!r} (expected one of {TRAINING_SCORERS})")


def run_training_allocator(gm: fx.GraphModule, options: Any, data: Any = None,
                           context: Any = None) -> tuple[dict[str, int], dict[str, Any]]:
    """Train `options.adapter` with the allocator `options.scorer` on `data`; resize; return (ranks, history).

    `data`: a `rewrite.spec.DataOptions` ([data]), a `rewrite.data.DataSource`, or None (then
    `context.data`). Settings come from `settings_from(options, scorer)`; `options.budget` with
    `options.budget_unit`/`cost` = "params" becomes a rank budget through the mean per-rank cost."""
    from rewrite.train import train

    scorer = _lookup(options, "scorer") or "adalora"
    where = context.where if context is not None and hasattr(context, "where") else "<allocate>"
    if scorer not in TRAINING_SCORERS:
        raise SpecError(f"{where}: scorer {scorer!r} is not a training scorer ({', '.join(TRAINING_SCORERS)})")
    adapter = _lookup(options, "adapter") or "default"
    source = _data_source(gm, data, context, scorer, where)
    data_options = getattr(source, "options", None)
    steps = int(_lookup(options, "steps") or getattr(data_options, "steps", 100))
    settings = settings_from(options, scorer)
    budget = _lookup(options, "budget")
    unit = _lookup(options, "budget_unit") or _lookup(options, "cost") or "params"
    if "target_budget" not in settings and "target_rank" not in settings and budget is not None:
        if unit in ("params", "parameters"):
            settings["target_budget"] = _param_budget_to_triplets(gm, float(budget), adapter)
        elif unit in ("rank", "ranks", "triplets"):
            settings["target_budget"] = int(budget)
    allocator = make_allocator(gm, scorer, settings, adapter=adapter, total_steps=steps,
                               weight_decay=float(getattr(data_options, "weight_decay", 0.0) or 0.0), where=where)
    result = train(gm, source, steps=steps, callbacks=[allocator])
    ranks = allocator.finalize()
    history = dict(allocator.history)
    history.update(loss=result.losses, lr=result.lrs, seconds=result.seconds, settings=allocator.settings(),
                   adapter=adapter)
    return ranks, history


__all__ = ["AdaLoRA", "IncreLoRA", "TRAINING_SCORERS", "make_allocator", "run_training_allocator", "settings_from"]
