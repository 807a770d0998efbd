"""HRA: Householder reflection adaptation (Yuan et al. 2024), as PEFT 0.21's `HRAConfig` builds it: a chain of r
reflections of unit vectors u_0 .. u_(r-1) (columns of U [d_in, r], each normalised) multiplies the weight from the
right, which is a rotation of the layer's input.

    H_i = I - 2 u_i u_i^T / ||u_i||^2        R = H_0 H_1 ... H_(r-1)  [d_in, d_in]  (orthogonal)
    W' = W R                                  y' = x R^T W^T + b = base(x R^T)   (x a row vector)

so the module maps x to x R^T = x H_(r-1) ... H_0 (r rank-1 updates x <- x - 2 (x.u) u, H_(r-1) first) before the
base op ("input" join); the bias is untouched. `apply_GS` (Gram-Schmidt): the columns of U are first orthonormalised
into Q and R = I - 2 Q Q^T (Q Q^T, the projector onto the span of U, is all that counts: a QR decomposition gives it).
Init (PEFT's `init_weights = true`): r/2 random columns, each repeated twice (u, u, v, v, ...): H(u) H(u) = I, so
R = I, the identity. Neither an odd r nor apply_GS can start there (I - 2 Q Q^T is never I): odd r is refused, and
apply_GS is a constructor keyword that only `load` sets (from a trained PEFT directory), not an insert option.
Merge (linear W [d_out, d_in], in float64): W <- W R; unmerge W <- W R^T (R orthogonal).
PEFT: key `base_model.model.<module>.hra_u` [d_in, r] = U; config `r` (one for every module), `apply_GS`.
Refused: a `bias` other than "none", an odd r. Linear sites (PEFT's Conv2d HRA rotates unfolded patches, which an
input join cannot: not implemented). Not low-rank, no resize (the reflections are a product, not a sum of
components): allocate refuses it.
Unmerged (`rowwise`, join "input"): the r reflections at once (compact form). With v_0 .. v_(r-1) the unit vectors in
the order x meets them (u_(r-1) first), x_(k+1) = x_k - 2 c_k v_k where c_k = x_k . v_k = x . v_k - 2 sum_(j<k) c_j
(v_j . v_k), so c = (x V^T) M with M = (I + 2 N)^-1, N_jk = v_j . v_k for j < k (unit triangular: always invertible):
    x' = x - 2 ((x V^T) M) V          row vectors v = flatten(V) [r d_in] and m = flatten(M) [r r], both identity 0
(v = 0 gives x' = x whatever m); apply_GS is the same form with V = Q^T and M = I. Layout: reflections = r. Per row
three batched MatMuls; per run (ort-adapters) the same sums as products of v and m with a spread x.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt, StrictStr
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import PEFT_VERSION, OrthogonalPeftConfig, shared_setting
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftFormat

HRA_KEY = "hra_u"


class HRAPeftConfig(OrthogonalPeftConfig):
    expected: ClassVar[dict[str, str]] = {**OrthogonalPeftConfig.expected, "r": "a whole number >= 1",
                                          "apply_GS": "true or false"}

    peft_type: StrictStr = "HRA"
    r: StrictInt = Field(default=8, ge=1)
    apply_GS: StrictBool = False


def _check_hra(adapter: PeftAdapter) -> None:
    r = adapter.config.r
    if r % 2:
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'r' = {r} is odd; HRA adapters start from the identity "
                               "with reflections in pairs, so only an even r is supported")
    for module, parts in adapter.modules.items():
        shape = parts[HRA_KEY].shape
        if len(shape) != 2 or shape[1] != r:
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r}: {HRA_KEY} has shape {shape}; "
                                   f"expected [d_in, r] with r = {r} ('r' of {CONFIG})")


HRA_FORMAT = PeftFormat("HRA", HRAPeftConfig, ((HRA_KEY,),), check=_check_hra)


class HRA(AdapterKind):
    kind = "hra"
    ops = ("linear",)
    join = "input"
    settings = ("rank",)
    inits = ("paired",)
    mergeable = True
    rowwise = True
    peft_format = HRA_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 8, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "paired", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", apply_GS: bool = False):
        super().__init__()
        if rank < 2 or rank % 2:
            raise NotSupported(f"hra: rank = {rank}; its reflections start in equal pairs (the identity), so the rank "
                               "(the number of reflections) must be even and >= 2")
        self.op, self.d_in, self.d_out, self.rank = op, d_in, d_out, rank
        self.apply_GS = apply_GS
        self.hra_u = nn.Parameter(torch.empty(d_in, rank, dtype=dtype, device=device))
        self._paired_init()

    @torch.no_grad()
    def _paired_init(self) -> None:
        """Columns u, u, v, v, ...: each pair of equal reflections cancels (PEFT's kaiming-uniform halves)."""
        if self.hra_u.is_meta:
            return
        half = self.rank // 2
        bound = 1 / math.sqrt(half)
        self.hra_u.copy_(torch.empty(self.d_in, half).uniform_(-bound, bound).repeat_interleave(2, dim=1))

    def _unit_vectors(self, dtype: torch.dtype) -> torch.Tensor:
        """The columns of U normalised; orthonormalised in order with `apply_GS`."""
        u = self.hra_u.to(dtype)
        if self.apply_GS:
            return torch.linalg.qr(u).Q
        return u / u.norm(dim=0)

    def _reflect(self, rows: torch.Tensor, transposed: bool) -> torch.Tensor:
        """rows R (H_0 applied first), or rows R^T (H_(r-1) first) with `transposed`, for rows [..., d_in]."""
        units = self._unit_vectors(rows.dtype)
        if self.apply_GS:  # R = I - 2 Q Q^T is symmetric
            return rows - 2 * (rows @ units) @ units.T
        for i in (reversed(range(self.rank)) if transposed else range(self.rank)):
            unit = units[:, i]
            rows = rows - 2 * (rows @ unit)[..., None] * unit
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reflect(x, transposed=True)

    @torch.no_grad()
    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        units = self._unit_vectors(torch.float64).T  # [r, d_in]
        eye = torch.eye(self.rank, dtype=torch.float64, device=units.device)
        if self.apply_GS:
            compact = eye
        else:
            units = units.flip(0)  # V: H_(r-1) meets x first
            compact = torch.linalg.inv(eye + 2 * torch.triu(units @ units.T, 1))
        return {"v": (units.flatten().to(self.hra_u.dtype), 0.0), "m": (compact.flatten().to(self.hra_u.dtype), 0.0)}

    def row_layout(self) -> dict:
        return {"reflections": self.rank}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, *, reflections: int) -> torch.Tensor:
        """x' = x - 2 ((x V^T) M) V: v [rows or 1, 1, r d_in], m [rows or 1, 1, r r] against t [rows, tokens, d_in],
        or v [r d_in], m [r r] against t [..., d_in] (ort-adapters: products with spread activations only, so they stay
        the graph inputs an adapter file feeds; see oft.rotate_blocks)"""
        v, m, width = params["v"], params["m"], t.shape[-1]
        if v.dim() == 1:
            dots = (t.unsqueeze(-2).expand(*[-1] * (t.dim() - 1), reflections, width).flatten(-2) * v)
            dots = dots.unflatten(-1, (reflections, width)).sum(-1)  # x V^T [..., r]
            c = (dots.unsqueeze(-1).expand(*[-1] * dots.dim(), reflections).flatten(-2) * m)
            c = c.unflatten(-1, (reflections, reflections)).sum(-2)  # (x V^T) M
            spread = c.unsqueeze(-1).expand(*[-1] * c.dim(), width).flatten(-2) * v
            return t - 2 * spread.unflatten(-1, (reflections, width)).sum(-2)
        units = v[:, 0].unflatten(-1, (reflections, width))  # [rows, r, d_in]
        compact = m[:, 0].unflatten(-1, (reflections, reflections))
        return t - 2 * ((t @ units.transpose(-1, -2)) @ compact) @ units

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        """W <- W R (sign > 0) or W <- W R^T (sign < 0), in float64."""
        if weight.is_meta:
            return
        weight.copy_(self._reflect(weight.double(), transposed=sign < 0))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {HRA_KEY: self.hra_u}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[HRA], dict]:
        return cls, dict(rank=adapter.config.r, apply_GS=adapter.config.apply_GS)

    @classmethod
    def peft_config(cls, modules) -> dict:
        return {"peft_type": "HRA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "peft_version": PEFT_VERSION, "target_modules": sorted(modules),
                "r": shared_setting(modules, "rank"), "apply_GS": shared_setting(modules, "apply_GS"),
                "bias": "none", "init_weights": True, "modules_to_save": None, "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, d_in={self.d_in}, reflections={self.rank}, apply_GS={self.apply_GS}"
