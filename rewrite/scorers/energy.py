"""energy: no data; the energy of the adapter's own update, for compressing an adapter that is already trained.

    Delta = s A B  (conv2d: s B_mat A_mat on flattened kernels),  sigma_i = sigma_i(Delta),
    v(r) = sum_{i<=r} sigma_i^2            (flat beyond rank(Delta); v(r_max) = ||Delta||_F^2)

Truncating a site to rank r by SVD (`LoRA.resize`) keeps exactly v(r) and loses ||Delta - Delta_r||_F^2 =
||Delta||_F^2 - v(r) (Eckart-Young). Curves are not normalised per site (normalize = "none" by default), so
one unit of update energy is worth the same everywhere: under unit costs per rank the solver keeps the
globally largest singular values, the best a budget allows. The SVD is exact and cheap, from QR of the
factors: A = Qa Ra, B^T = Qb Rb, sigma(A B) = sigma(Ra Rb^T), O((fan_in + d_out) r^2) per site.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.scorers import Curves, ScoreContext, Scorer, spectral_curves


def update_spectrum(adapter: nn.Module) -> torch.Tensor:
    """Singular values of the adapter's update s A B (float64, descending); all zero for a fresh adapter."""
    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    if adapter.op == "conv2d":  # A [r, c_in, kh, kw], B [c_out, r, 1, 1]: the product is B_mat A_mat
        a, b = b.flatten(1), a.flatten(1)
    ra = torch.linalg.qr(a, mode="r").R
    rb = torch.linalg.qr(b.T, mode="r").R
    return torch.linalg.svdvals(ra @ rb.T) * abs(adapter.scaling)


def update_kept(spectra: dict[str, torch.Tensor],
                ranks: dict[str, int]) -> tuple[dict[str, float | None], float | None]:
    """The share of each site's update energy ||s A B||_F^2 that SVD truncation to its rank keeps (None: no update),
    and the share of the sum over sites (None: no site has an update)."""
    kept = {owner: float((sigma[:ranks[owner]] ** 2).sum()) for owner, sigma in spectra.items()}
    total = {owner: float((sigma ** 2).sum()) for owner, sigma in spectra.items()}
    shares = {owner: kept[owner] / total[owner] if total[owner] > 0 else None for owner in spectra}
    whole = sum(total.values())
    return shares, (sum(kept.values()) / whole if whole > 0 else None)


class EnergyScorer(Scorer):
    name = "energy"

    def __call__(self, ctx: ScoreContext) -> Curves:
        return spectral_curves(ctx, lambda t: update_spectrum(t.adapter), "s A B", "none")
