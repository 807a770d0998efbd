"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"), as PEFT's `LNTuningConfig` trains it: new
weights (and biases) for the targeted norm layers, kept here as deltas on the site's own.

    layernorm   y = W (.) n(x) + b     n(x) = (x - mean(x)) / sqrt(var(x) + eps)    over the last dim
    rmsnorm     y = W (.) n            n = x * rsqrt(mean(x^2) + eps), the site's input (rewrite/sites.py)

    y' = y + dW (.) n + db             ("add" join: layernorm recomputes n from x with the site's eps; no db where
                                        the norm has no bias)

which is the norm with weight W + dW and bias b + db. Init dW = db = 0 (the identity). Merge (exact, additive):
W <- W + dW, b <- b + db; unmerge subtracts. No rank: allocate refuses it.

Unmerged exports switch it as an output scale of the base norm (`parted`: rewrite/adapters/output_scale.py), per row
(bank, custom-op) or per run (ort-adapters), with no second normalisation: n = (y - b) / W, so

    y' = g (.) y + h,     g = (W + dW) / W,     h = (1 - g) (.) b + db        (g computed in float64)

Exact where every W_i != 0; the float32 rounding of y is multiplied by g, so a site where max |g| > 100 (a base
weight near 0 that tuning moved) is refused (merge it): below that the served error stays under 100 eps32 |y|.

PEFT (`LN_TUNING`) trains a copy of the whole layer, so a directory holds the TUNED tensors, not deltas:
`base_model.model.<module>.ln_tuning_layers.weight` [d] = W + dW (and `.bias` [d] = b + db where the norm has one).
The module is built with the site's base W and b (`built_with_base`), kept as frozen buffers, and converts with
them: saved = base + delta, loaded delta = saved - base (so a directory applies its tuned norm whatever the base
holds, as PEFT's copy does). PEFT may copy any module; ours adapts norm sites only. The same module is what a norm
named by another tuner's `modules_to_save` loads as (`copies_layer`: `copy_state` = {"weight", "bias"}, the tuned
tensors), and what `save` writes there.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import StrictStr

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.output_scale import OutputScale
from rewrite.adapters.trained_copy import TrainedCopy
from rewrite.formats.peft_dir import PeftConfig, PeftFormat

WEIGHT, BIAS = "ln_tuning_layers.weight", "ln_tuning_layers.bias"
PEFT_KEYS = {"weight": WEIGHT, "bias": BIAS}


class LnTuningPeftConfig(PeftConfig):
    """`adapter_config.json` of an LN tuning adapter. PEFT's LNTuningConfig has no layers_to_transform or
    layers_pattern (it ignores them when present), so a config that sets one is refused rather than read."""

    unsupported: ClassVar[dict[str, str]] = {
        **PeftConfig.unsupported, **{key: f"{key} (not an LNTuningConfig field: PEFT ignores it)"
                                     for key in ("layers_to_transform", "layers_pattern")}}

    peft_type: StrictStr = "LN_TUNING"


LN_TUNING_FORMAT = PeftFormat("LN_TUNING", LnTuningPeftConfig, ((WEIGHT,), (WEIGHT, BIAS)))


MAX_SCALE = 100.0  # the largest |g| an unmerged export accepts (module docstring)


class LnTuningScale(OutputScale):
    """LN tuning's unmerged form: g = (W + dW) / W, h = (1 - g) (.) b + db (module docstring)."""

    kind = "ln_tuning"
    ops = ("layernorm", "rmsnorm")


class LnTuning(TrainedCopy):
    kind = "ln_tuning"
    ops = ("layernorm", "rmsnorm")
    peft_format = LN_TUNING_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 base_weight: torch.Tensor, base_bias: torch.Tensor | None):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.eps = (conv or {}).get("eps")  # layernorm only: rmsnorm sites are given n itself
        self._hold_copy((d_out,), base_weight, base_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = F.layer_norm(x, (self.d_out,), eps=self.eps) if self.op == "layernorm" else x
        delta = n * self.weight_delta
        return delta if self.bias_delta is None else delta + self.bias_delta

    @torch.no_grad()
    def unmerged_parts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[None, list[AdapterKind]]:
        """No factors; the output scale g = (W + dW) / W with h = (1 - g) (.) b + db (module docstring)."""
        base = weight.double()
        scale = (base + self.weight_delta.double()) / base
        zero = int((base == 0).sum())
        if zero or scale.abs().max() > MAX_SCALE:
            why = (f"{zero} of its base weights are 0" if zero else
                   f"its tuned weights are up to {float(scale.abs().max()):.3g}x the base ones (> {MAX_SCALE:g}x)")
            raise NotSupported(f"ln_tuning switches unmerged as a scale of the base norm's output, and {why}: the "
                               "scale would be inexact or amplify rounding; merge it")
        return None, [LnTuningScale(self.op, self.d_in, scale.to(self.weight_delta.dtype), bias, self.bias_delta)]

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {PEFT_KEYS[key]: t for key, t in self.copy_state().items()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {PEFT_KEYS[key]: shape for key, shape in self.copy_shapes().items()}

    def load_peft_state(self, tensors) -> None:
        self.load_copy({key: tensors[peft] for key, peft in PEFT_KEYS.items() if peft in tensors})

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[LnTuning], dict]:
        return cls, {}

    @classmethod
    def peft_config(cls, modules) -> dict:
        return {"peft_type": "LN_TUNING", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "target_modules": sorted(modules), "exclude_modules": None, "modules_to_save": None,
                "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, d={self.d_out}, bias={self.bias_delta is not None}"
