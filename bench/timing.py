"""Interleaved timing shared by the benchmarks: contenders in a new random order every round, so load from other
processes hits all of them alike; one sample per contender per round."""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, block: int = 1, *, warmup: int = 1,
                seed: int = 0, clock: Callable[[], float] = time.perf_counter,
                within: Callable[[list[float]], float] = statistics.fmean) -> dict[str, list[float]]:
    """{contender: seconds per call, one sample per round}: each sample is `within` (mean by default) of the times of
    `block` consecutive calls, after `warmup` untimed calls of every contender."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {key: [] for key in calls}
    order, shuffle = list(calls), random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            fn, times = calls[key], []
            for _ in range(block):
                start = clock()
                fn()
                times.append(clock() - start)
            samples[key].append(within(times))
    return samples
