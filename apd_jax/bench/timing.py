"""Wall-clock timing of device work: each call waited for, the median or best of several."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def call_times(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of fn, waited for, and the last call's output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times, out


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = call_times(fn, repeats)
    return statistics.median(times), out


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` calls after as many warm-up calls: a ceiling is the best the device
    does once its clocks are up (an idle GPU starts at a fraction of its clock)."""
    call_times(fn, repeats)
    return min(call_times(fn, repeats)[0])
