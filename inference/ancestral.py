r"""Running the DDPM reverse chain: ancestral sampling through the program, and DDIM.

:func:`ancestral_sample` runs the model's reverse-chain program
(:meth:`~probgen.models.DDPM.chain_model`, one Pyro sample site per step) with nothing
observed; a light handler records the sites' values when the trajectory is wanted.
:func:`ddim_sample` is the DDIM update (Song, Meng & Ermon 2021, arXiv:2010.02502, eq. 12)
with the same trained predictor, on S evenly spaced steps.

Randomness comes from ``generator`` where one is passed: the global RNG is forked and
seeded from it for the duration of the call (Pyro's sites draw from the global RNG), so
the outer stream is untouched and the result is a function of the generator's state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from probgen.distributions import q_marginal
from probgen.objectives import seeded
from probgen.schedules import ddim_step

__all__ = ["ancestral_sample", "ddim_sample", "ddim_timesteps"]


class _ChainObserver(Messenger):
    """Records each sample site's value (in program order) and advances a progress bar."""

    def __init__(self, record: bool, bar) -> None:
        super().__init__()
        self.record, self.bar = record, bar
        self.values: list[Tensor] = []

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        if self.record:
            self.values.append(msg["value"])
        if self.bar is not None:
            self.bar.update(1)


@contextlib.contextmanager
def _randomness(generator: torch.Generator | None, like: Tensor) -> Iterator[None]:
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    with seeded(seed, like):
        yield


def _check_num(num: object) -> int:
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"Expected num >= 1 (an int), but found {num!r}.")
    return num


def _to_space(ddpm, x0: Tensor) -> Tensor:
    """The decoder's output in the diffusion's space (bin centres for levels)."""
    return ddpm.encode(x0) if ddpm.decoder == "discretized" else x0


@torch.no_grad()
def ancestral_sample(
    ddpm,
    num: int,
    *,
    x_T: Tensor | None = None,
    start_t: int | None = None,
    x0: Tensor | None = None,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Ancestral sampling of the DDPM reverse chain (Ho et al. 2020, arXiv:2006.11239, Algorithm 2).

    Runs ``ddpm.chain_model`` with nothing observed:
    :math:`x_{t-1} = (x_t - \beta_t \epsilon_\theta / \sqrt{1 - \bar\alpha_t}) / \sqrt{\alpha_t}
    + \sigma_t z` down to the decoder, whose *sample* is returned (integer levels for the
    discretized decoder, the bin holding a Gaussian draw around :math:`\mu_\theta(x_1, 1)`).

    Args:
        ddpm: a :class:`~probgen.models.DDPM`.
        num: B, the number of chains.
        x_T: start from these states at step ``start_t`` (default T), ``(B, D)``.
        start_t: the step ``s`` to start from, in ``1..T``; needs ``x_T`` or ``x0``.
        x0: start from data noised to step ``s``: :math:`x_s \sim q(x_s \mid x_0)`, ``(B, D)``
            in the data's form (levels for the discretized decoder).
        return_trajectory: also return the states.
        generator: source of randomness (see the module docstring); default the global RNG.
        progress: show a progress bar over the steps.

    Returns:
        ``x0`` samples ``(B, D)``; with ``return_trajectory``, also the states
        ``(N + 1, B, D)`` for ``N = s`` steps: :math:`x_s, \dots, x_1` and the sample, all in
        the diffusion's space (bin centres for levels).
    """
    num = _check_num(num)
    if x_T is not None and x0 is not None:
        raise ValueError("Expected at most one of x_T and x0, but found both.")
    if start_t is not None and x_T is None and x0 is None:
        raise ValueError(f"Expected x_T or x0 to start from step start_t={start_t}, but found neither.")
    s = ddpm.T if start_t is None else start_t
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= ddpm.T:
        raise ValueError(f"Expected start_t in [1, {ddpm.T}], but found {start_t!r}.")
    given = x_T if x_T is not None else x0
    if given is not None and tuple(given.shape) != (num, ddpm.data_dim):
        name = "x_T" if x_T is not None else "x0"
        raise ValueError(
            f"Expected {name} of shape ({num}, {ddpm.data_dim}), but found {tuple(given.shape)}."
        )
    like = ddpm._anchor
    bar = tqdm(total=s + (x_T is None and x0 is None), desc="ancestral", disable=not progress)
    observer = _ChainObserver(return_trajectory, bar if progress else None)
    with _randomness(generator, like), pyro.validation_enabled(False), bar:
        start = None
        if x0 is not None:
            start = q_marginal(ddpm.tables(like).schedule, ddpm.encode(x0.to(like.device)), s).sample()
        elif x_T is not None:
            start = x_T.to(like.device, like.dtype)
        if return_trajectory or progress:
            with observer:
                out = ddpm.chain_model(None, num, start=start, start_t=None if start is None else s)
        else:
            out = ddpm.chain_model(None, num, start=start, start_t=None if start is None else s)
    if not return_trajectory:
        return out
    states = ([] if start is None else [start]) + observer.values[:-1] + [_to_space(ddpm, out)]
    return out, torch.stack(states)


def ddim_timesteps(T: int, steps: int, spacing: str = "linear") -> list[int]:
    """``steps`` steps from T down to 1 (both included), as ints in descending order.

    ``spacing="linear"`` spaces them evenly; ``"quadratic"`` places step i (of 0..S-1) at
    :math:`1 + (T - 1) (i / (S - 1))^2`, so more of them fall near the data, where the
    details of a sample are decided (the two selections of Song, Meng & Ermon 2021, sec. D.2).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"Expected steps in [1, {T}], but found {steps!r}.")
    if spacing not in ("linear", "quadratic"):
        raise ValueError(f"Expected spacing in ('linear', 'quadratic'), but found {spacing!r}.")
    if steps == 1:
        return [T]
    if spacing == "linear":
        return sorted(
            {int(math.floor(1 + i * (T - 1) / (steps - 1) + 0.5)) for i in range(steps)}, reverse=True
        )
    ts = [T]  # from the top down, each step at least one below the last and leaving room below
    for i in range(steps - 2, -1, -1):
        t = int(math.floor(1 + (T - 1) * (i / (steps - 1)) ** 2 + 0.5))
        ts.append(max(min(t, ts[-1] - 1), i + 1))
    return ts


@torch.no_grad()
def ddim_sample(
    ddpm,
    num: int,
    *,
    steps: int = 50,
    eta: float = 0.0,
    x_T: Tensor | None = None,
    final: str = "mode",
    spacing: str = "linear",
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""DDIM sampling (Song, Meng & Ermon 2021, arXiv:2010.02502, eq. 12) with the DDPM's predictor.

    On steps :math:`\tau_S = T > \dots > \tau_1 = 1` (:func:`ddim_timesteps`) and
    :math:`\tau_0 = 0` (:math:`\bar\alpha_0 = 1`):

    .. math::
        x_{\tau_{i-1}} = \sqrt{\bar\alpha_{\tau_{i-1}}}\, \hat x_0
        + \sqrt{1 - \bar\alpha_{\tau_{i-1}} - \sigma_i^2}\, \hat\epsilon + \sigma_i z, \qquad
        \sigma_i = \eta \sqrt{\frac{1 - \bar\alpha_{\tau_{i-1}}}{1 - \bar\alpha_{\tau_i}}}
        \sqrt{1 - \frac{\bar\alpha_{\tau_i}}{\bar\alpha_{\tau_{i-1}}}},

    so ``eta = 0`` is deterministic given :math:`x_T` and the last state is :math:`\hat x_0`
    at step 1, i.e. the decoder's location :math:`\mu_\theta(x_1, 1)`. With ``final="mode"``
    (the paper's choice) that location is the sample; for the discretized decoder it is returned
    as the level whose bin holds it (the decoder's mode). With ``final="sample"`` the last state
    is drawn from the model's own decoder :math:`p_\theta(x_0 \mid x_1)` at that location
    (what ancestral sampling does at its last step), so the output has the decoder's spread.

    Args:
        ddpm: a :class:`~probgen.models.DDPM`.
        num: B, the number of samples.
        steps: S, the number of network evaluations, in ``1..T``.
        eta: :math:`\eta \in [0, 1]`; 1 with ``steps = T`` is ancestral sampling with
            :math:`\sigma_t^2 = \tilde\beta_t`.
        x_T: initial states ``(B, D)``; default drawn from :math:`\mathcal N(0, I)`.
        final: ``"mode"`` or ``"sample"``: how the last state becomes a sample (see above).
        spacing: ``"linear"`` or ``"quadratic"`` choice of the S steps (:func:`ddim_timesteps`).
        generator: source of randomness (see the module docstring); default the global RNG.
        return_trajectory: also return the states.
        progress: show a progress bar over the steps.

    Returns:
        Samples ``(B, D)``; with ``return_trajectory``, also the states ``(S + 1, B, D)`` in the
        diffusion's space: :math:`x_{\tau_S}, \dots, x_{\tau_1}` and :math:`\hat x_0`.
    """
    num = _check_num(num)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"Expected eta in [0, 1], but found {eta!r}.")
    if final not in ("mode", "sample"):
        raise ValueError(f"Expected final in ('mode', 'sample'), but found {final!r}.")
    ts = ddim_timesteps(ddpm.T, steps, spacing)
    like = ddpm._anchor
    if x_T is not None and tuple(x_T.shape) != (num, ddpm.data_dim):
        raise ValueError(f"Expected x_T of shape ({num}, {ddpm.data_dim}), but found {tuple(x_T.shape)}.")
    alpha_bars = ddpm.schedule.alpha_bars.tolist()
    with _randomness(generator, like):
        x = torch.randn(num, ddpm.data_dim, device=like.device, dtype=like.dtype) if x_T is None else x_T
        x = x.to(like.device, like.dtype)
        states = [x] if return_trajectory else None
        for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress)):
            t_prev = ts[i + 1] if i + 1 < len(ts) else 0
            eps, x0_hat = ddpm.predict(x, t)
            a_t = alpha_bars[t - 1]
            a_prev = alpha_bars[t_prev - 1] if t_prev > 0 else 1.0
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = ddim_step(x0_hat, eps, math.sqrt(a_prev), math.sqrt(1 - a_prev), noise_scale=sigma)
            if states is not None:
                states.append(x)
        if final == "sample":
            # At t = 1 the decoder's location mu_theta(x_1, 1) is x0_hat (the last update's x).
            scale = ddpm.tables(like).sigma[0]
            out = ddpm.decoder_dist(x, scale).sample()
            if not return_trajectory:
                return out
            return out, torch.stack(states)
    out = x
    if ddpm.decoder == "discretized":
        out = ((x + 1) * (ddpm.num_levels / 2)).floor().clamp(0, ddpm.num_levels - 1)
    if not return_trajectory:
        return out
    return out, torch.stack(states)
