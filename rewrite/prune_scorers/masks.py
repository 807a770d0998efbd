"""Unit masks for the scorers that train: one scalar per unit (or per KV head) that scales what the unit feeds into
the next weight, inserted into the graph for the scorer's training and taken out after.

    x' = x (.) m[unit of channel]    at every site whose weight reads the units' channels (its input cuts: the
                                     o-projection's columns of a head, the down-projection's column of a neuron,
                                     the next conv's input channel), for the base op and every adapter there

A head's mask therefore scales its attention output (Light-PEFT's m_att on the attention probabilities: the same,
since probs @ (m V) = m (probs @ V)), a neuron's mask its activation before the down-projection (Light-PEFT's
m_ffn), and a mask of 0 is exactly the removal of the unit (LoRAPrune's binary masks; o / down are not masked
there either, they lose what q / gate lost). Channels no unit of the group owns keep a factor 1.

    masks = attach(gm, entries, trainable=True)   # entries: group -> list of Units (units or KV heads)
    ... train ...                                 # masks.values[group]: the live mask vector
    masks.detach()                                # the graph as it was (nodes and submodules removed)
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from rewrite.coupling.groups import WEIGHT_DIMS, Group, Unit
from rewrite.errors import SpecError
from rewrite.graph_edit import adapter_input
from rewrite.state import AdapterTag, state_of

ROOT = "prune_masks"


class UnitMask(nn.Module):
    """values [n] (1: kept); per consumer call j a buffer index_j [channels] -> entry + 1 (0: not this group's)."""

    def __init__(self, n: int, indices: list[torch.Tensor], trainable: bool, dtype: torch.dtype, device):
        super().__init__()
        ones = torch.ones(n, dtype=dtype, device=device)
        if trainable:
            self.values = nn.Parameter(ones)
        else:
            self.register_buffer("values", ones)
        for j, index in enumerate(indices):
            self.register_buffer(f"index_{j}", (index + 1).to(device))

    def forward(self, x: torch.Tensor, j: int, dim: int) -> torch.Tensor:
        full = torch.cat([self.values.new_ones(1), self.values]).index_select(0, getattr(self, f"index_{j}"))
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * full.view(shape).to(x.dtype)


class Masks:
    def __init__(self, gm: fx.GraphModule, modules: dict[str, UnitMask], paths: dict[str, str], nodes: list[fx.Node]):
        self.gm, self.modules, self.paths, self.nodes = gm, modules, paths, nodes

    @property
    def values(self) -> dict[str, torch.Tensor]:
        return {name: m.values for name, m in self.modules.items()}

    def parameter_names(self) -> list[str]:
        return [f"{self.paths[name]}.values" for name in self.modules]

    def detach(self) -> None:
        for node in self.nodes:
            node.replace_all_uses_with(node.args[0])
            self.gm.graph.erase_node(node)
        if hasattr(self.gm, ROOT):
            delattr(self.gm, ROOT)
        self.gm.recompile()


def _consumers(gm: fx.GraphModule, entries: list[Unit]) -> dict[str, torch.Tensor]:
    """site name -> [d_in] entry index per input channel (-1: none) for the sites reading these entries."""
    sites = state_of(gm).sites
    by_weight: dict[tuple[str, int], list] = {}
    for site in sites.values():
        if site.op in WEIGHT_DIMS:
            by_weight.setdefault((site.weight, WEIGHT_DIMS[site.op][1]), []).append(site)
    out: dict[str, torch.Tensor] = {}
    for e, unit in enumerate(entries):
        for cut in unit.cuts:
            for site in by_weight.get((cut.tensor, cut.dim), []):
                index = out.setdefault(site.name, torch.full((site.d_in,), -1, dtype=torch.long))
                index[list(cut.index)] = e
    return out


def attach(gm: fx.GraphModule, entries: dict[str, list[Unit]], groups: dict[str, Group], *, trainable: bool,
           where: str) -> Masks:
    """Insert a mask per group (module docstring); a group whose units no weight reads is a SpecError."""
    sites = state_of(gm).sites
    by_name = {n.name: n for n in gm.graph.nodes}
    order_of = {n: i for i, n in enumerate(gm.graph.nodes)}
    weight = next(iter(gm.parameters()))
    modules, paths, inserted = {}, {}, []
    for k, (name, units) in enumerate(entries.items()):
        consumers = _consumers(gm, units)
        if not consumers:
            raise SpecError(f"{where}: the units of {name} feed no weight that could be masked (what they feed is "
                            f"read without a weight), so this method cannot score them; exempt its sites (exempt = "
                            f"[\"{name}*\"]) or use method = \"magnitude\"")
        order = list(consumers)
        module = UnitMask(len(units), [consumers[s] for s in order], trainable, torch.float32, weight.device)
        path = f"{ROOT}.m{k}"
        gm.add_submodule(path, module)
        modules[name], paths[name] = module, path
        for j, site_name in enumerate(order):
            site = sites[site_name]
            base = by_name[site.node]
            x = adapter_input(base, site)
            dim = 1 if site.op == "conv2d" else -1
            readers = [u for u in x.users if u is base or (
                isinstance(u.meta.get("rewrite"), AdapterTag) and u.meta["rewrite"].site == site.name)]
            with gm.graph.inserting_before(min(readers, key=lambda u: order_of.get(u, len(order_of)))):
                node = gm.graph.call_module(path, (x, j, dim))
            for user in readers:
                user.replace_input_with(x, node)
            inserted.append(node)
    gm.recompile()
    return Masks(gm, modules, paths, inserted)
