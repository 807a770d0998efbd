"""Full: a trained copy of a layer's weight and bias, PEFT's `modules_to_save` (every tuner's config may name modules
to train whole; the SEQ_CLS, TOKEN_CLS and QUESTION_ANS task types add the head themselves). Kept as deltas on the
site's own tensors, in the base op's layout:

    linear      y' = x (W + dW)^T + (b + db)            W [d_out, d_in]
    conv1d      y' = x (Wc + dWc) + (b + db)            Wc [d_in, d_out] (GPT-2)
    conv2d      y' = conv(x, W + dW) + (b + db)         the base conv's stride, padding, dilation
    embedding   y' = (E + dE)[ids]                      E [V, d]
    y' = y + delta(x)   ("add" join: the module returns x dW^T + db, conv(x, dW) + db, dE[ids])

Init dW = db = 0 (the identity); `insert kind = "full"` trains the whole layer. Merge (additive, exact up to one
rounding of W + dW): W <- W + dW, b <- b + db; unmerge subtracts. No rank: allocate, fuse and combine refuse it.

A PEFT directory holds the trained tensors themselves (`base_model.model.<module>.weight`, `.bias`: the module's
state), converted with the base the module is built with (rewrite/adapters/trained_copy.py: copy = base + delta), so
the directory applies its trained layer whatever the base holds, as PEFT's copy does. Norm sites named by `modules_to_save` load as `ln_tuning`,
which is the same copy of a norm. A `full` module saves only beside another tuner's modules (PEFT has no tuner made of
modules_to_save alone).

Unmerged exports (linear, Conv1D sites) switch it as a `parted` kind: dW through exact factors of its dense update at
its numerical rank (rewrite/adapters/dense_factors.py: a classifier head of c classes has rank <= c) and db as a
per-output offset of the base op's output (rewrite/adapters/output_scale.py, scale 1):
    y' = (y + x A B) + db,        A B = dW^T (linear) or dWc (conv1d)
Conv2d and embedding sites must be merged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.dense_factors import dense_factors
from rewrite.adapters.output_scale import OutputScale
from rewrite.adapters.trained_copy import TrainedCopy


class FullBiasOffset(OutputScale):
    """The bias part of a `full` copy in unmerged exports: y' = y + db (scale 1)."""

    kind = "full"


class Full(TrainedCopy):
    kind = "full"
    ops = ("linear", "conv1d", "conv2d", "embedding")

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 base_weight: torch.Tensor, base_bias: torch.Tensor | None):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.conv = dict(conv or {})
        self._hold_copy(tuple(base_weight.shape), base_weight, base_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "embedding":
            return F.embedding(x, self.weight_delta)
        if self.op == "conv2d":
            return F.conv2d(x, self.weight_delta, self.bias_delta, self.conv["stride"], self.conv["padding"],
                            self.conv["dilation"])
        weight = self.weight_delta if self.op == "linear" else self.weight_delta.T
        return F.linear(x, weight, self.bias_delta)

    @torch.no_grad()
    def unmerged_parts(self, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[AdapterKind]]:
        """Exact factors of dW^T and the offset db (module docstring)."""
        if self.op not in ("linear", "conv1d"):
            raise NotSupported(f"a full (modules_to_save) copy of a {self.op} layer cannot be switched in an "
                               "unmerged export (linear and Conv1D layers can): merge it")
        delta_t = self.weight_delta.T if self.op == "linear" else self.weight_delta
        factors = dense_factors(self.kind, delta_t, self.weight_delta.dtype)
        rows = [] if self.bias_delta is None else [
            FullBiasOffset(self.op, self.d_in, torch.ones_like(self.bias_delta), None, self.bias_delta)]
        return factors, rows

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        raise NotSupported("a full copy of a layer is saved in a PEFT directory only as modules_to_save beside another "
                           "tuner's modules (PEFT has no tuner made of copies alone); merge it, or save the adapter "
                           "with a tuner module beside it")

    def extra_repr(self) -> str:
        return f"op={self.op}, weight={tuple(self.weight_delta.shape)}, bias={self.bias_delta is not None}"
