"""Bottleneck adapters: series (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et
al. 2020) and parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"), with the
projections, non-linearities, scaling and init of the `adapters` library (AdapterHub), on one site y = base(x):

    series    y' = y + a(y)      "output" join: after the op, before whatever follows it (the residual add, a norm)
    parallel  y' = y + a(x)      "add" join: beside the op, reading its input
    a(h) = dropout(s (U phi(D h + b_D) + b_U))

D [m, d_h], b_D [m], U [d_out, m], b_U [d_out] (nn.Linear layout), d_h the adapter's input width (series d_out,
parallel d_in), m = max(1, d_h // reduction_factor); phi = relu | gelu (erf) | silu (AdapterHub's "swish");
s = `scaling`. Init "mam_adapter": D kaiming-uniform (a = sqrt(5)), b_D = 0, U = 0, b_U = 0: the identity.
Houlsby places a series adapter after the attention output projection and after the feed-forward output projection
(target o_proj and down_proj, BERT's attention.output.dense and output.dense), Pfeiffer after the feed-forward one
only. AdapterHub's own configs also move the block's LayerNorm around the adapter (`original_ln_before`); that is
not reproduced: this is the plain residual form at the op's output.

phi sits between D and U: not mergeable and not low-rank. `merge` refuses it, and so does an unmerged (switchable)
export; a merged export keeps it inline. No rank (m follows reduction_factor): allocate refuses it. No saved form:
PEFT has no bottleneck tuner, and our adapter file holds LoRA adapters.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.options import Strict

NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
INLINE_ONLY = ("bottleneck adapters have a non-linearity between their projections: they cannot be folded into the "
               "weights, nor switched in an unmerged export (not low-rank); export them inline with "
               "[export] mode = \"merged\", which keeps them as they are")


class BottleneckOptions(Strict):
    """insert's `options` for kind = "bottleneck" (AdapterHub's SeqBnConfig defaults)."""

    reduction_factor: Annotated[StrictInt, Field(ge=1)] = 16
    non_linearity: Literal[tuple(NON_LINEARITIES)] = "relu"  # type: ignore[valid-type]
    placement: Literal["series", "parallel"] = "series"
    scaling: float = 1.0


class Bottleneck(AdapterKind):
    kind = "bottleneck"
    ops = ("linear", "conv1d")
    join = "output"  # per module: "add" for placement = "parallel"
    settings = ("dropout",)
    Options = BottleneckOptions
    inits = ("mam_adapter",)

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "mam_adapter", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", reduction_factor: int = 16,
                 non_linearity: str = "relu", placement: str = "series", scaling: float = 1.0):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.reduction_factor, self.non_linearity, self.placement, self.scaling = (
            reduction_factor, non_linearity, placement, float(scaling))
        self.join = "add" if placement == "parallel" else "output"
        width_in = d_in if placement == "parallel" else d_out
        self.width = max(1, width_in // reduction_factor)
        factory = dict(dtype=dtype, device=device)
        self.down_weight = nn.Parameter(torch.empty(self.width, width_in, **factory))
        self.down_bias = nn.Parameter(torch.zeros(self.width, **factory))
        self.up_weight = nn.Parameter(torch.zeros(d_out, self.width, **factory))
        self.up_bias = nn.Parameter(torch.zeros(d_out, **factory))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """a(h) = dropout(s (U phi(D h + b_D) + b_U))."""
        hidden = NON_LINEARITIES[self.non_linearity](F.linear(h, self.down_weight, self.down_bias))
        return self.dropout(F.linear(hidden, self.up_weight, self.up_bias) * self.scaling)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.branch(h) if self.join == "add" else h + self.branch(h)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        raise NotSupported(INLINE_ONLY)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotSupported(INLINE_ONLY)

    def adapter_file_entry(self):
        raise NotSupported("bottleneck adapters have no saved form: PEFT has no bottleneck tuner, and our adapter "
                           "file holds LoRA adapters")

    def manifest_entry(self) -> dict:
        return dict(op=self.op, scaling=self.scaling)

    def extra_repr(self) -> str:
        return (f"op={self.op}, {self.placement}, width={self.width}, non_linearity={self.non_linearity}, "
                f"scaling={self.scaling:g}")
