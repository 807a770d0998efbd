"""bfloat16 arithmetic inside a model that is not bfloat16, computed in float32 and rounded, exactly as torch does.

Some models compute one small tensor in bfloat16 whatever their own dtype (Falcon's ALiBi:
`slopes.bfloat16() * positions`). ONNX Runtime's CPU kernels have no bfloat16 Mul / Add / Sub / Div, so such a
graph exports but cannot be run. Each of these ops becomes

    a ⊙ b  ->  bf16( f32(bf16(a)) ⊙ f32(bf16(b)) )

which is what torch's CPU kernels compute (operands promoted to bfloat16, the op in float32, the result rounded once
to bfloat16): the answer is bit for bit the same. A graph with bfloat16 parameters or buffers (a bfloat16 model) is
left alone: there the dtype is the model's choice, and backends that run it have the kernels.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
ARITHMETIC = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor)


def _is_bfloat16(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def _cast(graph: fx.Graph, value, dtype: torch.dtype):
    """`value` as `dtype` by `aten._to_copy` (numbers and symbolic sizes are left as they are, as torch promotes
    them)."""
    known = value.meta.get("val") if isinstance(value, fx.Node) else None
    if not isinstance(known, torch.Tensor) or known.dtype == dtype:
        return value
    cast = graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
    cast.meta["val"] = known.to(dtype)
    return cast


def widen_bfloat16_islands(gm: fx.GraphModule) -> int:
    """Rewrite each bfloat16 `ARITHMETIC` op of a graph without bfloat16 tensors of its own, in place; returns how
    many (module docstring)."""
    if any(t.dtype == torch.bfloat16 for t in (*gm.parameters(), *gm.buffers())):
        return 0
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in ARITHMETIC and _is_bfloat16(node)):
            continue
        with graph.inserting_before(node):
            args = [_cast(graph, _cast(graph, a, torch.bfloat16), torch.float32) for a in node.args]
            wide = graph.call_function(node.target, tuple(args), dict(node.kwargs))
            wide.meta["val"] = node.meta["val"].to(torch.float32)
            rounded = _cast(graph, wide, torch.bfloat16)
        rounded.meta = dict(node.meta)
        node.replace_all_uses_with(rounded)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
