r"""Sampling of consistency models (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469).

Training is :func:`probgen.inference.fit` over the model's objective
(:class:`~probgen.models.consistency.ConsistencyObjective`: distillation from a ``score-sde`` teacher,
or consistency training); the objectives themselves live with the model
(:func:`~probgen.models.consistency.consistency_distillation_loss`,
:func:`~probgen.models.consistency.consistency_training_loss`). Here is K-step sampling (Algorithm 1)
with a seeded generator, the sampler ``"consistency"`` of ``probgen sample RUN --sampler consistency
--steps K``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from probgen.models.consistency import (
    Consistency,
    consistency_distillation_loss,
    consistency_training_loss,
    discretization_times,
)
from probgen.sdes import pf_ode_step

__all__ = [
    "consistency_distillation_loss",
    "consistency_training_loss",
    "discretization_times",
    "pf_ode_step",
    "sample_consistency",
]


def sample_consistency(
    cm: Consistency,
    num: int,
    *,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``num`` samples ``(num, D)`` by K-step consistency sampling (Algorithm 1), the model's Pyro program.

    Args:
        cm: a :class:`~probgen.models.consistency.Consistency`.
        num: number of samples.
        steps: K >= 1 (None: ``cm.sample_steps``, or ``len(sigmas)``).
        sigmas: the noise levels :math:`\tau_0 = \sigma(T) > \dots > \tau_{K-1}` (None: the fixed
            schedule :meth:`~probgen.models.consistency.Consistency.sample_sigmas`).
        generator: seeds the program's draws (Pyro samples from torch's global RNG, which is forked).
    """
    if not isinstance(cm, Consistency):
        raise ValueError(f"Expected a Consistency model, but found {type(cm).__name__}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Expected steps >= 1 (an int), but found {steps!r}.")
    device = cm._anchor.device
    seed = (
        None
        if generator is None
        else int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    )
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        return cm.sample(num, steps=steps, sigmas=sigmas)


def consistency_sampler(
    method, num: int, *, generator, steps: int | None = None, sigmas: Sequence[float] | None = None
) -> Tensor:
    """``--sampler consistency --steps K`` (``--option sigmas=[...]`` for other noise levels)."""
    return sample_consistency(method, num, steps=steps, sigmas=sigmas, generator=generator)
