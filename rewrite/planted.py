"""Planted-rank teachers: a model plus known low-rank updates, to check where an allocator puts ranks.

    ResMLP      x <- x + down(relu(up(x))) per block, then a head: 2 * depth + 1 Linear sites to plant into

    W_k <- W_k + g_k U_k V_k^T     U_k [d_out, r_k], V_k [d_in, r_k] orthonormal (QR of Gaussian matrices)
    g_k = scale                    (relative = False)
    g_k = scale * ||W_k||_2        (relative = True: every update the same fraction of its layer's norm)

The update of site k has rank exactly r_k and every singular value equal to g_k, so the best rank-r fit
of the teacher's change at site k needs r = r_k. Fed as [data] (the teacher's outputs as labels, loss
"mse"), an allocator should put its ranks where r_k is large (tests/test_allocate.py,
bench/bench_planted_ranks.py).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class ResMLP(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(up=nn.Linear(width, 2 * width), down=nn.Linear(2 * width, width)))
                                    for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


def plant(model: nn.Module, plan: Mapping[str, int], *, seed: int = 1, scale: float = 0.5,
          relative: bool = False) -> nn.Module:
    """A copy of `model` with a rank-`plan[name]` update added to the weight of each `nn.Linear` named in
    `plan` (rank 0: unchanged). The model itself is not modified."""
    teacher = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, rank in plan.items():
            layer = teacher.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"plant: {name} is a {type(layer).__name__}; planted updates go into nn.Linear layers")
            if not rank:
                continue
            u, _ = torch.linalg.qr(torch.randn(layer.out_features, rank, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=generator))
            gain = scale * torch.linalg.matrix_norm(layer.weight, ord=2) if relative else scale
            layer.weight += gain * u @ v.T
    return teacher


__all__ = ["ResMLP", "plant"]
