"""LoKr (LyCORIS): a Kronecker product added to the weight, as PEFT's `LoKrConfig` builds it on linear and conv2d sites.

    delta W = s * kron(w1, w2)        s = alpha / r (even where no factor has rank r)     y = base(x) + x delta W^T

Shapes: d_out = a b and d_in = c e, (a, b) = split(d_out), (c, e) = split(d_in) with PEFT's `factorization`
(`kron_split`; option `decompose_factor`, default -1: the divisor pair nearest the square root); w1 [a, c],
w2 [b, e] (conv2d: [b, e, kh, kw], c_in = c e, and delta W = kron(w1, w2 as [b, e kh kw]) viewed as the kernel).
Which factors are low-rank, PEFT's rule from the rank r:
    w1 = lokr_w1 [a, c],  or  lokr_w1_a [a, r] @ lokr_w1_b [r, c]    when option `decompose_both` and r < max(a, c) / 2
    w2 = lokr_w2 [b, e(, kh, kw)],  or  lokr_w2_a [b, r] @ lokr_w2_b [r, e kh kw]    when r < max(b, e) / 2
The names are the parameters' and PEFT's keys (rewrite/adapters/lycoris.py has what LoKr and LoHa share: forward,
merge, PEFT config). Init (PEFT's default, init_weights = true): lokr_w1 (or lokr_w1_a) = 0, every other factor
kaiming-uniform (U(+-1/sqrt(fan_in of the tensor))), so delta W = 0 at insert. Merge (exact): W += delta W.
Options (insert's `options`, PEFT's config fields of the same names): decompose_both, decompose_factor; one value
of each per saved adapter (PEFT has no per-module pattern for them).
Unmerged exports (linear sites) switch it through exact factors (rewrite/adapters/dense_factors.py), from the
structure rather than an SVD of delta W: rank(kron(w1, w2)) = rank(w1) rank(w2), and with w1^T = A1 B1, w2^T = A2 B2
at their numerical ranks (float64 SVDs of the small factors),
    delta W^T = s kron(w1^T, w2^T) = kron(A1, A2) (s kron(B1, B2))       A [d_in, k1 k2], B [k1 k2, d_out]
so the rank is k1 k2 <= min(a, c) min(b, e) (r or less for a split factor). Each factor's own tolerance drops only
products sigma_i(w1) sigma_j(w2) below delta W's (dense_factors.py) and may keep a product of two small ones that
delta W's would drop: exact either way, k1 k2 at least delta W's numerical rank. Up to full rank, which warns past
min(d_in, d_out) / 2 (merging is then cheaper). Conv2d sites must be merged. The factors are an export view: LoKr is
not `low_rank`. Not resizable: the rank only sets which factors are split and at what rank, and a site's parameter
count is flat in it once w2 is full, so `allocate` (which prices rank r at r (d_in + d_out)) cannot allocate it.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import StrictBool, StrictInt
from torch import nn

from rewrite.adapters.base import NotSupported
from rewrite.adapters.dense_factors import export_factors, rank_factors
from rewrite.adapters.lycoris import LycorisDelta, LycorisPeftConfig, lycoris_config, module_settings, refuse_tucker
from rewrite.formats.peft_dir import PeftFormat
from rewrite.options import Strict


def kron_split(dimension: int, factor: int) -> tuple[int, int]:
    """PEFT's `factorization`: (m, n) with m n = dimension. A `factor` > 0 that divides it gives (factor,
    dimension / factor); otherwise m is the largest divisor with m <= sqrt(dimension) and m <= factor (no bound for
    factor = -1; m = 1 for the other values below 1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else max(factor, 1)
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= bound)
    return m, dimension // m


def _kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """kron(x, y) of matrices; torch.kron fails on a rank-1 factor whose size-1 axis has a stride it cannot view."""
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1])


class LoKrPeftConfig(LycorisPeftConfig):
    """`adapter_config.json` of a LoKr adapter."""

    expected: ClassVar[dict[str, str]] = {**LycorisPeftConfig.expected, "decompose_both": "true or false",
                                          "decompose_factor": "a whole number", "rank_dropout_scale": "true or false"}
    unsupported: ClassVar[dict[str, str]] = {
        **LycorisPeftConfig.unsupported, "rank_dropout_scale": "rank_dropout_scale (rescaling under rank_dropout)"}

    decompose_both: StrictBool = False
    decompose_factor: StrictInt = -1
    rank_dropout_scale: StrictBool = False


W1_LAYOUTS = (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
W2_LAYOUTS = (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))
LOKR_FORMAT = PeftFormat("LOKR", LoKrPeftConfig, tuple(w1 + w2 for w1 in W1_LAYOUTS
                                                          for w2 in (*W2_LAYOUTS, (*W2_LAYOUTS[1], "lokr_t2"))),
                         check=refuse_tucker)
ZERO_AT_INIT = ("lokr_w1", "lokr_w1_a")


class LoKrOptions(Strict):
    decompose_both: bool = False  # also split w1 into w1_a w1_b of rank r (when r < max(a, c) / 2)
    decompose_factor: int = -1    # the first factor of each dimension's split (-1: nearest the square root)


class LoKr(LycorisDelta):
    kind = "lokr"
    factored = True
    Options = LoKrOptions
    inits = ("zeros",)
    peft_format = LOKR_FORMAT

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT's layout for this site, rank and options (module docstring)."""
        (a, b), (c, e) = kron_split(self.d_out, self.decompose_factor), kron_split(self.d_in, self.decompose_factor)
        r = self.rank
        shapes: dict[str, tuple[int, ...]] = {}
        if self.decompose_both and r < max(a, c) / 2:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            shapes.update(lokr_w1=(a, c))
        if r < max(b, e) / 2:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, e * math.prod(self.kernel)))
        else:
            shapes.update(lokr_w2=(b, e, *self.kernel))
        return shapes

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, param in self.peft_tensors().items():
            if name in ZERO_AT_INIT:
                param.zero_()
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def _matrix(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """w1 [a, c] or w2 [b, e kh kw] (`name` "lokr_w1" / "lokr_w2"), computed in `dtype` (default: the factors')."""
        split = name not in self.factor_names
        parts = [p.flatten(1).to(dtype or p.dtype) for p in
                 ([getattr(self, f"{name}_a"), getattr(self, f"{name}_b")] if split else [getattr(self, name)])]
        return parts[0] @ parts[1] if split else parts[0]

    def delta_matrix(self) -> torch.Tensor:
        return torch.kron(self._matrix("lokr_w1"), self._matrix("lokr_w2"))

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kron(A1, A2) [d_in, k1 k2], s kron(B1, B2) [k1 k2, d_out]): the module docstring's exact factors."""
        if self.op != "linear":
            raise NotSupported(f"unmerged export supports lokr on linear sites; {self.op} sites must be merged")
        a1, b1 = rank_factors(self._matrix("lokr_w1", torch.float64).T)
        a2, b2 = rank_factors(self._matrix("lokr_w2", torch.float64).T)
        return export_factors(self.kind, _kron(a1, a2), _kron(b1, b2) * self.scaling, next(self.parameters()).dtype)

    @classmethod
    def peft_config(cls, modules) -> dict:
        options = {(m.decompose_both, m.decompose_factor) for m in modules.values()}
        if len(options) > 1:
            raise NotSupported(f"lokr adapter mixes (decompose_both, decompose_factor) = {sorted(options)} across "
                               "sites; a PEFT LOKR config holds one value of each")
        both, factor = options.pop()
        return lycoris_config("LOKR", modules, decompose_both=both, decompose_factor=factor,
                              rank_dropout_scale=False)

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[LoKr], dict]:
        config: LoKrPeftConfig = adapter.config  # type: ignore[assignment]
        return cls, {**module_settings(adapter, module), "decompose_both": config.decompose_both,
                     "decompose_factor": config.decompose_factor}
