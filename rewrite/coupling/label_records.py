"""The records of a channel-label trace (`rewrite.coupling.labels.trace_labels`): id spaces, broadcast copies, ties."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Space:
    """Ids start .. start + prod(shape): one per index of `dim` of `tensor` (a parameter or buffer FQN), one per
    element (`dim` None: 1-D parameters and statistics), or one per broadcast copy (`tensor` "copy:<node>")."""
    tensor: str
    dim: int | None
    start: int
    shape: tuple[int, ...]
    role: str  # "out" (a weight op's output channels) | "in" | "elem" | "copy"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Copy:
    """The broadcast copies an expand made: copy c of sources[s] has id start + s * count + c."""
    node: str
    start: int
    sources: torch.Tensor
    count: int


@dataclass(frozen=True)
class Ties:
    node: str
    kind: str  # "add" (add / sub: a residual when it joins two weights' outputs) | "tie"
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Labels:
    n: int = 0
    spaces: list[Space] = field(default_factory=list)
    nodes: dict[str, Any] = field(default_factory=dict)  # node name -> label tensor (or tuple) of its value
    ties: list[Ties] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    pinned: list[tuple[str, int, str]] = field(default_factory=list)  # (node, dim, why its size must stay)
    blocked: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # ids never removed, and why
    split: list[torch.Tensor] = field(default_factory=list)  # ids tied inside a split dim (heads)
    weight_ops: dict[str, str] = field(default_factory=dict)  # weight FQN -> "linear" | "conv1d" | "conv" | ...
    aliases: dict[str, list[str]] = field(default_factory=dict)  # FQN -> the other names of the same tensor

    def space_of(self, tensor: str, dim: int | None) -> Space | None:
        return next((s for s in self.spaces if s.tensor == tensor and s.dim == dim), None)
