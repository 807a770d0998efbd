"""LoHa (LyCORIS; FedPara's low-rank Hadamard product), as PEFT's `LoHaConfig` builds it on linear and conv2d sites.

    delta W = s * (B1 A1) (.) (B2 A2)        s = alpha / r        y = base(x) + x delta W^T (conv2d: as a kernel)

    hada_w1_a = B1 [d_out, r]    hada_w1_b = A1 [r, fan_in]    hada_w2_a = B2 [d_out, r]    hada_w2_b = A2 [r, fan_in]

fan_in = d_in, or c_in kh kw on conv2d sites (delta W [c_out, c_in kh kw] viewed as the kernel). The names are the
parameters' and PEFT's keys (`base_model.model.<module>.hada_w1_a`, ...; rewrite/adapters/lycoris.py has what LoHa
and LoKr share: forward, merge, PEFT config). Init (PEFT's default, init_weights = true): B1, A1, B2
kaiming-uniform (U(+-1/sqrt(fan_in of the tensor))), A2 = 0, so delta W = 0 at insert.
Merge (exact): W += delta W in the base weight's layout; unmerge subtracts it.

Low-rank view (exact): (B1 A1) (.) (B2 A2) = P Q with the row-wise Khatri-Rao product P[o, (i, j)] = B1[o, i] B2[o, j]
[d_out, r^2] and the column-wise one Q[(i, j), f] = A1[i, f] A2[j, f] [r^2, fan_in]: a LoRA of rank r^2, `lora_A` =
Q^T [d_in, r^2], `lora_B` = P^T [r^2, d_out] (conv2d: LoRA's conv layout), `scaling` = s. Unmerged exports switch
LoHa adapters through it (linear sites), and the energy scorer reads the spectrum of delta W from it.

Resize (`resize(rank, keep)`, what `allocate` calls): component i is the pair of rank-1 terms (B1[:, i] A1[i],
B2[:, i] A2[i]); keeping components K keeps the Hadamard terms (i, j) in K x K. s is kept (alpha = s r).
New components have A1[i] = A2[i] = 0 (B1, B2 kaiming): both Hadamard factors, hence delta W, are unchanged.
Hazard for `allocate`: its cost model prices rank r as a LoRA's, r (d_in + d_out) parameters, half of LoHa's
2 r (d_in + d_out) (`fraction` budgets are unaffected, absolute ones count LoHa at half its size), and its energy
scorer values rank r by the top r singular values of delta W, which is what an SVD truncation keeps, not `resize`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rewrite.adapters.base import LowRank
from rewrite.adapters.lora import kept_components, orthogonal_factors
from rewrite.adapters.lycoris import LycorisDelta, LycorisPeftConfig, lycoris_config, refuse_tucker
from rewrite.formats.peft_dir import PeftFormat

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_FORMAT = PeftFormat("LOHA", LycorisPeftConfig, (FACTORS, (*FACTORS, "hada_t1", "hada_t2")),
                         check=refuse_tucker)


class LoHa(LycorisDelta, LowRank):
    kind = "loha"
    inits = ("zeros",)
    resizable = True
    peft_format = LOHA_FORMAT

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: (self.d_out, self.rank) if name.endswith("_a") else (self.rank, self.fan_in) for name in FACTORS}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name in FACTORS[:3]:
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        self.hada_w2_b.zero_()

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B1, A1), (B2, A2)."""
        return [(self.hada_w1_a, self.hada_w1_b), (self.hada_w2_a, self.hada_w2_b)]

    def delta_matrix(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def _khatri_rao(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P [d_out, r^2], Q [r^2, fan_in] with P Q = (B1 A1) (.) (B2 A2)."""
        (b1, a1), (b2, a2) = self._pairs()
        p = (b1[:, :, None] * b2[:, None, :]).reshape(self.d_out, -1)
        q = (a1[:, None, :] * a2[None, :, :]).reshape(-1, self.fan_in)
        return p, q

    @property
    def lora_A(self) -> torch.Tensor:
        q = self._khatri_rao()[1]
        return q.view(-1, self.d_in, *self.kernel) if self.op == "conv2d" else q.T

    @property
    def lora_B(self) -> torch.Tensor:
        p = self._khatri_rao()[0]
        return p.view(self.d_out, -1, 1, 1) if self.op == "conv2d" else p.T

    @torch.no_grad()
    def resize(self, rank: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        """Change the rank physically: new factor Parameters of the new shape (optimizers must be rebuilt).

        `keep` lists the components to keep (module docstring), in order, or is a bool mask over the current
        rank; at most `rank` of them. They fill the first slots; the others are new zero-delta components.
        With `keep=None`:
          - growing keeps every component and appends new ones (delta W unchanged);
          - shrinking an adapter whose delta W is zero (freshly inserted) keeps the first `rank` components as
            they are (their init is preserved);
          - shrinking a non-zero adapter first re-factors each Hadamard factor B_k A_k exactly into orthogonal
            components sorted by singular value (as `LoRA.resize` does), then keeps the top `rank` of each: each
            factor becomes its best rank-`rank` approximation, so delta W is unchanged while neither factor has a
            rank above `rank`, and otherwise approximated factor by factor (not the best LoHa of that rank).
        s = `scaling` is unchanged (alpha = s rank). Rank 0 drops the branch instead (unwire + drop_adapter).
        """
        if rank < 1:
            raise ValueError(f"loha rank must be >= 1, got {rank}; rank 0 drops the branch (unwire + drop_adapter)")
        keep_idx = kept_components(keep, self.rank, rank)
        if keep is None and rank == self.rank:
            return
        meta = self.hada_w1_a.is_meta
        pairs = [(b.detach(), a.detach()) for b, a in self._pairs()]
        if keep is None and rank < self.rank and not meta and bool(self.delta_matrix().any()):
            pairs = [orthogonal_factors(b, a) for b, a in pairs]  # min(r, d_out, fan_in) components, best first
            keep_idx = keep_idx[:pairs[0][0].shape[1]]
        scale, grads = self.scaling, [p.requires_grad for p in self.peft_tensors().values()]
        self.rank, self.alpha = rank, scale * rank
        self._make_factors(dtype=self.hada_w1_a.dtype, device=self.hada_w1_a.device)
        if not meta:
            self.reset_parameters()
            kept = len(keep_idx)
            for (new_b, new_a), (old_b, old_a) in zip(self._pairs(), pairs):
                new_b[:, :kept] = old_b[:, keep_idx]
                new_a[:kept] = old_a[keep_idx]
            self.hada_w1_b[kept:] = 0.0  # new components: A1 = A2 = 0 (A2 is zero from reset_parameters)
        for param, grad in zip(self.peft_tensors().values(), grads):
            param.requires_grad_(grad)

    @classmethod
    def peft_config(cls, modules) -> dict:
        return lycoris_config("LOHA", modules)
