"""Per-site rank bounds for the training-time allocators: lo_k <= r_k <= hi_k (the allocate pass's
`min_rank` / `max_rank` and their `*_pattern` forms; hi_k = 0 drops the site).

AdaLoRA, masking to a budget of b triplets (`keep_within`):

    1. site k keeps its lo_k best-scoring triplets, whatever they score (equal scores: lower index first);
    2. a triplet ranked below hi_k at its site is masked, whatever it scores;
    3. the triplets in between ("free") compete across sites for the b - sum_k lo_k places left:
       tau = kthvalue(free scores, n_free - (b - sum_k lo_k)); a free triplet is kept iff S > tau
       (equal scores prune more, as in PEFT); nothing free is masked when n_free <= b - sum_k lo_k.

Within a site the free triplets are that site's next best ones, so any global cut keeps a prefix of
them: lo_k <= kept_k <= hi_k always holds. Without bounds (lo = 0, hi = r0 at every site) every triplet
is free and step 3 is PEFT's rule itself: the same tau (the k-th smallest value does not depend on the
order of the values) and the same mask.

IncreLoRA (`rewrite.allocators.increlora`): a site starts at clamp(init_rank, lo_k, hi_k) (hi_k = 0:
its branch is removed before training), and a site whose rank + a would pass hi_k is skipped by the
growth step: the k = min(h, R_T - R_t) picks go to the best-scoring sites that can still grow.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

Bound = int | Mapping[str, int | None] | None


def _value(bound: Bound, owner: str) -> int | None:
    return bound.get(owner) if isinstance(bound, Mapping) else bound


def resolve_bounds(start: Mapping[str, int], min_rank: Bound = 0, max_rank: Bound = None, *,
                   cap: Mapping[str, int] | None = None, where: str = "<allocator>") -> dict[str, tuple[int, int]]:
    """owner -> (lo, hi) for the sites in `start` (owner -> starting rank).

    `min_rank` / `max_rank`: one value for every site, or owner -> value (a missing owner or None: no
    bound). hi is also capped by `cap[owner]` when given (AdaLoRA: the starting rank r0, it cannot grow).
    lo > hi is an error naming the site."""
    out = {}
    for owner in start:
        lo = _value(min_rank, owner) or 0
        hi = _value(max_rank, owner)
        limit = None if cap is None else cap.get(owner)
        if limit is not None:
            hi = limit if hi is None else min(hi, limit)
        if lo < 0 or (hi is not None and hi < 0):
            raise ValueError(f"{where}: site {owner}: rank bounds must be >= 0 (min {lo}, max {hi})")
        if hi is not None and lo > hi:
            why = f" (capped at the starting rank {limit})" if limit is not None and hi == limit else ""
            raise ValueError(f"{where}: site {owner}: min rank {lo} is above its max rank {hi}{why}")
        out[owner] = (int(lo), int(hi) if hi is not None else None)
    return out


@torch.no_grad()
def keep_within(scores: Mapping[str, torch.Tensor], budget: int,
                bounds: Mapping[str, tuple[int, int | None]]) -> tuple[dict[str, torch.Tensor], float | None]:
    """AdaLoRA's mask under per-site bounds (rules 1-3 above): (owner -> bool keep mask [r], tau or None)."""
    forced, free, beyond = {}, {}, {}
    for owner, s in scores.items():
        s = s.reshape(-1)
        lo, hi = bounds.get(owner, (0, None))
        hi = s.numel() if hi is None else min(hi, s.numel())
        order = torch.sort(s, descending=True, stable=True).indices
        forced[owner], free[owner], beyond[owner] = order[:lo], order[lo:hi], order[hi:]
    places = budget - sum(int(i.numel()) for i in forced.values())
    n_free = sum(int(i.numel()) for i in free.values())
    k = min(n_free - places, n_free)
    threshold = None
    if k > 0:
        pool = torch.cat([scores[o].reshape(-1)[i] for o, i in free.items()])
        threshold = torch.kthvalue(pool, k=k)[0].item()
    pattern = {}
    for owner, s in scores.items():
        s = s.reshape(-1)
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[forced[owner]] = True
        keep[free[owner]] = True if threshold is None else ~(s[free[owner]] <= threshold)
        pattern[owner] = keep
    return pattern, threshold


def clip_keep(pattern: Mapping[str, torch.Tensor],
              bounds: Mapping[str, tuple[int, int | None]]) -> dict[str, torch.Tensor]:
    """A mask made without scores, brought within the bounds by index order: the first hi kept triplets
    stay; below lo, the first masked ones come back."""
    out = {}
    for owner, keep in pattern.items():
        keep = keep.reshape(-1).clone()
        lo, hi = bounds.get(owner, (0, None))
        kept = keep.nonzero().reshape(-1)
        if hi is not None and kept.numel() > hi:
            keep[kept[hi:]] = False
        missing = lo - int(keep.sum())
        if missing > 0:
            keep[(~keep).nonzero().reshape(-1)[:missing]] = True
        out[owner] = keep
    return out


__all__ = ["Bound", "clip_keep", "keep_within", "resolve_bounds"]
