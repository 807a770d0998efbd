"""custom-op: a different adapter per batch row through `rewrite::LoraDelta` (export/lora_delta_op.py).

    A [C, d_in, r], B [C, r, d_out], ids [batch]:   y = LoraDelta(x, A, B, ids, base(x))

The base GEMM stays ONNX Runtime's; the op adds each row's delta into its output (in place when ORT allows),
grouping rows by adapter in C++ / CUDA. Banks are float32, or float16 to halve the bytes each call streams.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.export import lora_delta_op  # registers torch.ops.rewrite.lora_delta
from rewrite.export.lowerings.base import Lowering, bank_tensors, routed_ids


class CustomOpBank(nn.Module):
    def __init__(self, a_bank: torch.Tensor, b_bank: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.A = nn.Parameter(a_bank.to(dtype), requires_grad=False)
        self.B = nn.Parameter(b_bank.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewrite.lora_delta(x, self.A, self.B, routed_ids(), base)


class CustomOp(Lowering):
    name = "custom-op"
    routed = True
    fused = True

    def module(self, padded, names, slots, site, dtype) -> nn.Module:
        return CustomOpBank(*bank_tensors(padded, names, slots, site), dtype)

    def translation_table(self):
        return lora_delta_op.onnx_translation_table()
