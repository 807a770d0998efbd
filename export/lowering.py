"""Lower live adapters to switchable forms for unmerged export (the modes themselves: `export/lowerings/`).

Every site's chain of adapter branches is replaced by ONE module from the chosen lowering, computing the delta of
the adapter selected at run time; the sites of a fused group (`fuse`) share one module where the lowering has a
grouped form (bank: one A bank), and are lowered one by one otherwise. Scales are folded into B (B' = s B); the
ranks of one site are zero-padded to the largest, so adapters of different ranks share one model. Elementwise kinds
(`rowwise`: (IA)^3, RoAd, BitFit, OFT, HRA) get their own modules instead (`export/lowerings/rows.py`): gathered per
row from banks (bank, custom-op) or fed per run (ort-adapters); a site may hold both, each row getting its own
adapter's form and the identity from the other. A `parted` kind (DoRA, BOFT) is split into both forms
(`unmerged_parts`): its factors join the site's low-rank module, each row module its own `lower_rows` call (input
side before the base op, output side after base + delta: y' = rows_out(base(rows_in(x)) + x A B)).

`[export] reserve` keeps slots for adapters added while serving: the sites `reserve.targets` selects (Linear /
Conv1D) are lowered too, with zero-filled slots, and with per-row switching every lowered site's rank is at least
`reserve.rank` (zero columns add nothing, so the padding is exact).

Batch-row ids reach the lowered modules through `ROUTER`, set by `RoutedModel.forward`: non-strict
export runs this Python for real, so the ids tensor is traced like any other input. A row id covers the
block of N / batch consecutive flattened rows of x, which is that row's tokens for [B, T, d] and for
GPT-2's flattened [B*T, d] alike.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.errors import ExportError
from rewrite.export.lowerings import LOWERINGS
from rewrite.export.lowerings.base import ROUTER, Lowering
from rewrite.export.lowerings.rows import RowSite, lower_rows
from rewrite.graph_edit import adapter_input, adapters_at, drop_adapter, fused_groups, fused_parts, unwire
from rewrite.options import ExportOptions
from rewrite.sites import Site, select
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
    a_offset: int = 0  # a fused group's site: the column where its block starts in the group's shared A


class _OwnerBanks(NamedTuple):
    """One owner's low-rank adapters, ready to lower: `padded` {adapter: A / B zero-padded to `rank`}, `filled` the
    same or, for a site only `reserve.targets` gives a slot, zero A / B for every name."""
    sites: list[Site]
    rank: int
    padded: dict[str, dict[str, torch.Tensor]]
    filled: dict[str, dict[str, torch.Tensor]]


@dataclass
class Lowered:
    module: nn.Module
    lowering: Lowering
    adapters: list[str]
    sites: list[SiteLowering]
    reserved: list[str] = field(default_factory=list)  # owners given a slot by `reserve.targets`
    rows: list[RowSite] = field(default_factory=list)  # sites of elementwise kinds, switched by a gather

    @property
    def routed(self) -> bool:
        return self.lowering.routed


def _factors(module: AdapterKind, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [d_in, r], B [r, d_out]) with the scale folded into B, as the kind gives them. An adapter whose init
    rewrote the base weight (PiSSA, OLoRA: W <- W - delta0) is refused: the exported base would be that residual,
    so every row without this adapter would be served a wrong model."""
    init = getattr(module, "init", None)
    if init in module.weight_inits:
        raise ExportError(f"{owner}: the {module.kind} adapter was inserted with init = {init!r}, which rewrote the "
                          "base weight to its residual; an unmerged export would serve that residual as the base "
                          "model: merge it, or save it with convert_to_lora = true and load that onto the original "
                          "model")
    try:
        return module.factors()
    except NotSupported as err:
        raise ExportError(f"{owner}: {err}") from None


def _parts(gm: fx.GraphModule, module: AdapterKind, site: Site
           ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[AdapterKind]]:
    """A `parted` adapter's low-rank factors and row modules at `site`, from the base weight and bias exported."""
    bias = gm.get_parameter(site.bias) if site.bias else None
    try:
        return module.unmerged_parts(gm.get_parameter(site.weight), bias)
    except NotSupported as err:
        raise ExportError(f"{site.owner}: {err}") from None


def _pad(t: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    pad = [0, 0] * t.dim()
    pad[2 * (t.dim() - 1 - axis) + 1] = rank - t.shape[axis]
    return torch.nn.functional.pad(t, pad)


BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SWITCHABLE_OPS = ("linear", "conv1d")  # what a reserved slot can serve: y += x A B on a [.., d_in] input


def _reserved(state, options: ExportOptions, routed: bool) -> tuple[list[str], int]:
    """(owners `reserve.targets` selects, the least slot rank of every lowered site: reserve.rank when routed)."""
    reserve = options.reserve
    if reserve is None:
        return [], 0
    owners = []
    if reserve.targets:
        picked = select(state.sites, reserve.targets, "[export] reserve.targets", ops=SWITCHABLE_OPS)
        owners = list(dict.fromkeys(s.owner for s in picked))
    return owners, (reserve.rank or 0) if routed else 0


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
    reserved, least_rank = _reserved(state, options, lowering.routed)
    groups = [list(dict.fromkeys(state.sites[p.meta["rewrite"].site].owner for p in fused_parts(g)))
              for g in fused_groups(gm)]  # read before the adapters are detached (which unfuses them)
    banks: dict[str, _OwnerBanks] = {}  # every owner with low-rank adapters to lower
    rows = []
    for owner, modules in live.items():
        chosen = {n: m for n, m in modules.items() if n in names}
        for name in list(modules):
            unwire(gm, name, owner)
            drop_adapter(gm, owner, name)
        sites = [s for s in state.sites.values() if s.owner == owner]
        parts = {n: _parts(gm, m, sites[0]) for n, m in chosen.items() if m.parted}
        row_sets = [{n: m for n, m in chosen.items() if m.rowwise}]  # one module per adapter in each call
        for name, (_, row_parts) in parts.items():
            for index, part in enumerate(row_parts):
                row_sets += [{} for _ in range(index + 2 - len(row_sets))]
                row_sets[index + 1][name] = part
        nodes = [state.sites.node_of(gm, s.name) for s in sites]
        made = len(rows)
        for row_set in filter(None, row_sets):
            rows += lower_rows(gm, sites, nodes, row_set, names, slots, lowering.routed, BANK_DTYPES[bank_dtype],
                               start=len(rows) - made)
        factors = {n: _factors(m, owner) for n, m in chosen.items() if not (m.rowwise or m.parted)}
        factors |= {n: low for n, (low, _) in parts.items() if low is not None}
        if not factors and owner not in reserved:
            continue
        # a site only `reserve.targets` selects gets the reserved rank (ort-adapters: its ONNX rank dim is symbolic)
        rank = max([a.shape[1] for a, _ in factors.values()] + [least_rank]) if factors else options.reserve.rank or 1
        padded = {n: {"A": _pad(a, rank, 1), "B": _pad(b, rank, 0)} for n, (a, b) in factors.items()}
        # a reserved site no exported adapter touches: every slot zero (the base model until an adapter is added)
        weight = gm.get_parameter(sites[0].weight)
        empty = {"A": weight.new_zeros(sites[0].d_in, rank), "B": weight.new_zeros(rank, sites[0].d_out)}
        banks[owner] = _OwnerBanks(sites, rank, padded, padded or {n: empty for n in names})
    lowered_sites = []
    for group in filter(None, ([o for o in g if o in banks] for g in groups)):
        made = lowering.group_module([(banks[o].filled, banks[o].sites[0]) for o in group], names, slots,
                                     BANK_DTYPES[bank_dtype])
        if made is None:
            continue
        module, tensors, offsets = made
        path = f"lora.{group[0]}"
        gm.add_submodule(path, module)
        if lowering.fused:  # the group module adds every member's base output itself: one call after them all
            lowering.wire_group(gm, [(state.sites.node_of(gm, banks[o].sites[0].name), banks[o].sites[0])
                                     for o in group], path)
        for index, owner in enumerate(group):
            sites, rank, padded, _ = banks.pop(owner)
            if not lowering.fused:
                _wire_lowered(gm, state.sites.node_of(gm, sites[0].name), sites[0], path, fused=False, part=index)
            lowered_sites.append(SiteLowering(owner, sites[0].op, sites[0].d_in, sites[0].d_out, rank,
                                              {k: f"{path}.{v}" for k, v in tensors[index].items()}, padded,
                                              offsets[index]))
    for owner, (sites, rank, padded, filled) in banks.items():
        module = lowering.module(filled, names, slots, sites[0], BANK_DTYPES[bank_dtype])
        path = f"lora.{owner}"
        gm.add_submodule(path, module)
        for site in sites:
            _wire_lowered(gm, state.sites.node_of(gm, site.name), site, path, fused=lowering.fused)
        lowered_sites.append(SiteLowering(owner, sites[0].op, sites[0].d_in, sites[0].d_out, rank,
                                          {"A": f"{path}.A", "B": f"{path}.B"}, padded))
    gm.graph.lint()
    gm.recompile()
    root = RoutedModel(gm, list(state.inputs.kwargs)) if lowering.routed else gm
    return Lowered(root, lowering, names, lowered_sites, reserved, rows)


def _wire_lowered(gm: fx.GraphModule, base: fx.Node, site: Site, path: str, fused: bool, part: int | None = None
                  ) -> None:
    """base -> base + lowered(x), or lowered(x, base) when the module adds base itself; a group's module (`part`:
    this site's index in it) is called once, before its first site, and each site adds its part."""
    users = list(base.users)
    with gm.graph.inserting_before(base.next):
        if fused:
            join = gm.graph.call_module(path, (adapter_input(base, site), base))
        else:
            delta = gm.graph.call_module(path, (adapter_input(base, site),)) if part is None else \
                gm.graph.call_function(operator.getitem, (_group_call(gm, base, site, path), part))
            join = gm.graph.call_function(aten.add.Tensor, (base, delta))
    for user in users:
        user.replace_input_with(base, join)


def _group_call(gm: fx.GraphModule, base: fx.Node, site: Site, path: str) -> fx.Node:
    """The call of the group module at `path` (made right after the site's input the first time)."""
    found = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == path), None)
    if found is None:
        x = adapter_input(base, site)
        with gm.graph.inserting_after(x):
            found = gm.graph.call_module(path, (x,))
    return found
