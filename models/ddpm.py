r"""Denoising diffusion probabilistic model as a Pyro Markov chain.

Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239).
The reverse chain is the model and the fixed forward process is the guide:

.. math::
    p_\theta(x_{0:T}) = p(x_T) \prod_{t=1}^T p_\theta(x_{t-1} \mid x_t), \qquad
    q(x_{1:T} \mid x_0) = q(x_T \mid x_0) \prod_{t=2}^T q(x_{t-1} \mid x_t, x_0),

with :math:`p(x_T) = \mathcal N(0, I)`, :math:`p_\theta(x_{t-1} \mid x_t) = \mathcal N(\mu_\theta(x_t, t),
\sigma_t^2 I)` and, for :math:`t = 1`, a decoder of :math:`x_0` suited to the data (a Gaussian
for real vectors, :class:`~probgen.distributions.DiscretizedGaussian` for integer levels,
eq. 13). :meth:`DDPM.chain_model` / :meth:`DDPM.chain_guide` are these programs with every
:math:`x_1, \dots, x_T` a sample site, so Pyro's ``Trace_ELBO`` over them is the chain's ELBO
:math:`-(L_T + \sum_{t=2}^T L_{t-1} + L_0)` (eq. 5).

**Training programs.** :meth:`DDPM.model` / :meth:`DDPM.guide` make Pyro's ELBO
(:class:`~probgen.elbo.AnalyticKL_ELBO`) equal to the unbiased one-step estimator of that
ELBO, vectorized over the batch in one ``pyro.plate("data", B)``, each example with its own
step. Both programs have the sites

* ``"t"`` :math:`\sim \mathcal U\{1..T\}` (:class:`~probgen.distributions.UniformSteps`) and
  ``"x_t"`` :math:`\sim q(x_t \mid x_0)`, with the *same* distribution in model and guide:
  their analytic KL is exactly 0, so these auxiliary sites only carry values;
* ``"x_T"``: :math:`q(x_T \mid x_0)` in the guide, :math:`\mathcal N(0, I)` in the model:
  the KL is :math:`L_T`;
* ``"x_prev"`` under ``poutine.mask(t > 1)``: :math:`q(x_{t-1} \mid x_t, x_0)` in the guide,
  :math:`p_\theta(x_{t-1} \mid x_t)` in the model: the KL is :math:`L_{t-1}`;
* in the model only, the observed ``"x"`` under ``poutine.mask(t = 1)``: the decoder
  :math:`p_\theta(x_0 \mid x_1)`, whose log-probability is :math:`-L_0`;

and ``"x_prev"`` and ``"x"`` sit in ``poutine.scale(T)``. Since :math:`t` is uniform,
:math:`\mathbb E_t[T\, \ell_t] = \sum_t \ell_t`: the expected ELBO of the programs is the chain's
ELBO (``tests/models/test_ddpm.py`` checks it against ``Trace_ELBO`` over the chain programs).

**L_simple** (eq. 14) is the same programs with ``weighting="simple"``: the factor ``T`` is
replaced per example by :math:`w_t = 2 \sigma_t^2 \alpha_t (1 - \bar\alpha_t) / \beta_t^2`.
With :math:`\mu_\theta = (x_t - \beta_t \epsilon_\theta / \sqrt{1 - \bar\alpha_t}) / \sqrt{\alpha_t}`,
:math:`L_{t-1} = \lVert \epsilon - \epsilon_\theta \rVert^2 / w_t + c_t` with a constant
:math:`c_t` (0 when :math:`\sigma_t^2 = \tilde\beta_t`), and the Gaussian decoder's
:math:`L_0` has the same form, so the reweighted objective is
:math:`\mathbb E_{t, \epsilon} \lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2` (summed over
dimensions) plus a constant; for the discretized decoder the :math:`t = 1` term is its
pdf-times-bin-width approximation, as in the paper. For the ``x0`` parameterization the same
factor makes the term the squared error of the implied :math:`\epsilon`.

**Sampling.** Running :meth:`DDPM.model` with nothing observed runs :meth:`DDPM.chain_model`,
one site per step (Algorithm 2; the step is
:math:`x_{t-1} = (x_t - \beta_t \epsilon_\theta / \sqrt{1 - \bar\alpha_t}) / \sqrt{\alpha_t} + \sigma_t z`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.distributions import DiscretizedGaussian, UniformSteps, q_marginal, q_posterior
from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, register
from probgen.nets import NetSpec
from probgen.schedules import DiffusionSchedule, at_step, cosine_betas, linear_betas

__all__ = ["DDPM", "DECODERS", "PARAMETERIZATIONS", "SCHEDULES", "VARIANCES", "WEIGHTINGS"]

SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "x0")
VARIANCES = ("beta", "beta_tilde")
WEIGHTINGS = ("elbo", "simple")
DECODERS = ("gaussian", "discretized")


@dataclass(frozen=True, eq=False)
class _Tables:
    """Per-step coefficients on one device/dtype (index ``t - 1``)."""

    schedule: DiffusionSchedule
    sigma: Tensor  # reverse std sigma_t
    recip_sqrt_alpha: Tensor  # 1 / sqrt(alpha_t)
    eps_coef: Tensor  # beta_t / sqrt(1 - abar_t)
    simple_weight: Tensor  # 2 sigma_t^2 alpha_t (1 - abar_t) / beta_t^2


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected {what} in {choices}, but found {value!r}.")


#: DDPM's network defaults (wider than the score models': Ho et al.'s toy settings).
NET_DEFAULTS = {"hidden": (256, 256, 256), "embed_dim": 128}


@register("ddpm")
class DDPM(Method):
    r"""DDPM: the reverse chain as the model, the forward process as the guide.

    Args:
        data_dim: flat size D of one observation.
        event_shape: shape of one observation; ``(C, H, W)`` with ``H == W`` selects a
            :class:`~probgen.nets.UNet`, anything else an :class:`~probgen.nets.MLP`
            (default ``(D,)``).
        T: number of diffusion steps.
        schedule: ``"linear"`` (:math:`10^{-4}` to 0.02) or ``"cosine"`` (Nichol & Dhariwal 2021).
        betas: an explicit schedule of length ``T`` overriding ``schedule``.
        parameterization: the network predicts ``"eps"`` (:math:`\epsilon`) or ``"x0"``.
        variance: reverse variance :math:`\sigma_t^2`: ``"beta"`` (:math:`\beta_t`) or
            ``"beta_tilde"`` (:math:`\tilde\beta_t`, with :math:`\tilde\beta_2` at :math:`t = 1`
            as in Ho et al.'s code, since :math:`\tilde\beta_1 = 0`).
        weighting: ``"elbo"`` (the variational bound) or ``"simple"`` (L_simple, eq. 14).
        decoder: ``"gaussian"`` for real vectors; ``"discretized"`` for integer levels
            ``0 .. num_levels - 1``, diffused at bin centres :math:`(2v + 1)/L - 1`.
        num_levels: L, the number of levels of discretized data.
        hidden: hidden widths of the MLP.
        base_channels, channel_mults, num_res_blocks, attention: UNet options.
        embed_dim: size of the networks' time embedding.
        dropout: UNet dropout.
        net: a custom predictor ``net(x, s) -> (B, *event_shape)`` for ``x`` of shape
            ``(B, *event_shape)`` and network time ``s = t - 1`` (float, ``(B,)`` or scalar);
            not saved in :attr:`config`.

    Example:
        >>> ddpm = DDPM(64, event_shape=(1, 8, 8), decoder="discretized", num_levels=17)
        >>> loss = ddpm.elbo().differentiable_loss(ddpm.model, ddpm.guide, x)  # x: (B, 64) levels
        >>> samples = ddpm.sample(16)                                            # (16, 64) levels
    """

    samplers = {"ancestral": "ddpm-ancestral", "ddim": "ddim"}
    likelihoods = {"bound": "ddpm-bound"}

    def __init__(
        self,
        data_dim: int,
        *,
        event_shape: Sequence[int] | None = None,
        T: int = 1000,
        schedule: str = "linear",
        betas: Sequence[float] | None = None,
        parameterization: str = "eps",
        variance: str = "beta",
        weighting: str = "elbo",
        decoder: str = "gaussian",
        num_levels: int = 17,
        net: nn.Module | None = None,
        **net_options: Any,
    ) -> None:
        super().__init__()
        self.net_spec = NetSpec.from_options(net_options, defaults=NET_DEFAULTS)
        if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"Expected data_dim >= 1 (an int), but found {data_dim!r}.")
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"Expected T >= 1 (an int), but found {T!r}.")
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        _check_choice("variance", variance, VARIANCES)
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("decoder", decoder, DECODERS)
        if decoder == "discretized" and (not isinstance(num_levels, int) or num_levels < 2):
            raise ValueError(
                f"Expected num_levels >= 2 for the discretized decoder, but found {num_levels!r}."
            )
        event_shape = (data_dim,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != data_dim:
            raise ValueError(
                f"Expected an event_shape with {data_dim} elements, but found {event_shape} "
                f"({math.prod(event_shape)} elements)."
            )
        if betas is not None:
            betas_t = torch.as_tensor(list(betas), dtype=torch.float64)
            if betas_t.dim() != 1 or betas_t.numel() != T:
                raise ValueError(
                    f"Expected {T} betas (one per step), but found shape {tuple(betas_t.shape)}."
                )
        else:
            betas_t = linear_betas(T) if schedule == "linear" else cosine_betas(T)
        self.config = dict(
            data_dim=data_dim,
            event_shape=list(event_shape),
            T=T,
            schedule=schedule,
            betas=None if betas is None else [float(b) for b in betas],
            parameterization=parameterization,
            variance=variance,
            weighting=weighting,
            decoder=decoder,
            num_levels=num_levels,
            **self.net_spec.config(),
        )
        self.data_dim, self.event_shape, self.T = data_dim, event_shape, T
        self.parameterization, self.variance, self.weighting = parameterization, variance, weighting
        self.decoder, self.num_levels = decoder, num_levels
        self.schedule = DiffusionSchedule.from_betas(betas_t)
        self.net = net if net is not None else self.net_spec.build(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype
        self._tables_cache: dict[tuple[torch.device, torch.dtype], _Tables] = {}

    # ------------------------------------------------------------------ protocol

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Integer levels for level data (the discretized decoder), raw values for the toys."""
        return "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> DDPM:
        """A DDPM for ``dataset``: discretized decoder for level data, Gaussian for real vectors."""
        defaults: dict[str, Any] = {"data_dim": dataset.x.shape[-1], "event_shape": list(dataset.event_shape)}
        if dataset.num_levels is not None and dataset.num_levels >= 2:
            defaults.update(decoder="discretized", num_levels=int(dataset.num_levels))
        else:
            defaults.update(decoder="gaussian")
        defaults.update(kwargs)
        return cls(**defaults)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO()

    def check_data(self, x: Tensor) -> Tensor:
        """Validate a batch ``x`` of shape ``(B, D)`` (integer levels for the discretized decoder)."""
        super().check_data(x)
        if self.decoder == "discretized" and x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > self.num_levels - 1 or bool((x != x.round()).any()):
                raise ValueError(
                    f"Expected integer levels in [0, {self.num_levels - 1}] for the discretized decoder, "
                    f"but found values in [{lo}, {hi}]"
                    + ("" if bool((x == x.round()).all()) else " (not all integers)")
                    + "."
                )
        return x

    # ------------------------------------------------------------------ building blocks

    def encode(self, x: Tensor) -> Tensor:
        r"""Data ``(B, D)`` in the diffusion's space: levels at bin centres :math:`(2v + 1)/L - 1`."""
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"Expected data of shape (B, {self.data_dim}), but found {tuple(x.shape)}.")
        x = x.to(self._anchor.dtype)
        if self.decoder == "discretized":
            return (2 * x + 1) / self.num_levels - 1
        return x

    def tables(self, like: Tensor) -> _Tables:
        """The per-step coefficients on ``like``'s device and dtype (cached)."""
        key = (like.device, like.dtype)
        tables = self._tables_cache.get(key)
        if tables is None:
            s = self.schedule
            if self.variance == "beta":
                var = s.betas
            else:
                var = s.posterior_variance.clone()
                var[0] = s.posterior_variance[1] if self.T > 1 else s.betas[0]
            weight = 2 * var * s.alphas * (1 - s.alpha_bars) / s.betas**2
            tables = _Tables(
                schedule=s.to(like.device, like.dtype),
                sigma=var.sqrt().to(like.device, like.dtype),
                recip_sqrt_alpha=s.alphas.rsqrt().to(like.device, like.dtype),
                eps_coef=(s.betas / s.sqrt_one_minus_alpha_bars).to(like.device, like.dtype),
                simple_weight=weight.to(like.device, like.dtype),
            )
            self._tables_cache[key] = tables
        return tables

    def _net(self, x_t: Tensor, t: int | Tensor) -> Tensor:
        s = float(t - 1) if isinstance(t, int) else (t - 1).to(x_t.dtype)
        out = self.net(x_t.reshape(x_t.shape[0], *self.event_shape), s)
        return out.reshape(x_t.shape)

    def predict(self, x_t: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        r"""The network's predictions :math:`(\hat\epsilon, \hat x_0)` at ``x_t`` (``(B, D)``), step ``t``.

        Args:
            x_t: states, ``(B, D)``.
            t: the step, an int in ``1..T`` or a ``(B,)`` integer tensor.

        Returns:
            ``(eps_hat, x0_hat)``, each ``(B, D)``; one of them is the network output, the other
            follows from :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t} \epsilon`.
        """
        s = self.tables(x_t).schedule
        out = self._net(x_t, t)
        a, b = at_step(s.sqrt_alpha_bars, t, x_t), at_step(s.sqrt_one_minus_alpha_bars, t, x_t)
        if self.parameterization == "eps":
            return out, (x_t - b * out) / a
        return (x_t - a * out) / b, out

    def p_loc_scale(self, x_t: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        r"""Mean :math:`\mu_\theta(x_t, t)` ``(B, D)`` and std :math:`\sigma_t` of the reverse step.

        At ``t = 1`` these are the decoder's location and scale. One network call.
        """
        tab = self.tables(x_t)
        out = self._net(x_t, t)
        if self.parameterization == "eps":
            loc = at_step(tab.recip_sqrt_alpha, t, x_t) * (x_t - at_step(tab.eps_coef, t, x_t) * out)
        else:
            s = tab.schedule
            c1, c2 = at_step(s.posterior_mean_coef1, t, x_t), at_step(s.posterior_mean_coef2, t, x_t)
            loc = c1 * out + c2 * x_t
        return loc, at_step(tab.sigma, t, x_t)

    def decoder_dist(self, loc: Tensor, scale: Tensor) -> dist.Distribution:
        r"""The decoder :math:`p_\theta(x_0 \mid x_1)` from the last step's ``loc`` ``(B, D)``, ``scale``."""
        if self.decoder == "discretized":
            return DiscretizedGaussian(loc, scale, self.num_levels).to_event(1)
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1)

    def _step_weight(self, t: Tensor) -> float | Tensor:
        if self.weighting == "elbo":
            return float(self.T)
        return self.tables(self._anchor).simple_weight[t - 1]  # (B,): one factor per example

    # ------------------------------------------------------------------ training programs

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> Tensor | None:
        r"""One-step program of the reverse chain; with ``x=None``, :meth:`chain_model` (sampling).

        Args:
            x: observations ``(B, D)`` (levels for the discretized decoder), or None.
            batch_size: number of samples when ``x`` is None.
        """
        if x is None:
            return self.chain_model(None, batch_size)
        x0 = self.encode(x)
        n = x0.shape[0]
        sched = self.tables(x0).schedule
        with pyro.plate("data", n):
            t = pyro.sample("t", UniformSteps(self.T, device=x0.device).expand([n]))
            pyro.sample("x_T", dist.Normal(x0.new_zeros(()).expand_as(x0), 1.0).to_event(1))
            x_t = pyro.sample("x_t", q_marginal(sched, x0, t))
            loc, scale = self.p_loc_scale(x_t, t)
            with poutine.scale(scale=self._step_weight(t)):
                with poutine.mask(mask=t > 1):
                    pyro.sample("x_prev", dist.Normal(loc, scale.expand_as(loc)).to_event(1))
                with poutine.mask(mask=t == 1):
                    pyro.sample("x", self.decoder_dist(loc, scale), obs=x)
        return None

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        r"""One-step program of the forward process. ``x``: observations ``(B, D)``."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x0 = self.encode(x)
        n = x0.shape[0]
        sched = self.tables(x0).schedule
        with pyro.plate("data", n):
            t = pyro.sample("t", UniformSteps(self.T, device=x0.device).expand([n]))
            pyro.sample("x_T", q_marginal(sched, x0, self.T))
            x_t = pyro.sample("x_t", q_marginal(sched, x0, t))
            with poutine.scale(scale=self._step_weight(t)), poutine.mask(mask=t > 1):
                # At t = 1 the posterior is a point mass; those entries are masked out.
                tiny = torch.finfo(x0.dtype).tiny
                pyro.sample("x_prev", q_posterior(sched, x0, x_t, t, min_variance=tiny))

    # ------------------------------------------------------------------ full-chain programs

    def chain_model(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        *,
        start: Tensor | None = None,
        start_t: int | None = None,
    ) -> Tensor:
        r"""The reverse chain, one site per step: ``"x_T"``... named ``f"x_{t}"``, then ``"x"``.

        Args:
            x: observations ``(B, D)`` for the decoder site ``"x"``, or None to sample.
            batch_size: number of chains when ``x`` and ``start`` are None.
            start: the state :math:`x_s` at step ``s = start_t`` to run down from, ``(B, D)``
                (not a site); default: :math:`x_T \sim \mathcal N(0, I)` as site ``f"x_{T}"``.
            start_t: the step ``s`` of ``start`` (default T).

        Returns:
            The value of site ``"x"``, ``(B, D)`` (levels for the discretized decoder).
        """
        if start is None and start_t is not None:
            raise ValueError(f"Expected a start state with start_t={start_t}, but found start=None.")
        s = self.T if start_t is None else start_t
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.T:
            raise ValueError(f"Expected start_t in [1, {self.T}], but found {start_t!r}.")
        if start is not None:
            if start.dim() != 2 or start.shape[-1] != self.data_dim:
                raise ValueError(
                    f"Expected a start state of shape (B, {self.data_dim}), but found {tuple(start.shape)}."
                )
            n = start.shape[0]
        else:
            n = self._batch_size(x, batch_size)
        if x is not None and (x.dim() != 2 or x.shape != (n, self.data_dim)):
            raise ValueError(f"Expected data of shape ({n}, {self.data_dim}), but found {tuple(x.shape)}.")
        with pyro.plate("data", n):
            if start is None:
                zeros = self._anchor.new_zeros(()).expand(n, self.data_dim)
                x_t = pyro.sample(f"x_{s}", dist.Normal(zeros, 1.0).to_event(1))
            else:
                x_t = start.to(self._anchor.dtype)
            for t in range(s, 1, -1):
                loc, scale = self.p_loc_scale(x_t, t)
                x_t = pyro.sample(f"x_{t - 1}", dist.Normal(loc, scale.expand_as(loc)).to_event(1))
            loc, scale = self.p_loc_scale(x_t, 1)
            return pyro.sample("x", self.decoder_dist(loc, scale), obs=x)

    def chain_guide(self, x: Tensor, batch_size: int | None = None) -> None:
        r"""The forward process :math:`q(x_{1:T} \mid x_0)` in reverse time, every :math:`x_t` a site.

        Args:
            x: observations ``(B, D)``.
        """
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x0 = self.encode(x)
        sched = self.tables(x0).schedule
        with pyro.plate("data", x0.shape[0]):
            x_t = pyro.sample(f"x_{self.T}", q_marginal(sched, x0, self.T))
            for t in range(self.T, 1, -1):
                x_t = pyro.sample(f"x_{t - 1}", q_posterior(sched, x0, x_t, t))

    @torch.no_grad()
    def sample(self, num: int) -> Tensor:
        """Run the reverse chain with nothing observed: ``(num, D)`` (levels for the discretized decoder)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        with pyro.validation_enabled(False):
            return self.chain_model(None, batch_size=num)
