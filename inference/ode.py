r"""The probability-flow ODE: sampling, encoding, exact log-likelihoods (Song et al. 2021, arXiv:2011.13456).

The ODE :math:`dx/dt = \tilde f(x, t) = f(x, t) - \tfrac12 g(t)^2 s_\theta(x, t)`
(:class:`~probgen.sdes.ProbabilityFlowODE`) is solved with :func:`torchdiffeq.odeint`:

* :func:`ode_sample` from :math:`T` down to :math:`\epsilon` (prior draws to samples),
* :func:`ode_encode` from :math:`\epsilon` up to :math:`T` (data to latents; decoding returns them),
* :func:`ode_log_likelihood` by the instantaneous change of variables (Chen et al. 2018,
  arXiv:1806.07366; Grathwohl et al. 2019, arXiv:1810.01367)

  .. math::
      \log p_\epsilon(x_\epsilon) = \log p_T(x_T) + \int_\epsilon^T \nabla \cdot \tilde f(x_t, t)\, dt,

  with the divergence exact (autograd, :math:`D` backward passes) or estimated by Hutchinson-Skilling
  (:math:`\nabla \cdot \tilde f \approx v^\top (\partial \tilde f / \partial x)\, v`, one fixed
  :math:`v` per solve, :class:`LogDensityODE`),
* :func:`ode_bits_per_dim` for discrete data seen dequantized (``probgen.metrics``' bound).

Conventions as in :mod:`probgen.inference.sde`: ``x`` ``(B, D)``, ``eps=None`` means ``sde.eps``,
``return_nfe=True`` appends the number of score evaluations. Adaptive methods (``"dopri5"``,
``"dopri8"``, ``"bosh3"``, ``"fehlberg2"``, ``"adaptive_heun"``) use ``rtol``/``atol``; fixed-step
methods (``"euler"``, ``"midpoint"``, ``"rk4"``, ``"heun2"``, ``"heun3"``) need ``steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from probgen.inference.sde import check_sde_inputs, tweedie_denoise
from probgen.metrics import bits_per_dim, discrete_nll_from_density
from probgen.sdes import DiffusionSDE, IntegrationError, ProbabilityFlowODE, ScoreFn, check_finite

__all__ = ["LogDensityODE", "ode_bits_per_dim", "ode_encode", "ode_log_likelihood", "ode_sample"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "rk4", "heun2", "heun3")
MAX_ADAPTIVE_STEPS = 2000  # dopri5 takes ~100 steps on a trained model; a stiff one would run for hours
DIVERGENCES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")


class LogDensityODE(nn.Module):
    r"""The probability-flow ODE augmented with the change of log-density, for torchdiffeq.

    The state is ``(x, delta)`` with ``x`` ``(B, D)`` and ``delta`` ``(B,)``;
    ``forward(t, (x, delta))`` returns :math:`(\tilde f(x, t), \nabla \cdot \tilde f(x, t))`, so
    integrating from :math:`\epsilon` to :math:`T` gives
    :math:`\log p_\epsilon(x_\epsilon) = \log p_T(x_T) + \delta_T` (from :math:`\delta_\epsilon = 0`).

    Args:
        ode: the :class:`~probgen.sdes.ProbabilityFlowODE` (its ``nfe`` counts the evaluations).
        divergence: ``"exact"``, the trace of the Jacobian by :math:`D` backward passes, or
            ``"hutchinson"``, :math:`v^\top J v` by one vector-Jacobian product (Hutchinson 1989;
            Skilling 1989; FFJORD, arXiv:1810.01367), unbiased when :math:`\mathbb E[v v^\top] = I`.
        noise: :math:`v`, ``(B, D)``, fixed for the whole solve (so the ODE is deterministic);
            required for ``"hutchinson"``.
    """

    def __init__(
        self, ode: ProbabilityFlowODE, divergence: str = "exact", noise: Tensor | None = None
    ) -> None:
        super().__init__()
        if not isinstance(ode, ProbabilityFlowODE):
            raise ValueError(f"Expected a ProbabilityFlowODE, but found {type(ode).__name__}.")
        if divergence not in DIVERGENCES:
            raise ValueError(f"Expected divergence in {DIVERGENCES}, but found {divergence!r}.")
        if divergence == "hutchinson" and noise is None:
            raise ValueError("Expected a noise tensor (B, D) for the Hutchinson estimator, but found None.")
        self.ode = ode
        self.divergence = divergence
        self.noise = noise

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """torchdiffeq callback: :math:`(dx/dt, d\\delta/dt)` at time ``t`` (0-d): ``(B, D)``, ``(B,)``."""
        x = state[0]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.ode(t, x)
            if self.divergence == "hutchinson":
                (vjp,) = torch.autograd.grad(v, x, self.noise, allow_unused=True)
                div = (vjp * self.noise).sum(1) if vjp is not None else torch.zeros_like(v[:, 0])
            else:
                div = torch.zeros_like(v[:, 0])
                for i in range(x.shape[1]):
                    (grad,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=True, allow_unused=True)
                    if grad is not None:
                        div = div + grad[:, i]
        return v.detach(), div.detach()


def _check_solver(method: str, steps: int | None, rtol: float, atol: float) -> None:
    if method not in ADAPTIVE_METHODS + FIXED_METHODS:
        raise ValueError(f"Expected method in {ADAPTIVE_METHODS + FIXED_METHODS}, but found {method!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Expected steps >= 1 (an int) or None, but found {steps!r}.")
    if method in FIXED_METHODS and steps is None:
        raise ValueError(f"Expected steps for the fixed-step method {method!r}, but found None.")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"Expected {name} > 0, but found {tol!r}.")


def _solve(func: nn.Module, y0: Any, t0: float, t1: float, like: Tensor, method, steps, rtol, atol, path):
    """odeint from ``t0`` to ``t1`` on ``steps + 1`` even times (fixed-step grid or path), else the ends."""
    n = steps + 1 if steps is not None and (method in FIXED_METHODS or path) else 2
    ts = torch.linspace(t0, t1, n, dtype=like.dtype, device=like.device)
    # An adaptive step may overshoot the last time and interpolate back, but the SDE's coefficients
    # are undefined past [0, T] (e.g. VP's sqrt(1 - exp(-B(t))) at t < 0): make it stop exactly there.
    if method not in ADAPTIVE_METHODS:
        return odeint(func, y0, ts, method=method, rtol=rtol, atol=atol)
    options = {"step_t": ts[-1:], "max_num_steps": MAX_ADAPTIVE_STEPS}
    try:
        return odeint(func, y0, ts, method=method, rtol=rtol, atol=atol, options=options)
    except AssertionError as exc:  # torchdiffeq signals its step budget by an assertion
        if "max_num_steps" not in str(exc):
            raise
        raise IntegrationError(
            f"Expected the adaptive solver {method!r} to go from t = {t0:.6g} to t = {t1:.6g} within "
            f"{MAX_ADAPTIVE_STEPS} steps at rtol={rtol}, atol={atol}, but it did not: the flow is stiff "
            "there (an untrained or diverging score); train longer, loosen the tolerances or use a "
            "fixed-step solver."
        ) from None


def _flow(sde, score_fn, x, eps, forward, *, method, rtol, atol, steps, denoise, return_path, return_nfe):
    _check_solver(method, steps, rtol, atol)
    ode = ProbabilityFlowODE(sde, score_fn)
    t0, t1 = (eps, sde.T) if forward else (sde.T, eps)
    ys = _solve(ode, x, t0, t1, x, method, steps, rtol, atol, return_path)
    out = check_finite(ys[-1], t1)
    nfe = ode.nfe
    if denoise:
        out, nfe = tweedie_denoise(sde, score_fn, out, eps), nfe + 1
    result = (out,) + ((ys,) if return_path else ()) + ((nfe,) if return_nfe else ())
    return result if len(result) > 1 else out


@torch.no_grad()
def ode_sample(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float | None = None,
    denoise: bool = False,
    return_path: bool = False,
    return_nfe: bool = False,
) -> Tensor | tuple[Any, ...]:
    r"""Probability-flow ODE sampling, :math:`T` to :math:`\epsilon` (Song et al., arXiv:2011.13456, eq. 13).

    Args:
        sde: the forward :class:`~probgen.sdes.DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: the start :math:`x_T` ``(B, D)``, e.g. ``sde.prior_sample((B, D), generator=g)``.
        method: a torchdiffeq method (module docstring).
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.
        steps: number of even steps for fixed-step methods; for adaptive ones, with
            ``return_path``, the number of even intervals the path is reported on.
        eps: the end time :math:`\epsilon \in (0, T)`; default ``sde.eps``.
        denoise: end with :func:`~probgen.inference.sde.tweedie_denoise` at :math:`\epsilon`.
        return_path: also return the states on the time grid, ``(N + 1, B, D)`` (or ``(2, B, D)``).
        return_nfe: also return the number of score evaluations.

    Returns:
        :math:`x_\epsilon` ``(B, D)``, then the path and the count as asked.
    """
    x, eps = check_sde_inputs(sde, x, eps)
    return _flow(
        sde, score_fn, x, eps, False, method=method, rtol=rtol, atol=atol, steps=steps,
        denoise=denoise, return_path=return_path, return_nfe=return_nfe,
    )  # fmt: skip


@torch.no_grad()
def ode_encode(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x0: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float | None = None,
    return_path: bool = False,
    return_nfe: bool = False,
) -> Tensor | tuple[Any, ...]:
    r"""Probability-flow ODE encoding from :math:`\epsilon` to :math:`T` (Song et al. 2021, Section 4.3).

    The inverse of :func:`ode_sample` (up to the solver's error): ``ode_sample(sde, s, ode_encode(sde,
    s, x))`` returns ``x``. Arguments as for :func:`ode_sample`; ``x0`` ``(B, D)`` is taken as
    :math:`x_\epsilon`.

    Returns:
        The latents :math:`x_T` ``(B, D)``, then the path and the count as asked.
    """
    x0, eps = check_sde_inputs(sde, x0, eps)
    return _flow(
        sde, score_fn, x0, eps, True, method=method, rtol=rtol, atol=atol, steps=steps,
        denoise=False, return_path=return_path, return_nfe=return_nfe,
    )  # fmt: skip


@torch.no_grad()
def ode_log_likelihood(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x0: Tensor,
    *,
    divergence: str = "exact",
    noise: str = "rademacher",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    return_nfe: bool = False,
) -> Tensor | tuple[Tensor, int]:
    r"""Log-likelihood by the probability-flow ODE (Song et al. 2021, arXiv:2011.13456, App. D.2).

    Integrates :class:`LogDensityODE` from :math:`\epsilon` to :math:`T` and returns
    :math:`\log p_\epsilon(x_0) = \log \pi(x_T) + \int_\epsilon^T \nabla \cdot \tilde f\, dt`, the
    exact log-density (for exact divergences, up to the solver's error) of the model that pushes the
    prior :math:`\pi` through the ODE. With ``divergence="hutchinson"`` each example gets one noise
    vector :math:`v` for the whole solve (Rademacher :math:`\pm 1` or standard Gaussian) and the
    result is an unbiased estimate of that log-density.

    Args:
        sde: the forward :class:`~probgen.sdes.DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)``, differentiable in ``x`` (it runs under
            ``torch.enable_grad``).
        x0: data ``(B, D)``, taken as :math:`x_\epsilon`.
        divergence: ``"exact"`` (:math:`D` backward passes per evaluation; small :math:`D`) or
            ``"hutchinson"`` (one).
        noise: ``"rademacher"`` or ``"gaussian"``, the Hutchinson vectors.
        method: a torchdiffeq method (module docstring).
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.
        steps: number of steps, for fixed-step methods.
        eps: the start time :math:`\epsilon \in (0, T)`; default ``sde.eps``.
        prior_log_prob: :math:`\log \pi(z)` for ``z`` ``(B, D)``, ``(B,)``; default
            ``sde.prior_log_prob``.
        generator: source of the Hutchinson vectors (default the global RNG).
        return_nfe: also return the number of score evaluations.

    Returns:
        Log-likelihoods in nats per example, ``(B,)``; and the count with ``return_nfe``.
    """
    x0, eps = check_sde_inputs(sde, x0, eps)
    _check_solver(method, steps, rtol, atol)
    if noise not in NOISES:
        raise ValueError(f"Expected noise in {NOISES}, but found {noise!r}.")
    v = None
    if divergence == "hutchinson":
        v = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise == "rademacher":
            v = v.sign()  # P(v = 0) = 0; a sign of a symmetric draw is a fair +-1
    ode = ProbabilityFlowODE(sde, score_fn)
    func = LogDensityODE(ode, divergence, v)
    xs, deltas = _solve(
        func, (x0, x0.new_zeros(x0.shape[0])), eps, sde.T, x0, method, steps, rtol, atol, False
    )
    check_finite(deltas[-1], sde.T, "the log-density change")
    prior = sde.prior_log_prob if prior_log_prob is None else prior_log_prob
    log_prior = prior(check_finite(xs[-1], sde.T))
    ll = log_prior + deltas[-1]
    return (ll, ode.nfe) if return_nfe else ll


@torch.no_grad()
def ode_bits_per_dim(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    y: Tensor,
    *,
    num_levels: int,
    scale: float = 1.0,
    **likelihood_kwargs: Any,
) -> Tensor:
    r"""Bits/dim of :math:`L`-level data from the ODE log-likelihood of its dequantized values.

    For data seen as :math:`y = s (v + u) / L + c` (:math:`u \sim \mathcal U[0, 1)^D`; e.g. the digits'
    :math:`(v + u) / 17` with :math:`s = 1`, or :math:`2 (v + u)/17 - 1` with :math:`s = 2`),
    :math:`-\log P(v) \le -\log p(y) + D \log(L / s)`
    (:func:`probgen.metrics.discrete_nll_from_density`), reported as
    :math:`(-\log p(y) + D \log(L/s)) / (D \ln 2)` per example; average over the test set (and, for
    a tighter estimate, over several draws of :math:`u`).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        y: dequantized data ``(B, D)``.
        num_levels: :math:`L` (17 for the digits).
        scale: :math:`s`, the length of the data range per dimension.
        **likelihood_kwargs: passed to :func:`ode_log_likelihood` (not ``return_nfe``).

    Returns:
        ``(B,)`` upper bounds in bits/dim.
    """
    if likelihood_kwargs.get("return_nfe"):
        raise ValueError("Expected no return_nfe for ode_bits_per_dim, but found return_nfe=True.")
    ll = ode_log_likelihood(sde, score_fn, y, **likelihood_kwargs)
    D = y.shape[1]
    return bits_per_dim(discrete_nll_from_density(-ll, D, num_levels, scale=scale), D)
