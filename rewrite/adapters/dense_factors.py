"""Exact low-rank factors of a dense adapter update: the view in which the unmerged exports switch LoKr and FourierFT.

The unmerged lowerings (ort-adapters per run; bank and custom-op per row) switch an additive adapter as
delta(x) = x A B, A [d_in, k], B [k, d_out], the scale folded into B. A kind whose update is a dense delta W
[d_out, d_in] built from small factors gives them at its numerical rank k, computed in float64:

    M = U S V^T (SVD),   k = #{i : sigma_i > tol},   tol = sigma_max * max(rows, cols) * eps(float32)
    A = U_k sqrt(S_k),   B = sqrt(S_k) V_k^T          A B = M up to the dropped sigma_i <= tol

The tolerance is LAPACK's (numpy's `matrix_rank`) with float32's eps, because the exported model computes in float32:
rounding delta W to float32 already perturbs it by about max(rows, cols) eps32 ||delta W||_2 in spectral norm, so a
singular value below tol is rounding noise of the update as it is served, and dropping it changes x delta W^T by no
more than that rounding does. sqrt(S) goes to both sides so A and B have like magnitudes (a float16 bank keeps both).

The factors are the export view only: the kinds that give them stay `low_rank = False`, so `allocate` refuses them,
`fuse` leaves them inline and `combine` refuses them (neither is a LoRA with trainable A, B). A zero update (k = 0)
gives one zero column (a bank slot needs one). Past k = min(d_in, d_out) / 2 the factors hold more numbers than
delta W itself and x A B costs more than x delta W^T: that warns, since a merged export is then cheaper.
"""
from __future__ import annotations

import warnings

import torch


def rank_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rows, k], B [k, cols]) in float64 with A B = `matrix` at its numerical rank k (module docstring)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    tol = s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps
    k = int((s > tol).sum())
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def export_factors(kind: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported (A [d_in, k], B [k, d_out]) in `dtype`, from exact factors; warns where merging is cheaper."""
    d_in, k, d_out = a.shape[0], a.shape[1], b.shape[1]
    if k > min(d_in, d_out) / 2:
        warnings.warn(f"{kind}: the update of a {d_out} x {d_in} site has rank {k} > min(d_in, d_out) / 2 = "
                      f"{min(d_in, d_out) / 2:g}; switching it unmerged costs more than the dense weight (a merged "
                      "export is cheaper where one adapter per model serves)", stacklevel=2)
    if k == 0:
        a, b = a.new_zeros(d_in, 1), b.new_zeros(1, d_out)
    return a.to(dtype), b.to(dtype)


def dense_factors(kind: str, delta_t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a dense update given as delta W^T [d_in, d_out] (scale included), by its SVD."""
    return export_factors(kind, *rank_factors(delta_t), dtype)
