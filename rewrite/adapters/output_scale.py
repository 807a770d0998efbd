"""`OutputScale`: the output part of a `parted` kind (DoRA, BOFT, LN tuning) in unmerged exports, a per-output scale
g [d_out] of the base op's output that leaves its bias b alone, plus an optional offset c:

    y' = g (.) (y - b) + b + c = g (.) y + h,        h = (1 - g) (.) b + c   (b, c: 0 where absent)

Row vectors (`rowwise`, join "output"): g (identity 1) and h (identity 0), so a row without the adapter gathers
y' = y. Each kind subclasses it under its own name, so the manifest and its banks say whose scale it is.
"""
from __future__ import annotations

import torch

from rewrite.adapters.base import AdapterKind


class OutputScale(AdapterKind):
    ops = ("linear", "conv1d")
    join = "output"
    rowwise = True

    def __init__(self, op: str, d_in: int, scale: torch.Tensor, bias: torch.Tensor | None,
                 offset: torch.Tensor | None = None):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, scale.shape[0]
        shift = torch.zeros_like(scale) if bias is None else (1 - scale) * bias.to(scale.dtype)
        if offset is not None:
            shift = shift + offset.to(scale.dtype)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        return {"g": (self.scale, 1.0), "h": (self.shift, 0.0)}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, **layout) -> torch.Tensor:
        """y' = g (.) y + h"""
        return t * params["g"] + params["h"]
