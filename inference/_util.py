"""Small helpers shared by the inference modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pyro.poutine.util import site_is_subsample

__all__ = ["sample_sites", "seeded"]


def sample_sites(trace) -> Iterator[tuple[str, dict]]:
    """The ``(name, site)`` pairs of a trace's sample sites, plates' subsample sites excluded."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


@contextlib.contextmanager
def seeded(seed: int, like: torch.Tensor | None = None) -> Iterator[None]:
    """Run a block with the global RNG forked and seeded, leaving the outer stream untouched."""
    devices = [like.device.index or 0] if like is not None and like.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
