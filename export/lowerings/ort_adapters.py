"""ort-adapters: one adapter per run, through ONNX Runtime's own adapter mechanism.

    delta = x A B,  A [d_in, r], B [r, d_out]

Every A / B becomes a graph input named like the parameter, whose default is an EMPTY initializer ([d_in, 0] /
[0, d_out]): the model alone is the base model, and an `.onnx_adapter` file feeds one adapter's tensors per run.
Each site gets its own symbolic rank dim `rank_<i>` (one shared dim breaks per-layer ranks in ORT's buffer planner).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rewrite.export.lowerings.base import Lowering


class SwitchableLora(nn.Module):
    """A and B are replaced per run by ONNX Runtime adapter inputs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(a.clone(), requires_grad=False)
        self.B = nn.Parameter(b.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A @ self.B


class OrtAdapters(Lowering):
    name = "ort-adapters"
    routed = False
    keeps_shapes = False  # the rank dims changed: the exporter's shapes no longer hold

    def module(self, padded, names, slots, site, dtype) -> nn.Module:
        first = padded[next(iter(padded))]
        return SwitchableLora(first["A"], first["B"])

    def adapter_input(self, init: onnx.TensorProto, key: str, index: int) -> list[Any]:
        axis = 1 if key == "A" else 0
        shape: list[Any] = list(init.dims)
        shape[axis] = f"rank_{index}"
        empty = list(init.dims)
        empty[axis] = 0
        np_type = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(empty, np_type), init.name))
        return shape
