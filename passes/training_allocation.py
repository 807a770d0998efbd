"""Rank allocation while training, for the two passes that do it: `allocate` with scorer = "adalora" |
"increlora", and `train` with allocator = "adalora" | "increlora" (METHODS.md §2.1, §2.2).

    AdaLoRA:   dW_k = c P_k diag(lam_k) Q_k, c = alpha / r0; triplets pruned to a budget b(t) on the cubic
               schedule by S = e(lam) + mean e(Q) + mean e(P), e = EMA(|w . g|) x EMA(uncertainty)
    IncreLoRA: the same form grown from init_rank: every Delta steps the top-h sites by the EMA of
               sum |dW_k . dL/dW_k| / sqrt(numel) gain `a` ranks, until R_t = R_T

Rules (`allocate_while_training`):
1. Settings come from the pass's `adalora = {...}` / `increlora = {...}` table (PEFT and official names
   work too; rewrite.allocators.settings_from); the budget (`params` or `fraction`, metric params) becomes
   a total rank (rewrite.allocators.budget_in_ranks) unless a target_rank / target_budget is given.
2. `min_rank` / `max_rank` and their `*_pattern` forms bound every site's rank (a pattern key that
   matches no site is an error); AdaLoRA never masks below lo_k or keeps more than hi_k (capped at r0),
   IncreLoRA starts at clamp(init_rank, lo_k, hi_k) and never grows a site past hi_k (rewrite.allocators.bounds).
3. The allocator trains on the spec's [data] (rewrite.train) and resizes physically: every site ends as a
   plain LoRA of its final rank with the same delta; rank 0 sites lose their branch.
4. The report `<report>.json/.md/.png` (+ `<report>_history.png`) holds the per-site ranks, costs and
   scores and the budget and ranks over the steps; `report = ""` writes none, nor does a process other than
   rank 0 under torch.distributed (which trains on its rows of each batch: rewrite.distributed).
5. A second run with the same options and data leaves the graph alone (modified=False).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.fx as fx
from pydantic import Field

from rewrite.passes.rank_options import BudgetOptions, RankBoundsOptions
from rewrite.allocators import run_training_allocator, training_report
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import PassContext, PassResult
from rewrite.report import write_report
from rewrite.sites import check_mapping
from rewrite.state import state_of


class TrainingAllocatorOptions(RankBoundsOptions):
    """The options a pass with a training-time allocator has (besides its own)."""
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    budget: BudgetOptions | None = None
    steps: int | None = Field(default=None, ge=1)
    adalora: dict[str, Any] = {}
    increlora: dict[str, Any] = {}
    report: str = "allocation"
    plot: bool = True

    def report_files(self, history: bool) -> list[str]:
        """The report's files (rewrite.report.write_report), none with `report = ""`."""
        if not self.report:
            return []
        plots = [f"{self.report}.png", *([f"{self.report}_history.png"] if history else [])] if self.plot else []
        return [f"{self.report}.json", f"{self.report}.md", *plots]


def options_key(options: Any, data: Any) -> str:
    """A digest of the pass options and the [data] table: the same key means the same run."""
    text = json.dumps([options.model_dump(mode="json"), data.model_dump(mode="json") if data else None],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _adapter_modules(gm: fx.GraphModule, adapter: str) -> dict[str, Any]:
    owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
    return {o: adapters_at(gm, o)[adapter] for o in owners if adapter in adapters_at(gm, o)}


def allocate_while_training(gm: fx.GraphModule, context: PassContext, options: TrainingAllocatorOptions, *,
                            scorer: str, mark: str, train_options: dict[str, Any] | None = None) -> PassResult:
    """Rules 1-5 above; `mark` names the attribute the pass stamps its options key on (rule 5)."""
    table = state_of(gm).sites
    for key in ("min_rank_pattern", "max_rank_pattern"):
        check_mapping(table, getattr(options, key), f"{context.at(key)} {key}")
    key = options_key(options, context.data)
    modules = _adapter_modules(gm, options.adapter)
    if modules and all(getattr(m, mark, None) == key for m in modules.values()):
        return PassResult(gm, False, {"adapter": options.adapter, "sites": len(modules), "note": "already allocated"})
    if context.data is None:
        raise SpecError(f"{context.at('scorer')}: scorer = {scorer!r} trains the adapters and needs training data: "
                        "add a [data] table (path = tensor file or factory = 'pkg.mod:fn', loss, steps, lr)")
    before = {owner: m.rank for owner, m in modules.items()}
    params_before = sum(p.numel() for m in modules.values() for p in m.parameters())
    ranks, history = run_training_allocator(gm, options, context.data, context, scorer=scorer,
                                            train_options=train_options)
    after = _adapter_modules(gm, options.adapter)
    for module in after.values():
        setattr(module, mark, key)
    params_after = sum(p.numel() for m in after.values() for p in m.parameters())
    request = options.budget.text() if options.budget is not None else "(from the allocator settings)"
    report = training_report(gm, ranks, history, adapter=options.adapter, scorer=scorer, budget_request=request,
                             rank_before=before, params_before=params_before, options=options.model_dump(mode="json"),
                             tokens=getattr(options, "tokens", 128))
    files = []
    if options.report and context.write:
        stem = context.output_path(options.report, "report")
        files = [p.name for p in write_report(report, stem.parent, stem.name, plot=options.plot)]
    losses = [h["loss"] for h in history]
    tail = losses[-max(1, len(losses) // 10):]
    return PassResult(gm, True, {
        "adapter": options.adapter, "scorer": scorer, "metric": "params", "budget": report["budget"]["value"],
        "spent": report["budget"]["spent"], "sites": len(ranks), "ranks": sum(ranks.values()),
        "resized": sum(1 for w, r in ranks.items() if 0 < r != before.get(w, 0)),
        "dropped": sum(1 for r in ranks.values() if r == 0), "steps": len(history),
        "seconds": round(history.summary["seconds"], 3), "loss_first": losses[0], "loss_final": sum(tail) / len(tail),
        "params_before": params_before, "params_after": params_after, "report": files})


__all__ = ["TrainingAllocatorOptions", "allocate_while_training", "options_key"]
