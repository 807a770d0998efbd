"""Symbolic sizes that are one number at every input size the export serves become that number.

A captured graph computes some sizes from its dynamic axes, e.g. MPT's ALiBi slice start
`max(0, position_bias.size(1) - query_length)` = Max(0, 1 - past - 2 * new). The capture samples axes >= 2, and the
ONNX exporter re-traces with every axis in [0, inf) (it serves sizes 0 and 1 too), where it cannot decide that
Max(0, 1 - past - 2 * new) = 0, assumes the sliced axis (1 - Max(...)) broadcasts by equality with `new`, and fails
("Eq(s70 + Max(0, -s17 - 2*s70 + 1), 1) is inconsistent"). But the export never serves every axis at 0: each
symbolic integer node whose value, bounded over the axes' served ranges, is one number n

    lower(expr | axes in their ranges) == upper(expr | axes in their ranges) == n

is replaced by n. Served ranges: [1, inf) for the axes the capture names as batch or token axes (`TOKEN_AXES`: a
model is fed at least one row and one new token), [0, inf) for the cache's past length and for any other named
axis (its meaning unknown, so nothing is assumed).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

from rewrite.inputs import ExampleInputs

TOKEN_AXES = ("batch", "seq", "batch_size", "sequence_length", "total_sequence_length")


def _axis_ranges(gm: fx.GraphModule, inputs: ExampleInputs) -> dict:
    """sympy symbol of each dynamic input axis -> its served range (module docstring)."""
    ranges: dict = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value, names = node.meta.get("val"), inputs.dims.get(node.name)
        if not isinstance(value, torch.Tensor) or not names:
            continue
        for size, name in zip(value.shape, names):
            if isinstance(size, torch.SymInt) and name and size.node.expr.is_Symbol:
                low = 1 if name in TOKEN_AXES else 0
                known = ranges.get(size.node.expr)
                ranges[size.node.expr] = ValueRanges(max(low, known.lower if known else 0), int_oo)
    return ranges


def _fixed_value(node: fx.Node, ranges: dict) -> int | None:
    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.SymInt):
        return None
    expr = value.node.expr
    if expr.is_number or not expr.free_symbols <= ranges.keys():
        return None
    bound = bound_sympy(expr, {s: ranges[s] for s in expr.free_symbols})
    return int(bound.lower) if bound.is_singleton() else None


def fold_fixed_sizes(gm: fx.GraphModule, inputs: ExampleInputs) -> int:
    """Replace, in place, each symbolic integer node of `gm` that is one number over the served axis ranges by that
    number, and drop the size arithmetic left unused; returns how many were folded."""
    ranges = _axis_ranges(gm, inputs)
    if not ranges:
        return 0
    folded = 0
    for node in list(gm.graph.nodes):
        number = _fixed_value(node, ranges)
        if number is not None and node.users:
            node.replace_all_uses_with(number)
            folded += 1
    if folded:
        for node in reversed(list(gm.graph.nodes)):  # the size arithmetic that only fed folded nodes
            if node.op == "call_function" and not node.users and isinstance(node.meta.get("val"), torch.SymInt):
                gm.graph.erase_node(node)
        gm.recompile()
    return folded
