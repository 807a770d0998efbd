"""Pick one rank per site to maximise total value under one budget (a multiple-choice knapsack).

Each `Item` (one adapted module) offers allowed ranks r_0 < r_1 < ... with values v(r) and costs c(r)
(non-decreasing). Rank r_0 is the site's minimum and is always paid; rank 0, where allowed, means the
site loses its branch. `solve(items, budget)` returns the ranks, the value, the cost, and an upper bound
on what any allocation could reach.

Algorithm (METHODS.md §2.6):
1. Points no single site could afford even alone are removed; each site's remaining (cost, value) points
   are replaced by their **upper concave envelope** (the hull from r_0; points under it are skipped,
   segments with no value gain are dropped).
2. **Greedy by marginal value per unit cost** with a heap: pop the best segment (value gain / cost) of
   any site; take it if it fits the remaining budget and push that site's next segment; if it does not
   fit, that site stops (its later segments need this one) and the others go on.
3. Fill: leftover budget is spent on any single rank move (hull vertex or not) with the best gain that
   fits, until none fits.
4. The first segment that did not fit defines the LP bound U (greedy on the envelopes solves the
   fractional relaxation exactly, and the envelopes lie above the true curves, so U >= OPT).
5. max(greedy, best single site alone): U <= greedy + best single, so the answer is >= U / 2 >= OPT / 2.
6. If the answer is not proven optimal and the instance is small (integer cost steps after dividing by
   their gcd, at most `dp_limit` table cells), an exact dynamic programme over the budget replaces it.

When the answer is exact (`Solution.exact`):
- always when value == U (certificate), e.g. unit costs (c(r) = r, AdaLoRA/EVA counting) with concave
  value curves and an integer budget: every segment costs 1, the budget is used up at a vertex, greedy
  = global top-B increments = optimum;
- concave curves with linear but unequal per-rank costs (`params`, `flops`): greedy is exact for the
  fractional problem; the integer answer loses at most the value of the one segment that did not fit
  (reported as `gap = U - value`), and step 6 closes the gap when it is small enough to run;
- non-concave curves or non-linear costs (`bytes`, `latency`, rank buckets): greedy on the envelope is
  exact only at hull vertices; otherwise DP (step 6) or the >= OPT/2 guarantee of step 5, and the
  Solution says which (`method`, `notes`, `concave`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from rewrite.errors import SpecError


class BudgetError(SpecError):
    """The budget cannot be met: it is smaller than the cost of every site at its minimum rank."""


@dataclass(frozen=True)
class Item:
    name: str
    ranks: list[int]      # allowed ranks, strictly increasing; ranks[0] is the forced minimum
    values: list[float]   # v(r) per allowed rank
    costs: list[float]    # c(r) per allowed rank, non-decreasing

    def __post_init__(self):
        n = len(self.ranks)
        if n == 0 or len(self.values) != n or len(self.costs) != n:
            raise ValueError(f"item {self.name}: ranks, values and costs need the same non-zero length")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:])):
            raise ValueError(f"item {self.name}: ranks must be strictly increasing, got {self.ranks}")
        if any(b < a for a, b in zip(self.costs, self.costs[1:])):
            raise ValueError(f"item {self.name}: costs must not decrease with rank, got {self.costs}")
        if not all(math.isfinite(x) for x in (*self.values, *self.costs)):
            raise ValueError(f"item {self.name}: values and costs must be finite")


@dataclass
class Solution:
    ranks: dict[str, int]
    value: float
    cost: float
    budget: float
    minimum: float              # cost with every site at its minimum rank
    upper_bound: float          # no allocation within the budget can have more value
    exact: bool                 # proven optimal (value == upper bound, or exact DP)
    method: str                 # "greedy" | "greedy+fill" | "single" | "dp"
    shadow_price: float         # value per unit cost at the cut (0 when every gainful rank was taken)
    concave: dict[str, bool]    # per item: value curve concave in cost (greedy needs no envelope)
    notes: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return max(0.0, self.upper_bound - self.value)


def _envelope(costs: list[float], values: list[float], free: float) -> tuple[list[int], bool]:
    """Indices of the upper concave envelope from index 0 over the points affordable alone, and whether
    every affordable point with a value gain lies on it (the curve is concave)."""
    c0, v0 = costs[0], values[0]
    idx = [j for j in range(len(costs)) if costs[j] - c0 <= free]
    hull: list[int] = []
    for j in idx:
        # equal costs: keep only the best value (the lowest rank among equals)
        if hull and costs[hull[-1]] == costs[j]:
            if values[j] <= values[hull[-1]]:
                continue
            if hull[-1] != 0:  # index 0 (the minimum rank) always starts the envelope
                hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under (or on the chord from a to j) -> not a strict vertex of the upper hull
            cross = (costs[b] - costs[a]) * (values[j] - values[a]) - (values[b] - values[a]) * (costs[j] - costs[a])
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(j)
    # keep the rising part only
    best = max(range(len(hull)), key=lambda k: (values[hull[k]], -k))
    hull = hull[:best + 1]
    concave = _is_concave([costs[j] for j in idx], [values[j] for j in idx], v0)
    return hull, concave


def _is_concave(costs: list[float], values: list[float], v0: float) -> bool:
    slopes = []
    for k in range(1, len(costs)):
        dc, dv = costs[k] - costs[k - 1], values[k] - values[k - 1]
        if dc == 0:
            if dv > 0:
                return False
            continue
        slopes.append(dv / dc)
    tol = 1e-12 * max([abs(s) for s in slopes] + [1.0])
    return all(b <= a + tol for a, b in zip(slopes, slopes[1:]))


def solve(items: list[Item], budget: float, *, dp_limit: int = 4_000_000) -> Solution:
    """The best ranks within `budget` (see the module docstring for when the answer is exact)."""
    if not items:
        return Solution({}, 0.0, 0.0, budget, 0.0, 0.0, True, "greedy", 0.0, {})
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError("item names must be unique")
    minimum = math.fsum(it.costs[0] for it in items)
    if minimum > budget:
        raise BudgetError(f"budget {budget:g} is smaller than the minimum {minimum:g} (every site at its minimum "
                          "rank); raise the budget or lower min_rank")
    free = budget - minimum
    hulls, concave = [], {}
    for it in items:
        hull, is_concave = _envelope(it.costs, it.values, free)
        hulls.append(hull)
        concave[it.name] = is_concave

    pos = [0] * len(items)        # index into hulls[i] of the current vertex
    spent = minimum

    def seg(i: int) -> tuple[float, float, float] | None:
        h, k = hulls[i], pos[i]
        if k + 1 >= len(h):
            return None
        a, b = h[k], h[k + 1]
        dc, dv = items[i].costs[b] - items[i].costs[a], items[i].values[b] - items[i].values[a]
        if dv <= 0:
            return None
        return (math.inf if dc == 0 else dv / dc), dc, dv

    heap: list[tuple[float, int, int]] = []
    for i in range(len(items)):
        s = seg(i)
        if s is not None:
            heapq.heappush(heap, (-s[0], i, pos[i]))
    value = math.fsum(it.values[0] for it in items)
    upper_bound: float | None = None
    shadow = 0.0
    while heap:
        neg_slope, i, k = heapq.heappop(heap)
        slope, dc, dv = seg(i)
        if dc <= budget - spent:
            pos[i] += 1
            spent += dc
            value += dv
            nxt = seg(i)
            if nxt is not None:
                heapq.heappush(heap, (-nxt[0], i, pos[i]))
        elif upper_bound is None:  # the critical segment: the LP optimum takes a fraction of it
            upper_bound = value + (budget - spent) * slope
            shadow = slope
    if upper_bound is None:
        upper_bound = value
    choice = [hulls[i][pos[i]] for i in range(len(items))]
    method = "greedy"

    # fill the leftover with single moves to any allowed rank (not only hull vertices)
    while True:
        best = None
        room = budget - spent
        for i, it in enumerate(items):
            j0 = choice[i]
            for j in range(j0 + 1, len(it.ranks)):
                dc, dv = it.costs[j] - it.costs[j0], it.values[j] - it.values[j0]
                if dc <= room and dv > 0 and (best is None or dv > best[2]):
                    best = (i, j, dv, dc)
        if best is None:
            break
        i, j, dv, dc = best
        choice[i], spent, value, method = j, spent + dc, value + dv, "greedy+fill"

    # the best single site alone (the rest at their minimum): greedy + this >= U
    single_best = None
    for i, it in enumerate(items):
        for j in range(1, len(it.ranks)):
            dc, dv = it.costs[j] - it.costs[0], it.values[j] - it.values[0]
            if dc <= free and (single_best is None or dv > single_best[2]):
                single_best = (i, j, dv)
    base_value = math.fsum(it.values[0] for it in items)
    if single_best is not None and base_value + single_best[2] > value:
        choice = [0] * len(items)
        choice[single_best[0]] = single_best[1]
        value, method = base_value + single_best[2], "single"

    notes = []
    bent = [n for n, ok in concave.items() if not ok]
    if bent:
        notes.append(f"{len(bent)} site(s) have non-concave value curves in cost; greedy ran on their upper concave "
                     "envelope")
    tol = 1e-9 * max(1.0, abs(upper_bound))
    exact = upper_bound - value <= tol
    if not exact:
        dp = _dp(items, budget, minimum, dp_limit)
        if dp is not None:
            choice, value = dp
            method, exact = "dp", True
            notes.append("exact dynamic programme over the budget (greedy was not provably optimal)")
        else:
            notes.append(f"greedy is within {upper_bound - value:.4g} of the LP bound (>= 1/2 of the optimum); "
                         "the instance is too large for the exact DP")
    ranks = {it.name: it.ranks[choice[i]] for i, it in enumerate(items)}
    cost = math.fsum(it.costs[choice[i]] for i, it in enumerate(items))
    value = math.fsum(it.values[choice[i]] for i, it in enumerate(items))
    assert cost <= budget * (1 + 1e-12) + 1e-12, (cost, budget)
    return Solution(ranks, value, cost, budget, minimum, max(upper_bound, value), exact, method, shadow, concave,
                    notes)


def _dp(items: list[Item], budget: float, minimum: float, limit: int) -> tuple[list[int], float] | None:
    """Exact multiple-choice knapsack when every cost step is an integer multiple of a common step."""
    steps = [c - it.costs[0] for it in items for c in it.costs]
    if not all(float(s).is_integer() for s in steps):
        return None
    g = reduce(math.gcd, (int(s) for s in steps if s > 0), 0)
    if g == 0:
        return None
    cap = int((budget - minimum) // g)
    cells = (cap + 1) * sum(len(it.ranks) for it in items)
    if cells > limit:
        return None
    neg = -np.inf
    best = np.full(cap + 1, 0.0)          # best value with cost (in steps) <= b, over the items so far
    picks = np.zeros((len(items), cap + 1), dtype=np.int32)
    for i, it in enumerate(items):
        new = np.full(cap + 1, neg)
        arg = np.zeros(cap + 1, dtype=np.int32)
        for j in range(len(it.ranks)):
            w = int((it.costs[j] - it.costs[0]) // g)
            if w > cap:
                continue
            cand = np.full(cap + 1, neg)
            cand[w:] = best[:cap + 1 - w] + (it.values[j] - it.values[0])
            better = cand > new
            new[better], arg[better] = cand[better], j
        best, picks[i] = new, arg
    b = int(np.argmax(best))
    choice = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        j = int(picks[i, b])
        choice[i] = j
        b -= int((items[i].costs[j] - items[i].costs[0]) // g)
    value = math.fsum(it.values[choice[i]] for i, it in enumerate(items))
    return choice, value


__all__ = ["BudgetError", "Item", "Solution", "solve"]
