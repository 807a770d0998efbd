"""bank: a different adapter per batch row, with standard ONNX ops only.

    A [d_in, C r], B [C r, d_out], ids [batch]:   delta = ((x A) * onehot(ids)) B

C slots side by side; a row's one-hot mask keeps only its own rank slots (id -1 matches none: the base model).
The banks are graph inputs whose defaults are the exported adapters, so a session fills free slots without
reloading. A fused group (`fuse`) becomes one `FusedOneHotBank`: one A bank and one mask for all its sites.
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


class FusedOneHotBank(nn.Module):
    """The bank of a fused group (sites reading one input x), with ONE A bank and one mask:

        A = [A_1 | ... | A_k] [d_in, sum C r_i] (each A_i slot-major as above), B_i [C r_i, d_out_i]:
        h = (x A) * onehot(ids)[slot of each column],   delta_i = h[.., o_i : o_i + C r_i] B_i
    """

    def __init__(self, banks: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        slots = banks[0][0].shape[0]
        self.A = nn.Parameter(torch.cat([a.permute(1, 0, 2).reshape(a.shape[1], -1) for a, _ in banks], dim=1),
                              requires_grad=False)
        self.B = nn.ParameterList(nn.Parameter(b.reshape(-1, b.shape[2]).contiguous(), requires_grad=False)
                                  for _, b in banks)
        self.widths = [slots * a.shape[2] for a, _ in banks]
        self.register_buffer("slot_of", torch.cat([torch.arange(slots).repeat_interleave(a.shape[2]) for a, _ in banks]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids = routed_ids()
        mask = (ids[:, None] == self.slot_of).to(x.dtype)
        hidden = (x.reshape(ids.shape[0], -1, x.shape[-1]) @ self.A) * mask[:, None, :]
        return tuple((h @ b).reshape(*x.shape[:-1], b.shape[1]) for h, b in zip(hidden.split(self.widths, -1), self.B))


class Bank(Lowering):
    name = "bank"
    routed = True

    def module(self, padded, names, slots, site, dtype) -> nn.Module:
        return OneHotBank(*bank_tensors(padded, names, slots, site))

    def group_module(self, members, names, slots, dtype) -> tuple[nn.Module, list[dict[str, str]], list[int]]:
        banks = [bank_tensors(padded, names, slots, site) for padded, site in members]
        module = FusedOneHotBank(banks)
        offsets = [sum(module.widths[:i]) for i in range(len(banks))]
        return module, [{"A": "A", "B": f"B.{i}"} for i in range(len(banks))], offsets
