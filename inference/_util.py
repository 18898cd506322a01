"""Small helpers shared by the inference modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from probgen.elbo import sample_sites

__all__ = ["sample_sites", "seeded"]  # sample_sites re-exported from probgen.elbo


@contextlib.contextmanager
def seeded(seed: int, like: torch.Tensor | None = None) -> Iterator[None]:
    """Run a block with the global RNG forked and seeded, leaving the outer stream untouched."""
    devices = [like.device.index or 0] if like is not None and like.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
