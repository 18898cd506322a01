"""Interleaved timing shared by the benchmarks: ratios are only ever taken within one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["measure"]


def measure(
    fns: dict[str, Callable[[], object]], rounds: int, n: int, warmup: int = 10
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum over rounds of the mean time per call in ms, variants interleaved.

    Each round calls every variant ``n`` times, in alternating order from round to round. On a
    shared machine the minimum is the least disturbed estimate; both are reported.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(reversed(fns)):
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}
