"""Interleaved timing shared by the benchmarks: ratios are only ever taken within one run."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["measure", "run_cases", "train_steps"]


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


Case = tuple[dict[str, Callable[[], object]], int, int, int]


def run_cases(cases: dict[str, Case], base: str = "hand") -> dict:
    """Time each case's variants with :func:`measure`, print ratios to ``base`` and return the report.

    ``cases`` maps a case name to ``(fns, rounds, calls per round, warm-up calls)``.
    """
    report: dict = {}
    for name, (fns, rounds, n, warmup) in cases.items():
        ms, fastest = measure(fns, rounds, n, warmup)
        ratio = {k: v / ms[base] for k, v in ms.items()}
        ratio_min = {k: v / fastest[base] for k, v in fastest.items()}
        report[name] = {
            "ms_median": ms,
            "ratio_median": ratio,
            "ms_min": fastest,
            "ratio_min": ratio_min,
        }
        width = max(len(k) for k in ms)
        print(f"\n{name}\n  {'':<{width}} {'median':>12} {'':>8}   {'fastest round':>13}")
        for k in ms:
            med, low = f"{ms[k]:9.1f} ms  x{ratio[k]:.3f}", f"{fastest[k]:9.1f} ms  x{ratio_min[k]:.3f}"
            print(f"  {k:<{width}} {med}   {low}")
    return report


def train_steps(method, hand_loss, x: torch.Tensor, lr: float = 1e-3) -> dict:
    """One Adam step of the method's Pyro objective (``"pyro"``) and of ``hand_loss(method, x)``
    (``"hand"``) on two copies of the same method."""
    m_pyro, m_hand = copy.deepcopy(method), copy.deepcopy(method)
    elbo_objective = m_pyro.objective()  # what fit drives: the negative ELBO per example

    def objective(batch: torch.Tensor) -> torch.Tensor:
        return next(elbo_objective.losses(lambda k: batch, 0, 1))[1]

    opt_pyro = torch.optim.Adam(m_pyro.parameters(), lr=lr)
    opt_hand = torch.optim.Adam(m_hand.parameters(), lr=lr)

    def pyro_step():
        opt_pyro.zero_grad(set_to_none=True)
        objective(x).backward()
        opt_pyro.step()

    def hand_step():
        opt_hand.zero_grad(set_to_none=True)
        hand_loss(m_hand, x).backward()
        opt_hand.step()

    return {"hand": hand_step, "pyro": pyro_step}
