"""Shared helpers for the test suite."""

from __future__ import annotations

import math

import torch

__all__ = ["assert_close", "mc_tolerance"]


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Assert two tensors (or numbers) agree elementwise within ``atol + rtol * |expected|``."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def mc_tolerance(std: float, n: int, z: float = 4.0) -> float:
    """Half-width of a ``z``-sigma Monte Carlo interval for a mean of ``n`` draws of spread ``std``."""
    return z * std / math.sqrt(n)
