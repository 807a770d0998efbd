"""`TrainedCopy`: what the kinds that hold a trained copy of a layer's own tensors share (`full`: PEFT's
modules_to_save on weight layers; `ln_tuning`: norms). The copy is kept as deltas on the site's tensors, in the base
op's layout, relative to the base it was built on:

    copy = base + delta        delta = copy - base        merge (additive): W <- W + dW, b <- b + db

The base W and b are frozen buffers (`built_with_base`) that forward never reads: they convert the deltas to and from
the tensors PEFT saves (`copy_state`, `load_copy`), so a saved copy applies whatever the base holds, as PEFT's does.
Such modules ride beside another tuner's in its PEFT directory as `modules_to_save` (`rides`).
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.adapters.base import AdapterKind


class TrainedCopy(AdapterKind):
    settings = ()
    built_with_base = True
    mergeable = True
    parted = True
    copies_layer = True
    rides = "modules_to_save"

    def _hold_copy(self, shape: tuple[int, ...], base_weight: torch.Tensor, base_bias: torch.Tensor | None,
                   dtype: torch.dtype, device: torch.device | str) -> None:
        """Zero deltas of `shape` (weight) and of the bias's shape (None without one), and the frozen base."""
        factory = dict(dtype=dtype, device=device)
        self.weight_delta = nn.Parameter(torch.zeros(shape, **factory))
        self.bias_delta = None if base_bias is None else nn.Parameter(torch.zeros(base_bias.shape, **factory))
        # invariant: the base the deltas are relative to, for PEFT's full tensors (never read by forward)
        self.register_buffer("base_weight", base_weight.detach().clone(), persistent=False)
        self.register_buffer("base_bias", None if base_bias is None else base_bias.detach().clone(),
                             persistent=False)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        weight.add_(self.weight_delta.to(weight.dtype), alpha=sign)
        if self.bias_delta is not None:
            bias.add_(self.bias_delta.to(bias.dtype), alpha=sign)

    def copy_state(self) -> dict[str, torch.Tensor]:
        copy = {"weight": self.base_weight + self.weight_delta}
        if self.bias_delta is not None:
            copy["bias"] = self.base_bias + self.bias_delta
        return {key: t.detach().clone() for key, t in copy.items()}

    @torch.no_grad()
    def load_copy(self, tensors) -> None:
        self.weight_delta.copy_(tensors["weight"].to(self.base_weight.dtype) - self.base_weight)
        if self.bias_delta is not None:
            self.bias_delta.copy_(tensors["bias"].to(self.base_bias.dtype) - self.base_bias)
