"""Interleaved timing of a few callables (the benchmark's method, also used by the budget search): a private
helper below the apps, so that both ``foldattn.bench`` and ``foldattn.stripe`` can use it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

#: a sample repeats a fast runner at most this many times, however short ``min_sample_s`` makes a call
_MAX_CALLS_PER_SAMPLE = 1000


def interleaved(
    runners: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    min_sample_s: float = 0.0,
    clock: Callable[[], Any] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each runner ``reps`` times, interleaved, after ``warmup`` untimed rounds (at least one).

    Round ``i`` runs the runners in a rotated order (A B C, B C A, C A B, ...) so no
    runner always follows the same neighbour. A sample repeats its runner ``k`` times,
    ``k`` fixed per runner from the last warm-up call so a sample lasts about
    ``min_sample_s``; the per-call time of each sample is returned, in seconds.
    ``clock`` is wall time by default; ``time.process_time`` measures the CPU time of
    the process instead, which other processes on a shared machine disturb less.
    """
    keys = list(runners)
    calls = dict.fromkeys(keys, 1)
    for _ in range(max(1, warmup)):
        for k in keys:
            t0 = clock()
            runners[k]()
            sync()
            dt = clock() - t0
            calls[k] = max(1, min(_MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_s / max(dt, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(reps):
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            run, n = runners[k], calls[k]
            t0 = clock()
            for _ in range(n):
                run()
            sync()
            samples[k].append((clock() - t0) / n)
    return samples
