r"""Langevin samplers driven by a score function: ULA through torchsde, annealed Langevin, the corrector.

* :func:`langevin_sde_sample` solves :class:`~probgen.sdes.LangevinSDE`
  (:math:`dx = \nabla \log p(x)\, dt + \sqrt 2\, dW`) with :func:`torchsde.sdeint`; with
  Euler-Maruyama this is the unadjusted Langevin algorithm (ULA).
* :func:`annealed_langevin` is annealed Langevin dynamics over noise levels
  :math:`\sigma_1 > \dots > \sigma_L` (Song & Ermon 2019, Algorithm 1), with the optional final
  denoising step of Jolicoeur-Martineau et al. 2020. ``probgen sample RUN --sampler annealed-langevin``
  runs it for NCSN runs (registered at the bottom of this module).
* :func:`langevin_corrector` is the Langevin corrector of predictor-corrector sampling
  (Song et al. 2021, Algorithms 4 and 5), whose step is set by a signal-to-noise ratio.

Score functions follow :data:`probgen.sdes.ScoreFn`: ``score_fn(x, t) -> Tensor`` shaped like ``x``,
with ``t`` (a time or a noise level :math:`\sigma`) a ``(B,)`` tensor. Randomness comes from the
``generator`` passed in (the global RNG when it is None).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchsde
from torch import Tensor
from tqdm.auto import tqdm

from probgen.schedules import append_dims
from probgen.sdes import LangevinSDE, ScoreFn, batch_times, langevin_step, sdeint_on_grid

__all__ = ["annealed_langevin", "check_sigmas", "langevin_corrector", "langevin_sde_sample"]

_SDE_METHODS = ("euler", "milstein", "srk")


def _check_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {name} >= {low} (an int), but found {value!r}.")
    return value


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Expected {name} > 0 (a finite number), but found {value!r}.")
    return float(value)


def _check_states(x: object, ndim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"Expected x to be a floating-point torch.Tensor, but found {type(x).__name__}.")
    if (ndim is not None and x.ndim != ndim) or x.ndim < 1 or x.shape[0] < 1:
        want = f"{ndim} dims" if ndim is not None else "a batch dim"
        raise ValueError(f"Expected x with {want} (B, D), but found shape {tuple(x.shape)}.")
    return x


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def check_sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    r"""Validate noise levels: a 1-D tensor of :math:`L \ge 1` finite, positive, strictly descending values.

    Returns:
        ``sigmas`` as a tensor ``(L,)``.
    """
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 1:
        raise ValueError(f"Expected sigmas of shape (L,) with L >= 1, but found shape {tuple(sigmas.shape)}.")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas > 0).all()):
        raise ValueError(f"Expected finite sigmas > 0, but found {sigmas.tolist()}.")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            f"Expected strictly descending sigmas (sigma_1 > ... > sigma_L), but found {sigmas.tolist()}."
        )
    return sigmas


@torch.no_grad()
def langevin_sde_sample(
    score_fn: ScoreFn,
    x: Tensor,
    *,
    step_size: float,
    num_steps: int,
    method: str = "euler",
    temperature: float = 1.0,
    bm: torchsde.BrownianInterval | None = None,
    return_path: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Langevin dynamics by torchsde; Euler-Maruyama is ULA (Roberts & Tweedie 1996; arXiv:1907.05600).

    Solves :class:`~probgen.sdes.LangevinSDE` over :math:`[0, N h]` with fixed step :math:`h`, i.e.
    (``method="euler"``) :math:`x_{k+1} = x_k + h \nabla \log p(x_k) + \sqrt{2 T h}\, z_k`. The times
    passed to the solver are the running sums :math:`t_{k+1} = t_k + h` in float64, the very sums
    the solver forms, so it takes exactly :math:`N` steps of size :math:`h` and the path holds the
    iterates themselves (no interpolation).

    Args:
        score_fn: ``score_fn(x, t) -> (B, D)``, the target's score; ``t`` ``(B,)`` is the SDE time.
        x: initial states ``(B, D)``.
        step_size: :math:`h > 0`.
        num_steps: :math:`N \ge 1`.
        method: a torchsde Itô solver: ``"euler"`` (ULA), ``"milstein"`` (the same here: the noise
            is additive) or ``"srk"`` (stochastic Runge-Kutta, strong order 1 for diagonal noise).
        temperature: :math:`T > 0`; the stationary law is :math:`p^{1/T}`.
        bm: the Brownian motion to drive the solver, of size ``(B, D)`` over ``[0, t_N]`` (for
            ``"srk"`` with ``levy_area_approximation="space-time"``); default a
            :class:`torchsde.BrownianInterval` seeded from ``generator``.
        return_path: also return the states at every step.
        generator: seeds the default Brownian motion (default the global RNG).

    Returns:
        The final states ``(B, D)``; with ``return_path``, also :math:`x_0, \dots, x_N`, ``(N + 1, B, D)``.
    """
    x = _check_states(x, ndim=2)
    h = _check_positive("step_size", step_size)
    num_steps = _check_int("num_steps", num_steps)
    if method not in _SDE_METHODS:
        raise ValueError(f"Expected method in {_SDE_METHODS}, but found {method!r}.")
    sde = LangevinSDE(score_fn, temperature=temperature)
    ys = sdeint_on_grid(
        sde, x, h, num_steps, method=method, bm=bm, tree=True, generator=generator, return_path=return_path
    )
    return (ys[-1], ys) if return_path else ys[-1]


@torch.no_grad()
def annealed_langevin(
    score_fn: ScoreFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    step_size: float = 2e-5,
    steps_per_level: int = 100,
    denoise: bool = True,
    return_path: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, arXiv:1907.05600, Algorithm 1).

    For each level :math:`i = 1..L` with step :math:`\alpha_i = \epsilon\, \sigma_i^2 / \sigma_L^2`,
    :math:`M` steps :math:`x \leftarrow x + \tfrac{\alpha_i}{2} s(x, \sigma_i) + \sqrt{\alpha_i}\, z`,
    :math:`z \sim \mathcal N(0, I)`; then, with ``denoise``, one step
    :math:`x \leftarrow x + \sigma_L^2 s(x, \sigma_L)` to the Tweedie estimate of the clean sample
    (Jolicoeur-Martineau et al. 2020, arXiv:2009.05475), which removes the noise of the
    last level.

    Args:
        score_fn: ``score_fn(x, sigma) -> (B, D)``, the score of the data perturbed by
            :math:`\mathcal N(0, \sigma^2 I)`, with ``sigma`` ``(B,)`` the level of each example.
        x: initial states ``(B, D)`` (any ``(B, ...)`` works).
        sigmas: the levels :math:`\sigma_1 > \dots > \sigma_L > 0`, ``(L,)``.
        step_size: :math:`\epsilon > 0`, the step at the last level.
        steps_per_level: :math:`M \ge 1`.
        denoise: end with the denoising step.
        return_path: also return the states at the start and at the end of each level.
        generator: source of the noise (default the global RNG).
        callback: called after every step with ``{"x", "level", "step", "sigma", "step_size"}``
            (``level`` in ``0..L-1``, ``step`` in ``0..M-1``, ``step_size`` :math:`\alpha_i`).
        progress: show a progress bar over the levels.

    Returns:
        Samples ``(B, D)``; with ``return_path``, also the states ``(L + 1, B, D)``: the start and
        the end of each level (before denoising).
    """
    x = _check_states(x)
    sigmas = check_sigmas(sigmas)
    eps = _check_positive("step_size", step_size)
    steps_per_level = _check_int("steps_per_level", steps_per_level)
    levels = sigmas.to(device=x.device, dtype=x.dtype)
    alphas = (eps * (sigmas.double() / sigmas.double()[-1]) ** 2).tolist()
    batch = x.shape[0]
    path = [x] if return_path else None
    for i in tqdm(range(len(alphas)), desc="annealed Langevin", disable=not progress):
        alpha, sigma = alphas[i], levels[i].expand(batch)
        for m in range(steps_per_level):
            loc, scale = langevin_step(x, score_fn(x, sigma), alpha)
            x = loc + scale * _noise(x, generator)
            if callback is not None:
                callback({"x": x, "level": i, "step": m, "sigma": float(levels[i]), "step_size": alpha})
        if path is not None:
            path.append(x)
    if denoise:
        x = x + levels[-1] ** 2 * score_fn(x, levels[-1].expand(batch))
    return (x, torch.stack(path)) if path is not None else x


@torch.no_grad()
def langevin_corrector(
    score_fn: ScoreFn,
    x: Tensor,
    t: float | Tensor,
    *,
    snr: float,
    alpha: float | Tensor = 1.0,
    n_steps: int = 1,
    per_example: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Langevin corrector steps at a fixed time (Song et al. 2021, arXiv:2011.13456, Algorithms 4 and 5).

    Each step draws :math:`z \sim \mathcal N(0, I)`, evaluates :math:`s = s(x, t)` and moves

    .. math::
        \epsilon = 2 \alpha \Big(\frac{r \lVert z \rVert}{\lVert s \rVert}\Big)^2, \qquad
        x \leftarrow x + \epsilon s + \sqrt{2 \epsilon}\, z,

    with norms per example (``per_example=False``: the mean norms over the batch, one step for the
    whole batch, as the authors' code does). In plain words, the signal-to-noise ratio ``snr``
    :math:`r` sets the step so that the deterministic move :math:`\epsilon s` is :math:`r \sqrt\alpha`
    times as long as the random move :math:`\sqrt{2\epsilon} z`: a small ``snr`` makes small,
    noise-dominated steps, a large one long, score-dominated steps. The step adapts to the score's
    size, so one ``snr`` serves every noise level (0.16 is the authors' default for CIFAR-10).
    :math:`\alpha = 1` for VE SDEs (Algorithm 4) and :math:`\alpha_i = 1 - \beta_i` at the current
    step for VP SDEs (Algorithm 5).

    Like every unadjusted Langevin step, a step does not leave the target exactly invariant: on
    :math:`\mathcal N(0, I_D)` one per-example step (:math:`c = 2 \alpha r^2`) gives variance
    :math:`1 + 8c/(D - 2) + c^2 (D + 2)/(D - 2)`, the first term because the step grows with
    :math:`\lVert z \rVert`; with batch norms it is :math:`1 + c^2` up to :math:`O(1/B)`.

    Args:
        score_fn: ``score_fn(x, t) -> (B, D)``, the score of the marginal at time ``t``.
        x: states ``(B, D)`` (any ``(B, ...)`` works).
        t: the time, a float or a ``(B,)`` tensor; passed to ``score_fn`` as ``(B,)``.
        snr: :math:`r > 0`.
        alpha: :math:`\alpha > 0`, a float or ``(B,)``.
        n_steps: number of corrector steps, :math:`\ge 0` (0 returns ``x``).
        per_example: norms per example (the paper's algorithms) or averaged over the batch.
        generator: source of the noise (default the global RNG).

    Returns:
        The corrected states, shaped like ``x``.
    """
    x = _check_states(x)
    r = _check_positive("snr", snr)
    n_steps = _check_int("n_steps", n_steps, low=0)
    t = batch_times(t, x)
    alpha = torch.as_tensor(alpha, device=x.device, dtype=x.dtype)
    if alpha.ndim > 1 or (alpha.ndim == 1 and alpha.shape != (x.shape[0],)) or not bool((alpha > 0).all()):
        raise ValueError(
            f"Expected alpha > 0, a float or of shape ({x.shape[0]},), but found {alpha.tolist()}."
        )
    for _ in range(n_steps):
        z = _noise(x, generator)
        s = score_fn(x, t)
        z_norm, s_norm = z.reshape(len(z), -1).norm(dim=1), s.reshape(len(s), -1).norm(dim=1)
        ratio = z_norm / s_norm if per_example else z_norm.mean() / s_norm.mean()
        eps = append_dims(2 * alpha * (r * ratio) ** 2, x.ndim)
        x = x + eps * s + (2 * eps).sqrt() * z
    return x


def ncsn_annealed_langevin(
    method,
    num: int,
    *,
    generator,
    steps: int | None = None,
    step_size: float | None = None,
    denoise: bool | None = None,
) -> Tensor:
    """``--sampler annealed-langevin``: Algorithm 1 from the NCSN's start, levels and defaults.

    ``steps`` overrides the steps per level; the options ``step_size`` and ``denoise`` the others.
    """
    defaults = dict(method.sampling_defaults)
    x = method.init_sample(num, generator)
    return annealed_langevin(
        method.score,
        x,
        method.sigmas,
        step_size=defaults["step_size"] if step_size is None else step_size,
        steps_per_level=steps or defaults["steps_per_level"],
        denoise=defaults.get("denoise", True) if denoise is None else denoise,
        generator=generator,
    )
