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
    """AdaLoRA's mask under per-site bounds (rules 1-3 above): (owner -> bool keep mask [r], tau or None).
    One pass over all triplets at once (it runs every deltaT training steps)."""
    owners = list(scores)
    flat = torch.cat([scores[o].reshape(-1) for o in owners])
    sizes = [scores[o].numel() for o in owners]
    site = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor(sizes))
    lo = torch.tensor([bounds.get(o, (0, None))[0] for o in owners])
    caps = [bounds.get(o, (0, None))[1] for o in owners]
    hi = torch.tensor([n if cap is None else min(cap, n) for cap, n in zip(caps, sizes)])
    # position of each triplet in its site's descending order (equal scores: lower index first): two stable sorts
    by_score = torch.sort(flat, descending=True, stable=True).indices
    order = by_score[torch.sort(site[by_score], stable=True).indices]
    starts = torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0)
    position = torch.empty_like(site)
    position[order] = torch.arange(flat.numel()) - starts[site[order]]
    forced = position < lo[site]
    free = ~forced & (position < hi[site])
    places = budget - int(forced.sum())
    n_free = int(free.sum())
    k = min(n_free - places, n_free)
    threshold = torch.kthvalue(flat[free], k=k)[0].item() if k > 0 else None
    keep = forced | (free if threshold is None else free & (flat > threshold))
    return dict(zip(owners, keep.split(sizes))), threshold


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
