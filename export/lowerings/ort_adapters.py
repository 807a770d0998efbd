"""ort-adapters: one adapter per run, through ONNX Runtime's own adapter mechanism.

    low-rank     delta = x A B,  A [d_in, r], B [r, d_out]                        (`SwitchableLora`)
    row kinds    t' = kind.apply_rows(t, p), p [1, 1, width] each vector of the kind  (`RunRows`: rows.py)

Every A / B and every vector p becomes a graph input named like the parameter, with a default that makes the model
alone the base model: an EMPTY initializer for A / B ([d_in, 0] / [0, d_out]), the kind's identity value for p. An
adapter's `.onnx_adapter` file feeds its own tensors per run; inputs it does not name keep their defaults.
Each low-rank site gets its own symbolic rank dim `rank_<i>` (one shared dim breaks per-layer ranks in ORT's buffer
planner); a vector's input keeps its fixed shape. Exports with elementwise kinds skip the exporter's optimizer
(`export_unmerged`): it would fold a kind's ops on a vector alone into initializers no adapter file names.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rewrite.adapters.base import AdapterKind
from rewrite.export.lowerings.base import Lowering


class SwitchableLora(nn.Module):
    """A and B are replaced per run by ONNX Runtime adapter inputs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(a.clone(), requires_grad=False)
        self.B = nn.Parameter(b.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A @ self.B


class RunRows(nn.Module):
    """The vectors of one elementwise kind and layout at a site, at the identity; replaced per run by adapter inputs."""

    def __init__(self, formula: type[AdapterKind], layout: dict[str, Any], identities: dict[str, torch.Tensor]):
        super().__init__()
        self.formula, self.layout = formula, layout
        # held as [1, 1, width], apply_rows' [rows, 1, width] for the run's one "row"
        self.vectors = nn.ParameterDict({p: nn.Parameter(v.reshape(1, 1, -1).clone(), requires_grad=False)
                                         for p, v in identities.items()})

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(1, -1, t.shape[-1])  # [B, T, d] and GPT-2's flattened [B*T, d] alike
        return self.formula.apply_rows(rows, dict(self.vectors.items()), **self.layout).reshape(t.shape)


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
