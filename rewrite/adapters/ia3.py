"""(IA)^3: learned vectors that rescale a layer's activations (Liu et al. 2022), as PEFT's `IA3Config` places them.

    kind = "ia3"      y' = l (.) base(x)         l [d_out]   on outputs (attention k / v, PEFT's default)
    kind = "ia3_ff"   y' = base(l (.) x)         l [d_in]    on inputs (PEFT's `feedforward_modules`)

Init l = 1 (the identity). Merge is exact and multiplicative, in the base op's own layout:
    ia3      linear  W <- diag(l) W,  b <- l (.) b       Conv1D (W [d_in, d_out])  W <- W diag(l),  b <- l (.) b
    ia3_ff   linear  W <- W diag(l)   (b unchanged)     Conv1D                    W <- diag(l) W
Unmerge divides (exact up to rounding while l has no zeros; `unmerge` restores the kept weights instead).
PEFT: one `IA3` adapter holds both kinds; key `base_model.model.<module>.ia3_l`, shape [d_out, 1] for outputs and
[1, d_in] for inputs; `feedforward_modules` names the input-scaled ones.
Unmerged: elementwise (`rowwise`, vector "l", identity 1): bank / custom-op exports switch it per batch row,
t' = t (.) l[id] on the output (ia3) or the input (ia3_ff); ort-adapters feeds l per run (identity default).
Its PEFT format and row-vector reading: rewrite/formats/peft_rows.py.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rewrite.adapters.base import AdapterKind
from rewrite.formats.peft_rows import IA3_FORMAT


class IA3(AdapterKind):
    kind = "ia3"
    ops = ("linear", "conv1d")
    join = "output"
    settings = ("init",)
    inits = ("ones",)
    mergeable = True
    peft_format = IA3_FORMAT
    rowwise = True
    scales_input: ClassVar[bool] = False

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "ones", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.ia3_l = nn.Parameter(torch.ones(d_in if self.scales_input else d_out, dtype=dtype, device=device))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.ia3_l

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        return {"l": (self.ia3_l.detach(), 1.0)}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, **layout) -> torch.Tensor:
        """t' = t (.) l"""
        return t * params["l"]

    def _scale_weight(self) -> bool:
        """Whether l multiplies the weight's rows (dim 0) rather than its columns."""
        rows_are_outputs = self.op == "linear"  # linear W [d_out, d_in]; Conv1D W [d_in, d_out]
        return rows_are_outputs != self.scales_input

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        factor = self.ia3_l.to(weight.dtype) if sign > 0 else 1.0 / self.ia3_l.to(weight.dtype)
        weight.mul_(factor[:, None] if self._scale_weight() else factor[None, :])
        if bias is not None and not self.scales_input:
            bias.mul_(factor.to(bias.dtype))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[None, :] if self.scales_input else self.ia3_l[:, None]}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[IA3], dict]:
        return (IA3FeedForward if adapter.config.scales_input(module) else IA3), {}

    @classmethod
    def peft_config(cls, modules) -> dict:
        return {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "target_modules": sorted(modules),
                "feedforward_modules": sorted(o for o, m in modules.items() if m.scales_input),
                "fan_in_fan_out": any(m.op == "conv1d" for m in modules.values()), "init_ia3_weights": True,
                "modules_to_save": None, "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, {'inputs' if self.scales_input else 'outputs'}={self.ia3_l.numel()}"


class IA3FeedForward(IA3):
    kind = "ia3_ff"
    join = "input"
    scales_input = True

