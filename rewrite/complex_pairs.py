"""Complex-valued arithmetic as real (re, im) pairs, so graphs that compute rotary embeddings in complex numbers
export to ONNX (which has no complex tensors).

Some models rotate queries and keys by complex multiplication (DeepSeek-V2:
`view_as_real(view_as_complex(x.reshape(..., -1, 2)) * polar(1, angle))`). Every complex tensor z of the graph
becomes a real tensor Z of one more trailing axis, Z[..., 0] = re z, Z[..., 1] = im z (the layout `view_as_real`
gives), and each op on complex tensors its real counterpart:

    polar(r, t)                -> stack(r cos t, r sin t)
    view_as_complex(x)         -> x                   view_as_real(z) -> Z
    z * w (both complex)       -> stack(Zr Wr - Zi Wi, Zr Wi + Zi Wr)
    z * a (a real)             -> Z * a[..., None]    (a number: Z * a)
    unsqueeze(z, d)            -> unsqueeze(Z, d if d >= 0 else d - 1)
    z.to(device / dtype)       -> Z.to(device / the real dtype of the same width)
    torch's metadata checks on z are dropped (they assert the complex dtype)

A graph with any other complex op is left as it is (its ONNX export then fails, naming the op): no partial rewrite.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}
_CONVERSIONS = (aten.to.dtype_layout, aten.to.dtype, aten.to.device, aten._to_copy.default, aten.clone.default,
                aten.alias.default)
_CHECKS = (aten._assert_tensor_metadata.default,)  # torch's dtype / shape checks on a complex tensor: dropped
SUPPORTED = (*_CHECKS, aten.polar.default, aten.view_as_complex.default, aten.view_as_real.default, aten.mul.Tensor,
             aten.unsqueeze.default, *_CONVERSIONS)


def _is_complex(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def _touches_complex(node: fx.Node) -> bool:
    return node.op == "call_function" and (_is_complex(node.meta.get("val")) or any(
        _is_complex(arg.meta.get("val")) for arg in node.all_input_nodes))


class _Builder:
    """Inserts real ops before `at`, each with the meta value torch computes for it and `at`'s stack trace."""

    def __init__(self, graph: fx.Graph, at: fx.Node):
        self.graph, self.at = graph, at

    def __call__(self, op, *args, **kwargs) -> fx.Node:
        def meta(value):
            if isinstance(value, list):
                return [meta(v) for v in value]
            return value.meta["val"] if isinstance(value, fx.Node) else value
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(op, args, kwargs)
        node.meta["val"] = op(*[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()})
        for key in ("stack_trace", "nn_module_stack"):
            if key in self.at.meta:
                node.meta[key] = self.at.meta[key]
        return node

    def parts(self, pair: fx.Node) -> tuple[fx.Node, fx.Node]:
        return self(aten.select.int, pair, -1, 0), self(aten.select.int, pair, -1, 1)

    def stack(self, re: fx.Node, im: fx.Node) -> fx.Node:
        return self(aten.stack.default, [re, im], -1)


def _real_dtype(value: Any) -> Any:
    return REAL.get(value, value) if isinstance(value, torch.dtype) else value


def _rewrite(node: fx.Node, pairs: dict[fx.Node, fx.Node], make: _Builder) -> fx.Node | None:
    if node.target in _CHECKS:
        return None
    args = [pairs.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
    if node.target is aten.polar.default:
        r, t = args
        return make.stack(make(aten.mul.Tensor, r, make(aten.cos.default, t)),
                          make(aten.mul.Tensor, r, make(aten.sin.default, t)))
    if node.target in (aten.view_as_complex.default, aten.view_as_real.default):
        return args[0]
    if node.target is aten.unsqueeze.default:
        dim = args[1] if args[1] >= 0 else args[1] - 1
        return make(aten.unsqueeze.default, args[0], dim)
    if node.target is aten.mul.Tensor:
        a, b = node.args
        if a in pairs and b in pairs:
            (ar, ai), (br, bi) = make.parts(pairs[a]), make.parts(pairs[b])
            return make.stack(make(aten.sub.Tensor, make(aten.mul.Tensor, ar, br), make(aten.mul.Tensor, ai, bi)),
                              make(aten.add.Tensor, make(aten.mul.Tensor, ar, bi), make(aten.mul.Tensor, ai, br)))
        pair, other = (pairs[a], b) if a in pairs else (pairs[b], a)
        if isinstance(other, fx.Node):
            other = make(aten.unsqueeze.default, other, -1)
        return make(aten.mul.Tensor, pair, other)
    kwargs = {k: _real_dtype(v) for k, v in node.kwargs.items()}  # the conversions
    return make(node.target, *[_real_dtype(a) for a in args], **kwargs)


def _supported(node: fx.Node, complex_nodes: set[fx.Node]) -> bool:
    """A covered op whose complex inputs are all computed by covered ops (not complex parameters or inputs); a
    product of a complex tensor and real factors; a conversion from complex to complex."""
    if node.target not in SUPPORTED or not all(
            a in complex_nodes for a in node.all_input_nodes if _is_complex(a.meta.get("val"))):
        return False
    if node.target is aten.mul.Tensor:
        return (any(a in complex_nodes for a in node.args)
                and not any(isinstance(a, complex) for a in node.args))
    if node.target in _CONVERSIONS:
        return node in complex_nodes and node.args[0] in complex_nodes
    return True


def complex_to_pairs(gm: fx.GraphModule) -> int:
    """Rewrite `gm`'s complex arithmetic as real pairs in place (module docstring); returns how many ops, 0 when the
    graph has none or one this rewrite does not cover."""
    touched = [n for n in gm.graph.nodes if _touches_complex(n)]
    complex_nodes = {n for n in touched if _is_complex(n.meta.get("val"))}
    if not touched or not all(_supported(n, complex_nodes) for n in touched):
        return 0
    pairs: dict[fx.Node, fx.Node] = {}
    for node in touched:
        new = _rewrite(node, pairs, _Builder(gm.graph, node))
        if node in complex_nodes:
            pairs[node] = new
        else:
            if new is not None:
                node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    for node in reversed(list(gm.graph.nodes)):
        if node in complex_nodes:
            gm.graph.erase_node(node)
    gm.recompile()
    return len(touched)
