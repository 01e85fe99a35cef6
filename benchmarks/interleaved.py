"""Timing several subjects turn about (A B C, A B C, ...), so that a machine's drift falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None] = lambda: None,
                ) -> dict[str, float]:
    """Median seconds of each call, alternating calls every round, after one warm-up call each; `sync` waits for
    queued device work before and after each timed call."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
