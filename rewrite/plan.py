"""What a spec will do to a captured model, without running it (`rewrite inspect --spec`, `rewrite apply --dry-run`).

For each pass: the sites its `targets` select (each selector on its own, with its error when it matches nothing),
the sites a `load` reaches (the pass itself run on a scratch copy of the graph: every check of a real load, nothing
kept), and the files it writes; then the files the export writes. Nothing is written.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from rewrite.adapters import KINDS
from rewrite.adapters.for_site import selectable_ops
from rewrite.errors import RewriteError, SpecError
from rewrite.formats.manifest import MANIFEST
from rewrite.graph_edit import adapters_at
from rewrite.pass_infra import PassContext
from rewrite.pipeline import schedule
from rewrite.sites import select
from rewrite.spec import Spec
from rewrite.state import state_of


@dataclass
class SelectorPlan:
    selector: str
    matches: list[str]
    error: str = ""


@dataclass
class PassPlan:
    index: int
    name: str
    where: str
    selectors: list[SelectorPlan] = field(default_factory=list)
    reaches: dict[str, str] = field(default_factory=dict)  # load: owner module -> adapter kind
    error: str = ""
    writes: list[str] = field(default_factory=list)


def plan_passes(spec: Spec, gm: fx.GraphModule) -> list[PassPlan]:
    sites = state_of(gm).sites
    plans = []
    for entry, scheduled in zip(spec.passes, schedule(spec, PassContext(spec_dir=spec.base_dir))):
        plan = PassPlan(entry.index, entry.name, spec.location("pass", entry.index),
                        writes=scheduled.graph_pass.writes())
        kind = KINDS.get(getattr(entry.options, "kind", None)) if entry.name == "insert" else None
        ops = selectable_ops(kind.ops) if kind else None  # what insert picks among (norm sites: norm kinds only)
        for pattern in getattr(entry.options, "targets", None) or []:
            where = spec.location("pass", entry.index, "targets")
            try:
                plan.selectors.append(SelectorPlan(pattern, [s.name for s in select(sites, [pattern], where, ops)]))
            except SpecError as err:
                plan.selectors.append(SelectorPlan(pattern, [], str(err)))
        if entry.name == "load":
            plan.reaches, plan.error = _load_reaches(gm, scheduled.graph_pass, entry.options.adapter)
        plans.append(plan)
    return plans


def _load_reaches(gm: fx.GraphModule, load_pass, adapter: str) -> tuple[dict[str, str], str]:
    scratch = copy.deepcopy(gm)
    try:
        load_pass(scratch)
    except RewriteError as err:
        return {}, str(err)
    owners = dict.fromkeys(s.owner for s in state_of(scratch).sites.values())
    return {o: m.kind for o in owners if (m := adapters_at(scratch, o).get(adapter)) is not None}, ""


def export_writes(spec: Spec) -> list[str]:
    """The export's files; `<model>.data` beside the model too when it is written with external data."""
    options = spec.export
    if options.format == "none":
        return [MANIFEST]
    adapters = ["adapters/<name>.onnx_adapter"] if (options.mode, options.switching) == ("unmerged", "ort-adapters") \
        else []
    triton = ["triton/<OUT's name>/ (config.pbtxt, 1/model.onnx, README.md)"] if options.target == "triton" else []
    return [options.filename, *adapters, MANIFEST, *triton]


def as_json(plans: list[PassPlan]) -> list[dict[str, Any]]:
    return [asdict(p) for p in plans]
