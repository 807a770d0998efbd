"""Capture cost that grows with distinct blocks, not with layers: export two layers of a stack, stamp the rest.

A *stack* is an `nn.ModuleList` of >= 3 blocks of one class (`model.layers`, `h`, `encoder.block`). Exporting a
32- or 80-layer decoder traces every layer although they are alike, so `capture(stamp=True)`:

1. finds every stack and checks its blocks are interchangeable (`block_difference`): same module classes, the same
   parameter / buffer names, shapes, dtypes and devices, the same plain attributes (ints, floats, strings, bools:
   `attention_type`, `sliding_window`; the index attributes in `INDEX_ATTRS` may differ), no hooks on any block
   and no global module hooks, and no tensor shared between blocks or with the rest of the model;
2. exports the model with each stack cut to its first two blocks (`config.num_hidden_layers` cut with it when it
   equals the stack length, since transformers iterates `layers[: num_hidden_layers]`);
3. checks in the graph that block 1 is block 0 op for op (`_Region`): same targets, the same constants, the same
   shared inputs (mask, rotary tables), block 0's one output is block 1's one carried input and nothing else uses
   it, and block 1's one output feeds the rest of the graph;
4. stamps blocks 2..n-1 as copies of block 1, renaming weight targets and `nn_module_stack` paths
   (`model.layers.1.` -> `model.layers.k.`), chains each copy's carried input to the previous copy's output, and
   registers the real blocks' parameters and buffers on the GraphModule under their FQNs (shared, not copied).

The result has the site table, node targets, `nn_module_stack` paths, state-dict names and outputs of a full
capture; only fx node names differ (copies are named after block 1's nodes). What it cannot see: a forward that
treats a block by its index beyond block 1 (`if i == len(layers) - 1`), which no shipped transformers model does.
Any failed check returns a reason; the caller then runs the full capture and prints that reason on one line.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})
_PLAIN = (int, float, str, bool, type(None))


def find_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every `nn.ModuleList` of >= 3 children of one class, outermost first; stacks nested in a stack are left to
    their outer stack's copies."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 3 or len({type(b) for b in module}) != 1:
            continue
        if any(path.startswith(outer + ".") for outer, _ in stacks):
            continue
        stacks.append((path, module))
    return stacks


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in INDEX_ATTRS
            and (isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)))}


def _signature(block: nn.Module) -> list[Any]:
    sig: list[Any] = []
    for name, module in block.named_modules():
        sig.append((name, type(module), _plain_attrs(module)))
    for name, t in list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(
            remove_duplicate=False)):
        sig.append((name, tuple(t.shape), t.dtype, t.device.type, t.requires_grad))
    return sig


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, h, None) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                  "_backward_pre_hooks", "_state_dict_hooks"))


def block_difference(model: nn.Module, path: str, stack: nn.ModuleList) -> str | None:
    """Why the blocks of `stack` are not interchangeable, or None when they are (rule 1 of the module docstring)."""
    if any(getattr(nn.modules.module, g) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return "global module hooks are registered"
    first = _signature(stack[0])
    for i, block in enumerate(stack):
        if any(_hooked(m) for m in block.modules()):
            return f"{path}.{i} has hooks"
        if i and _signature(block) != first:
            return f"{path}.{i} differs from {path}.0 (classes, weights or attributes)"
    owners: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(
            remove_duplicate=False)):
        if id(t) in owners and (name.startswith(path + ".") or owners[id(t)].startswith(path + ".")):
            return f"{name} shares its tensor with {owners[id(t)]}"
        owners.setdefault(id(t), name)
    return None


@contextlib.contextmanager
def two_blocks(model: nn.Module, config: Any, stacks: list[tuple[str, nn.ModuleList]]) -> Iterator[None]:
    """Cut every stack to its first two blocks (and `config.num_hidden_layers` when it counts a stack) for the
    duration of the block; everything is restored on exit, also on error."""
    saved_layers = getattr(config, "num_hidden_layers", None)
    try:
        for path, stack in stacks:
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._modules[leaf] = nn.ModuleList(list(stack)[:2])
            if saved_layers == len(stack):
                config.num_hidden_layers = 2
        yield
    finally:
        for path, stack in stacks:
            parent, _, leaf = path.rpartition(".")
            (model.get_submodule(parent) if parent else model)._modules[leaf] = stack
        if saved_layers is not None:
            config.num_hidden_layers = saved_layers


def _rename(text: str, old: str, new: str) -> str:
    """`old` -> `new` where `old` is a whole dotted path prefix of `text`, anywhere in it (the key of an
    `nn_module_stack` entry is `L__self__` + the path)."""
    at = text.find(old)
    while at >= 0:
        end = at + len(old)
        if end == len(text) or text[end] == ".":
            return text[:at] + new + text[end:]
        at = text.find(old, end)
    return text


def _in_block(node: fx.Node, prefix: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(isinstance(v, tuple) and (v[0] == prefix or str(v[0]).startswith(prefix + "."))
               for v in stack.values())


@dataclass
class _Region:
    """One block's nodes in a captured graph: its weight reads (`attrs`), its ops in graph order (`ops`), the one
    op whose value leaves the block (`out`) and that op's users outside the block."""
    attrs: list[fx.Node]
    ops: list[fx.Node]
    out: fx.Node
    out_users: list[fx.Node]

    @classmethod
    def of(cls, graph: fx.Graph, prefix: str) -> "_Region | str":
        attrs = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(prefix + ".")]
        ops = [n for n in graph.nodes if n.op == "call_function" and _in_block(n, prefix)]
        inside = set(ops)
        leaving = [n for n in ops if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            return f"{prefix} has {len(leaving)} values used outside it (stamping needs exactly one)"
        out = leaving[0]
        return cls(attrs, ops, out, [u for u in out.users if u not in inside])


def _shape(node: Any) -> Any:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _same_block(r0: _Region, r1: _Region, p0: str, p1: str) -> str | None:
    """Why block 1 is not block 0 op for op (rule 3 of the module docstring), or None."""
    if len(r0.attrs) != len(r1.attrs) or len(r0.ops) != len(r1.ops):
        return f"{p1} has {len(r1.ops)} ops, {p0} {len(r0.ops)}"
    if set(r0.out_users) - set(r1.ops):
        return f"the output of {p0} is used outside {p1} (e.g. all hidden states returned)"
    pair = dict(zip(r0.attrs, r1.attrs))
    for a, b in pair.items():
        if _rename(str(a.target), p0, p1) != b.target:
            return f"{b.target} has no counterpart {a.target}"
    carried: set[fx.Node] = set()
    for a, b in zip(r0.ops, r1.ops):
        if a.target != b.target or _shape(a) != _shape(b):
            return f"{p1} differs from {p0} at {b.name} ({b.target} vs {a.target})"
        leaves_a, spec_a = pytree.tree_flatten((a.args, a.kwargs))
        leaves_b, spec_b = pytree.tree_flatten((b.args, b.kwargs))
        if spec_a != spec_b or len(leaves_a) != len(leaves_b):
            return f"{p1} differs from {p0} at {b.name} (arguments)"
        for x, y in zip(leaves_a, leaves_b):
            if isinstance(x, fx.Node) and x in pair:
                ok = pair[x] is y
            elif isinstance(x, fx.Node) and y is r0.out:
                carried.add(x)
                ok = True
            else:
                ok = x is y if isinstance(x, fx.Node) else type(x) is type(y) and x == y
            if not ok:
                return f"{p1} differs from {p0} at {b.name} (argument {y})"
        pair[a] = b
    if len(carried) != 1:
        return f"{p1} takes {len(carried)} values from {p0} (stamping needs exactly one, the hidden state)"
    return None


def _set_tensor(root: nn.Module, target: str, tensor: torch.Tensor, persistent: bool) -> None:
    *path, leaf = target.split(".")
    module = root
    for atom in path:
        if not hasattr(module, atom):
            module.add_module(atom, nn.Module())
        module = getattr(module, atom)
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor, persistent=persistent)


def _stamp_stack(gm: fx.GraphModule, path: str, stack: nn.ModuleList) -> str | None:
    graph = gm.graph
    p0, p1 = f"{path}.0", f"{path}.1"
    r0, r1 = _Region.of(graph, p0), _Region.of(graph, p1)
    if isinstance(r0, str) or isinstance(r1, str):
        return r0 if isinstance(r0, str) else r1
    reason = _same_block(r0, r1, p0, p1)
    if reason:
        return reason
    attr_anchor = r1.attrs[-1].next if r1.attrs else None
    op_anchor = r1.ops[-1].next
    prev = r1.out
    for k in range(2, len(stack)):
        pk = f"{path}.{k}"
        env: dict[fx.Node, fx.Node] = {r0.out: prev}
        for node in r1.attrs:
            with graph.inserting_before(attr_anchor):
                env[node] = graph.node_copy(node, lambda n: env.get(n, n))
            env[node].target = _rename(str(node.target), p1, pk)
            env[node]._rename(env[node].target.replace(".", "_"))
        for node in r1.ops:
            with graph.inserting_before(op_anchor):
                copy = graph.node_copy(node, lambda n: env.get(n, n))
            stack_meta = node.meta.get("nn_module_stack")
            if stack_meta:
                copy.meta["nn_module_stack"] = {_rename(key, p1, pk): (_rename(str(v[0]), p1, pk), *v[1:])
                                                for key, v in stack_meta.items()}
            env[node] = copy
        prev = env[r1.out]
        block = stack[k]
        for name, t in block.named_parameters():
            _set_tensor(gm, f"{pk}.{name}", t, True)
        for name, t in block.named_buffers():
            owner, _, leaf = f"{name}".rpartition(".")
            sub = block.get_submodule(owner) if owner else block
            _set_tensor(gm, f"{pk}.{name}", t, leaf not in sub._non_persistent_buffers_set)
    for user in r1.out_users:
        user.replace_input_with(r1.out, prev)
    return None


def stamped_export(model: nn.Module, config: Any, export: Any) -> tuple[fx.GraphModule | None, str | None]:
    """`export(model)` (a function returning the unlifted GraphModule) on the model cut to two blocks per stack,
    then stamped. Returns (graph, None); (None, reason) when the blocks are not interchangeable (the caller runs
    the full capture and says why); (None, None) when the model has no stack (the full capture costs the same)."""
    stacks = find_stacks(model)
    if not stacks:
        return None, None
    counted = getattr(config, "num_hidden_layers", None)
    for path, stack in stacks:
        if isinstance(counted, int) and counted < len(stack):
            return None, f"config.num_hidden_layers = {counted} runs part of {path} ({len(stack)} blocks)"
        reason = block_difference(model, path, stack)
        if reason:
            return None, reason
    with two_blocks(model, config, stacks):
        gm = export(model)
    for path, stack in stacks:
        reason = _stamp_stack(gm, path, stack)
        if reason:
            return None, reason
    gm.graph.lint()
    gm.recompile()
    return gm, None
