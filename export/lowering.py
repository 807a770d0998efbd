"""Lower live adapters to switchable forms for unmerged export (the modes themselves: `export/lowerings/`).

Every site's chain of adapter branches is replaced by ONE module from the chosen lowering, computing the delta of
the adapter selected at run time. Scales are folded into B (B' = s B); the ranks of one site are zero-padded to
the largest, so adapters of different ranks share one model.

Batch-row ids reach the lowered modules through `ROUTER`, set by `RoutedModel.forward`: non-strict
export runs this Python for real, so the ids tensor is traced like any other input. A row id covers the
block of N / batch consecutive flattened rows of x, which is that row's tokens for [B, T, d] and for
GPT-2's flattened [B*T, d] alike.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.errors import ExportError
from rewrite.export.lowerings import LOWERINGS
from rewrite.export.lowerings.base import ROUTER, Lowering
from rewrite.graph_edit import adapters_at, drop_adapter, site_input, unwire
from rewrite.options import ExportOptions
from rewrite.sites import Site
from rewrite.state import state_of

aten = torch.ops.aten


class RoutedModel(nn.Module):
    """The export root: the model's own inputs plus `adapter_ids` (one id per batch row)."""

    def __init__(self, gm: fx.GraphModule, input_names: list[str]):
        super().__init__()
        self.gm, self.input_names = gm, input_names

    def forward(self, *args: torch.Tensor) -> Any:
        *inputs, ids = args
        ROUTER.ids = ids
        try:
            return self.gm(**dict(zip(self.input_names, inputs)))
        finally:
            ROUTER.ids = None


@dataclass
class SiteLowering:
    owner: str
    op: str
    d_in: int
    d_out: int
    rank: int
    tensors: dict[str, str]  # "A" / "B" -> module path of the parameter (its ONNX initializer name)
    per_adapter: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {"A", "B"} scaled


@dataclass
class Lowered:
    module: nn.Module
    lowering: Lowering
    adapters: list[str]
    sites: list[SiteLowering]

    @property
    def routed(self) -> bool:
        return self.lowering.routed


def _factors(module: AdapterKind, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [d_in, r], B [r, d_out]) with the scale folded into B, as the kind gives them."""
    try:
        return module.factors()
    except NotSupported as err:
        raise ExportError(f"{owner}: {err}") from None


def _pad(t: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    pad = [0, 0] * t.dim()
    pad[2 * (t.dim() - 1 - axis) + 1] = rank - t.shape[axis]
    return torch.nn.functional.pad(t, pad)


BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def lower(gm: fx.GraphModule, options: ExportOptions) -> Lowered:
    """A copy of `gm` with each adapted site's branches replaced by one module of the lowering
    `options.switching`, holding `options.adapters` (default: every live adapter) in `options.capacity` slots."""
    lowering, adapters, bank_dtype = LOWERINGS[options.switching], options.adapters, options.bank_dtype
    gm = copy.deepcopy(gm)
    state = state_of(gm)
    owners = list(dict.fromkeys(s.owner for s in state.sites.values()))
    live = {o: adapters_at(gm, o) for o in owners}
    names = list(dict.fromkeys(n for mods in live.values() for n in mods))
    if adapters is not None:
        missing = [n for n in adapters if n not in names]
        if missing:
            raise ExportError(f"[export] adapters {missing} are not attached (attached: {names or 'none'})")
        names = list(adapters)
    if not names:
        raise ExportError("unmerged export needs at least one live adapter (insert or load one; do not merge it)")
    slots = options.capacity or len(names)
    if slots < len(names):
        raise ExportError(f"[export] capacity = {slots} is smaller than the {len(names)} adapters exported")
    lowered_sites = []
    for owner, modules in live.items():
        chosen = {n: m for n, m in modules.items() if n in names}
        for name in list(modules):
            unwire(gm, name, owner)
            drop_adapter(gm, owner, name)
        if not chosen:
            continue
        sites = [s for s in state.sites.values() if s.owner == owner]
        factors = {n: _factors(m, owner) for n, m in chosen.items()}
        rank = max(a.shape[1] for a, _ in factors.values())
        padded = {n: {"A": _pad(a, rank, 1), "B": _pad(b, rank, 0)} for n, (a, b) in factors.items()}
        module = lowering.module(padded, names, slots, sites[0], BANK_DTYPES[bank_dtype])
        path = f"lora.{owner}"
        gm.add_submodule(path, module)
        for site in sites:
            _wire_lowered(gm, state.sites.node_of(gm, site.name), site, path, fused=lowering.fused)
        lowered_sites.append(SiteLowering(owner, sites[0].op, sites[0].d_in, sites[0].d_out, rank,
                                          {"A": f"{path}.A", "B": f"{path}.B"}, padded))
    gm.graph.lint()
    gm.recompile()
    root = RoutedModel(gm, list(state.inputs.kwargs)) if lowering.routed else gm
    return Lowered(root, lowering, names, lowered_sites)


def _wire_lowered(gm: fx.GraphModule, base: fx.Node, site: Site, path: str, fused: bool) -> None:
    """base -> base + lowered(x), or lowered(x, base) when the module adds base itself."""
    users = list(base.users)
    with gm.graph.inserting_before(base.next):
        if fused:
            join = gm.graph.call_module(path, (site_input(base, site), base))
        else:
            delta = gm.graph.call_module(path, (site_input(base, site),))
            join = gm.graph.call_function(aten.add.Tensor, (base, delta))
    for user in users:
        user.replace_input_with(base, join)
