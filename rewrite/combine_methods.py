"""Merge arithmetic: one low-rank update from several, as PEFT's `add_weighted_adapter` (0.21.2) computes it.

Everything here is in the weight layout (PEFT's): input t at a site is

    A_t [r_t, n]   B_t [d_out, r_t]   scale s_t   weight w_t        delta W_t = D_t = s_t B_t A_t  [d_out, n]

(n = fan_in: d_in, or c_in kh kw on conv2d), and the result (A, B) has scale 1: delta W = B A.

    cat           A = [w_1 s_1 A_1; ...; w_T s_T A_T] (stacked rows), B = [B_1, ..., B_T] (side by side)
                  B A = sum_t w_t s_t B_t A_t exactly, rank sum_t r_t
    factor methods (equal ranks): the same merge of the A's and, separately, of the B's (never of the deltas),
                  with weights a_t = sign(w_t s_t) sqrt|w_t s_t| on A (sign(0) = +1), b_t = sqrt|w_t s_t| on B
        linear             A = sum_t a_t A_t                B A has cross terms b_u a_t B_u A_t (u != t)
        magnitude_prune    A = sum_t a_t trim(A_t)
        ties               A = disjoint({trim(A_t)}, a)
        dare_linear        A = sum_t a_t drop(A_t)
        dare_ties          A = disjoint({drop(A_t)}, a)
    svd methods: the merge of the deltas D_t with the weights w_t, then re-compressed
        svd = linear on the deltas (D = sum_t w_t D_t); ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
        D = U S V^T,  B = U_k S_k,  A = V_k^T,  ||D - B A||_F = sqrt(sum_{i>k} sigma_i^2)   (Eckart-Young)
        k = `rank` (at most the number of singular values), or with `energy` the least k with
        sum_{i<=k} sigma_i^2 >= energy sum_i sigma_i^2

    trim(X)            keeps the floor(density numel(X)) entries of largest |X|, zeros the rest
    drop(X)            X (.) M / density, M_ij ~ Bernoulli(density) i.i.d.                    (DARE)
    disjoint({X_t}, c) gamma = sign(sum_t X_t) ("total") or sign(sum_t sign(X_t)) ("frequency"), +1 where 0;
                       keep_t = [sign(X_t) = gamma]; sum_t c_t X_t keep_t / max(1, sum_t keep_t)   (TIES)
    density >= 1 prunes nothing.

DARE draws its masks from the `generator` it is given, in PEFT's order: per site, for factor methods one mask per
A_t (shape [r_t, n]) then one per B_t ([d_out, r_t]); for svd methods one per D_t in the base weight's own layout
([d_out, n], or [n, d_out] where the weight is stored so: Conv1D, embedding, `fan_in_first`); each in row-major
order. PEFT draws the same masks when its draws come from a generator seeded alike (it draws from torch's global
generator, after initialising the new adapter's weights from it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CAT = "cat"
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (CAT, *FACTOR_METHODS, *SVD_METHODS)
TRIMMING = ("ties", "magnitude_prune")
RANDOM = ("dare_linear", "dare_ties")
PRUNING = (*TRIMMING, *RANDOM)  # the merges that read `density`
ELECTING = ("ties", "dare_ties")  # the merges that read `sign_method`


def merge_of(method: str) -> str:
    """The merge a method applies (to factors or to deltas): "svd" is linear on the deltas, "x_svd" is x."""
    return "linear" if method == "svd" else method.removesuffix("_svd")


@dataclass(frozen=True)
class Term:
    """One input at one site, in the weight layout: delta W = scale * b @ a."""
    a: torch.Tensor  # [r, n]
    b: torch.Tensor  # [d_out, r]
    scale: float
    weight: float


@dataclass(frozen=True)
class Merge:
    """The settings of the merges that prune (`density`), elect signs (`sign_method`) or draw masks (`generator`)."""
    density: float = 1.0
    sign_method: str = "total"
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Combined:
    """The new update delta W = b @ a (scale 1); svd methods also give ||D||_F and the error ||D - b @ a||_F."""
    a: torch.Tensor
    b: torch.Tensor
    norm: float | None = None
    error: float | None = None


def combine(method: str, terms: list[Term], merge: Merge, *, rank: int | None = None, energy: float | None = None,
            fan_in_first: bool = False) -> Combined:
    """The combined update of `terms` by `method` (module docstring); svd methods keep `rank` or `energy` and merge
    the deltas in the base weight's own layout, [n, d_out] where it is stored `fan_in_first` (Conv1D, embedding)."""
    if method == CAT:
        return concatenate(terms)
    if method in FACTOR_METHODS:
        return merge_factors(method, terms, merge)
    if method == "svd":  # the sum of deltas is the cat's B A: its SVD from the factors, no dense matrix
        cat = concatenate(terms)
        u, s, vh = factored_svd(cat.b, cat.a)
    else:
        deltas = [t.scale * (t.b @ t.a) for t in terms]
        if fan_in_first:
            deltas = [d.T for d in deltas]
        merged = merge_tensors(merge_of(method), deltas, [t.weight for t in terms], merge)
        if fan_in_first:
            merged = merged.T
        u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    return truncate(u, s, vh, rank, energy, terms[0].a.dtype)


def concatenate(terms: list[Term]) -> Combined:
    """cat: A = [w_t s_t A_t] stacked, B = [B_t] side by side."""
    return Combined(torch.cat([t.a * (t.weight * t.scale) for t in terms], 0), torch.cat([t.b for t in terms], 1))


def merge_factors(method: str, terms: list[Term], merge: Merge) -> Combined:
    """Factor methods (equal ranks): the A's merged with weights sign(w s) sqrt|w s|, then the B's with sqrt|w s|."""
    root = [abs(t.weight * t.scale) ** 0.5 for t in terms]
    signed = [r if t.weight * t.scale >= 0 else -r for r, t in zip(root, terms)]
    a = merge_tensors(method, [t.a for t in terms], signed, merge)
    return Combined(a, merge_tensors(method, [t.b for t in terms], root, merge))


def merge_tensors(method: str, tensors: list[torch.Tensor], weights: list[float], merge: Merge) -> torch.Tensor:
    """One merge of same-shaped tensors: linear, magnitude_prune, ties, dare_linear or dare_ties."""
    if method in TRIMMING:
        tensors = [trim(x, merge.density) for x in tensors]
    elif method in RANDOM:
        tensors = [drop(x, merge.density, merge.generator) for x in tensors]
    if method in ELECTING:
        return disjoint(tensors, weights, merge.sign_method)
    return sum(w * x for w, x in zip(weights, tensors))


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the floor(density numel) entries of largest magnitude."""
    if density >= 1:
        return x
    keep = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    keep[x.abs().flatten().topk(int(density * x.numel())).indices] = 1
    return x * keep.view_as(x)


def drop(x: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale the survivors by 1 / density."""
    if density >= 1:
        return x
    mask = torch.bernoulli(torch.full(x.shape, density), generator=generator)
    return x * mask.to(x) / density


def disjoint(tensors: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    """TIES: elect a sign per entry, average the weighted entries that agree with it."""
    stacked = torch.stack(tensors)
    signs = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(stacked)
    scaled = stacked * torch.tensor(weights).to(stacked).view(-1, *[1] * (stacked.dim() - 1))
    return (scaled * agree).sum(0) / agree.sum(0).clamp(min=1)


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of b @ a (float64) from QR of the factors: b = Qb Rb, a^T = Qa Ra, Rb Ra^T = U' S V'^T,
    so b a = (Qb U') S (V'^T Qa^T). O((d_out + n) r^2), and S holds every non-zero singular value."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def kept_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """`rank` capped at len(s), or the least k whose top k singular values hold `energy` of sum sigma^2 (>= 1)."""
    if energy is None:
        return min(rank, len(s))
    power = s.square().cumsum(0)
    return min(int(torch.searchsorted(power, energy * power[-1])) + 1, len(s))


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None, energy: float | None,
             dtype: torch.dtype) -> Combined:
    """B = U_k S_k, A = V_k^T, with ||D||_F and the error sqrt(sum_{i>k} sigma_i^2)."""
    k = kept_rank(s, rank, energy)
    power = s.square()
    return Combined(vh[:k].to(dtype), (u[:, :k] * s[:k]).to(dtype), norm=float(power.sum().sqrt()),
                    error=float(power[k:].sum().sqrt()))
