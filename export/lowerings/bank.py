"""bank: a different adapter per batch row, with standard ONNX ops only.

    A [d_in, C r], B [C r, d_out], ids [batch]:   delta = ((x A) * onehot(ids)) B

C slots side by side; a row's one-hot mask keeps only its own rank slots (id -1 matches none: the base model).
The banks are graph inputs whose defaults are the exported adapters, so a session fills free slots without
reloading.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.export.lowerings.base import Lowering, bank_tensors, routed_ids


class OneHotBank(nn.Module):
    def __init__(self, a_bank: torch.Tensor, b_bank: torch.Tensor):
        super().__init__()
        self.slots, _, self.rank = a_bank.shape
        self.A = nn.Parameter(a_bank.permute(1, 0, 2).reshape(a_bank.shape[1], -1).contiguous(), requires_grad=False)
        self.B = nn.Parameter(b_bank.reshape(-1, b_bank.shape[2]).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = routed_ids()
        mask = (ids[:, None] == torch.arange(self.slots, device=x.device)).to(x.dtype)
        hidden = (x.reshape(-1, x.shape[-1]) @ self.A).reshape(ids.shape[0], -1, self.slots, self.rank)
        hidden = (hidden * mask[:, None, :, None]).reshape(-1, self.slots * self.rank)
        return (hidden @ self.B).reshape(*x.shape[:-1], self.B.shape[1])


class Bank(Lowering):
    name = "bank"
    routed = True

    def module(self, padded, names, slots, site, dtype) -> nn.Module:
        return OneHotBank(*bank_tensors(padded, names, slots, site))
