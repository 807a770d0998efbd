"""Graph edits shared by the passes: attach an adapter call to a site, detach it, keep only one adapter, read a
base conv's settings.

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

import copy
import dataclasses
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from rewrite.errors import SpecError
from rewrite.sites import Site, SiteTable
from rewrite.state import AdapterTag, adapter_path, state_of

aten = torch.ops.aten


def site_input(node: fx.Node, site: Site) -> fx.Node:
    if node.op == "call_module":
        return node.args[0]
    if site.op == "conv1d":
        return node.args[1]
    if site.op == "embedding":
        return node.args[1]
    if site.op == "rmsnorm":  # weight * n or n * weight: the normalised input n
        return next(a for a in node.args if not (isinstance(a, fx.Node) and a.target == site.weight))
    return node.args[0]


def adapter_input(node: fx.Node, site: Site) -> fx.Node:
    """The x a site's adapters read: the base op's input before any input-side adapter of this site rewrote it (an
    input-side kind changes what W reads, not what the other adapters at the site read; `merge` folds it that way)."""
    x = site_input(node, site)
    while isinstance(tag := x.meta.get("rewrite"), AdapterTag) and tag.role == "input" and tag.site == site.name:
        x = x.args[0]
    return x


def _tag(node: fx.Node, base: fx.Node, tag: AdapterTag) -> None:
    if "nn_module_stack" in base.meta:
        node.meta["nn_module_stack"] = dict(base.meta["nn_module_stack"])
    node.meta["rewrite"] = tag
    node.meta["custom"] = {"rewrite.site": tag.site, "rewrite.adapter": tag.adapter, "rewrite.role": tag.role}


def site_chain(base: fx.Node, site: str) -> list[fx.Node]:
    """The joins after a site's base op, in chain order (input-joined adapters sit before the op, not here)."""
    chain, current = [], base
    while True:
        nxt = next((u for u in current.users
                    if isinstance(u.meta.get("rewrite"), AdapterTag) and u.meta["rewrite"].role == "join"
                    and u.meta["rewrite"].site == site and u.args[0] is current), None)
        if nxt is None:
            return chain
        chain.append(nxt)
        current = nxt


def _chain_end(base: fx.Node, site: str) -> fx.Node:
    return ([base, *site_chain(base, site)])[-1]


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


def wire(gm: fx.GraphModule, base: fx.Node, site: Site, adapter: str, module: nn.Module) -> None:
    """Join `adapter` (registered at `adapters.<owner>.<adapter>`) to the base op as its kind says (`module.join`):

        add     y' = y + adapter(x)     after the site's current chain end; its users are rerouted
                                        (a kind that `reads_weight`: adapter(x, W), W a get_attr of the site weight;
                                        one that also `reads_output`: adapter(x, W, y0, b), y0 the base op's node,
                                        b a get_attr of the site bias or None)
        output  y' = adapter(y)         likewise, the module itself is the join
        input   y' = base(adapter(x))   the base op reads the adapted input (only the base op: siblings sharing x
                                        keep theirs, and so do the other adapters at this site: `adapter_input`)
        graph   nothing at the site     only the graph edits below

    A module that rewrites graph inputs or outputs (`module.graph_edits`, checked before anything changes) gets one
    call `adapter(v, edit=key)` per such value, tagged role "graph", made once per adapter: an input's call comes
    right after the placeholders and every user of the input reads it instead (torch.export's `_guards_fn`, which
    checks the inputs the caller gave, keeps the original); an output's call feeds the graph's output in its place.
    """
    graph, path, kind = gm.graph, adapter_path(site.owner, adapter), module.kind
    try:
        inputs, outputs = module.graph_edits(gm, site)
    except ValueError as err:
        raise SpecError(f"site {site.name}: {err}") from None
    if (inputs or outputs) and not any(n.target == path and n.meta["rewrite"].role == "graph"
                                       for n in graph.nodes if n.op == "call_module"):
        _edit_graph(gm, base, site, adapter, module, inputs, outputs)
    if module.join == "graph":
        return
    if module.join == "input":
        x = site_input(base, site)
        with graph.inserting_before(base):
            scaled = graph.call_module(path, (x,))
        _tag(scaled, base, AdapterTag(site.name, kind, adapter, "input"))
        base.replace_input_with(x, scaled)
        return
    end = _chain_end(base, site.name)
    users = [u for u in end.users]
    with graph.inserting_before(end.next):
        if module.join == "output":
            join = graph.call_module(path, (end,))
        else:
            inputs = (adapter_input(base, site),)
            if module.reads_weight:
                inputs += (graph.get_attr(site.weight),)
            if module.reads_output:
                inputs += (base, graph.get_attr(site.bias) if site.bias else None)
            delta = graph.call_module(path, inputs)
            _tag(delta, base, AdapterTag(site.name, kind, adapter, "delta"))
            join = graph.call_function(aten.add.Tensor, (end, delta))
    _tag(join, base, AdapterTag(site.name, kind, adapter, "join"))
    for user in users:
        user.replace_input_with(end, join)


def _output_keys(gm: fx.GraphModule) -> list[str]:
    """The key path of each of the graph's outputs ("logits", "present.0.key"; "0" for a tuple's first item), in the
    output node's order; none for a graph without an output tree (fx symbolic traces)."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return []
    tree = pytree.tree_unflatten([0] * spec.num_leaves, spec)
    return [".".join(str(getattr(e, "key", getattr(e, "idx", e))) for e in path) for path, _ in
            pytree.tree_flatten_with_path(tree)[0]]


def _edit_graph(gm: fx.GraphModule, base: fx.Node, site: Site, adapter: str, module: nn.Module,
                inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """`wire`'s graph edits (its docstring)."""
    graph, path = gm.graph, adapter_path(site.owner, adapter)
    tag = AdapterTag(site.name, module.kind, adapter, "graph")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if node.name not in inputs:
            continue
        users = [u for u in node.users if not (u.op == "call_module" and u.target == "_guards_fn")]
        with graph.inserting_after(placeholders[-1]):
            edited = graph.call_module(path, (node,), {"edit": inputs[node.name]})
        _tag(edited, base, tag)
        for user in users:
            user.replace_input_with(node, edited)
    if not outputs:
        return
    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])
    for index, key in enumerate(_output_keys(gm)):
        if key in outputs:
            with graph.inserting_before(output):
                values[index] = graph.call_module(path, (values[index],), {"edit": outputs[key]})
            _tag(values[index], base, tag)
    output.args = (type(output.args[0])(values), *output.args[1:])


FUSED_ROOT = "fused_adapters"


def fused_groups(gm: fx.GraphModule) -> list[fx.Node]:
    """The calls of fused groups (`fuse`) in graph order."""
    if not hasattr(gm, FUSED_ROOT):
        return []
    return [n for n in gm.graph.nodes if isinstance(n.meta.get("rewrite"), AdapterTag) and n.meta["rewrite"].role
            == "fused"]


def fused_parts(group: fx.Node) -> list[fx.Node]:
    """The `getitem` nodes that read a fused group's output, by member index."""
    return sorted(group.users, key=lambda part: part.args[1])


def fuse_branches(gm: fx.GraphModule, calls: list[fx.Node], path: str, module: nn.Module) -> fx.Node:
    """Replace the adapter calls `calls` (role "delta", all reading the same input x) by one call of `module`
    (registered at `path`) returning their deltas as a tuple, read back by one `getitem` per member; the joins stay
    where they were, so the chains keep their order. Returns the group's call."""
    graph, x = gm.graph, calls[0].args[0]
    gm.add_submodule(path, module)
    with graph.inserting_before(calls[0]):
        group = graph.call_module(path, (x,))
    first = calls[0].meta["rewrite"]
    _tag(group, calls[0], AdapterTag(first.site, "fused", ",".join(sorted({c.meta["rewrite"].adapter for c in calls})),
                                     "fused"))
    for index, call in enumerate(calls):
        with graph.inserting_before(call):
            part = graph.call_function(operator.getitem, (group, index))
        part.meta = dict(call.meta)
        call.replace_all_uses_with(part)
        graph.erase_node(call)
    return group


def unfuse(gm: fx.GraphModule, group: fx.Node) -> None:
    """Undo `fuse_branches`: each member's own adapter call goes back where its part was read; the group's module
    is removed."""
    table = state_of(gm).sites
    x = group.args[0]
    for part in fused_parts(group):
        tag = part.meta["rewrite"]
        with gm.graph.inserting_before(part):
            call = gm.graph.call_module(adapter_path(table[tag.site].owner, tag.adapter), (x,))
        call.meta = dict(part.meta)
        part.replace_all_uses_with(call)
        gm.graph.erase_node(part)
    gm.graph.erase_node(group)
    gm.delete_submodule(group.target)


def unwire(gm: fx.GraphModule, adapter: str, owner: str) -> int:
    """Remove every call of `adapters.<owner>.<adapter>` and its join; returns how many calls were removed. A fused
    group holding it is unfused first (its other members get their own calls back)."""
    table = state_of(gm).sites
    for group in fused_groups(gm):
        if any(p.meta["rewrite"].adapter == adapter and table[p.meta["rewrite"].site].owner == owner
               for p in group.users):
            unfuse(gm, group)
    target = adapter_path(owner, adapter)
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == target:
            if node.meta["rewrite"].role == "delta":
                for join in list(node.users):
                    join.replace_all_uses_with(join.args[0])
                    gm.graph.erase_node(join)
            else:  # the module is its own join (output), rewrites the base op's input, or a graph value
                node.replace_all_uses_with(node.args[0])
            weights = [a for a in node.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
            gm.graph.erase_node(node)
            for weight in weights:  # wire's own get_attrs of the site weight and bias (reads_weight, reads_output)
                if not weight.users:
                    gm.graph.erase_node(weight)
            removed += 1
    return removed


def drop_adapter(gm: fx.GraphModule, owner: str, adapter: str) -> nn.Module:
    """Detach the module from the GraphModule (after `unwire`) and return it."""
    holder = gm.get_submodule(f"adapters.{owner}")
    module = getattr(holder, adapter)
    delattr(holder, adapter)
    return module


def add_zero_bias(gm: fx.GraphModule, site: Site) -> Site:
    """Give the op of a site without a bias (and every other call of its owner) a zero bias parameter
    `<module of the weight>.bias` [d_out], in the weight's dtype and device; the outputs are unchanged. The site
    table records it (so unmerge restores it to zero). Returns the updated site."""
    module_path = site.weight.rpartition(".")[0]
    module = gm.get_submodule(module_path)
    if getattr(module, "bias", None) is not None:
        raise SpecError(f"site {site.name}: its op has no bias but {module_path or 'the model'} already holds a 'bias'")
    weight = gm.get_parameter(site.weight)
    name = f"{module_path}.bias" if module_path else "bias"
    setattr(module, "bias", nn.Parameter(torch.zeros(site.d_out, dtype=weight.dtype, device=weight.device),
                                         requires_grad=weight.requires_grad))
    table = state_of(gm).sites
    for call in (s for s in table.values() if s.owner == site.owner):
        node = table.node_of(gm, call.name)
        if node.op == "call_module":
            continue  # the nn.Linear / nn.Conv2d reads its own `bias` attribute
        with gm.graph.inserting_before(node):
            bias = gm.graph.get_attr(name)
        node.args = (*node.args[:2], bias, *node.args[3:])  # aten.linear / aten.conv2d(x, W, b, ...)
    state_of(gm).sites = SiteTable(dataclasses.replace(s, bias=name) if s.owner == site.owner else s
                                   for s in table.values())
    return state_of(gm).sites[site.name]


def conv_settings(gm: fx.GraphModule, site: Site, where: str) -> dict | None:
    """The base conv's kernel size, stride, padding and dilation: from the nn.Conv2d (fx capture) or from the
    aten.conv2d call's arguments (torch.export keeps plain Modules without conv attributes). A layer norm's `eps`
    likewise (the one setting of a norm site; None for the other ops)."""
    if site.op not in ("conv2d", "layernorm"):
        return None
    node = next(n for n in gm.graph.nodes if n.name == site.node)
    if site.op == "layernorm":  # aten.layer_norm(input, normalized_shape, weight, bias, eps=1e-5, cudnn_enable)
        eps = gm.get_submodule(site.owner).eps if node.op == "call_module" else (
            node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5))
        return dict(eps=float(eps))
    if node.op == "call_module":
        module = gm.get_submodule(site.owner)
        kernel, stride, padding, dilation, groups = (module.kernel_size, module.stride, module.padding,
                                                     module.dilation, module.groups)
    else:  # aten.conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
        args = [*node.args, *(None, None, None, 1, 0, 1, 1)[len(node.args):]]
        stride, padding, dilation, groups = (node.kwargs.get(k, args[i]) for i, k in
                                             enumerate(("stride", "padding", "dilation", "groups"), start=3))
        kernel = gm.get_parameter(site.weight).shape[2:]
    if groups != 1:
        raise SpecError(f"{where}: site {site.name} is a grouped conv (groups={groups}); LoRA on grouped "
                        "convs cannot be merged exactly and is not supported")
    return dict(kernel_size=tuple(kernel), stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def only_adapter(gm: fx.GraphModule, keep: str | None) -> fx.GraphModule:
    """A copy of `gm` where only adapter `keep` (or none) is attached."""
    gm = copy.deepcopy(gm)
    for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
        for name in list(adapters_at(gm, owner)):
            if name != keep:
                unwire(gm, name, owner)
                drop_adapter(gm, owner, name)
    gm.graph.lint()
    gm.recompile()
    return gm
