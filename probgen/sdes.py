r"""Stochastic differential equations as torchsde objects, and the probability-flow ODE.

Every SDE here subclasses :class:`torchsde.SDEIto`, so :func:`torchsde.sdeint` solves it: it has
``noise_type`` and ``sde_type`` attributes and the drift ``f(t, y)`` and diffusion ``g(t, y)`` of

.. math::
    dy = f(t, y)\, dt + g(t, y)\, dW_t,

with ``y`` of shape ``(B, D)`` (images are flattened at this boundary, :func:`flat_score`) and, for
diagonal noise, ``g(t, y)`` of shape ``(B, D)`` too. Only these torchsde callbacks (and torchdiffeq's
``forward(t, y)``) take ``(t, y)``; everything else in probgen takes ``(x, t)``.

**Score functions.** An SDE that is driven by a score takes ``score_fn(x, t) -> Tensor`` shaped like
``x``, with ``x`` of shape ``(B, D)`` and ``t`` a ``(B,)`` tensor (the time, or the noise level, each
example is at). A score of a fixed target ignores ``t``.

Contents: :class:`LangevinSDE`; the forward processes of score-based diffusion (Song et al. 2021,
arXiv:2011.13456) :class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE` on the common base
:class:`DiffusionSDE`; the reverse-time SDE :class:`ReverseSDE` (Anderson 1982) and the
probability-flow ODE :class:`ProbabilityFlowODE`, both driven by a score function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torchsde
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal
from torchdiffeq import odeint

from probgen.schedules import append_dims

__all__ = [
    "DiffusionSDE",
    "GridBrownian",
    "IntegrationError",
    "LangevinSDE",
    "ProbabilityFlowODE",
    "ReverseSDE",
    "ScoreFn",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "batch_times",
    "check_finite",
    "flat_score",
    "SDESpec",
    "langevin_step",
    "pf_ode_step",
    "sdeint_on_grid",
]
ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(x, t) -> score``: ``x`` ``(B, D)``, ``t`` ``(B,)``, the score shaped like ``x``."""


class IntegrationError(ValueError):
    """Non-finite values appeared while integrating an SDE or ODE (a diverging score or step size)."""


def check_finite(y: Tensor, t: float | Tensor, what: str = "the state") -> Tensor:
    """Return ``y`` if all its entries are finite, else raise :class:`IntegrationError` naming the time.

    Args:
        y: any tensor met during integration, e.g. the state ``(B, D)`` or a score.
        t: the (forward) time at which it was met: a float or a tensor of times.
        what: what ``y`` is, for the message.
    """
    # One reduction: any NaN or inf (or an overflow) makes the sum non-finite.
    if not math.isfinite(float(y.detach().sum())):
        times = torch.as_tensor(t, dtype=torch.float64).flatten()
        when = f"{float(times[0]):.6g}" if times.numel() else "?"
        bad = int((~torch.isfinite(y)).sum())
        found = f"{bad} non-finite entries" if bad else "entries so large that their sum overflows"
        raise IntegrationError(
            f"Expected finite values during integration, but found {found} in {what} "
            f"at t = {when}; the score or the step size diverges there (try more steps or a tighter "
            "tolerance)."
        )
    return y


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


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Expected {name} > 0 (a finite number), but found {value!r}.")
    return float(value)


def _check_states(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(
            f"Expected {name} to be a floating-point torch.Tensor, but found {type(x).__name__}."
        )
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"Expected {name} of shape (B, D), but found shape {tuple(x.shape)}.")
    return x


class DiffusionSDE(torchsde.SDEIto):
    r"""Base of the forward SDEs of score-based diffusion: linear drift, state-independent diffusion.

    .. math::
        dx = a(t)\, x\, dt + g(t)\, dW_t, \qquad t \in [0, T],

    so the transition from :math:`x_0` is Gaussian,
    :math:`q(x_t \mid x_0) = \mathcal N(m(t)\, x_0, s(t)^2 I)` with
    :math:`m' = a\, m` and :math:`(s^2)' = 2 a\, s^2 + g^2` (Särkkä & Solin 2019, eq. 6.2;
    Song et al. 2021, arXiv:2011.13456, eq. 29 and App. B). A subclass gives :meth:`drift_coef`
    :math:`a(t)`, :meth:`diffusion` :math:`g(t)`, :meth:`marginal_params` :math:`(m, s)` in closed
    form, ``prior_std`` and ``eps``; the rest follows. ``tests/probgen/test_sdes.py`` checks the
    moment equations above for every subclass and the marginals against long ``sdeint`` runs.

    Attributes:
        T: the end time.
        eps: the default smallest time for sampling, training and likelihoods (Song et al. stop at
            :math:`\epsilon > 0` because the score blows up at :math:`t = 0`).
        prior_std: the prior is :math:`\mathcal N(0, \text{prior\_std}^2 I)`.
    """

    prior_std: float = 1.0

    def __init__(self, T: float = 1.0, eps: float = 1e-3) -> None:
        super().__init__(noise_type="diagonal")
        self.T = _check_positive("T", T)
        self.eps = _check_positive("eps", eps)
        if not self.eps < self.T:
            raise ValueError(f"Expected eps < T = {self.T}, but found {eps!r}.")

    # -- what a subclass gives ---------------------------------------------------------------------
    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t)` with drift :math:`f(x, t) = a(t)\, x`; ``t`` ``(B,)`` gives ``(B,)``."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        r"""The diffusion :math:`g(t)`; ``t`` ``(B,)`` gives ``(B,)``."""
        raise NotImplementedError

    def marginal_params(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(m(t), s(t))` with :math:`x_t = m(t)\, x_0 + s(t)\, \epsilon`.

        Both are shaped like ``t`` (``(B,)`` for ``(B,)``).
        """
        raise NotImplementedError

    # -- derived ----------------------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        r"""The drift :math:`a(t)\, x`: ``x`` ``(B, D)``, ``t`` ``(B,)``; ``(B, D)``."""
        return append_dims(self.drift_coef(t), x.ndim) * x

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift ``(B, D)`` and diffusion ``(B,)`` at ``x`` ``(B, D)``, ``t`` ``(B,)``."""
        return self.drift(x, t), self.diffusion(t)

    def f(self, t: float | Tensor, y: Tensor) -> Tensor:
        """torchsde drift at time ``t`` (a float or 0-d tensor), ``y`` ``(B, D)``; ``(B, D)``."""
        return self.drift(y, batch_times(t, y))

    def g(self, t: float | Tensor, y: Tensor) -> Tensor:
        """torchsde diagonal diffusion, ``(B, D)``."""
        return append_dims(self.diffusion(batch_times(t, y)), y.ndim).expand_as(y)

    def marginal(self, x0: Tensor, t: float | Tensor) -> Distribution:
        r"""The transition :math:`q(x_t \mid x_0) = \mathcal N(m(t)\, x_0, s(t)^2 I)`.

        Args:
            x0: ``(B, D)``.
            t: times in :math:`[0, T]`, a float or ``(B,)``.

        Returns:
            An ``Independent(Normal)`` with batch shape ``(B,)`` and event shape ``(D,)``.
        """
        x0 = _check_states(x0, "x0")
        t = batch_times(t, x0)
        if bool(((t < 0) | (t > self.T)).any()):
            raise ValueError(
                f"Expected times in [0, {self.T}], but found {t.min().item()}..{t.max().item()}."
            )
        mean, std = self.marginal_params(t)
        return Independent(Normal(append_dims(mean, 2) * x0, append_dims(std, 2).expand_as(x0)), 1)

    def prior(self, D: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        r"""The prior :math:`\mathcal N(0, \text{prior\_std}^2 I_D)` at time :math:`T`.

        Returns:
            An ``Independent(Normal)`` with event shape ``(D,)``.
        """
        if isinstance(D, bool) or not isinstance(D, int) or D < 1:
            raise ValueError(f"Expected D >= 1 (an int), but found {D!r}.")
        loc = torch.zeros(D, device=device, dtype=dtype or torch.get_default_dtype())
        return Independent(Normal(loc, torch.full_like(loc, self.prior_std)), 1)

    def prior_sample(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draws of the prior of ``shape``, e.g. ``(B, D)``, from ``generator`` (default the global RNG)."""
        if generator is not None and device is None:
            device = generator.device
        return self.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior at ``z`` ``(B, D)`` (any ``(B, ...)``, summed over the rest); ``(B,)``."""
        if not isinstance(z, Tensor) or z.ndim < 2:
            raise ValueError(
                f"Expected z of shape (B, D), but found {getattr(z, 'shape', type(z).__name__)}."
            )
        z = z.reshape(len(z), -1)
        D, s = z.shape[1], self.prior_std
        return -0.5 * (z / s).pow(2).sum(1) - D * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def discretize(self, x: Tensor, t: float | Tensor, dt: float) -> tuple[Tensor, Tensor]:
        r"""One forward step of a discretization, :math:`x_{t} = x_{t - \Delta t} + f_i + G_i z`.

        This default is Euler-Maruyama at ``t``: :math:`f_i = f(x, t)\, \Delta t`,
        :math:`G_i = g(t) \sqrt{\Delta t}` (score_sde's ``SDE.discretize``). The reverse-diffusion
        predictor steps back with it: :math:`x \leftarrow x - f_i + G_i^2\, s(x, t) + G_i z`
        (Song et al. 2021, eq. 45).

        Args:
            x: ``(B, D)``.
            t: the step's end time, a float or ``(B,)``.
            dt: the step :math:`\Delta t > 0`.

        Returns:
            ``(f_i, G_i)`` of shapes ``(B, D)`` and ``(B,)``.
        """
        t = batch_times(t, x)
        drift, g = self.sde(x, t)
        return drift * dt, g * math.sqrt(dt)

    def corrector_alpha(self, t: float | Tensor, dt: float, like: Tensor) -> Tensor:
        r"""The :math:`\alpha_i` of the Langevin corrector (Song et al. 2021, Algorithm 4): 1, ``(B,)``."""
        return torch.ones_like(batch_times(t, like))


class _LinearBetaSDE(DiffusionSDE):
    r"""The linear :math:`\beta(t) = \beta_{\min} + (\beta_{\max} - \beta_{\min}) t / T` of VP and sub-VP."""

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, eps: float = 1e-3
    ) -> None:
        super().__init__(T=T, eps=eps)
        self.beta_min = _check_positive("beta_min", beta_min)
        self.beta_max = _check_positive("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"Expected beta_max >= beta_min = {beta_min}, but found {beta_max!r}.")

    def beta(self, t: Tensor) -> Tensor:
        r""":math:`\beta(t)`, shaped like ``t``."""
        return self.beta_min + (self.beta_max - self.beta_min) * (t / self.T)

    def int_beta(self, t: Tensor) -> Tensor:
        r""":math:`B(t) = \int_0^t \beta(s)\, ds`, shaped like ``t``."""
        return self.beta_min * t + (self.beta_max - self.beta_min) * t**2 / (2 * self.T)

    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t) = -\beta(t) / 2`."""
        return -0.5 * self.beta(t)

    def corrector_alpha(self, t: float | Tensor, dt: float, like: Tensor) -> Tensor:
        r""":math:`\alpha_i = 1 - \beta(t)\, \Delta t`, DDPM's :math:`\alpha_i` (Algorithm 5), ``(B,)``."""
        return 1 - self.beta(batch_times(t, like)) * dt


class VPSDE(_LinearBetaSDE):
    r"""Variance-preserving SDE, the continuous limit of DDPM (Song et al. 2021, arXiv:2011.13456, eq. 11).

    .. math::
        dx = -\tfrac12 \beta(t)\, x\, dt + \sqrt{\beta(t)}\, dW, \qquad
        m(t) = e^{-B(t)/2}, \quad s(t)^2 = 1 - e^{-B(t)},

    with :math:`\beta(t) = \beta_{\min} + (\beta_{\max} - \beta_{\min}) t / T` and
    :math:`B(t) = \int_0^t \beta`; prior :math:`\mathcal N(0, I)`.

    **DDPM.** :meth:`discretize` is DDPM's Markov chain with :math:`\beta_i = \beta(t)\, \Delta t`:
    :math:`x_t = \sqrt{1 - \beta_i}\, x_{t - \Delta t} + \sqrt{\beta_i}\, z`. At
    :math:`t = (i - 1) T / (N - 1)` with :math:`\Delta t = T / N` (score_sde's discrete grid) and
    :math:`T = 1`, :math:`\beta_i = \beta_{\min}/N + \frac{i - 1}{N (N - 1)} (\beta_{\max} - \beta_{\min})`,
    i.e. ``probgen.schedules.linear_betas(N, beta_min / N, beta_max / N)``; the defaults 0.1, 20 and
    :math:`N = 1000` give ``linear_betas(1000)`` of :class:`probgen.models.DDPM` (1e-4 ... 0.02).

    Args:
        beta_min: :math:`\beta_{\min} > 0`.
        beta_max: :math:`\beta_{\max} \ge \beta_{\min}`.
        T: the end time.
        eps: the default smallest time (1e-3 as in the paper).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)}`."""
        return self.beta(t).sqrt()

    def marginal_params(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`m = e^{-B/2}`, :math:`s = \sqrt{1 - e^{-B}}` (``expm1`` keeps small times exact)."""
        b = self.int_beta(torch.as_tensor(t))
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def discretize(self, x: Tensor, t: float | Tensor, dt: float) -> tuple[Tensor, Tensor]:
        r"""DDPM's step: :math:`f_i = (\sqrt{1 - \beta_i} - 1)\, x`, :math:`G_i = \sqrt{\beta_i}`.

        Here :math:`\beta_i = \beta(t)\, \Delta t` (Song et al. 2021, App. B; score_sde's
        ``VPSDE.discretize`` on its grid).
        """
        beta_i = self.beta(batch_times(t, x)) * dt
        return append_dims(torch.sqrt(1 - beta_i) - 1, x.ndim) * x, beta_i.sqrt()


class SubVPSDE(_LinearBetaSDE):
    r"""Sub-VP SDE (Song et al. 2021, arXiv:2011.13456, eq. 12), whose variance stays below the VP's.

    .. math::
        dx = -\tfrac12 \beta(t)\, x\, dt + \sqrt{\beta(t) \big(1 - e^{-2 B(t)}\big)}\, dW, \qquad
        m(t) = e^{-B(t)/2}, \quad s(t) = 1 - e^{-B(t)},

    (the seed notes' last SDE; ``DESIGN.md``); prior :math:`\mathcal N(0, I)`. :meth:`discretize` is
    Euler-Maruyama, as in the authors' code.

    Args:
        beta_min: :math:`\beta_{\min} > 0`.
        beta_max: :math:`\beta_{\max} \ge \beta_{\min}`.
        T: the end time.
        eps: the default smallest time (1e-3 as in the paper).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t) (1 - e^{-2 B(t)})}`."""
        return torch.sqrt(-self.beta(t) * torch.expm1(-2 * self.int_beta(t)))

    def marginal_params(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`m = e^{-B/2}`, :math:`s = 1 - e^{-B}`."""
        b = self.int_beta(torch.as_tensor(t))
        return torch.exp(-0.5 * b), -torch.expm1(-b)


class VESDE(DiffusionSDE):
    r"""Variance-exploding SDE, the continuous limit of NCSN (Song et al. 2021, arXiv:2011.13456, eq. 9).

    .. math::
        dx = \sigma(t) \sqrt{2 \log(\sigma_{\max} / \sigma_{\min}) / T}\, dW, \qquad
        \sigma(t) = \sigma_{\min} (\sigma_{\max} / \sigma_{\min})^{t / T},

    so :math:`m(t) = 1` and :math:`s(t)^2 = \sigma(t)^2 - \sigma_{\min}^2`, the exact marginal of the
    SDE started at :math:`x_0` (the authors' code uses :math:`s(t) = \sigma(t)`, i.e. treats the
    data as already perturbed by :math:`\sigma_{\min}`); prior :math:`\mathcal N(0, \sigma_{\max}^2 I)`.
    :meth:`discretize` is NCSN's chain, :math:`G_i^2 = s(t)^2 - s(t - \Delta t)^2`.

    Args:
        sigma_min: :math:`\sigma_{\min} > 0`.
        sigma_max: :math:`\sigma_{\max} > \sigma_{\min}`.
        T: the end time.
        eps: the default smallest time (1e-5 as in the paper).
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, eps: float = 1e-5
    ) -> None:
        super().__init__(T=T, eps=eps)
        self.sigma_min = _check_positive("sigma_min", sigma_min)
        self.sigma_max = _check_positive("sigma_max", sigma_max)
        if not sigma_max > sigma_min:
            raise ValueError(f"Expected sigma_max > sigma_min = {sigma_min}, but found {sigma_max!r}.")
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        r""":math:`\sigma(t)`, shaped like ``t``."""
        return self.sigma_min * torch.exp(self._log_ratio * (t / self.T))

    def drift_coef(self, t: Tensor) -> Tensor:
        """:math:`a(t) = 0`."""
        return torch.zeros_like(t)

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sigma(t) \sqrt{2 \log(\sigma_{\max}/\sigma_{\min}) / T}`."""
        return self.sigma(t) * math.sqrt(2 * self._log_ratio / self.T)

    def marginal_params(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`m = 1`, :math:`s = \sigma_{\min} \sqrt{(\sigma_{\max}/\sigma_{\min})^{2t/T} - 1}`."""
        t = torch.as_tensor(t)
        return torch.ones_like(t), self.sigma_min * torch.sqrt(
            torch.expm1(2 * self._log_ratio * (t / self.T))
        )

    def discretize(self, x: Tensor, t: float | Tensor, dt: float) -> tuple[Tensor, Tensor]:
        r"""NCSN's step: :math:`f_i = 0`, :math:`G_i = \sqrt{s(t)^2 - s(\max(t - \Delta t, 0))^2}`."""
        t = batch_times(t, x)
        _, s_now = self.marginal_params(t)
        _, s_prev = self.marginal_params((t - dt).clamp(min=0))
        return torch.zeros_like(x), torch.sqrt(s_now**2 - s_prev**2)


class ReverseSDE(torchsde.SDEIto):
    r"""The reverse-time SDE of a :class:`DiffusionSDE`, run forward in :math:`s = T - t` (Anderson 1982).

    The reverse of :math:`dx = f\, dt + g\, dW` is :math:`dx = [f - g^2 \nabla_x \log p_t(x)]\, dt
    + g\, d\bar W` run from :math:`T` down to 0 (Song et al. 2021, arXiv:2011.13456, eq. 6). In
    :math:`s = T - t` it is the ordinary forward Itô SDE

    .. math::
        dy = -\big[f(y, T - s) - g(T - s)^2\, s_\theta(y, T - s)\big]\, ds + g(T - s)\, dW_s,

    so ``torchsde.sdeint(ReverseSDE(sde, score_fn), x_T, ts=[0, ..., T - eps])`` samples
    (:func:`probgen.inference.sde.reverse_sde_sample` does it).

    Args:
        sde: the forward :class:`DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)``, :math:`\nabla_x \log p_t(x)` at ``x`` ``(B, D)``,
            ``t`` ``(B,)`` the forward time.

    References:
        Anderson 1982, "Reverse-time diffusion equation models", Stochastic Processes and their
        Applications 12(3).
    """

    def __init__(self, sde: DiffusionSDE, score_fn: ScoreFn) -> None:
        super().__init__(noise_type="diagonal")
        if not isinstance(sde, DiffusionSDE):
            raise ValueError(f"Expected a DiffusionSDE, but found {type(sde).__name__}.")
        if not callable(score_fn):
            raise ValueError(f"Expected a callable score_fn(x, t), but found {type(score_fn).__name__}.")
        self.sde = sde
        self.score_fn = score_fn
        self.T = sde.T
        self.__dict__["_last"] = None  # (s, y, (drift, g)) of the last evaluation

    def f(self, s: float | Tensor, y: Tensor) -> Tensor:
        """Reverse drift at reversed time ``s`` and ``y`` ``(B, D)``; ``(B, D)``."""
        return self._drift_and_g(s, y)[0]

    def _drift_and_g(self, s: float | Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # torchsde's sdeint evaluates f, then f_and_g_prod, at (s_0, x_T) to check shapes before its
        # first step there: remembering the last call saves those two score evaluations.
        if self._last is not None and self._last[1] is y and float(self._last[0]) == float(s):
            return self._last[2]
        t = batch_times(self.T - s, y)
        check_finite(y, t)
        drift, g = self.sde.sde(y, t)
        g = append_dims(g, y.ndim)
        out = (g.square() * self.score_fn(y, t) - drift, g)
        self.__dict__["_last"] = (s, y, out)  # nn.Module.__setattr__ costs as much as a small kernel
        return out

    def g(self, s: float | Tensor, y: Tensor) -> Tensor:
        """Diagonal diffusion :math:`g(T - s)`, ``(B, D)``."""
        return self.sde.g(self.T - s, y)

    def f_and_g_prod(self, s: float | Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""Drift and :math:`g\,v` in one pass (torchsde's Euler step calls this): ``(B, D)`` each."""
        drift, g = self._drift_and_g(s, y)
        return drift, g * v


class GridBrownian(torchsde.BaseBrownian):
    r"""Brownian motion sampled on a fixed grid :math:`t_0 + k h`, its increments drawn lazily in order.

    ``torchsde.sdeint`` with a fixed step ``dt = h`` and the Euler-Maruyama or Milstein solver (diagonal
    noise, no Lévy area) only asks for :math:`W(t_{k+1}) - W(t_k)` on the grid it steps through. This
    object answers exactly those (and any sum of them) with i.i.d. :math:`\mathcal N(0, h I)` draws from
    ``generator``, made once each in the order of ``k`` and kept; :class:`torchsde.BrownianInterval`
    answers arbitrary times through a tree of cached intervals, whose bookkeeping costs about as much as
    a small network's evaluation per step. Same law, same solver, less work.

    Args:
        t0: the start of the grid.
        h: the step, > 0.
        steps: the number of grid steps N (times :math:`t_0 .. t_0 + N h`).
        size: the shape of :math:`W(t)`, e.g. ``(B, D)``.
        dtype, device: of the increments.
        generator: the source of the increments (default the global RNG).

    Raises:
        ValueError: when asked for a time off the grid (an adaptive or higher-order solver), or for
            Lévy areas.
    """

    def __init__(
        self,
        t0: float,
        h: float,
        steps: int,
        size: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not h > 0 or not math.isfinite(h):
            raise ValueError(f"Expected a step h > 0, but found {h!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Expected steps >= 1 (an int), but found {steps!r}.")
        self._t0, self._h, self._steps = float(t0), float(h), steps
        self._shape = torch.Size(size)
        self._dtype, self._device = dtype, torch.device("cpu" if device is None else device)
        self._generator = generator
        self._increments: list[Tensor] = []

    def _index(self, t: float | Tensor) -> int:
        k = (float(t) - self._t0) / self._h
        i = round(k)
        if abs(k - i) > 1e-6 * max(1, abs(i)) or not 0 <= i <= self._steps:
            raise ValueError(
                f"Expected a time on the grid {self._t0} + k * {self._h} (k = 0..{self._steps}), but found "
                f"{float(t)!r}; GridBrownian serves fixed-step Euler-Maruyama/Milstein only."
            )
        return i

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False) -> Tensor:
        if return_U or return_A:
            raise ValueError("Expected no Lévy area request (GridBrownian has none), but found one.")
        a, b = (0, self._index(ta)) if tb is None else (self._index(ta), self._index(tb))
        if b < a:
            raise ValueError(f"Expected ta <= tb, but found ta={float(ta)!r} > tb={float(tb)!r}.")
        scale = math.sqrt(self._h)
        while len(self._increments) < b:
            z = torch.randn(self._shape, generator=self._generator, dtype=self._dtype, device=self._device)
            self._increments.append(z.mul_(scale))
        if b == a + 1:
            return self._increments[a]
        if b == a:
            return torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        return torch.stack(self._increments[a:b]).sum(0)

    def __repr__(self) -> str:
        return f"GridBrownian(t0={self._t0}, h={self._h}, steps={self._steps}, size={tuple(self._shape)})"

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def levy_area_approximation(self) -> str:
        return "none"


class ProbabilityFlowODE(nn.Module):
    r"""The probability-flow ODE of a :class:`DiffusionSDE`, as a torchdiffeq function ``forward(t, y)``.

    .. math::
        \frac{dx}{dt} = \tilde f(x, t) = f(x, t) - \tfrac12 g(t)^2\, s_\theta(x, t),

    whose solutions have the marginals :math:`p_t` of the SDE when :math:`s_\theta` is their score
    (Song et al. 2021, arXiv:2011.13456, eq. 13). ``nfe`` counts the calls of ``forward`` (one score
    evaluation each); reset it to 0 to count again. The coefficients are undefined outside
    :math:`[0, T]` (VP's :math:`s(t)` at :math:`t < 0`), and torchdiffeq's adaptive solvers step past
    the last time and interpolate back: give them ``options={"step_t": ts[-1:]}`` so they stop there
    (:func:`probgen.inference.ode.ode_sample` does).

    Args:
        sde: the forward :class:`DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)`` with ``x`` ``(B, D)``, ``t`` ``(B,)``.

    Example:
        >>> from torchdiffeq import odeint
        >>> ode = ProbabilityFlowODE(VPSDE(), lambda x, t: -x)  # data N(0, I): p_t = N(0, I)
        >>> ts = torch.tensor([1.0, 1e-3])
        >>> odeint(ode, torch.zeros(4, 2), ts, options={"step_t": ts[-1:]}).shape
        torch.Size([2, 4, 2])
    """

    def __init__(self, sde: DiffusionSDE, score_fn: ScoreFn) -> None:
        super().__init__()
        if not isinstance(sde, DiffusionSDE):
            raise ValueError(f"Expected a DiffusionSDE, but found {type(sde).__name__}.")
        if not callable(score_fn):
            raise ValueError(f"Expected a callable score_fn(x, t), but found {type(score_fn).__name__}.")
        self.sde = sde
        self.score_fn = score_fn
        self.nfe = 0

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        r""":math:`\tilde f(x, t)` at ``x`` ``(B, D)`` and ``t`` ``(B,)``; ``(B, D)`` (not counted)."""
        drift, g = self.sde.sde(x, t)
        return drift - 0.5 * append_dims(g**2, x.ndim) * self.score_fn(x, t)

    def forward(self, t: float | Tensor, y: Tensor) -> Tensor:
        """torchdiffeq callback: :math:`\\tilde f` at time ``t`` (0-d) and ``y`` ``(B, D)``."""
        self.nfe += 1
        return self.drift(check_finite(y, t), batch_times(t, y))


def flat_score(score_fn: ScoreFn, event_shape: Sequence[int]) -> ScoreFn:
    r"""A score of ``(B, *event_shape)`` inputs as a score of flat ``(B, D)`` inputs, for the SDE boundary.

    Args:
        score_fn: ``score_fn(x, t)`` with ``x`` ``(B, *event_shape)`` (e.g. ``(B, C, H, W)``).
        event_shape: the shape of one example, e.g. ``(1, 8, 8)``.

    Returns:
        ``score(x, t)`` with ``x`` ``(B, D)``, :math:`D = \prod` ``event_shape``, returning ``(B, D)``.
    """
    if not callable(score_fn):
        raise ValueError(f"Expected a callable score_fn(x, t), but found {type(score_fn).__name__}.")
    event_shape = tuple(int(n) for n in event_shape)
    if not event_shape or any(n < 1 for n in event_shape):
        raise ValueError(f"Expected a non-empty event_shape of positive sizes, but found {event_shape}.")
    D = math.prod(event_shape)

    def score(x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != D:
            raise ValueError(f"Expected x of shape (B, {D}), but found {tuple(x.shape)}.")
        return score_fn(x.reshape(len(x), *event_shape), t).reshape(len(x), D)

    return score


class _IntervalODE(nn.Module):
    """The PF-ODE over per-example intervals, rescaled to :math:`u \\in [0, 1]`: :math:`t = a + u (b - a)`."""

    def __init__(self, ode: ProbabilityFlowODE, t_from: Tensor, t_to: Tensor) -> None:
        super().__init__()
        self.ode, self.t_from, self.span = ode, t_from, t_to - t_from

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        t = self.t_from + u * self.span
        return self.ode.drift(y, t) * append_dims(self.span, y.ndim)


@torch.no_grad()
def pf_ode_step(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    t_from: Tensor,
    t_to: Tensor,
    *,
    method: str = "heun2",
) -> Tensor:
    r"""One step of the probability-flow ODE from ``t_from`` to ``t_to``, each example on its own interval.

    Solves :math:`dx/du = \tilde f(x, a + u (b - a))\, (b - a)` over :math:`u \in [0, 1]` with one step of
    the fixed-step torchdiffeq ``method`` (``"heun2"``: Heun's second-order step, the paper's CD solver;
    ``"euler"``; ``"rk4"``, ...), :math:`\tilde f` the drift of :class:`~probgen.sdes.ProbabilityFlowODE`.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: states at ``t_from``, ``(B, D)``.
        t_from, t_to: ``(B,)`` times.
        method: a fixed-step torchdiffeq method.

    Returns:
        ``(B, D)`` states at ``t_to``.
    """
    func = _IntervalODE(ProbabilityFlowODE(sde, score_fn), t_from.to(x.dtype), t_to.to(x.dtype))
    return odeint(func, x, torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device), method=method)[-1]


def sdeint_on_grid(
    sde: object,
    x: Tensor,
    step: float,
    steps: int,
    *,
    method: str = "euler",
    bm: object | None = None,
    tree: bool = False,
    generator: torch.Generator | None = None,
    return_path: bool = False,
) -> Tensor:
    r"""``torchsde.sdeint`` of ``sde`` from ``x`` over exactly ``steps`` steps of size ``step``, from time 0.

    The times are the running float64 sums :math:`t_{k+1} = t_k + h`, the very sums the solver forms,
    so it takes exactly ``steps`` steps and a returned path holds the iterates themselves. The default
    Brownian motion is a :class:`GridBrownian` (the step increments drawn in order from ``generator``),
    or with ``tree`` or ``method="srk"`` a :class:`torchsde.BrownianInterval` seeded from ``generator``
    (with space-time Lévy area for ``"srk"``).

    Returns:
        ``(steps + 1, B, D)`` states with ``return_path``, else ``(2, B, D)``: the start and the end.
    """
    times = [0.0]
    for _ in range(steps):
        times.append(times[-1] + step)
    ts = torch.tensor(times if return_path else [0.0, times[-1]], dtype=torch.float64, device=x.device)
    if bm is None and (tree or method == "srk"):
        device = generator.device if generator is not None else x.device
        entropy = int(torch.randint(2**31 - 1, (), generator=generator, device=device))
        bm = torchsde.BrownianInterval(
            t0=0.0, t1=times[-1], size=tuple(x.shape), dtype=x.dtype, device=x.device, entropy=entropy,
            dt=step, levy_area_approximation="space-time" if method == "srk" else "none",
        )  # fmt: skip
    elif bm is None:  # Euler-Maruyama and Milstein step on the grid: no interval tree needed
        bm = GridBrownian(
            0.0, step, steps, tuple(x.shape), dtype=x.dtype, device=x.device, generator=generator
        )
    return torchsde.sdeint(sde, x, ts, bm=bm, method=method, dt=step)


@dataclass(frozen=True)
class SDESpec:
    """The forward SDE a score-based method is composed with: an SDE object, or its kind and parameters.

    The fields are the method's flat config keys (``sde`` is the kind), so configs stay flat and old
    run directories load as before; :meth:`build` makes the :class:`DiffusionSDE`.

    Attributes:
        kind: ``"vp"``, ``"subvp"`` or ``"ve"``.
        beta_min, beta_max: the linear :math:`\beta(t)` of VP and sub-VP.
        sigma_min, sigma_max: VE's noise levels.
        T: the end time.
        eps: the smallest time for sampling and likelihoods (None: the SDE's own default).
    """

    kind: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0
    eps: float | None = None

    KINDS = ("vp", "subvp", "ve")

    @classmethod
    def from_options(
        cls, sde: str | DiffusionSDE, options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> tuple[SDESpec, dict[str, Any]]:
        """The spec of ``sde`` (a kind with the SDE keys of ``options``, or an SDE object) and the rest.

        Raises:
            ValueError: an unknown kind, or SDE keys given beside an SDE object.
        """
        keys = [f.name for f in fields(cls) if f.name != "kind"]
        mine = {k: options[k] for k in keys if k in options}
        rest = {k: v for k, v in options.items() if k not in mine}
        if isinstance(sde, DiffusionSDE):
            if mine:
                raise ValueError(
                    f"Expected no {sorted(mine)} beside an SDE object (set them on it), but found them."
                )
            kind = {VPSDE: "vp", SubVPSDE: "subvp", VESDE: "ve"}.get(type(sde))
            if kind is None:
                raise ValueError(f"Expected a VPSDE, SubVPSDE or VESDE, but found {type(sde).__name__}.")
            params = {k: float(getattr(sde, k)) for k in keys if hasattr(sde, k)}
            return replace(cls(kind=kind), **params), rest
        if sde not in cls.KINDS:
            raise ValueError(f"Expected sde in {cls.KINDS}, but found {sde!r}.")
        values = {**dict(defaults or {}), **mine}
        values = {k: (None if v is None else float(v)) for k, v in values.items()}
        return replace(cls(kind=sde), **values), rest

    def config(self) -> dict[str, Any]:
        """The flat config entries (``sde`` for the kind)."""
        out = asdict(self)
        return {"sde": out.pop("kind"), **out}

    def build(self) -> DiffusionSDE:
        """The forward SDE (``eps`` None: its own default)."""
        extra = {} if self.eps is None else {"eps": self.eps}
        if self.kind == "ve":
            return VESDE(sigma_min=self.sigma_min, sigma_max=self.sigma_max, T=self.T, **extra)
        cls = VPSDE if self.kind == "vp" else SubVPSDE
        return cls(beta_min=self.beta_min, beta_max=self.beta_max, T=self.T, **extra)


def langevin_step(x: Tensor, score: Tensor, step_size: Any) -> tuple[Tensor, Any]:
    r"""The unadjusted Langevin step as a Gaussian: :math:`x' \sim \mathcal N(x + 	frac{lpha}{2} s, lpha I)`.

    Song & Ermon 2019 (arXiv:1907.05600), Algorithm 1. Returns ``(loc, scale)``: the Pyro Markov chain of
    :func:`probgen.models.score_matching.langevin_chain` samples ``Normal(loc, scale)`` and
    :func:`probgen.inference.langevin.annealed_langevin` takes ``loc + scale * z``, the same step.

    Args:
        x: states ``(B, D)``.
        score: the score at ``x``, ``(B, D)``.
        step_size: :math:`lpha > 0` (a float or a tensor).
    """
    scale = step_size.sqrt() if isinstance(step_size, Tensor) else math.sqrt(step_size)
    return x + 0.5 * step_size * score, scale
