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
Not low-rank (rank w1 x rank w2, up to full rank): unmerged exports refuse it. Not resizable: the rank only sets
which factors are split and at what rank, and a site's parameter count is flat in it once w2 is full, so
`allocate` (which prices rank r at r (d_in + d_out)) cannot allocate it.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import StrictBool, StrictInt
from torch import nn

from rewrite.adapters.base import NotSupported
from rewrite.adapters.lycoris import LycorisDelta, LycorisPeftConfig, lycoris_config, module_settings
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
LOKR_FORMAT = PeftFormat("LOKR", LoKrPeftConfig, tuple(w1 + w2 for w1 in W1_LAYOUTS for w2 in W2_LAYOUTS))
ZERO_AT_INIT = ("lokr_w1", "lokr_w1_a")


class LoKrOptions(Strict):
    decompose_both: bool = False  # also split w1 into w1_a w1_b of rank r (when r < max(a, c) / 2)
    decompose_factor: int = -1    # the first factor of each dimension's split (-1: nearest the square root)


class LoKr(LycorisDelta):
    kind = "lokr"
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

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if "lokr_w1" in self.factor_names else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        """w2 as a matrix [b, e kh kw]."""
        return self.lokr_w2.flatten(1) if "lokr_w2" in self.factor_names else self.lokr_w2_a @ self.lokr_w2_b

    def delta_matrix(self) -> torch.Tensor:
        return torch.kron(self._w1(), self._w2())

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
