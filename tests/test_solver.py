"""The rank solver (rewrite.solver) against brute force on small random instances.

Checked: the budget is never exceeded; concave value curves with unit costs give the exact optimum by
greedy alone; whatever the curves, the answer is >= OPT / 2, never above the reported upper bound, and
exact whenever the solver says so; the exact DP closes every gap it is allowed to run on; a budget below
the minimum is a clear BudgetError (a SpecError: exit 2 through the CLI).
"""
from __future__ import annotations

import itertools
import math
import random

import pytest

from rewrite.errors import SpecError
from rewrite.solver import BudgetError, Item, solve


def brute_force(items: list[Item], budget: float) -> float:
    best = -math.inf
    for combo in itertools.product(*(range(len(it.ranks)) for it in items)):
        if sum(it.costs[j] for it, j in zip(items, combo)) <= budget:
            best = max(best, sum(it.values[j] for it, j in zip(items, combo)))
    return best


def random_item(rng: random.Random, name: str, kind: str) -> Item:
    low = rng.choice([0, 0, 1])
    ranks = list(range(low, low + rng.randint(1, 5)))
    steps = len(ranks) - 1
    if kind == "any":  # non-concave values, uneven (even zero) cost steps
        gains = [rng.random() * 10 for _ in range(steps)]
        widths = [rng.randint(0, 20) for _ in range(steps)]
    else:              # concave: non-increasing gains; linear costs (unit, or one width per site)
        gains = sorted((rng.random() * 10 for _ in range(steps)), reverse=True)
        widths = [1 if kind == "unit" else rng.randint(1, 20)] * steps
    values, costs = [0.0], [float(rng.randint(0, 4)) if low else 0.0]
    for gain, width in zip(gains, widths):
        values.append(values[-1] + gain)
        costs.append(costs[-1] + width)
    return Item(name, ranks, values, costs)


@pytest.mark.parametrize("kind", ["unit", "linear", "any"])
@pytest.mark.parametrize("dp", [True, False])
def test_equals_or_bounds_brute_force(kind, dp):
    rng = random.Random(hash((kind, dp)) % 1000)
    checked = exact = 0
    for _ in range(300):
        items = [random_item(rng, f"s{k}", kind) for k in range(rng.randint(1, 4))]
        budget = rng.randint(0, 60)
        if sum(it.costs[0] for it in items) > budget:
            with pytest.raises(BudgetError):
                solve(items, budget)
            continue
        solution = solve(items, budget, dp_limit=4_000_000 if dp else 0)
        best = brute_force(items, budget)
        checked += 1
        assert solution.cost <= budget                               # never over budget
        assert sum(it.costs[it.ranks.index(solution.ranks[it.name])] for it in items) == solution.cost
        assert solution.value <= best + 1e-9
        assert solution.upper_bound >= best - 1e-9                   # a true upper bound
        assert solution.value >= best / 2 - 1e-9                     # max(greedy, best single) guarantee
        if solution.exact:
            assert solution.value == pytest.approx(best, abs=1e-9)
            exact += 1
        if kind == "unit":                                           # concave + unit costs: greedy is exact
            assert solution.exact and solution.method in ("greedy", "greedy+fill")
        if dp:                                                       # integer costs: the DP closes any gap
            assert solution.exact
    assert checked > 200 and exact >= (checked if kind == "unit" or dp else 1)


def test_concave_curves_greedy_picks_global_top_increments():
    # unit costs: the 5 largest increments overall are a: 9, 8; b: 7, 6; c: 5
    items = [Item("a", [0, 1, 2, 3], [0, 9, 17, 18], [0, 1, 2, 3]),
             Item("b", [0, 1, 2, 3], [0, 7, 13, 14], [0, 1, 2, 3]),
             Item("c", [0, 1, 2], [0, 5, 6], [0, 1, 2])]
    solution = solve(items, 5)
    assert solution.ranks == {"a": 2, "b": 2, "c": 1}
    assert (solution.value, solution.cost, solution.exact, solution.method) == (35, 5, True, "greedy")
    assert solution.shadow_price == 1  # the next increment (a: 18 - 17) is worth 1 per unit
    assert all(solution.concave.values())


def test_non_concave_curve_uses_the_envelope_and_says_so():
    # "a" is worthless until rank 2 (a jump), "b" is concave
    items = [Item("a", [0, 1, 2], [0, 0, 10], [0, 3, 6]), Item("b", [0, 1, 2], [0, 4, 6], [0, 3, 6])]
    solution = solve(items, 6)
    assert solution.ranks == {"a": 2, "b": 0} and solution.value == 10
    assert solution.concave == {"a": False, "b": True}
    assert any("envelope" in note for note in solution.notes)


def test_rank_zero_drops_and_min_rank_is_paid_first():
    items = [Item("a", [2, 3, 4], [5, 6, 6.5], [20, 30, 40]), Item("b", [0, 1, 2], [0, 3, 5], [0, 10, 20])]
    solution = solve(items, 30)
    assert solution.minimum == 20 and solution.ranks == {"a": 2, "b": 1} and solution.cost == 30


def test_budget_below_the_minimum_is_a_clear_error():
    items = [Item("a", [1, 2], [1, 2], [10, 20]), Item("b", [2, 3], [1, 2], [15, 25])]
    with pytest.raises(BudgetError, match=r"budget 20 is smaller than the minimum 25 \(every site at its minimum rank\)"):
        solve(items, 20)
    assert issubclass(BudgetError, SpecError)


def test_bad_items_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        Item("a", [0, 2, 1], [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="must not decrease"):
        Item("a", [0, 1], [0, 1], [5, 1])
    with pytest.raises(ValueError, match="finite"):
        Item("a", [0, 1], [0, math.nan], [0, 1])


def test_float_costs_latency_like():
    rng = random.Random(3)
    for _ in range(100):
        items = []
        for k in range(3):
            ranks = [0, 1, 2, 4, 8]
            base = rng.random() * 0.05  # a fixed cost of having the branch at all
            costs = [0.0] + [base + 0.01 * r * (1 + rng.random()) for r in ranks[1:]]
            costs = [max(costs[:i + 1]) for i in range(len(costs))]
            values = [0.0]
            for _ in ranks[1:]:
                values.append(values[-1] + rng.random())
            items.append(Item(f"s{k}", ranks, values, costs))
        budget = rng.random() * 0.3
        solution = solve(items, budget)
        best = brute_force(items, budget)
        assert solution.cost <= budget and best / 2 - 1e-12 <= solution.value <= best + 1e-12
