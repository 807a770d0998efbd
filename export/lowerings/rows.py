"""Row-switched kinds (`AdapterKind.rowwise`: (IA)^3, RoAd, BitFit, OFT, HRA, and the row parts of `parted` kinds:
DoRA, BOFT, LN tuning) in unmerged exports, one module per kind and layout at a site.

A kind declares its vectors (`row_params`: p [width] and its identity value) and how they rewrite the tensor its join
touches (`apply_rows`): the base op's input x ("input": (IA)^3 on feed-forward inputs) or its output y (every other
join):  (IA)^3 t (.) l, RoAd c1 (.) t + c2 (.) rot(t), BitFit t + b (no matmul); OFT, HRA and BOFT rotate x by
vectors holding R - I or unit reflections (a small batched matmul). Per-row lowerings (bank, custom-op) hold a bank

    P [C + 1, width]   row k: adapter k's p (slot order); free slots and the last row: the identity

and each batch row gathers its own vectors by its id (an id outside 0..C-1, such as -1, reads the last row: the base):

    p_rows = Gather(P, Where(0 <= ids < C, ids, C))   [batch, width], broadcast over the row's tokens
    t'     = kind.apply_rows(t, p_rows)

(`RowBank`; banks follow `[export] bank_dtype` when the model's vectors are float32, the gathered rows are cast to
the activation dtype). ort-adapters holds ONE vector per p instead (`RunRows`, ort_adapters.py): an adapter input
[1, 1, width] (one row for `apply_rows`) defaulting to the identity, which an adapter's `.onnx_adapter` file replaces
per run. Both name it `rows.<site>.<i>.vectors.<p>`, so one `.onnx_adapter` fits either. Adapters of one kind and
layout at a site share one module; another kind or layout at the same site gets its own, applied in turn (a row or
run has one adapter: every other module gives it the identity). A LoRA-shaped adapter's slot holds the identity
here, and its own module (bank.py, custom_op.py, ort_adapters.py) adds its delta.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.errors import ExportError
from rewrite.export.lowerings.base import routed_ids
from rewrite.export.lowerings.ort_adapters import RunRows
from rewrite.graph_edit import site_input
from rewrite.sites import Site
from rewrite.state import AdapterTag


class RowBank(nn.Module):
    """The vectors of one elementwise kind at one site, one bank row per slot plus the identity row."""

    def __init__(self, formula: type[AdapterKind], layout: dict[str, Any], banks: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.formula, self.layout = formula, layout
        # named like RunRows' vectors: an adapter's .onnx_adapter then names the same inputs in every switching mode
        self.vectors = nn.ParameterDict({p: nn.Parameter(b.to(dtype) if b.dtype == torch.float32 else b,
                                                         requires_grad=False) for p, b in banks.items()})
        self.slots = next(iter(banks.values())).shape[0] - 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ids = routed_ids()
        index = torch.where((ids >= 0) & (ids < self.slots), ids, self.slots)
        rows = t.reshape(ids.shape[0], -1, t.shape[-1])  # [B, T, d] and GPT-2's flattened [B*T, d] alike
        params = {p: bank.index_select(0, index)[:, None, :].to(t.dtype) for p, bank in self.vectors.items()}
        return self.formula.apply_rows(rows, params, **self.layout).reshape(t.shape)


@dataclass
class RowSite:
    """A lowered elementwise site as the manifest records it (`rewrite.formats.manifest.RowSite`)."""
    owner: str
    kind: str
    op: str
    join: str  # "input" | "output": the tensor it rewrites
    widths: dict[str, int]  # vector name -> its width
    tensors: dict[str, str]  # vector name -> module path of its bank / vector (its ONNX initializer name)
    identity: dict[str, float]
    layout: dict[str, Any]
    per_adapter: dict[str, dict[str, torch.Tensor]]  # adapter name -> {vector name: [width]}


def lower_rows(gm: fx.GraphModule, sites: list[Site], nodes: list[fx.Node], modules: dict[str, AdapterKind],
               names: list[str], slots: int, routed: bool, bank_dtype: torch.dtype, start: int = 0) -> list[RowSite]:
    """One module per kind and layout among `modules` (adapter name -> module, already unwired), each wired at every
    one of `sites` (one owner's; `nodes`: their base ops): `routed`, a `RowBank` (adapter `names[k]` in slot k of
    `slots`, banks of `bank_dtype`); otherwise a `RunRows` at the identity."""
    owner = sites[0].owner
    groups: dict[tuple, tuple[AdapterKind, dict[str, dict[str, tuple[torch.Tensor, float]]]]] = {}
    for name, module in modules.items():
        try:
            params = module.row_params()
        except NotSupported as err:
            raise ExportError(f"{owner}: {err}") from None
        key = (type(module), json.dumps(module.row_layout(), sort_keys=True))
        groups.setdefault(key, (module, {}))[1][name] = params
    lowered = []
    for index, (first, per_adapter) in enumerate(groups.values()):
        declared = next(iter(per_adapter.values()))
        path = f"rows.{owner}.{start + index}"  # `start`: modules an earlier call made at this owner
        if routed:
            banks = {}
            for p, (vector, identity) in declared.items():
                bank = vector.new_full((slots + 1, vector.shape[0]), identity)
                for slot, name in enumerate(names):
                    if name in per_adapter:
                        bank[slot] = per_adapter[name][p][0]
                banks[p] = bank
            module = RowBank(type(first), first.row_layout(), banks, bank_dtype)
        else:
            identities = {p: vector.new_full(vector.shape, identity) for p, (vector, identity) in declared.items()}
            module = RunRows(type(first), first.row_layout(), identities)
        gm.add_submodule(path, module)
        join = "input" if first.join == "input" else "output"
        for site, node in zip(sites, nodes):
            _wire(gm, node, site, path, join, first.kind)
        widths = {p: vector.shape[0] for p, (vector, _) in declared.items()}
        lowered.append(RowSite(owner, first.kind, sites[0].op, join, widths,
                               {p: f"{path}.vectors.{p}" for p in declared}, {p: i for p, (_, i) in declared.items()},
                               first.row_layout(),
                               {n: {p: v for p, (v, _) in params.items()} for n, params in per_adapter.items()}))
    return lowered


def _wire(gm: fx.GraphModule, base: fx.Node, site: Site, path: str, join: str, kind: str) -> None:
    """input: base(rows(x)), tagged like an input-side adapter so the site's other adapters still read x;
    output: rows(y) for every user of y (a LoRA bank wired afterwards joins y + delta inside it)."""
    graph = gm.graph
    if join == "input":
        x = site_input(base, site)
        with graph.inserting_before(base):
            node = graph.call_module(path, (x,))
        base.replace_input_with(x, node)
    else:
        users = list(base.users)
        with graph.inserting_after(base):
            node = graph.call_module(path, (base,))
        for user in users:
            user.replace_input_with(base, node)
    node.meta["rewrite"] = AdapterTag(site.name, kind, "rows", join)
    if "nn_module_stack" in base.meta:
        node.meta["nn_module_stack"] = dict(base.meta["nn_module_stack"])
