r"""Sampling score-based diffusion models through the reverse-time SDE (Song et al. 2021, arXiv:2011.13456).

* :func:`reverse_sde_sample` solves :class:`~probgen.sdes.ReverseSDE` with :func:`torchsde.sdeint`
  from :math:`T` down to :math:`\epsilon`.
* :func:`pc_sample` is predictor-corrector sampling (Algorithms 2 and 3): a predictor step of the
  reverse SDE (:func:`reverse_diffusion_predictor` or :func:`euler_maruyama_predictor`), then
  Langevin corrector steps (:func:`probgen.inference.langevin.langevin_corrector`) at the new time.
* :func:`tweedie_denoise` is the optional last step of both: the posterior mean of :math:`x_0`.

Conventions shared with :mod:`probgen.inference.ode`: ``x`` is ``(B, D)`` (flatten images with
:func:`probgen.sdes.flat_score`), ``eps=None`` means ``sde.eps``, and ``return_nfe=True`` appends the
number of score evaluations (an ``int``) to what is returned: ``x``, ``(x, nfe)``, or with
``return_path`` ``(x, path, nfe)``. Randomness comes from the ``generator`` passed in (the global RNG
when it is None).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torchsde
from torch import Tensor
from tqdm.auto import tqdm

from probgen.inference.langevin import langevin_corrector
from probgen.schedules import append_dims
from probgen.sdes import DiffusionSDE, ReverseSDE, ScoreFn, batch_times, check_finite, sdeint_on_grid

__all__ = [
    "CountingScore",
    "check_sde_inputs",
    "euler_maruyama_predictor",
    "pc_sample",
    "reverse_diffusion_predictor",
    "reverse_sde_sample",
    "tweedie_denoise",
]

_SDE_METHODS = ("euler", "milstein", "srk")

Predictor = Callable[..., Tensor]
"""``predictor(sde, score_fn, x, t, dt, *, generator) -> x``: one step from ``t`` to ``t - dt``."""

Corrector = Callable[..., Tensor]
"""``corrector(score_fn, x, t, *, alpha, generator) -> x``: one step at time ``t``."""


class CountingScore:
    """A score function that counts its calls (``calls``), to report the number of evaluations.

    With ``check`` (the default) it raises :class:`~probgen.sdes.IntegrationError`, naming the time,
    when its input or its output has non-finite entries.
    """

    def __init__(self, score_fn: ScoreFn, check: bool = True) -> None:
        if not callable(score_fn):
            raise ValueError(f"Expected a callable score_fn(x, t), but found {type(score_fn).__name__}.")
        self.score_fn = score_fn
        self.check = check
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if not self.check:
            return self.score_fn(x, t)
        return check_finite(self.score_fn(check_finite(x, t), t), t, "the score")


def check_sde_inputs(sde: object, x: object, eps: float | None) -> tuple[Tensor, float]:
    """Validate ``sde``, ``x`` ``(B, D)``, ``eps`` in ``(0, T)``; returns ``x`` and eps (None: sde.eps)."""
    if not isinstance(sde, DiffusionSDE):
        raise ValueError(f"Expected sde to be a DiffusionSDE, but found {type(sde).__name__}.")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"Expected x to be a floating-point torch.Tensor, but found {type(x).__name__}.")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"Expected x of shape (B, D), but found shape {tuple(x.shape)}.")
    eps = sde.eps if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < sde.T:
        raise ValueError(f"Expected eps in (0, T = {sde.T}), but found {eps!r}.")
    return x, float(eps)


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {name} >= {low} (an int), but found {value!r}.")
    return value


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def tweedie_denoise(sde: DiffusionSDE, score_fn: ScoreFn, x: Tensor, t: float | Tensor) -> Tensor:
    r"""Tweedie's formula: :math:`\mathbb E[x_0 \mid x_t] = (x_t + s(t)^2 \nabla \log p_t(x_t)) / m(t)`.

    Exact for :math:`x_t = m(t) x_0 + s(t) z` (Efron 2011, "Tweedie's formula and selection bias";
    the denoising step of Jolicoeur-Martineau et al. 2020, arXiv:2009.05475). Removes the noise of
    level :math:`s(\epsilon)` that stopping at :math:`\epsilon` leaves.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: states at time ``t``, ``(B, D)``.
        t: the time, a float or ``(B,)``.

    Returns:
        ``(B, D)``.
    """
    t = batch_times(t, x)
    mean, std = sde.marginal_params(t)
    return (x + append_dims(std**2, x.ndim) * score_fn(x, t)) / append_dims(mean, x.ndim)


@torch.no_grad()
def reverse_sde_sample(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    steps: int = 1000,
    method: str = "euler",
    eps: float | None = None,
    denoise: bool = True,
    bm: torchsde.BrownianInterval | None = None,
    return_path: bool = False,
    return_nfe: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Any, ...]:
    r"""Reverse-time SDE sampling by torchsde (Anderson 1982; Song et al. 2021, arXiv:2011.13456, eq. 6).

    Solves :class:`~probgen.sdes.ReverseSDE` in :math:`s = T - t` over :math:`[0, T - \epsilon]` with
    ``steps`` fixed steps :math:`h = (T - \epsilon) / N` (the solver's times are its own running sums,
    so it takes exactly :math:`N` steps), then, with ``denoise``, one :func:`tweedie_denoise` at
    :math:`\epsilon`. Without it the samples follow :math:`p_\epsilon` (for exact scores and
    :math:`x_T \sim p_T`), with it the law of :math:`\mathbb E[x_0 \mid x_\epsilon]`.

    Args:
        sde: the forward :class:`~probgen.sdes.DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)``, the score of :math:`p_t`, ``t`` ``(B,)``.
        x: the start :math:`x_T`, ``(B, D)``, e.g. ``sde.prior_sample((B, D), generator=g)``.
        steps: :math:`N \ge 1`.
        method: a torchsde Itô solver for diagonal noise: ``"euler"`` (Euler-Maruyama),
            ``"milstein"`` (the same here: the diffusion does not depend on ``x``) or ``"srk"``
            (stochastic Runge-Kutta, strong order 1.0 for diagonal noise; torchsde's tableau evaluates
            the drift 10 times a step).
        eps: the end time :math:`\epsilon \in (0, T)`; default ``sde.eps``.
        denoise: end with the Tweedie denoising step (one more score evaluation).
        bm: the Brownian motion of size ``(B, D)`` over :math:`[0, s_N]`; default, for ``"euler"`` and
            ``"milstein"``, a :class:`~probgen.sdes.GridBrownian` drawing the step increments in order
            from ``generator`` (torchsde's interval tree would double the cost of small networks), and
            for ``"srk"`` a :class:`torchsde.BrownianInterval` with space-time Lévy area, seeded from it.
        return_path: also return the states at :math:`s_0, \dots, s_N`, ``(N + 1, B, D)`` (before denoising).
        return_nfe: also return the number of score evaluations: ``steps`` for ``"euler"`` and
            ``"milstein"`` (torchsde's shape check at the start reuses the first step's), plus one
            for ``denoise``.
        generator: seeds the default Brownian motion (default the global RNG).

    Returns:
        Samples ``(B, D)``, then the path and the count as asked (see the module docstring).
    """
    x, eps = check_sde_inputs(sde, x, eps)
    steps = _check_int("steps", steps)
    if method not in _SDE_METHODS:
        raise ValueError(f"Expected method in {_SDE_METHODS}, but found {method!r}.")
    h = (sde.T - eps) / steps
    counted = CountingScore(score_fn, check=False)  # ReverseSDE checks each state it steps from
    ys = sdeint_on_grid(
        ReverseSDE(sde, counted),
        x,
        h,
        steps,
        method=method,
        bm=bm,
        generator=generator,
        return_path=return_path,
    )
    check_finite(ys[-1], eps)
    out = tweedie_denoise(sde, counted, ys[-1], eps) if denoise else ys[-1]
    result = (out,) + ((ys,) if return_path else ()) + ((counted.calls,) if return_nfe else ())
    return result if len(result) > 1 else out


def reverse_diffusion_predictor(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: float | Tensor,
    dt: float,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Reverse-diffusion predictor (Song et al. 2021, arXiv:2011.13456, eq. 45-47), ``t`` to ``t - dt``.

    With the forward step :math:`(f_i, G_i)` of ``sde.discretize(x, t, dt)``,
    :math:`x \leftarrow x - f_i + G_i^2\, s(x, t) + G_i z`: for VP the ancestral step
    :math:`(2 - \sqrt{1 - \beta_i}) x + \beta_i s + \sqrt{\beta_i} z`, for VE NCSN's
    :math:`x + (\sigma_i^2 - \sigma_{i-1}^2) s + \sqrt{\sigma_i^2 - \sigma_{i-1}^2}\, z`.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: states at ``t``, ``(B, D)``.
        t: the current time (float or ``(B,)``).
        dt: the step :math:`> 0`.
        generator: source of :math:`z`.

    Returns:
        States at ``t - dt``, ``(B, D)``.
    """
    t = batch_times(t, x)
    f, G = sde.discretize(x, t, dt)
    G = append_dims(G, x.ndim)
    return x - f + G**2 * score_fn(x, t) + G * _noise(x, generator)


def euler_maruyama_predictor(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: float | Tensor,
    dt: float,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Euler-Maruyama step of the reverse SDE, ``t`` to ``t - dt`` (Song et al., arXiv:2011.13456, eq. 6).

    :math:`x \leftarrow x - [f(x, t) - g(t)^2 s(x, t)]\, \Delta t + g(t) \sqrt{\Delta t}\, z`.
    Arguments as for :func:`reverse_diffusion_predictor`.
    """
    t = batch_times(t, x)
    drift, g = sde.sde(x, t)
    g = append_dims(g, x.ndim)
    return x - (drift - g**2 * score_fn(x, t)) * dt + g * math.sqrt(dt) * _noise(x, generator)


_PREDICTORS: dict[str, Predictor] = {
    "reverse_diffusion": reverse_diffusion_predictor,
    "euler_maruyama": euler_maruyama_predictor,
}


@torch.no_grad()
def pc_sample(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    steps: int = 1000,
    predictor: str | Predictor = "reverse_diffusion",
    corrector: str | Corrector | None = "langevin",
    corrector_steps: int = 1,
    snr: float = 0.16,
    per_example: bool = False,
    eps: float | None = None,
    denoise: bool = True,
    return_nfe: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, int]:
    r"""Predictor-corrector sampling (Song et al. 2021, arXiv:2011.13456, Algorithms 2 and 3).

    On the grid :math:`t_i = T - i \Delta t`, :math:`\Delta t = (T - \epsilon) / N`, each of the
    :math:`N` iterations makes one predictor step from :math:`t_i` to :math:`t_{i+1}` and then
    ``corrector_steps`` Langevin corrector steps at :math:`t_{i+1}` with
    :math:`\alpha = ` ``sde.corrector_alpha`` (1 for VE, :math:`1 - \beta(t)\Delta t` for VP and
    sub-VP). In plain words, the signal-to-noise ratio ``snr`` :math:`r` sets the corrector's step so
    that its push along the score is :math:`r \sqrt\alpha` times as long as its random kick: small
    ``snr`` makes timid, noise-dominated corrections, large ``snr`` long, score-dominated ones (0.16
    is the authors' CIFAR-10 value). With ``denoise`` the result is :func:`tweedie_denoise` at
    :math:`\epsilon`. Score evaluations: :math:`N (1 + M)` plus one for ``denoise``.

    Args:
        sde: the forward :class:`~probgen.sdes.DiffusionSDE`.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: the start :math:`x_T`, ``(B, D)``.
        steps: :math:`N \ge 1`.
        predictor: ``"reverse_diffusion"``, ``"euler_maruyama"`` or a function
            ``predictor(sde, score_fn, x, t, dt, *, generator) -> x``.
        corrector: ``"langevin"`` (:func:`~probgen.inference.langevin.langevin_corrector` with
            ``snr`` and ``per_example``), None (predictor only) or a function
            ``corrector(score_fn, x, t, *, alpha, generator) -> x`` making one step.
        corrector_steps: :math:`M \ge 0` corrector steps per iteration.
        snr: :math:`r > 0`, the Langevin corrector's signal-to-noise ratio.
        per_example: Langevin step sizes from per-example norms (the paper's algorithms) or from
            batch-mean norms (the authors' code, the default: with per-example norms the step
            :math:`\propto 1 / \lVert s \rVert^2` has heavy tails in low dimension).
        eps: the end time :math:`\epsilon \in (0, T)`; default ``sde.eps``.
        denoise: end with the Tweedie denoising step.
        return_nfe: also return the number of score evaluations.
        generator: source of all the noise (default the global RNG).
        callback: called after every iteration with ``{"x", "i", "t"}`` (``t`` the new time).
        progress: show a progress bar.

    Returns:
        Samples ``(B, D)``, and the count with ``return_nfe``.
    """
    x, eps = check_sde_inputs(sde, x, eps)
    steps = _check_int("steps", steps)
    corrector_steps = _check_int("corrector_steps", corrector_steps, low=0)
    if isinstance(predictor, str):
        if predictor not in _PREDICTORS:
            raise ValueError(
                f"Expected predictor in {tuple(_PREDICTORS)} or a function, but found {predictor!r}."
            )
        predictor = _PREDICTORS[predictor]
    elif not callable(predictor):
        raise ValueError(
            f"Expected predictor to be a name or a function, but found {type(predictor).__name__}."
        )
    needs_alpha = predictor is reverse_diffusion_predictor or (
        corrector == "langevin" and corrector_steps > 0
    )
    if corrector == "langevin":
        if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not snr > 0:
            raise ValueError(f"Expected snr > 0, but found {snr!r}.")

        def corrector(score_fn, x, t, *, alpha, generator):
            return langevin_corrector(
                score_fn, x, t, snr=snr, alpha=alpha, per_example=per_example, generator=generator
            )

    elif corrector is None:
        corrector_steps = 0
    elif not callable(corrector):
        raise ValueError(f"Expected corrector 'langevin', None or a function, but found {corrector!r}.")
    ts = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()
    dt = (sde.T - eps) / steps
    alphas = sde.corrector_alpha(torch.tensor(ts, dtype=torch.float64), dt, torch.empty(steps + 1, 1))
    if needs_alpha and not bool((alphas > 0).all()):
        raise ValueError(
            f"Expected steps large enough that every step's alpha_i = 1 - beta_i > 0, but found "
            f"min alpha_i = {alphas.min().item():.3g} with steps={steps}."
        )
    counted = CountingScore(score_fn)
    for i in tqdm(range(steps), desc="PC sampling", disable=not progress):
        x = predictor(sde, counted, x, ts[i], dt, generator=generator)
        if corrector_steps:
            alpha = sde.corrector_alpha(ts[i + 1], dt, x)
            for _ in range(corrector_steps):
                x = corrector(counted, x, ts[i + 1], alpha=alpha, generator=generator)
        if callback is not None:
            callback({"x": x, "i": i, "t": ts[i + 1]})
    check_finite(x, eps)
    if denoise:
        x = tweedie_denoise(sde, counted, x, eps)
    return (x, counted.calls) if return_nfe else x
