"""RoAd: 2D rotations with scales on pairs of a layer's output channels (Liao et al. 2024, "3-in-1: 2D Rotary
Adaptation"), as PEFT's `RoadConfig` builds it.

Output channels form groups of g = group_size; inside each group channel i < g/2 is paired with j = i + g/2:
    y = base(x),   y'_i = c1_i y_i - c2_i y_j,   y'_j = c2_j y_i + c1_j y_j
i.e. y' = c1 (.) y + c2 (.) rot(y), rot(y)_i = -y_j, rot(y)_j = y_i, with c1, c2 [d_out] from the angles theta and
the scales alpha of the variant:
    road_1 (PEFT's default)  theta, alpha [d_out / 2]  one pair shares one (alpha, theta): c1 = alpha cos theta,
                                                       c2 = alpha sin theta on both channels of the pair
    road_2                   theta, alpha [d_out]      one per channel: c1 = alpha cos theta, c2 = alpha sin theta
    road_4                   theta, alpha [2 d_out]    per group of 2g entries, the first g give c1 = alpha cos theta
                                                       and the last g give c2 = alpha sin theta
Init `identity` (theta = 0, alpha = 1, PEFT's init_weights=True): c1 = 1, c2 = 0.
Merge (exact): R (W x + b) = (R W) x + R b, each column of W and b rotated like y (linear W [d_out, d_in]).
Unmerge applies R^-1, again of this form: per pair, det = c1_i c1_j + c2_i c2_j, c1'_i = c1_j / det,
c1'_j = c1_i / det, c2' = -c2 / det (a pair with det = 0 cannot be unmerged; `unmerge` restores kept weights).
Elementwise (`rowwise`: vectors c1 [d_out], identity 1, and c2, identity 0, layout group_size): bank / custom-op
exports switch it per batch row, y' = c1[id] (.) y + c2[id] (.) rot(y); ort-adapters feeds c1, c2 per run (identity
default). No rank: allocate refuses it. d_out must be a multiple of
g (even).
PEFT: keys `base_model.model.<module>.road_theta` and `.road_alpha`, in the layouts above; config `variant`,
`group_size` (one each per adapter); PEFT's RoAd adapts Linear layers only. The format, and its tensors read as c1, c2
without torch: rewrite/formats/peft_rows.py.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.formats.peft_rows import ALPHA, PARAMS_PER_CHANNEL, ROAD_FORMAT, THETA, GroupSize, Variant
from rewrite.options import Strict

__all__ = ["ALPHA", "THETA", "Road", "RoadOptions"]


class RoadOptions(Strict):
    """insert's `options` for kind = "road" (PEFT's defaults)."""

    variant: Variant = "road_1"
    group_size: GroupSize = 64


def _rotate_half(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """rot(t) over the last dim: in each group, (first half, second half) -> (-second half, first half)."""
    halves = t.unflatten(-1, (-1, 2, group_size // 2))
    return torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)


def _swap_halves(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)


class Road(AdapterKind):
    kind = "road"
    ops = ("linear",)
    join = "output"
    settings = ("init",)
    Options = RoadOptions
    inits = ("identity",)
    mergeable = True
    rowwise = True
    peft_format = ROAD_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "identity", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", variant: str = "road_1",
                 group_size: int = 64):
        super().__init__()
        if d_out % group_size:
            raise ValueError(f"road: this layer's {d_out} outputs are not whole groups of group_size = {group_size} "
                             "(set options.group_size to a divisor of every targeted layer's output size)")
        self.op, self.d_in, self.d_out, self.variant, self.group_size = op, d_in, d_out, variant, group_size
        size = int(d_out * PARAMS_PER_CHANNEL[variant])
        self.road_theta = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        self.road_alpha = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c1, c2) [d_out]: y' = c1 (.) y + c2 (.) rot(y)."""
        theta, alpha, group = self.road_theta, self.road_alpha, self.group_size
        if self.variant == "road_4":  # per group of 2g entries: the first g for c1, the last g for c2
            theta1, theta2 = (part.flatten() for part in theta.unflatten(0, (-1, 2, group)).unbind(1))
            alpha1, alpha2 = (part.flatten() for part in alpha.unflatten(0, (-1, 2, group)).unbind(1))
            return alpha1 * theta1.cos(), alpha2 * theta2.sin()
        if self.variant == "road_1":  # each pair's value on both of its channels
            theta, alpha = (t.unflatten(0, (-1, 1, group // 2)).expand(-1, 2, -1).flatten() for t in (theta, alpha))
        return alpha * theta.cos(), alpha * theta.sin()

    def inverse_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c1', c2') of R^-1, per pair (see the module docstring)."""
        c1, c2 = self.coefficients()
        det = c1 * _swap_halves(c1, self.group_size) + c2 * _swap_halves(c2, self.group_size)
        if not bool(det.all()):
            raise NotSupported(f"road adapter has {int((det == 0).sum()) // 2} channel pair(s) with a singular 2x2 "
                               "block (alpha = 0): it cannot be unmerged by its inverse; merge with keep_original = "
                               "true and unmerge restores the kept weights")
        return _swap_halves(c1, self.group_size) / det, -c2 / det

    def _apply(self, t: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        return self.apply_rows(t, {"c1": c1, "c2": c2}, group_size=self.group_size)

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        c1, c2 = (c.detach() for c in self.coefficients())
        return {"c1": (c1, 1.0), "c2": (c2, 0.0)}

    def row_layout(self) -> dict:
        return {"group_size": self.group_size}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, *, group_size: int) -> torch.Tensor:
        """y' = c1 (.) y + c2 (.) rot(y), rot pairing channel i with i + group_size / 2 in each group"""
        return t * params["c1"] + _rotate_half(t, group_size) * params["c2"]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, *self.coefficients())

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        if weight.is_meta:
            return
        c1, c2 = (c.to(weight.dtype) for c in (self.coefficients() if sign > 0 else self.inverse_coefficients()))
        weight.copy_(self._apply(weight.T, c1, c2).T)  # linear W [d_out, d_in]: rotate each column like y
        if bias is not None:
            bias.copy_(self._apply(bias, c1.to(bias.dtype), c2.to(bias.dtype)))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {THETA: self.road_theta, ALPHA: self.road_alpha}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[Road], dict]:
        return cls, {"variant": adapter.config.variant, "group_size": adapter.config.group_size}

    @classmethod
    def peft_config(cls, modules) -> dict:
        shared = {key: {getattr(m, key) for m in modules.values()} for key in ("variant", "group_size")}
        mixed = [key for key, values in shared.items() if len(values) > 1]
        if mixed:
            raise NotSupported(f"PEFT's RoAd config holds one {mixed[0]} for all modules; this adapter has "
                               f"{sorted(shared[mixed[0]])}: save its parts as separate adapters")
        return {"peft_type": "ROAD", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "target_modules": sorted(modules), "variant": shared["variant"].pop(),
                "group_size": shared["group_size"].pop(), "init_weights": True, "modules_to_save": None,
                "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, d_out={self.d_out}, variant={self.variant}, group_size={self.group_size}"
