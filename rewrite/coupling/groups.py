"""Dependency groups: what a structural prune must cut together, from the channel labels of `trace_labels`.

Atoms. The ties of `rewrite.coupling.labels` join ids into fine atoms (connected components); with every broadcast
copy also joined to its source they join into coarse atoms.

Units (what one removal takes):
    plain        a coarse atom without copies: an MHA head (q / k / v rows, o columns, biases), an FFN neuron (plain
                 or gated), a conv channel (its BatchNorm entries, the next conv's input channel)
    GQA          a coarse atom with copies: each fine atom holding copies is a query head (q rows, o columns) and
                 the coarse atom itself a KV head (k / v rows and every query head of its group); query heads are
                 removed evenly per KV head (`rewrite.coupling.remove` checks the grid)
Structure of a unit: "channels" (it touches a conv weight), "heads" (its ids were tied inside a split dim), "hidden"
(a residual add joins the outputs of two weights in it: the residual stream), else "ffn".

A unit is blocked when one of its ids is blocked, or when it covers whole slices of a pinned dim (removing it would
resize a tensor the graph reads without labels, a normalised or softmaxed dim, or the model's outputs). A group
(the units of one structure made by the same weights: one attention layer's heads, one MLP's neurons, one conv's
channels) is tied when a residual add joins two of its weights' outputs (cutting it would cut the residual stream
on both sides: refused), and refused when an adapter on its sites cannot be sliced (`adapter_axes`).

networkx: `Coupling.graph` has a node per tensor axis ("<FQN>:<dim>") and an edge per pair of axes some op ties
(attribute `via`: the op nodes, `kind`: "add" when an add / sub ties them); a group's axes are the nodes its ids
live on, and a group is tied when an "add" edge joins two of its output axes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from rewrite.adapters.base import NotSupported
from rewrite.coupling.adapter_axes import adapter_axes
from rewrite.coupling.components import components
from rewrite.coupling.label_records import Labels, Space
from rewrite.coupling.labels import trace_labels
from rewrite.graph_edit import adapters_at
from rewrite.state import state_of

# site op -> (output dim, input dim) of its weight
WEIGHT_DIMS = {"linear": (0, 1), "conv1d": (1, 0), "conv2d": (0, 1), "embedding": (1, 0)}


@dataclass(frozen=True)
class Cut:
    """Indices `index` of dim `dim` of the tensor `tensor` (a parameter or buffer FQN)."""
    tensor: str
    dim: int
    index: tuple[int, ...]


@dataclass
class Unit:
    label: str                # "head 3", "kv head 1", "neuron 17", "channel 5"
    atoms: frozenset[int]     # the fine atoms it removes
    cuts: list[Cut]
    blocked: list[str] = field(default_factory=list)  # why it cannot be removed (empty: it can)


@dataclass(frozen=True)
class AdapterAxis:
    adapter: str   # module path adapters.<owner>.<name>
    kind: str
    role: str      # "out" | "in"
    tensor: str    # attribute
    dim: int
    site: str


@dataclass
class Group:
    name: str
    structure: str            # "heads" | "ffn" | "channels" | "hidden"
    units: list[Unit]         # removable one by one (GQA: query heads)
    blocks: list[Unit]        # GQA: KV heads (a block removes its query heads too); [] elsewhere
    block_of: list[int]       # GQA: units[i] belongs to blocks[block_of[i]]
    axes: list[str]           # "<FQN>:<dim>" of every tensor axis that shrinks
    sites: list[str]          # the weight sites (module paths) it cuts
    adapters: list[AdapterAxis]
    tied: str | None = None   # why it may not be cut (a residual add), else None
    refused: str | None = None  # an adapter that cannot be sliced

    @property
    def removable(self) -> list[int]:
        return [i for i, u in enumerate(self.units) if not u.blocked]

    @property
    def status(self) -> str:
        if self.refused or self.tied:
            return "refused" if self.refused else "tied"
        return "ok" if self.removable else "blocked"


@dataclass
class Coupling:
    labels: Labels
    fine: torch.Tensor      # id -> fine atom root
    coarse: torch.Tensor    # id -> coarse atom root
    groups: list[Group]
    graph: nx.Graph

    def ids_of(self, atoms: set[int]) -> torch.Tensor:
        """A bool mask over ids: the ids of these fine atoms."""
        return torch.isin(self.fine, torch.tensor(sorted(atoms), dtype=torch.long))


def analyze(gm: fx.GraphModule, kwargs: dict[str, torch.Tensor] | None = None) -> Coupling:
    """The dependency groups of `gm`, traced on `kwargs` (default: the capture's example inputs)."""
    labels = trace_labels(gm, kwargs if kwargs is not None else state_of(gm).inputs.kwargs)
    a = torch.cat([t.a for t in labels.ties]) if labels.ties else torch.zeros(0, dtype=torch.long)
    b = torch.cat([t.b for t in labels.ties]) if labels.ties else torch.zeros(0, dtype=torch.long)
    fine = components(labels.n, a, b)
    copy_ids, copy_src = [], []
    for copy in labels.copies:
        copy_ids.append(torch.arange(copy.start, copy.start + copy.sources.numel() * copy.count))
        copy_src.append(copy.sources.repeat_interleave(copy.count))
    coarse = components(labels.n, torch.cat([fine, *copy_ids]), torch.cat([torch.arange(labels.n), *copy_src]))
    graph = _axis_graph(labels)
    groups = _Builder(gm, labels, fine, coarse, graph).groups()
    return Coupling(labels, fine, coarse, groups, graph)


def _axis_name(space: Space) -> str:
    return f"{space.tensor}:{0 if space.dim is None else space.dim}"


def _space_index(labels: Labels, ids: torch.Tensor) -> torch.Tensor:
    starts = torch.tensor([s.start for s in labels.spaces], dtype=torch.long)
    return torch.searchsorted(starts, ids, right=True) - 1


def _axis_graph(labels: Labels) -> nx.Graph:
    graph = nx.Graph()
    for space in labels.spaces:
        if space.role != "copy":
            graph.add_node(_axis_name(space), tensor=space.tensor, role=space.role)
    for ties in labels.ties:
        pairs = torch.unique(torch.stack([_space_index(labels, ties.a), _space_index(labels, ties.b)]), dim=1)
        for i, j in pairs.T.tolist():
            u, v = labels.spaces[i], labels.spaces[j]
            if i == j or "copy" in (u.role, v.role):
                continue
            edge = graph.get_edge_data(_axis_name(u), _axis_name(v)) or {"via": [], "kind": "tie"}
            edge["via"].append(ties.node)
            if ties.kind == "add" and u.role == v.role == "out" and u.tensor != v.tensor:
                edge["kind"] = "add"
            graph.add_edge(_axis_name(u), _axis_name(v), **edge)
    return graph


class _Builder:
    def __init__(self, gm: fx.GraphModule, labels: Labels, fine: torch.Tensor, coarse: torch.Tensor,
                 graph: nx.Graph):
        self.gm, self.labels, self.fine, self.coarse, self.graph = gm, labels, fine, coarse, graph
        self.space = _space_index(labels, torch.arange(labels.n)) if labels.n else torch.zeros(0, dtype=torch.long)
        self.is_copy = torch.zeros(labels.n, dtype=torch.bool)
        for copy in labels.copies:
            self.is_copy[copy.start:copy.start + copy.sources.numel() * copy.count] = True
        self.split = torch.zeros(labels.n, dtype=torch.bool)
        for ids in labels.split:
            self.split[ids] = True
        self.fine_blocked = self._blocked(fine)
        self.coarse_blocked = self._blocked(coarse)
        order = torch.argsort(fine, stable=True)
        roots, counts = torch.unique_consecutive(fine[order], return_counts=True)
        self.members = dict(zip(roots.tolist(), torch.split(order, counts.tolist())))

    def _blocked(self, roots: torch.Tensor) -> dict[int, list[str]]:
        """atom root -> reasons: blocked ids, and whole slices of pinned dims."""
        out: dict[int, list[str]] = {}
        for ids, why in self.labels.blocked:
            for root in torch.unique(roots[ids]).tolist():
                out.setdefault(root, []).append(why)
        for node, dim, why in self.labels.pinned:
            labels = self.labels.nodes.get(node)
            if not isinstance(labels, torch.Tensor):
                continue
            atoms = torch.where(labels >= 0, roots[labels.clamp(min=0)], -1).movedim(dim, 0).reshape(
                labels.shape[dim], -1)
            low, high = atoms.min(1).values, atoms.max(1).values
            for root in torch.unique(low[(low == high) & (low >= 0)]).tolist():
                reasons = out.setdefault(root, [])
                if why not in reasons:
                    reasons.append(why)
        return out

    def _cuts(self, ids: torch.Tensor) -> list[Cut]:
        cuts = []
        spaces = self.space[ids]
        for s in torch.unique(spaces).tolist():
            space = self.labels.spaces[s]
            if space.role == "copy":
                continue
            index = (ids[spaces == s] - space.start).sort().values
            cuts.append(Cut(space.tensor, 0 if space.dim is None else space.dim, tuple(index.tolist())))
        return cuts

    def groups(self) -> list[Group]:
        coarse_members: dict[int, list[int]] = {}
        for fine_root in self.members:
            coarse_members.setdefault(int(self.coarse[fine_root]), []).append(fine_root)
        found: dict[tuple, list[tuple[int, list[int]]]] = {}
        for croot, fine_roots in coarse_members.items():
            ids = torch.cat([self.members[f] for f in fine_roots])
            outs = sorted({self.labels.spaces[s].tensor for s in torch.unique(self.space[ids]).tolist()
                           if self.labels.spaces[s].role == "out"})
            if not outs:
                continue  # no weight makes these channels: nothing to prune
            found.setdefault((self._structure(ids), tuple(outs)), []).append((croot, fine_roots))
        groups = [self._group(structure, list(outs), atoms) for (structure, outs), atoms in found.items()]
        names = [(g.structure, g.name) for g in groups]
        for g, outs in zip(groups, found):
            if names.count((g.structure, g.name)) > 1:
                g.name = f"{g.name}[{'+'.join(_module(w) for w in outs[1])}]"
        return sorted(groups, key=lambda g: (g.structure, _natural(g.name)))

    def _structure(self, ids: torch.Tensor) -> str:
        tensors = {self.labels.spaces[s].tensor for s in torch.unique(self.space[ids]).tolist()}
        if any(self.labels.weight_ops.get(t) == "conv" for t in tensors):
            return "channels"
        if bool(self.split[ids].any()):
            return "heads"
        return "hidden" if self._tie_of(ids) else "ffn"

    def _tie_of(self, ids: torch.Tensor) -> str | None:
        """The residual add joining two output axes of these ids, if any."""
        axes = {_axis_name(self.labels.spaces[s]) for s in torch.unique(self.space[ids]).tolist()
                if self.labels.spaces[s].role == "out"}
        for u, v, data in self.graph.subgraph(axes).edges(data=True):
            if data["kind"] == "add":
                return f"a residual add ({data['via'][0]}) joins the outputs of {u} and {v}"
        return None

    def _group(self, structure: str, outs: list[str], atoms: list[tuple[int, list[int]]]) -> Group:
        units, blocks, block_of = [], [], []
        for croot, fine_roots in sorted(atoms, key=lambda a: self._first_out(a[1], outs)):
            queries = [f for f in fine_roots if bool(self.is_copy[self.members[f]].any())]
            if queries:
                block = self._unit("kv head", croot, fine_roots, coarse=True)
                for f in sorted(queries, key=lambda f: self._first_out([f], outs)):
                    units.append(self._unit("head", f, [f]))
                    block_of.append(len(blocks))
                blocks.append(block)
            else:
                units.append(self._unit(_UNIT_NAME[structure], croot, fine_roots, coarse=True))
        for i, unit in enumerate(units):
            unit.label = f"{unit.label} {i}"
        for i, block in enumerate(blocks):
            block.label = f"{block.label} {i}"
        all_ids = torch.cat([self.members[f] for _, fr in atoms for f in fr])
        axes = sorted({_axis_name(self.labels.spaces[s]) for s in torch.unique(self.space[all_ids]).tolist()
                       if self.labels.spaces[s].role != "copy"}, key=_natural)
        weights = outs if structure == "channels" else sorted(
            {a.rpartition(":")[0] for a in axes if self.labels.weight_ops.get(a.rpartition(":")[0])})
        name = ".".join(os.path.commonprefix([_module(w).split(".") for w in weights])) or (
            "+".join(_module(w) for w in outs) if len(outs) <= 2 else "<model>")
        group = Group(name, structure, units, blocks, block_of, axes, [], [])
        self._sites(group, axes)
        tie = self._tie_of(all_ids)
        if tie:
            group.tied = tie
        return group

    def _first_out(self, fine_roots: list[int], outs: list[str]) -> tuple:
        ids = torch.cat([self.members[f] for f in fine_roots])
        for rank, tensor in enumerate(outs):
            for s in torch.unique(self.space[ids]).tolist():
                space = self.labels.spaces[s]
                if space.tensor == tensor and space.role == "out":
                    return rank, int(ids[self.space[ids] == s].min()) - space.start
        return len(outs), 0

    def _unit(self, label: str, root: int, fine_roots: list[int], coarse: bool = False) -> Unit:
        ids = torch.cat([self.members[f] for f in fine_roots])
        blocked = [why for f in fine_roots for why in self.fine_blocked.get(f, [])]
        if coarse:
            blocked += self.coarse_blocked.get(root, [])
        return Unit(label, frozenset(fine_roots), self._cuts(ids), list(dict.fromkeys(blocked)))

    def _sites(self, group: Group, axes: list[str]) -> None:
        table = state_of(self.gm).sites
        for site in table.values():
            out_dim, in_dim = WEIGHT_DIMS.get(site.op, (None, None))
            roles = [role for role, dim in (("out", out_dim), ("in", in_dim)) if f"{site.weight}:{dim}" in axes]
            if not roles:
                continue
            if site.name not in group.sites:
                group.sites.append(site.name)
            for name, module in adapters_at(self.gm, site.owner).items():
                try:
                    spec = adapter_axes(module)
                except NotSupported as err:
                    group.refused = f"adapter {name!r} at {site.owner}: {err}"
                    continue
                for role in roles:
                    for tensor, dim in spec[role]:
                        axis = AdapterAxis(f"adapters.{site.owner}.{name}", module.kind, role, tensor, dim, site.name)
                        if axis not in group.adapters:
                            group.adapters.append(axis)


_UNIT_NAME = {"heads": "head", "ffn": "neuron", "channels": "channel", "hidden": "channel"}


def _module(fqn: str) -> str:
    return fqn.rpartition(".")[0]


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def summary(group: Group) -> dict:
    """A group as plain data (`rewrite inspect --groups`, JSON)."""
    reasons = list(dict.fromkeys(r for u in group.units for r in u.blocked))
    return dict(group=group.name, structure=group.structure, status=group.status, units=len(group.units),
                removable=len(group.removable), kv_heads=len(group.blocks), axes=group.axes, sites=group.sites,
                adapters=[f"{a.adapter}.{a.tensor}:{a.dim}" for a in group.adapters],
                why=group.refused or group.tied or ("; ".join(reasons[:3]) if not group.removable else None))
