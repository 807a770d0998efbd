"""Structural removal: cut units out of the graph's weights, adapters and shape constants, in place.

Given the fine atoms to remove (`Coupling.ids_of`), every labelled tensor of the traced graph loses the positions whose
ids are removed. Those positions must form whole slices (a grid): index i of dim k goes when every position of that
slice goes, and a position goes exactly when one of its indices does; anything else is refused (`PassError`).
Broadcast copies are interchangeable (repeat_kv's copies of one KV head are the same data), so each source keeps the
first count - r of its copies when r of them are removed: query heads removed evenly per KV head form a grid.

Then, from the new sizes:
    weights     every parameter / buffer axis with removed ids is index_select-ed (weights, biases, norm weights,
                BatchNorm statistics), and every adapter at a site whose weight shrank (`adapter_axes`)
    constants   view / reshape / expand sizes, unflatten sizes, slice / narrow bounds, select indices and split
                sizes are rewritten to the new sizes (symbolic sizes are left alone: they follow at run time)
    sites       d_in / d_out in the site table
The caller recompiles (the pass manager does, once per pass).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import nn

from rewrite.coupling.adapter_axes import slice_adapter
from rewrite.coupling.groups import WEIGHT_DIMS, Coupling
from rewrite.errors import PassError
from rewrite.graph_edit import adapters_at
from rewrite.sites import SiteTable
from rewrite.state import state_of

aten = torch.ops.aten
_SIZES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


@dataclasses.dataclass
class Removal:
    params_before: int
    params_after: int
    constants: int  # shape constants rewritten


def removed_mask(coupling: Coupling, atoms: set[int]) -> torch.Tensor:
    """The ids that go, copies made canonical (module docstring)."""
    removed = coupling.ids_of(atoms)
    for copy in coupling.labels.copies:
        ids = torch.arange(copy.start, copy.start + copy.sources.numel() * copy.count)
        gone = removed[ids].view(-1, copy.count).sum(1, keepdim=True)
        canonical = torch.arange(copy.count).view(1, -1) >= copy.count - gone
        removed[ids] = (canonical | removed[copy.sources].view(-1, 1)).flatten()
    return removed


def kept_indices(labels: torch.Tensor, removed: torch.Tensor, where: str) -> list[torch.Tensor | None]:
    """Per dim of a labelled tensor: the indices kept (None: all); PassError unless the removed part is a grid."""
    gone = torch.where(labels >= 0, removed[labels.clamp(min=0)], False)
    if not bool(gone.any()):
        return [None] * labels.dim()
    per_dim = [gone.movedim(d, 0).reshape(labels.shape[d], -1).all(1) for d in range(labels.dim())]
    grid = torch.zeros_like(gone)
    for d, mask in enumerate(per_dim):
        shape = [1] * labels.dim()
        shape[d] = -1
        grid = grid | mask.view(shape)
    if not bool((grid == gone).all()):
        raise PassError(f"removing these units leaves {where} ragged (not whole slices of one dim); GQA query "
                           "heads must be removed evenly from every KV head")
    out = []
    for d, mask in enumerate(per_dim):
        if bool(mask.all()):
            raise PassError(f"removing these units empties {where} (dim {d}): at least one must stay")
        out.append(torch.nonzero(~mask).flatten() if bool(mask.any()) else None)
    return out


def remove(gm: fx.GraphModule, coupling: Coupling, atoms: set[int]) -> Removal:
    """Cut the fine atoms `atoms` out of `gm` in place (module docstring)."""
    removed = removed_mask(coupling, atoms)
    keeps: dict[str, list[torch.Tensor | None]] = {}
    for name, labels in coupling.labels.nodes.items():
        if isinstance(labels, torch.Tensor):
            keeps[name] = kept_indices(labels, removed, f"the output of node {name}")
    before = sum(p.numel() for p in gm.parameters())
    constants = _fix_constants(gm, coupling, keeps)
    axes = _slice_tensors(gm, coupling, removed)
    _slice_adapters_and_sites(gm, axes)
    return Removal(before, sum(p.numel() for p in gm.parameters()), constants)


def _fix_constants(gm: fx.GraphModule, coupling: Coupling, keeps: dict[str, list]) -> int:
    changed = 0
    labels = coupling.labels.nodes
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        mine = keeps.get(node.name)
        if node.target in _SIZES and mine is not None:
            old = labels[node.name].shape
            sizes = list(node.args[1])
            for k, entry in enumerate(sizes):
                if isinstance(entry, int) and entry != -1 and mine[k] is not None:
                    sizes[k] = int(mine[k].numel()) if entry == old[k] else entry
            if sizes != list(node.args[1]):
                node.args = (node.args[0], sizes, *node.args[2:])
                changed += 1
        elif node.target == aten.unflatten.int and mine is not None:
            dim, sizes = node.args[1] % len(mine), list(node.args[2])
            new = [int(mine[dim + i].numel()) if mine[dim + i] is not None and s != -1 else s
                   for i, s in enumerate(sizes)]
            if new != sizes:
                node.args = (node.args[0], node.args[1], new)
                changed += 1
        elif source is not None and source.name in keeps and node.target in _INDEXING:
            changed += _INDEXING[node.target](node, keeps[source.name], labels[source.name].shape)
    return changed


def _kept_before(keep: torch.Tensor, position: int) -> int:
    return int((keep < position).sum())


def _fix_slice(node: fx.Node, keep: list, shape) -> int:
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    source, dim, start, end, step = args[:5]
    dim %= len(shape)
    if keep[dim] is None:
        return 0
    if step != 1:
        raise PassError(f"node {node.name} slices a pruned dim with step {step}")
    size = shape[dim]
    start = 0 if start is None else min(max(start + size if start < 0 else start, 0), size)
    end = size if end is None else min(max(end + size if end < 0 else end, 0), size)
    node.args = (source, dim, _kept_before(keep[dim], start), _kept_before(keep[dim], end), 1)
    return 1


def _fix_narrow(node: fx.Node, keep: list, shape) -> int:
    source, dim, start, length = node.args
    dim %= len(shape)
    if keep[dim] is None:
        return 0
    first = _kept_before(keep[dim], start)
    node.args = (source, dim, first, _kept_before(keep[dim], start + length) - first)
    return 1


def _fix_select(node: fx.Node, keep: list, shape) -> int:
    source, dim, index = node.args
    dim %= len(shape)
    if keep[dim] is None:
        return 0
    index %= shape[dim]
    if not bool((keep[dim] == index).any()):
        raise PassError(f"node {node.name} selects index {index}, which the removal takes")
    node.args = (source, dim, _kept_before(keep[dim], index))
    return 1


def _fix_split(node: fx.Node, keep: list, shape) -> int:
    """split / split_with_sizes / chunk along a pruned dim become split_with_sizes of what each piece keeps."""
    source = node.args[0]
    if node.target == aten.chunk.default:
        chunks, dim = node.args[1], node.args[2] if len(node.args) > 2 else 0
        step = -(-shape[dim % len(shape)] // chunks)
        sizes = [min(step, shape[dim % len(shape)] - i * step) for i in range(chunks)]
    elif node.target == aten.split.Tensor:
        size, dim = node.args[1], node.args[2] if len(node.args) > 2 else 0
        total = shape[dim % len(shape)]
        sizes = [min(size, total - i) for i in range(0, total, size)]
    else:
        sizes, dim = list(node.args[1]), node.args[2] if len(node.args) > 2 else 0
    dim %= len(shape)
    if keep[dim] is None:
        return 0
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    new = [_kept_before(keep[dim], hi) - _kept_before(keep[dim], lo) for lo, hi in zip(bounds, bounds[1:])]
    node.target, node.args, node.kwargs = aten.split_with_sizes.default, (source, new, dim), {}
    return 1


_INDEXING = {aten.slice.Tensor: _fix_slice, aten.narrow.default: _fix_narrow, aten.select.int: _fix_select,
             aten.split.Tensor: _fix_split, aten.split_with_sizes.default: _fix_split, aten.chunk.default: _fix_split}


@torch.no_grad()
def _slice_tensors(gm: fx.GraphModule, coupling: Coupling, removed: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """index_select every parameter / buffer axis that loses ids; returns (FQN, dim) -> kept indices."""
    axes: dict[tuple[str, int], torch.Tensor] = {}
    for space in coupling.labels.spaces:
        if space.role == "copy":
            continue
        gone = removed[space.start:space.start + space.size]
        if bool(gone.any()):
            axes[(space.tensor, 0 if space.dim is None else space.dim)] = torch.nonzero(~gone).flatten()
    new_tensors: dict[str, torch.Tensor] = {}
    for (fqn, dim), keep in axes.items():
        old = new_tensors.get(fqn, _get(gm, fqn))
        new = old.detach().index_select(dim, keep.to(old.device)).clone()
        new_tensors[fqn] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    for fqn, tensor in new_tensors.items():
        for name in (fqn, *coupling.labels.aliases.get(fqn, [])):  # tied weights stay tied
            module_path, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(module_path), attr, tensor)
    for alias_of, names in coupling.labels.aliases.items():
        for name in names:
            for (fqn, dim), keep in list(axes.items()):
                if fqn == alias_of:
                    axes[(name, dim)] = keep
    return axes


def _get(gm: fx.GraphModule, fqn: str) -> torch.Tensor:
    module_path, _, attr = fqn.rpartition(".")
    return getattr(gm.get_submodule(module_path), attr)


def _slice_adapters_and_sites(gm: fx.GraphModule, axes: dict[tuple[str, int], torch.Tensor]) -> None:
    state = state_of(gm)
    sites = []
    done: set[str] = set()
    for site in state.sites.values():
        out_dim, in_dim = WEIGHT_DIMS.get(site.op, (None, None))
        out_keep, in_keep = axes.get((site.weight, out_dim)), axes.get((site.weight, in_dim))
        if (out_keep is not None or in_keep is not None) and site.owner not in done:
            done.add(site.owner)
            for module in adapters_at(gm, site.owner).values():
                slice_adapter(module, out_keep, in_keep)
        sites.append(dataclasses.replace(
            site, d_out=site.d_out if out_keep is None else int(out_keep.numel()),
            d_in=site.d_in if in_keep is None else int(in_keep.numel())))
    state.sites = SiteTable(sites)
