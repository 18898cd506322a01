r"""Noise schedules of the discrete-time diffusion (DDPM) and the quantities derived from them.

A schedule is a float64 tensor of :math:`\beta_1, \dots, \beta_T` (index ``t - 1`` holds
:math:`\beta_t`). :class:`DiffusionSchedule` derives, in float64,

.. math::
    \alpha_t = 1 - \beta_t, \qquad \bar\alpha_t = \prod_{s \le t} \alpha_s, \qquad
    \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t,

    \tilde\mu_t(x_t, x_0) = c^{(1)}_t x_0 + c^{(2)}_t x_t, \qquad
    c^{(1)}_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}, \qquad
    c^{(2)}_t = \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t},

with :math:`\bar\alpha_0 = 1` (so :math:`\tilde\beta_1 = 0`, :math:`\tilde\mu_1 = x_0`).

References:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239, eqs. (4)-(7).
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672, eq. (17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DiffusionSchedule",
    "append_dims",
    "at_step",
    "check_betas",
    "cosine_betas",
    "ddim_step",
    "linear_betas",
]


def _check_steps(T: object) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"Expected T >= 1 (an int), but found {T!r}.")
    return T


def append_dims(v: Tensor, ndim: int) -> Tensor:
    r"""Append trailing singleton dims to ``v`` until it has ``ndim`` dims (for broadcasting).

    Args:
        v: per-example coefficients, e.g. ``(B,)``, or a scalar ``()``.
        ndim: the number of dims of the tensor ``v`` will multiply, e.g. ``x.ndim``.

    Returns:
        ``v`` viewed as ``(*v.shape, 1, ..., 1)`` with ``ndim`` dims.
    """
    if v.ndim > ndim:
        raise ValueError(f"Expected a tensor with at most {ndim} dims, but found shape {tuple(v.shape)}.")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def at_step(values: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
    r"""Entry ``t - 1`` of a per-step table, on ``like``'s dtype and device, broadcastable against ``like``.

    Args:
        values: a per-step table, ``(T,)`` (index ``t - 1`` holds step ``t``).
        t: the step, an int in ``1..T`` (giving a scalar) or a ``(B,)`` integer tensor
            (giving ``(B, 1, ..., 1)`` with ``like.ndim`` dims; its range is not checked).
        like: the tensor the result will multiply, e.g. ``x`` of shape ``(B, D)``.
    """
    values = values.to(device=like.device, dtype=like.dtype)
    if isinstance(t, Tensor):
        return append_dims(values[t - 1], like.ndim)
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= values.shape[0]:
        raise ValueError(f"Expected a step t in [1, {values.shape[0]}], but found {t!r}.")
    return values[t - 1]


def check_betas(betas: Tensor) -> Tensor:
    r"""Validate a schedule: a 1-D tensor of T >= 1 values in the open interval (0, 1).

    Returns:
        ``betas`` unchanged.
    """
    if not isinstance(betas, Tensor):
        raise TypeError(f"Expected betas to be a torch.Tensor, but found {type(betas).__name__}.")
    if betas.dim() != 1 or betas.numel() < 1:
        raise ValueError(f"Expected betas of shape (T,) with T >= 1, but found shape {tuple(betas.shape)}.")
    if not bool(((betas > 0) & (betas < 1)).all()):
        lo, hi = float(betas.min()), float(betas.max())
        raise ValueError(f"Expected betas in (0, 1), but found values in [{lo}, {hi}].")
    return betas


def linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> Tensor:
    r"""Linear schedule :math:`\beta_t` from ``start`` to ``end`` (Ho et al. 2020, arXiv:2006.11239).

    Returns:
        float64 tensor ``(T,)``.
    """
    T = _check_steps(T)
    return check_betas(torch.linspace(start, end, T, dtype=torch.float64))


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    r"""Cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17).

    :math:`\bar\alpha_t = f(t) / f(0)`, :math:`f(t) = \cos^2\big(\frac{t/T + s}{1 + s} \frac{\pi}{2}\big)`,
    :math:`\beta_t = \min(1 - \bar\alpha_t / \bar\alpha_{t-1}, \beta_{\max})`.

    Returns:
        float64 tensor ``(T,)``.
    """
    T = _check_steps(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return check_betas(betas)


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    r"""The forward process's coefficients, one entry per step (index ``t - 1`` is step ``t``).

    Build with :meth:`from_betas` (computed in float64); :meth:`to` casts every field.

    Attributes:
        betas: :math:`\beta_t`, ``(T,)``.
        alphas: :math:`\alpha_t = 1 - \beta_t`.
        alpha_bars: :math:`\bar\alpha_t`.
        alpha_bars_prev: :math:`\bar\alpha_{t-1}` (1 at ``t = 1``).
        sqrt_alpha_bars: :math:`\sqrt{\bar\alpha_t}`.
        sqrt_one_minus_alpha_bars: :math:`\sqrt{1 - \bar\alpha_t}`.
        posterior_variance: :math:`\tilde\beta_t` (0 at ``t = 1``).
        posterior_mean_coef1: :math:`c^{(1)}_t`, the coefficient of :math:`x_0` in :math:`\tilde\mu_t`.
        posterior_mean_coef2: :math:`c^{(2)}_t`, the coefficient of :math:`x_t` in :math:`\tilde\mu_t`.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor
    alpha_bars_prev: Tensor
    sqrt_alpha_bars: Tensor
    sqrt_one_minus_alpha_bars: Tensor
    posterior_variance: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiffusionSchedule:
        """Derive every coefficient from ``betas`` (``(T,)``, validated) in float64."""
        betas = check_betas(torch.as_tensor(betas)).to(torch.float64)
        alphas = 1 - betas
        alpha_bars = torch.cumprod(alphas, 0)
        alpha_bars_prev = torch.cat([alpha_bars.new_ones(1), alpha_bars[:-1]])
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bars=alpha_bars,
            alpha_bars_prev=alpha_bars_prev,
            sqrt_alpha_bars=alpha_bars.sqrt(),
            sqrt_one_minus_alpha_bars=(1 - alpha_bars).sqrt(),
            posterior_variance=betas * (1 - alpha_bars_prev) / (1 - alpha_bars),
            posterior_mean_coef1=betas * alpha_bars_prev.sqrt() / (1 - alpha_bars),
            posterior_mean_coef2=alphas.sqrt() * (1 - alpha_bars_prev) / (1 - alpha_bars),
        )

    @property
    def T(self) -> int:
        """Number of steps."""
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """The same schedule with every field cast to ``device`` / ``dtype``."""
        return DiffusionSchedule(**{f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)})


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, alpha: Any, sigma: Any, noise_scale: float = 0.0) -> Tensor:
    r"""One DDIM update (Song, Meng & Ermon 2020, arXiv:2010.02502, eq. 12) to the state at the next level.

    .. math::
        x' = \alpha\, \hat x_0 + \sqrt{\sigma^2 - s^2}\, \hat\epsilon + s z,

    with :math:`\alpha = \sqrt{\bar\alpha'}`, :math:`\sigma = \sqrt{1 - \bar\alpha'}` of the next level
    and :math:`s` = ``noise_scale`` (0: deterministic DDIM; the noise is drawn from the global RNG).
    The one DDIM step of the library: DDPM's DDIM sampler and the distilled students both take it.

    Args:
        x0_hat, eps_hat: the predictions at the current level, ``(B, D)``.
        alpha, sigma: floats, or tensors broadcastable to ``(B, D)``.
        noise_scale: :math:`s \le \sigma`.
    """
    if not noise_scale:
        return alpha * x0_hat + sigma * eps_hat
    direction = math.sqrt(max(float(sigma) ** 2 - noise_scale**2, 0.0))
    x = alpha * x0_hat + direction * eps_hat
    return x + noise_scale * torch.randn(x.shape, device=x.device, dtype=x.dtype)
