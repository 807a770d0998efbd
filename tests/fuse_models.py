"""A LLaMA-shaped stack of linears for the fuse pass: per layer q / k / v read one normed input, o reads their
mix, gate / up read a second normed input, down reads silu(gate) * up. Factory: `fuse_models:stack`."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    @staticmethod
    def norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.o_proj(self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h))
        h = self.norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, d: int = 32, f: int = 48, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, f) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return Block.norm(x)


def stack() -> nn.Module:
    torch.manual_seed(0)
    return Stack().eval()
