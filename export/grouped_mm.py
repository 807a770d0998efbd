"""ONNX for the grouped matrix product of mixture-of-experts layers, which torchlib cannot lower.

transformers' `grouped_mm_fallback(a [M, K], W [G, K, N], offs [G])` (transformers 5 runs the experts of MoE models
such as Mixtral through it by default on CPU): the rows of `a` are sorted by expert and `offs` holds each expert's
cumulative end row. With offs[-1] = 0,

    out = Concat_g( a[offs[g-1] : offs[g]] @ W[g] )          g = 0 .. G-1, G static (W's first dim)

Each row meets only its own expert's weight: G MatMuls over row ranges, never a [M, K, N] gather of weights.
"""
from __future__ import annotations

from typing import Any

import torch


def _grouped_mm(mat_a, mat_b, offs):
    from onnxscript.onnx_opset import opset18 as op

    groups = mat_b.shape[0] if mat_b.shape is not None else None
    if not isinstance(groups, int):
        raise ValueError("grouped_mm: the number of experts (the weight's first dim) must be static")
    ends = op.Cast(offs, to=7)  # int64
    ends = op.Split(ends, axis=0, num_outputs=groups) if groups > 1 else [ends]
    weights = op.Split(mat_b, axis=0, num_outputs=groups) if groups > 1 else [mat_b]
    axes = op.Constant(value_ints=[0])
    start = op.Constant(value_ints=[0])
    outputs = []
    for g in range(groups):
        rows = op.Slice(mat_a, start, ends[g], axes)
        outputs.append(op.MatMul(rows, op.Squeeze(weights[g], axes)))
        start = ends[g]
    return op.Concat(*outputs, axis=0)


def grouped_mm_translations() -> dict[Any, Any]:
    """`{op: lowering}` for `torch.onnx.export(..., custom_translation_table=...)`; empty until transformers has
    registered its op (it does when an MoE model's module is imported)."""
    packet = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    return {packet.default: _grouped_mm} if packet is not None else {}
