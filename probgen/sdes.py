r"""Stochastic differential equations as torchsde objects.

Every SDE here subclasses :class:`torchsde.SDEIto`, so :func:`torchsde.sdeint` solves it: it has
``noise_type`` and ``sde_type`` attributes and the drift ``f(t, y)`` and diffusion ``g(t, y)`` of

.. math::
    dy = f(t, y)\, dt + g(t, y)\, dW_t,

with ``y`` of shape ``(B, D)`` (images are flattened at this boundary) and, for diagonal noise,
``g(t, y)`` of shape ``(B, D)`` too. Only these torchsde callbacks take ``(t, y)``; everything else
in probgen takes ``(x, t)``.

**Score functions.** An SDE that is driven by a score takes ``score_fn(x, t) -> Tensor`` shaped like
``x``, with ``x`` of shape ``(B, D)`` and ``t`` a ``(B,)`` tensor (the time, or the noise level, each
example is at). A score of a fixed target ignores ``t``.

So far: :class:`LangevinSDE`. The forward processes of score-based diffusion (VP, sub-VP, VE;
Song et al. 2021, arXiv:2011.13456) belong in this module too, each a separate class on the same
template.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchsde
from torch import Tensor

__all__ = ["LangevinSDE", "ScoreFn", "batch_times"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(x, t) -> score``: ``x`` ``(B, D)``, ``t`` ``(B,)``, the score shaped like ``x``."""


def batch_times(t: float | Tensor, like: Tensor) -> Tensor:
    r"""A time (a float or a 0-d / ``(B,)`` tensor) as a ``(B,)`` tensor on ``like``'s device and dtype.

    Args:
        t: the time; a scalar is repeated for every example.
        like: the states ``(B, D)`` the time belongs to.

    Returns:
        ``(B,)`` tensor.
    """
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        return t.expand(like.shape[0])
    if tuple(t.shape) != (like.shape[0],):
        raise ValueError(f"Expected a time of shape () or ({like.shape[0]},), but found {tuple(t.shape)}.")
    return t


class LangevinSDE(torchsde.SDEIto):
    r"""The overdamped Langevin diffusion of a target :math:`p`, as a torchsde Itô SDE.

    .. math::
        dx = \nabla_x \log p(x)\, dt + \sqrt{2 T}\, dW_t,

    whose stationary law is :math:`p^{1/T}` (normalized) for temperature :math:`T`, so :math:`p` itself
    at ``temperature=1``. Solved by Euler-Maruyama with step :math:`h` (``torchsde.sdeint(...,
    method="euler", dt=h)``) this is the unadjusted Langevin algorithm (ULA)
    :math:`x_{k+1} = x_k + h \nabla \log p(x_k) + \sqrt{2 T h}\, z_k`, whose stationary law is
    biased by :math:`O(h)` (for :math:`p = \mathcal N(0, s^2)` its variance is
    :math:`s^2 / (1 - h / (2 s^2))`).

    Args:
        score_fn: ``score_fn(x, t) -> (B, D)``, :math:`\nabla_x \log p(x)` at ``x`` ``(B, D)``;
            ``t`` ``(B,)`` is the SDE's time, which a fixed target ignores.
        temperature: :math:`T > 0`.

    References:
        Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and their discrete
        approximations", Bernoulli 2(4).
        Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution",
        arXiv:1907.05600, Section 2.2.

    Example:
        >>> sde = LangevinSDE(lambda x, t: -x)  # target N(0, I)
        >>> ys = torchsde.sdeint(sde, torch.zeros(8, 2), torch.tensor([0.0, 1.0]), method="euler", dt=0.01)
        >>> ys.shape
        torch.Size([2, 8, 2])
    """

    def __init__(self, score_fn: ScoreFn, temperature: float = 1.0) -> None:
        super().__init__(noise_type="diagonal")
        if not callable(score_fn):
            raise ValueError(f"Expected a callable score_fn(x, t), but found {type(score_fn).__name__}.")
        if not float(temperature) > 0:
            raise ValueError(f"Expected temperature > 0, but found {temperature!r}.")
        self.score_fn = score_fn
        self.temperature = float(temperature)

    def f(self, t: float | Tensor, y: Tensor) -> Tensor:
        """Drift: the score at ``y`` ``(B, D)``, ``(B, D)``."""
        return self.score_fn(y, batch_times(t, y))

    def g(self, t: float | Tensor, y: Tensor) -> Tensor:
        r"""Diffusion (diagonal): :math:`\sqrt{2T}` everywhere, ``(B, D)``."""
        return torch.full_like(y, math.sqrt(2 * self.temperature))
