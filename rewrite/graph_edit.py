"""Graph edits shared by the passes: attach an adapter call to a site, detach it again.

A site with adapters a1, a2 looks like

    y  = base_op(x, W, b)
    d1 = call_module adapters.<owner>.a1 (x)      tag role="delta"
    j1 = add(y, d1)                               tag role="join"
    d2 = call_module adapters.<owner>.a2 (x)
    j2 = add(j1, d2)                              every former user of y now reads j2

Adapters are keyed by the weight's owner, so several calls of one module share one adapter (as in PEFT).
New nodes are created with `inserting_before(chain_end.next)` so they keep their order (CAPTURE.md §6),
carry the site's `nn_module_stack`, an `AdapterTag` in `meta["rewrite"]` and a JSON tag in
`meta["custom"]` (the only slot that survives a re-export).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from rewrite.sites import Site
from rewrite.state import AdapterTag, adapter_path

aten = torch.ops.aten


def site_input(node: fx.Node, site: Site) -> fx.Node:
    if node.op == "call_module":
        return node.args[0]
    if site.op == "conv1d":
        return node.args[1]
    if site.op == "embedding":
        return node.args[1]
    return node.args[0]


def _tag(node: fx.Node, base: fx.Node, tag: AdapterTag) -> None:
    if "nn_module_stack" in base.meta:
        node.meta["nn_module_stack"] = dict(base.meta["nn_module_stack"])
    node.meta["rewrite"] = tag
    node.meta["custom"] = {"rewrite.site": tag.site, "rewrite.adapter": tag.adapter, "rewrite.role": tag.role}


def _chain_end(base: fx.Node, site: str) -> fx.Node:
    current = base
    while True:
        nxt = next((u for u in current.users
                    if isinstance(u.meta.get("rewrite"), AdapterTag) and u.meta["rewrite"].role == "join"
                    and u.meta["rewrite"].site == site and u.args[0] is current), None)
        if nxt is None:
            return current
        current = nxt


def has_adapter(gm: fx.GraphModule, owner: str, adapter: str) -> bool:
    try:
        gm.get_submodule(adapter_path(owner, adapter))
        return True
    except AttributeError:
        return False


def adapters_at(gm: fx.GraphModule, owner: str) -> dict[str, nn.Module]:
    try:
        holder = gm.get_submodule(f"adapters.{owner}")
    except AttributeError:
        return {}
    return {name: m for name, m in holder.named_children() if hasattr(m, "kind")}


def register_adapter(gm: fx.GraphModule, owner: str, adapter: str, module: nn.Module) -> None:
    """Adapters start in inference mode (dropout off); the training driver switches them to train mode."""
    gm.add_submodule(adapter_path(owner, adapter), module.eval())


def wire(gm: fx.GraphModule, base: fx.Node, site: Site, adapter: str, kind: str) -> None:
    """Add `base_out + adapter(x)` after the site's current chain end and reroute its users."""
    graph = gm.graph
    end = _chain_end(base, site.name)
    users = [u for u in end.users]
    with graph.inserting_before(end.next):
        delta = graph.call_module(adapter_path(site.owner, adapter), (site_input(base, site),))
        join = graph.call_function(aten.add.Tensor, (end, delta))
    _tag(delta, base, AdapterTag(site.name, kind, adapter, "delta"))
    _tag(join, base, AdapterTag(site.name, kind, adapter, "join"))
    for user in users:
        user.replace_input_with(end, join)


def unwire(gm: fx.GraphModule, adapter: str, owner: str) -> int:
    """Remove every call of `adapters.<owner>.<adapter>` and its join; returns how many calls were removed."""
    target = adapter_path(owner, adapter)
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == target:
            for join in list(node.users):
                join.replace_all_uses_with(join.args[0])
                gm.graph.erase_node(join)
            gm.graph.erase_node(node)
            removed += 1
    return removed


def drop_adapter(gm: fx.GraphModule, owner: str, adapter: str) -> nn.Module:
    """Detach the module from the GraphModule (after `unwire`) and return it."""
    holder = gm.get_submodule(f"adapters.{owner}")
    module = getattr(holder, adapter)
    delattr(holder, adapter)
    return module
