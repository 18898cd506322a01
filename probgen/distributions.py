r"""Pyro distributions for forward processes and discrete data likelihoods.

:class:`DiscretizedLogistic` puts a logistic density on the real line and
integrates it over the bins of ``num_levels`` integer levels, with the two
edge bins absorbing the tails (Salimans et al. 2017, PixelCNN++,
arXiv:1701.05517). A mixture of them is ``MixtureSameFamily`` over it.

For DDPM (Ho et al. 2020, arXiv:2006.11239): the forward process's closed forms
:func:`q_step` :math:`q(x_t \mid x_{t-1})`, :func:`q_marginal` :math:`q(x_t \mid x_0)` and
:func:`q_posterior` :math:`q(x_{t-1} \mid x_t, x_0)` as diagonal Gaussians;
:class:`DiscretizedGaussian`, the L_0 decoder of level data (eq. 13); and
:class:`UniformSteps`, the uniform law of the time step of the one-step ELBO
estimator.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.util import is_validation_enabled
from torch import Tensor
from torch.distributions import register_kl
from torch.distributions.utils import broadcast_all

from probgen.schedules import DiffusionSchedule, at_step

__all__ = [
    "DiscretizedGaussian",
    "DiscretizedLogistic",
    "UniformSteps",
    "q_marginal",
    "q_posterior",
    "q_step",
]


class DiscretizedLogistic(TorchDistribution):
    r"""Logistic distribution discretized to the integer levels ``0 .. num_levels - 1``.

    .. math::
        P(v) = \sigma\Big(\frac{v + \frac12 - \mu}{s}\Big) - \sigma\Big(\frac{v - \frac12 - \mu}{s}\Big),

    with :math:`v - \frac12` replaced by :math:`-\infty` for :math:`v = 0` and
    :math:`v + \frac12` by :math:`+\infty` for :math:`v = L - 1`, computed in log
    space as :math:`\log\sigma(a) + \log\sigma(-b) + \log(1 - e^{b - a})`.

    Args:
        loc: location :math:`\mu` in level units, any shape.
        scale: scale :math:`s > 0` in level units, broadcastable with ``loc``.
        num_levels: number of levels L >= 2.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc, scale, num_levels: int, validate_args=None) -> None:
        if num_levels < 2:
            raise ValueError(f"Expected num_levels >= 2, but found {num_levels}.")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_levels = int(num_levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.to(self.loc.dtype)
        inv_s = self.scale.reciprocal()
        a = (value + 0.5 - self.loc) * inv_s  # upper edge
        b = (value - 0.5 - self.loc) * inv_s  # lower edge
        interior = F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-inv_s))
        lowest = F.logsigmoid(a)
        highest = F.logsigmoid(-b)
        out = torch.where(value <= 0, lowest, interior)
        return torch.where(value >= self.num_levels - 1, highest, out)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
        return x.round().clamp(0, self.num_levels - 1)

    @property
    def mean(self) -> torch.Tensor:
        levels = torch.arange(self.num_levels, dtype=self.loc.dtype, device=self.loc.device)
        lp = self.log_prob(levels.view((-1,) + (1,) * self.loc.dim()).expand((-1,) + self.loc.shape))
        return (lp.exp() * levels.view((-1,) + (1,) * self.loc.dim())).sum(0)


# ----------------------------------------------------------------------------- DDPM forward process


def _at(coef: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
    """:func:`~probgen.schedules.at_step`, with the range of tensor steps checked under validation."""
    if isinstance(t, Tensor) and is_validation_enabled() and t.numel():
        if not bool(((t >= 1) & (t <= coef.shape[0])).all()):
            raise ValueError(
                f"Expected steps t in [1, {coef.shape[0]}], but found values in "
                f"[{int(t.min())}, {int(t.max())}]."
            )
    return at_step(coef, t, like)


def q_step(schedule: DiffusionSchedule, x_prev: Tensor, t: int | Tensor, *, event_dim: int = 1):
    r"""One forward step :math:`q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{\alpha_t}\, x_{t-1}, \beta_t I)`.

    Args:
        schedule: the forward process's coefficients.
        x_prev: :math:`x_{t-1}`, ``(B, D)``.
        t: the step, an int in ``1..T`` or a ``(B,)`` integer tensor.
        event_dim: number of trailing event dims of ``x_prev`` (1 for flat ``(B, D)`` data).

    Returns:
        ``Normal(...).to_event(event_dim)``, batch shape ``(B,)``.
    """
    loc = _at(schedule.alphas, t, x_prev).sqrt() * x_prev
    scale = _at(schedule.betas, t, x_prev).sqrt().expand_as(loc)
    return dist.Normal(loc, scale).to_event(event_dim)


def q_marginal(schedule: DiffusionSchedule, x0: Tensor, t: int | Tensor, *, event_dim: int = 1):
    r"""Forward marginal :math:`q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t} x_0, (1-\bar\alpha_t) I)`.

    Ho et al. 2020 (arXiv:2006.11239), eq. (4).

    Args:
        schedule: the forward process's coefficients.
        x0: clean data :math:`x_0`, ``(B, D)``.
        t: the step, an int in ``1..T`` or a ``(B,)`` integer tensor.
        event_dim: number of trailing event dims of ``x0``.

    Returns:
        ``Normal(...).to_event(event_dim)``, batch shape ``(B,)``.
    """
    loc = _at(schedule.sqrt_alpha_bars, t, x0) * x0
    scale = _at(schedule.sqrt_one_minus_alpha_bars, t, x0).expand_as(loc)
    return dist.Normal(loc, scale).to_event(event_dim)


def q_posterior(
    schedule: DiffusionSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    *,
    event_dim: int = 1,
    min_variance: float = 0.0,
):
    r"""Forward posterior :math:`q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)`.

    Ho et al. 2020 (arXiv:2006.11239), eqs. (6)-(7). At ``t = 1``,
    :math:`\tilde\beta_1 = 0` (the posterior is a point mass at :math:`x_0`): pass
    ``min_variance > 0`` to get a proper distribution there (the DDPM programs mask
    those entries out, so any valid value does).

    Args:
        schedule: the forward process's coefficients.
        x0: clean data, ``(B, D)``.
        x_t: the noised state at step ``t``, ``(B, D)``.
        t: the step, an int in ``1..T`` or a ``(B,)`` integer tensor.
        event_dim: number of trailing event dims.
        min_variance: lower bound on the variance.

    Returns:
        ``Normal(...).to_event(event_dim)``, batch shape ``(B,)``.
    """
    loc = _at(schedule.posterior_mean_coef1, t, x0) * x0 + _at(schedule.posterior_mean_coef2, t, x0) * x_t
    var = _at(schedule.posterior_variance, t, x0)
    if min_variance > 0:
        var = var.clamp(min=min_variance)
    return dist.Normal(loc, var.sqrt().expand_as(loc)).to_event(event_dim)


class UniformSteps(TorchDistribution):
    r"""The uniform distribution on the steps :math:`\{1, \dots, T\}`.

    Its law has no parameters, so a draw is a constant of every parameter and the
    pathwise ("reparameterized") gradient through it is exactly zero: hence
    ``has_rsample = True`` and ``rsample = sample``. This is what lets the DDPM
    one-step estimator put ``t`` in a site that mean-field ELBOs accept; the KL
    between two of them with the same T is registered as exactly 0.

    Args:
        num_steps: T >= 1.
        batch_shape: batch shape of the draws.
        device: device of the draws.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        num_steps: int,
        batch_shape=torch.Size(),
        *,
        device: torch.device | str | None = None,
        validate_args=None,
    ) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"Expected num_steps >= 1 (an int), but found {num_steps!r}.")
        self.num_steps = num_steps
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(1, self.num_steps)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(UniformSteps, _instance)
        new.num_steps = self.num_steps
        new.device = self.device
        super(UniformSteps, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        return torch.randint(1, self.num_steps + 1, self._extended_shape(sample_shape), device=self.device)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        return torch.full(shape, -math.log(self.num_steps), device=value.device)


@register_kl(UniformSteps, UniformSteps)
def _kl_uniform_steps(p: UniformSteps, q: UniformSteps) -> Tensor:
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    value = math.log(q.num_steps / p.num_steps) if p.num_steps <= q.num_steps else math.inf
    return torch.full(shape, value, device=p.device)


class DiscretizedGaussian(TorchDistribution):
    r"""Gaussian integrated over the bins of ``num_levels`` levels in :math:`[-1, 1]` (DDPM's L_0 decoder).

    Level :math:`v \in \{0, \dots, L-1\}` sits at the bin centre :math:`c_v = (2v + 1)/L - 1`
    with half-width :math:`1/L`, and the edge bins absorb the tails (Ho et al. 2020,
    arXiv:2006.11239, eq. 13, with L levels instead of 256):

    .. math::
        P(v) = \Phi\Big(\frac{c_v + 1/L - \mu}{\sigma}\Big) - \Phi\Big(\frac{c_v - 1/L - \mu}{\sigma}\Big),

    with the upper limit :math:`+\infty` for :math:`v = L - 1` and the lower limit
    :math:`-\infty` for :math:`v = 0`. Computed in log space with ``log_ndtr``, in the
    tail where the difference is accurate.

    Args:
        loc: :math:`\mu` on the :math:`[-1, 1]` scale, any shape.
        scale: :math:`\sigma > 0`, broadcastable with ``loc``.
        num_levels: L >= 2.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc, scale, num_levels: int, validate_args=None) -> None:
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"Expected num_levels >= 2 (an int), but found {num_levels!r}.")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_levels = num_levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        super(DiscretizedGaussian, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def centres(self, value: Tensor) -> Tensor:
        """Bin centres :math:`c_v = (2v + 1)/L - 1` of levels ``value``."""
        return (2 * value.to(self.loc.dtype) + 1) / self.num_levels - 1

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        inv_s = self.scale.reciprocal()
        centred = self.centres(value) - self.loc
        upper = (centred + 1 / self.num_levels) * inv_s
        lower = (centred - 1 / self.num_levels) * inv_s
        lowest, highest = value <= 0, value >= self.num_levels - 1
        # Interior: Phi(u) - Phi(l) = Phi(-l) - Phi(-u); take the form whose terms lie in the left
        # tail, log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))) with a < b. Edge bins need one
        # term only, log Phi(u) or log Phi(-l), which shares the first log_ndtr call.
        flip = lower > 0
        a = torch.where(flip, -upper, lower)
        b = torch.where(flip, -lower, upper)
        b = torch.where(lowest, upper, torch.where(highest, -lower, b))
        log_b = torch.special.log_ndtr(b)
        gap = -torch.expm1(torch.special.log_ndtr(a) - log_b)
        interior = log_b + gap.clamp(min=torch.finfo(gap.dtype).tiny).log()
        return torch.where(lowest | highest, log_b, interior)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        y = torch.normal(self.loc.expand(shape), self.scale.expand(shape))
        return self.levels(y)

    def levels(self, y: Tensor) -> Tensor:
        """The level whose bin holds ``y`` (edge bins extended to infinity), as floats."""
        return ((y + 1) * (self.num_levels / 2)).floor().clamp(0, self.num_levels - 1)

    @property
    def mode(self) -> Tensor:
        """The most probable level: the one whose bin holds ``loc``."""
        return self.levels(self.loc)
