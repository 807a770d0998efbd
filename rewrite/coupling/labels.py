"""Channel labels: which weight channels every tensor of a captured graph carries, found by running it once.

Every output and input channel of a weight-carrying op, every element of a 1-D parameter (biases, norm weights) and
of a BatchNorm statistic gets an integer id (a `Space` numbers one such axis). The graph runs once on its example
inputs (torch.fx.Interpreter: real values give every shape and every symbolic size); beside each value runs a label
tensor of the same shape holding, per element, the id of the channel it belongs to, or -1 (batch, sequence, masks).
The rules per op (aten, as the export front-end writes them):

    movement     view, reshape, transpose, permute, slice, select, split, cat, ...: the same op on the labels.
                 A reshape that splits a labelled dim into several ([.., H*dh] -> [.., H, dh]) ties every inner dim
                 (dh) to the outer one: heads are cut whole, never inside d_h (RoPE pairs i, i + d_h/2).
    expand       broadcast copies get ids of their own, each a `Copy` of its source: repeat_kv's query groups
                 (a KV head's copies are its query heads; removing a copy keeps its source).
    elementwise  add, mul, where, activations, ...: the labels of aligned elements are tied (a residual add ties
                 both sides; a gate ties gate and up). An operand without labels that varies along a labelled dim
                 pins that dim (its size must not change: RoPE tables, masks).
    reductions   mean / var / softmax / layer_norm over a labelled dim pin it (removal would change the statistic);
                 sum does not (a zero channel adds nothing).
    matmul       contracted dims of both operands are tied, and batch dims (heads) too.
    weight ops   linear, addmm (Conv1D), mm, conv, embedding: the input's channel dim is tied to the weight's input
                 space, the output carries the weight's output space; biases, norm and BatchNorm tensors tie
                 elementwise.
    adapters     an adapter's call carries the labels of the site it adapts (its tensors are sliced with it).
    anything else with labelled inputs blocks those ids (they are never removed), and the outputs of the graph pin
    every dim (the model's interface keeps its shape).

Ties become pairs of ids; `rewrite.coupling.groups` joins them into removable units.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from rewrite.coupling.aten_ops import (ALONG, BATCH_NORMS, CONVS, ELEMENTWISE, FOLLOW_TO_WEIGHT, IDENTITY, JOINS,
                                       MATMULS, MOVES, QUIET, REDUCTIONS, RESHAPES, SUMS)
from rewrite.coupling.label_records import Copy, Labels, Space, Ties
from rewrite.state import AdapterTag

aten = torch.ops.aten


def flat_inputs(gm: fx.GraphModule, kwargs: dict[str, torch.Tensor]) -> list[Any]:
    """The placeholder values for the example inputs (export captures take ((), kwargs) through their in_spec)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return fx_pytree.tree_flatten_spec(((), kwargs), info.in_spec)
    return [kwargs[n.target] for n in gm.graph.nodes if n.op == "placeholder"]


def trace_labels(gm: fx.GraphModule, kwargs: dict[str, torch.Tensor]) -> Labels:
    """Run `gm` once on `kwargs` and label every tensor (module docstring)."""
    tracer = _Tracer(gm)
    with torch.no_grad():
        tracer.run(*flat_inputs(gm, kwargs))
    return tracer.out


def _dim_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Consecutive dims of shape `a` and of shape `b` with equal products (how a reshape maps one onto the other)."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ga, gb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i)
                pa, i = pa * a[i], i + 1
            elif j < len(b):
                gb.append(j)
                pb, j = pb * b[j], j + 1
            else:
                break
        groups.append((ga, gb))
    return groups


def _varies(labels: torch.Tensor, dim: int) -> bool:
    return labels.shape[dim] > 1 and bool((labels != labels.narrow(dim, 0, 1)).any())


class _Tracer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)  # `_weight` walks back through earlier values
        self.out = Labels()
        self.canonical: dict[str, str] = {}
        self.params = dict(gm.named_parameters())  # one name per tensor: tied weights answer to the first
        self.buffers = dict(gm.named_buffers())
        for names, first in ((gm.named_parameters(remove_duplicate=False), self.params),
                             (gm.named_buffers(remove_duplicate=False), self.buffers)):
            canonical = {id(t): n for n, t in first.items()}
            for name, tensor in names:
                if name not in first:
                    self.canonical[name] = canonical[id(tensor)]
                    self.out.aliases.setdefault(canonical[id(tensor)], []).append(name)
        self.sites = {}
        state = gm.meta.get("rewrite")
        if state is not None:
            self.sites = {s.name: s.node for s in state.sites.values()}
        self.elements: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- ids
    def _reserve(self, tensor: str, dim: int | None, shape: tuple[int, ...], role: str) -> Space:
        space = Space(tensor, dim, self.out.n, tuple(shape), role)
        self.out.spaces.append(space)
        self.out.n += space.size
        return space

    def _axis(self, tensor: str, dim: int, role: str) -> torch.Tensor:
        """The ids of `dim` of a weight (made once per tensor and dim)."""
        space = self.out.space_of(tensor, dim)
        if space is None:
            param = self.params.get(tensor, self.buffers.get(tensor))
            space = self._reserve(tensor, dim, (param.shape[dim],), role)
        return torch.arange(space.start, space.start + space.size)

    def _elements_of(self, tensor: str) -> torch.Tensor:
        if tensor not in self.elements:
            value = self.params.get(tensor, self.buffers.get(tensor))
            space = self._reserve(tensor, None, tuple(value.shape), "elem")
            self.elements[tensor] = torch.arange(space.start, space.start + space.size).view(value.shape)
        return self.elements[tensor]

    # ---------------------------------------------------------------- recording
    def _tie(self, a: torch.Tensor, b: torch.Tensor, node: fx.Node, kind: str = "tie") -> None:
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        key = torch.unique(a[keep] * (1 << 32) + b[keep])
        self.out.ties.append(Ties(node.name, kind, key >> 32, key & ((1 << 32) - 1)))

    def _block(self, labels: Any, why: str) -> None:
        for t in _tensors(labels):
            ids = t[t >= 0]
            if ids.numel():
                self.out.blocked.append((torch.unique(ids), why))

    def _tie_dim(self, labels: torch.Tensor, dim: int, ids: torch.Tensor, node: fx.Node) -> None:
        """Tie dim `dim` of `labels` (every position along the other dims) to `ids`."""
        flat = labels.movedim(dim, -1).reshape(-1, labels.shape[dim])
        self._tie(flat, ids.view(1, -1), node)

    def _pin(self, node: fx.Node, dims: list[int], why: str) -> None:
        for dim in dims:
            self.out.pinned.append((node.name, dim, why))

    # ---------------------------------------------------------------- labels of arguments
    def lab(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return None
        if arg.name in self.out.nodes:
            return self.out.nodes[arg.name]
        fqn = self.canonical.get(arg.target, arg.target) if arg.op == "get_attr" else None
        if fqn in self.params and self.params[fqn].dim() == 1:
            return self._elements_of(fqn)
        return None

    def _weight(self, arg: Any) -> tuple[str, list[int]] | None:
        """(FQN, used dim -> parameter dim) of a parameter read directly or through transposes and casts."""
        perm = None
        while isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                fqn = self.canonical.get(arg.target, arg.target)
                if fqn not in self.params:
                    return None
                return fqn, perm if perm is not None else list(range(self.params[fqn].dim()))
            if arg.op != "call_function" or arg.target not in FOLLOW_TO_WEIGHT:
                return None
            ndim = self.env[arg].dim()
            step = list(range(ndim))
            if arg.target == aten.t.default and ndim == 2:
                step = [1, 0]
            elif arg.target == aten.transpose.int:
                d0, d1 = (d % ndim for d in arg.args[1:3])
                step[d0], step[d1] = step[d1], step[d0]
            elif arg.target == aten.permute.default:
                step = [d % ndim for d in arg.args[1]]
            perm = step if perm is None else [step[p] for p in perm]  # used dim -> input dim -> ... -> param dim
            arg = arg.args[0]
        return None

    # ---------------------------------------------------------------- the interpreter
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "output":
            for item in _nodes(list(n.args)):
                labels = self.lab(item)
                if isinstance(labels, torch.Tensor):
                    self._pin(item, list(range(labels.dim())), f"reaches the model output ({item.name})")
            return value
        labels = self._rule(n, value)
        if labels is not None:
            self.out.nodes[n.name] = labels
        return value

    def _rule(self, n: fx.Node, value: Any) -> Any:
        if n.op == "call_module":
            return self._module(n, value)
        if n.op != "call_function":
            return None
        args = list(n.args)
        inputs = [self.lab(a) for a in _nodes(args) + _nodes(list(n.kwargs.values()))]
        target = n.target
        if target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default) \
                and self._weight(args[1 if target != aten.addmm.default else 2]) is not None:
            return self._weight_matmul(n, value)
        if target in CONVS:
            return self._conv(n, value, args[CONVS[target]] if len(args) > CONVS[target] else 1)
        if target == aten.embedding.default and self._weight(args[0]) is not None:
            fqn, perm = self._weight(args[0])
            self.out.weight_ops.setdefault(fqn, "embedding")
            return self._axis(fqn, perm[1], "out").expand(value.shape).contiguous()
        if all(i is None for i in inputs):
            return None
        if target == operator.getitem:
            source = self.lab(args[0])
            return source[args[1]] if isinstance(source, (tuple, list)) else None
        if target in IDENTITY:
            return self.lab(args[0])
        if target == aten.expand.default:
            return self._expand(n, self.lab(args[0]), value)
        if target in MOVES:
            return self._move(n, value) if self.lab(args[0]) is not None else None
        if target in JOINS:
            parts = [self.lab(a) for a in args[0]]
            parts = [p if p is not None else torch.full(tuple(v.shape), -1) for p, v in
                     zip(parts, self.fetch_args_kwargs_from_env(n)[0][0])]
            return target(parts, *args[1:])
        if target in ELEMENTWISE:
            return self._elementwise(n, value)
        if target in MATMULS:
            return self._matmul(n, self.lab(args[0]), self.lab(args[1]), value)
        if target in SUMS or target in REDUCTIONS:
            return self._reduce(n, value, pin=target in REDUCTIONS)
        if target in ALONG:
            labels = self.lab(args[0])
            dim = args[1] % labels.dim()
            self._pin(n, [dim] if _varies(labels, dim) else [], f"{_op(n)} at {n.name} runs along it")
            return labels
        if target == aten.layer_norm.default:
            return self._layer_norm(n)
        if target in BATCH_NORMS:
            return self._batch_norm(n, value)
        if target in QUIET or not _tensors(value if isinstance(value, (tuple, list)) else [value]):
            return None
        for labels in inputs:
            self._block(labels, f"{_op(n)} at {n.name} is not understood by the coupling analysis")
        return None

    # ---------------------------------------------------------------- rules
    def _module(self, n: fx.Node, value: Any) -> Any:
        tag = n.meta.get("rewrite")
        module = self.module.get_submodule(n.target)
        if isinstance(tag, AdapterTag) and hasattr(module, "join"):
            if module.join == "add":  # a delta on the site's output channels
                base = self.sites.get(tag.site)
                return self.out.nodes.get(base) if base else None
            return self.lab(n.args[0])  # rewrites the site's input or output in place: same channels
        for arg in _nodes(list(n.args)):
            self._block(self.lab(arg), f"module call {n.target} is not understood by the coupling analysis")
        return None

    def _weight_matmul(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        """linear(x, W[out, in]), addmm(b, x, W[in, out]) (Conv1D), mm / matmul(x, W[in, out])."""
        target, args = n.target, n.args
        linear = target == aten.linear.default
        x_arg, w_arg = (args[1], args[2]) if target == aten.addmm.default else (args[0], args[1])
        fqn, perm = self._weight(w_arg)
        out_dim, in_dim = (perm[0], perm[1]) if linear else (perm[-1], perm[-2])
        self.out.weight_ops.setdefault(fqn, "linear" if linear else "conv1d")
        x = self.lab(x_arg)
        if x is not None:
            self._tie_dim(x, x.dim() - 1, self._axis(fqn, in_dim, "in"), n)
        out = self._axis(fqn, out_dim, "out")
        bias = self.lab(args[2] if linear and len(args) > 2 else args[0] if target == aten.addmm.default else None)
        if bias is not None:
            self._tie(bias, out, n)
        return out.expand(value.shape).contiguous()

    def _conv(self, n: fx.Node, value: torch.Tensor, groups: int) -> torch.Tensor | None:
        weight = self._weight(n.args[1])
        x = self.lab(n.args[0])
        if weight is None:
            self._block(x, f"{_op(n)} at {n.name} has a computed weight")
            return None
        fqn, _ = weight
        self.out.weight_ops.setdefault(fqn, "conv")
        out = self._axis(fqn, 0, "out")
        channels = self.env[n.args[0]].shape[1]
        if groups != 1 and not (groups == channels == out.numel()):
            self._block(x, f"grouped conv {n.name} (groups={groups})")
            self._block(out, f"grouped conv {n.name} (groups={groups})")
        elif x is not None:
            self._tie_dim(x, 1, out if groups != 1 else self._axis(fqn, 1, "in"), n)
        if len(n.args) > 2 and self.lab(n.args[2]) is not None:
            self._tie(self.lab(n.args[2]), out, n)
        return out.view(1, -1, *[1] * (value.dim() - 2)).expand(value.shape).contiguous()

    def _move(self, n: fx.Node, value: Any) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        labels = self.lab(n.args[0])
        target = aten.reshape.default if n.target in (aten.view.default, aten._unsafe_view.default) else n.target
        out = target(labels, *args[1:], **kwargs)
        if n.target in RESHAPES:
            self._split_ties(n, labels, out)
        return tuple(t.contiguous() for t in out) if isinstance(out, (tuple, list)) else out.contiguous()

    def _split_ties(self, n: fx.Node, before: torch.Tensor, after: torch.Tensor) -> None:
        """A labelled dim split into several: tie every inner dim to the outer one (module docstring)."""
        for ga, gb in _dim_groups(tuple(before.shape), tuple(after.shape)):
            wide = [d for d in gb if after.shape[d] > 1]
            if len(wide) < 2 or not any(_varies(before, d) for d in ga):
                continue
            ref = after
            for d in wide[1:]:
                ref = ref.narrow(d, 0, 1)
            self._tie(after, ref.expand_as(after), n)
            self.out.split.append(torch.unique(after[after >= 0]))

    def _expand(self, n: fx.Node, labels: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = labels.expand(value.shape)
        lead = out.dim() - labels.dim()
        grown = [d for d in range(out.dim()) if out.shape[d] > 1 and (d < lead or labels.shape[d - lead] == 1)]
        if not grown or not bool((labels >= 0).any()):
            return out.contiguous()
        count = math.prod(out.shape[d] for d in grown)
        coord, stride = torch.zeros(out.shape, dtype=torch.long), 1
        for d in reversed(grown):
            shape = [1] * out.dim()
            shape[d] = out.shape[d]
            coord = coord + torch.arange(out.shape[d]).view(shape) * stride
            stride *= out.shape[d]
        sources = torch.unique(labels[labels >= 0])
        space = self._reserve(f"copy:{n.name}", None, (sources.numel() * count,), "copy")
        index = torch.searchsorted(sources, out.clamp(min=0))
        self.out.copies.append(Copy(n.name, space.start, sources, count))
        return torch.where(out >= 0, space.start + index * count + coord, -1)

    def _elementwise(self, n: fx.Node, value: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        values = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)]
        nodes = [a for a in [*n.args, *n.kwargs.values()] if isinstance(a, fx.Node)
                 and isinstance(self.env.get(a), torch.Tensor)]
        shape = tuple(value.shape)
        labelled = [torch.broadcast_to(self.lab(a), shape) for a in nodes if self.lab(a) is not None]
        out = labelled[0]
        for other in labelled[1:]:
            self._tie(out, other, n, "add" if n.target in (aten.add.Tensor, aten.sub.Tensor) else "tie")
            out = torch.where(out >= 0, out, other)
        varying = [d for d in range(out.dim()) if _varies(out, d)]
        for a, v in zip(nodes, values):
            if self.lab(a) is None:
                lead = len(shape) - v.dim()
                dims = [d for d in varying if d >= lead and v.shape[d - lead] > 1]
                self._pin(n, dims, f"{_op(n)} at {n.name} combines it with a tensor that has no channel labels")
        return out.contiguous()

    def _matmul(self, n: fx.Node, a: torch.Tensor | None, b: torch.Tensor | None, value: torch.Tensor) -> Any:
        """a [.., n, k] @ b [.., k, m]: k tied across the operands, rows / columns kept, batch dims tied."""
        args = self.fetch_args_kwargs_from_env(n)[0]
        a = a if a is not None else torch.full(tuple(args[0].shape), -1)
        b = b if b is not None else torch.full(tuple(args[1].shape), -1)
        if a.dim() == 1 or b.dim() == 1:
            for labels in (a, b):
                self._block(labels, f"matmul with a vector at {n.name}")
            return None
        self._tie(a, a.narrow(-2, 0, 1), n)  # what varies along the kept rows of a is one unit per contraction
        self._tie(b, b.narrow(-1, 0, 1), n)
        ka, kb = a.narrow(-2, 0, 1), b.narrow(-1, 0, 1).transpose(-1, -2)  # [.., 1, k] both
        self._tie(ka, kb, n)
        rows = a.narrow(-1, 0, 1).expand(*a.shape[:-1], b.shape[-1])
        cols = b.narrow(-2, 0, 1).expand(*b.shape[:-2], a.shape[-2], b.shape[-1])
        rows, cols = torch.broadcast_tensors(rows, cols)
        self._tie(rows, cols, n)
        out = torch.where(rows >= 0, rows, cols).reshape(value.shape)
        return out.contiguous() if bool((out >= 0).any()) else None

    def _reduce(self, n: fx.Node, value: Any, pin: bool) -> Any:
        labels = self.lab(n.args[0])
        at = 2 if n.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim) else 1
        dims = n.args[at] if len(n.args) > at else n.kwargs.get("dim")
        dims = list(range(labels.dim())) if dims is None else [dims] if isinstance(dims, int) else dims
        dims = sorted({d % labels.dim() for d in dims})
        if pin:
            self._pin(n.args[0], [d for d in dims if _varies(labels, d)], f"{_op(n)} at {n.name} reduces over it")
        if any(_varies(labels, d) for d in dims) or not isinstance(value, torch.Tensor):
            return None
        out = labels
        for d in dims:
            out = out.narrow(d, 0, 1)
        return out.reshape(value.shape).contiguous() if out.numel() == value.numel() else None

    def _layer_norm(self, n: fx.Node) -> torch.Tensor:
        labels = self.lab(n.args[0])
        normalized = len(n.args[1])
        self._pin(n.args[0], [d for d in range(labels.dim() - normalized, labels.dim()) if _varies(labels, d)],
                  f"layer_norm at {n.name} normalises over it")
        for arg in n.args[2:4]:
            if self.lab(arg) is not None:
                self._tie(labels, self.lab(arg), n)
        return labels

    def _batch_norm(self, n: fx.Node, value: Any) -> Any:
        labels = self.lab(n.args[0])
        channel = labels.movedim(1, -1)
        for arg in n.args[1:5]:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                self._tie(channel, self._elements_of(self.canonical.get(arg.target, arg.target)), n)
        return (labels, None, None) if isinstance(value, tuple) else labels


def _nodes(values: list) -> list[fx.Node]:
    out = []
    for v in values:
        if isinstance(v, fx.Node):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _nodes(list(v))
    return out


def _tensors(labels: Any) -> list[torch.Tensor]:
    if isinstance(labels, torch.Tensor):
        return [labels]
    if isinstance(labels, (tuple, list)):
        return [t for item in labels for t in _tensors(item)]
    return []


def _op(n: fx.Node) -> str:
    return str(n.target).removeprefix("aten.").removesuffix(".default")
