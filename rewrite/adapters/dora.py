"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), as PEFT's `LoraConfig(use_dora=True)` computes it.

    W' = m (.) (W + s B A) / n,    n = ||W + s B A||_c  (per output: the norm of that output's weights),
    s = alpha / r  (rsLoRA: alpha / sqrt(r))

n carries no gradient (PEFT's `weight_norm.detach()`, the paper's section 4.3). A LoRA (A, B, s, shared resize)
plus a magnitude vector m [d_out], init m = n at insert (B = 0 there, so m = ||W||_c and W' = W: the identity).
The module reads the site's base weight W: it is built with it (m's init) and called as delta(x, W, y0, b) ("add"
join, `reads_weight`, `reads_output`: y0 the base op's output, b its bias), with c = m / n and x through dropout (none
on embedding ids):

    y' = y + (c - 1) (.) base(x, W) + c (.) s B(A(x))        base: the op without its bias (which stays unscaled)

which is PEFT's `(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling`. base(x, W) = y0 - b,
as PEFT's `base_result - bias`: the base matmul runs once; only with dropout active in training is it run again on
the dropped x (PEFT does the same). Outputs and norms per
base op, in its own weight layout:
    linear  W [d_out, d_in]  norm over d_in          conv1d (GPT-2)  W [d_in, d_out]  norm over d_in
    conv2d  W [c_out, ...]   norm over the rest      embedding       W [V, d]         norm over V (PEFT's choice)

Merge (exact): W <- (m / n) (.) (W + s B A), the bias unchanged. The merged weight's own norm is m, so the n of the
unmerged W cannot be read back from it: `merge_into` keeps n (PEFT caches it as well) and `unmerge_from` restores
W <- W / (m / n) - s B A. The norm is the base weight's: DoRA merges alone at its site, or before other adapters there.
Not low-rank (delta(x) is not x A B), but `parted`: with g = m / n a constant vector once trained,

    y' = g (.) (y0 - b + s x A B) + b = g (.) (y0 + x A (s B)) + (1 - g) (.) b

so unmerged exports (linear and Conv1D sites) switch it as LoRA factors (A, s B), added to the base output, and an
output scale (`DoraScale`: g, identity 1, and h = (1 - g) (.) b, identity 0) applied to that sum; n is the norm of
the exported base weight. Embedding and conv2d sites must be merged. Our LoRA adapter file has no magnitude: save
as PEFT.
Resizing (allocate) changes A and B as LoRA's and keeps m.

PEFT: a LORA directory with `use_dora = true`; per module LoRA's `lora_A.weight` [r, d_in], `lora_B.weight`
[d_out, r] (embedding: `lora_embedding_A` [r, V], `lora_embedding_B` [d, r]) and `lora_magnitude_vector` [d_out]
(conv2d [1, c_out, 1, 1]).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import StrictBool
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.lora import IDENTITY_INITS, LoRA
from rewrite.adapters.output_scale import OutputScale
from rewrite.formats.peft_dir import PeftFormat
from rewrite.formats.peft_lora import EMBEDDING_KEYS, LINEAR_KEYS, LORA_FORMAT, LoraPeftConfig

MAGNITUDE = "lora_magnitude_vector"


class DoraPeftConfig(LoraPeftConfig):
    """`adapter_config.json` of a DoRA adapter: LoRA's, with `use_dora = true` (the same variants refused)."""

    unsupported: ClassVar[dict[str, str]] = {key: what for key, what in LoraPeftConfig.unsupported.items()
                                             if key != "use_dora"}

    use_dora: StrictBool = True


DORA_FORMAT = PeftFormat("LORA", DoraPeftConfig, ((*LINEAR_KEYS, MAGNITUDE), (*EMBEDDING_KEYS, MAGNITUDE)),
                         check=LORA_FORMAT.check, accepts=lambda raw: raw.get("use_dora") is True)


class DoraScale(OutputScale):
    """DoRA's output part in unmerged exports: g = m / n (module docstring)."""

    kind = "dora"


class DoRA(LoRA):
    kind = "dora"
    reads_weight = True
    reads_output = True
    inits = IDENTITY_INITS  # LoRA's inits that rewrite the base weight (PiSSA, OLoRA) are not DoRA's
    weight_inits = ()
    low_rank = False
    parted = True
    peft_format = DORA_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int, alpha: float, *, weight: torch.Tensor,
                 **settings: Any):
        super().__init__(op, d_in, d_out, rank, alpha, **settings)
        self.magnitude = nn.Parameter(self.column_norm(weight).to(self.lora_A.dtype))
        self.merged_norm: torch.Tensor | None = None  # n of the weight merge_into changed, for unmerge_from

    # What LoRA does and DoRA cannot: switching as x A B, and our adapter file (LoRA tensors only, no magnitude).
    factors = AdapterKind.factors
    adapter_file_entry = AdapterKind.adapter_file_entry
    adapter_file_shapes = AdapterKind.adapter_file_shapes
    load_adapter_file_entry = AdapterKind.load_adapter_file_entry

    def _output_axis(self) -> int:
        """The base weight's output axis: linear and conv2d weights lead with it, Conv1D and embedding end with it."""
        return 0 if self.op in ("linear", "conv2d") else 1

    def _along_outputs(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-output vector shaped to scale a base weight of `ndim` dimensions along its output axis."""
        return vector.view([-1 if axis == self._output_axis() else 1 for axis in range(ndim)])

    @torch.no_grad()
    def column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s B A||_c [d_out], without gradient."""
        adapted = weight.detach() + self.delta_weight().to(weight.dtype)
        return torch.linalg.vector_norm(adapted, dim=[a for a in range(adapted.ndim) if a != self._output_axis()])

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The site's op on x with weight W and no bias."""
        if self.op == "linear":
            return F.linear(x, weight)
        if self.op == "conv1d":
            return x @ weight
        if self.op == "embedding":
            return F.embedding(x, weight)
        return F.conv2d(x, weight, None, self.conv["stride"], self.conv["padding"], self.conv["dilation"])

    def forward(self, x: torch.Tensor, weight: torch.Tensor, base_output: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        x = x if self.op == "embedding" else self.dropout(x)
        scale = self.magnitude / self.column_norm(weight)
        if self.op == "conv2d":
            scale = scale[:, None, None]  # outputs [N, c_out, H, W]
        if base_output is None or dropped:  # the base op saw the undropped x: run it again on the dropped one
            base = self._base_op(x, weight)
        else:
            base = base_output if bias is None else base_output - (bias[:, None, None] if self.op == "conv2d" else bias)
        return (scale - 1) * base + scale * self.branch(x)

    @torch.no_grad()
    def unmerged_parts(self, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[AdapterKind]]:
        """LoRA factors (A, s B) and the output scale g = m / ||W + s B A||_c (module docstring)."""
        if self.op not in ("linear", "conv1d"):
            raise NotSupported(f"unmerged export switches {self.kind} on linear and Conv1D sites (LoRA factors and an "
                               f"output scale); its magnitude on {self.op} sites must be merged")
        scale = self.magnitude.double() / self.column_norm(weight.double())
        return LoRA.factors(self), [DoraScale(self.op, self.d_in, scale.to(self.magnitude.dtype), bias)]

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None = None, sign: float = 1.0) -> None:
        """W <- (m / n) (.) (W + s B A), keeping n for `unmerge_from`; the bias stays."""
        if sign < 0:
            self.unmerge_from(weight, bias)
            return
        if weight.is_meta:
            return
        super().merge_into(weight)  # W + s B A in place: one product, no temporary of W's size
        self.merged_norm = torch.linalg.vector_norm(weight, dim=[a for a in range(weight.ndim)
                                                                 if a != self._output_axis()])
        weight.mul_(self._merge_factor(weight))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """W <- W / (m / n) - s B A, with the n that `merge_into` kept."""
        if weight.is_meta:
            return
        if self.merged_norm is None:
            raise NotSupported(f"{self.kind} adapters unmerge only from a weight they merged into (the norm of the "
                               "unmerged weight is kept then); restore the original weight instead")
        weight.div_(self._merge_factor(weight))
        super().merge_into(weight, sign=-1.0)
        self.merged_norm = None

    def _merge_factor(self, weight: torch.Tensor) -> torch.Tensor:
        return self._along_outputs(self.magnitude.detach() / self.merged_norm, weight.ndim).to(weight.dtype)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        magnitude = self.magnitude.view(1, -1, 1, 1) if self.op == "conv2d" else self.magnitude
        return {**super().peft_tensors(), MAGNITUDE: magnitude}

    @classmethod
    def peft_config(cls, modules) -> dict:
        return {**super().peft_config(modules), "use_dora": True}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, magnitude={self.magnitude.numel()}"
