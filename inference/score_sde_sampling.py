r"""Samplers and the likelihood of the ``score-sde`` method, registered for the CLI and ``evaluate``.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(arXiv:2011.13456). Every sampler starts from the SDE's prior :math:`x_T \sim \mathcal N(0,
\sigma_T^2 I)` drawn from the passed ``generator`` and ends at the SDE's ``eps`` with the Tweedie
denoising step (the authors' ``noise_removal``):

* ``"em"``: the reverse-time SDE solved by :func:`torchsde.sdeint`
  (:func:`~probgen.inference.sde.reverse_sde_sample`; option ``solver`` ``"euler"`` (Euler-Maruyama,
  the default), ``"milstein"`` or ``"srk"``); ``steps`` default 1000;
* ``"pc"``: predictor-corrector sampling (:func:`~probgen.inference.sde.pc_sample`, Algorithms 2-3:
  reverse-diffusion predictor, ``corrector_steps`` Langevin steps at signal-to-noise ratio ``snr``,
  default 1 and 0.16 as in the paper); ``steps`` default 1000;
* ``"ode"``: the probability-flow ODE (:func:`~probgen.inference.ode.ode_sample`), adaptive
  ``dopri5`` with ``rtol = atol = 1e-5`` by default; ``steps`` only with a fixed-step ``solver``
  (``"euler"``, ``"rk4"``, ...).

The likelihood registered for ``probgen evaluate`` is the probability-flow ODE's
(:func:`ode_likelihood`, App. D.2): exact divergence up to D = 16, Hutchinson's unbiased estimate
(one Rademacher vector per example) above, adaptive ``dopri5``; its description carries the mean
number of score evaluations (NFE). It is the log-density at :math:`x_\epsilon`, i.e. of the model's
:math:`p_\epsilon`, which is what the samples (before denoising) follow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from probgen.inference.ode import ADAPTIVE_METHODS, ode_log_likelihood, ode_sample
from probgen.inference.sde import pc_sample, reverse_sde_sample
from probgen.sdes import DiffusionSDE, ScoreFn

__all__ = ["SAMPLERS", "ode_likelihood", "sample_score_sde"]

SAMPLERS = ("em", "pc", "ode")
_EXACT_MAX_DIM = 16


def sample_score_sde(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    num: int,
    dim: int,
    *,
    sampler: str = "em",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Tensor:
    r"""``num`` samples ``(num, dim)`` of a score model: prior draws through ``"em"``, ``"pc"`` or ``"ode"``.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        num: number of samples.
        dim: D.
        sampler: a name in :data:`SAMPLERS` (module docstring).
        steps: number of steps (None: 1000 for ``"em"``/``"pc"``; the adaptive solver for ``"ode"``).
        generator: source of the prior draws and of every noise (default the global RNG).
        device, dtype: of the samples (default the generator's device, the default dtype).
        **options: ``"em"``: ``solver``, ``eps``, ``denoise``; ``"pc"``: ``predictor``,
            ``corrector_steps``, ``snr``, ``per_example``, ``eps``, ``denoise``; ``"ode"``: ``solver``,
            ``rtol``, ``atol``, ``eps``, ``denoise``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Expected sampler in {SAMPLERS}, but found {sampler!r}.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"Expected num >= 1, but found {num!r}.")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    x = sde.prior_sample((num, dim), generator=generator, device=device, dtype=dtype)
    options = dict(options)
    denoise = options.pop("denoise", True)
    eps = options.pop("eps", None)
    if sampler == "em":
        solver = options.pop("solver", "euler")
        _reject(options, sampler)
        return reverse_sde_sample(
            sde,
            score_fn,
            x,
            steps=steps or 1000,
            method=solver,
            eps=eps,
            denoise=denoise,
            generator=generator,
        )
    if sampler == "pc":
        pc_opts = {
            k: options.pop(k) for k in ("predictor", "corrector_steps", "snr", "per_example") if k in options
        }
        _reject(options, sampler)
        return pc_sample(
            sde, score_fn, x, steps=steps or 1000, eps=eps, denoise=denoise, generator=generator, **pc_opts
        )
    solver = options.pop("solver", "dopri5")
    rtol, atol = options.pop("rtol", 1e-5), options.pop("atol", 1e-5)
    _reject(options, sampler)
    if solver in ADAPTIVE_METHODS and steps is not None:
        raise ValueError(
            f"Expected no steps for the adaptive ODE solver {solver!r} (choose a fixed-step one, e.g. "
            f"solver=rk4), but found steps={steps}."
        )
    return ode_sample(
        sde, score_fn, x, method=solver, rtol=rtol, atol=atol, steps=steps, eps=eps, denoise=denoise
    )


#: the knobs of each sampler besides ``steps`` (see :func:`sample_score_sde`).
KNOBS = {
    "em": ("solver", "eps", "denoise"),
    "pc": ("predictor", "corrector_steps", "snr", "per_example", "eps", "denoise"),
    "ode": ("solver", "rtol", "atol", "eps", "denoise"),
}


def _reject(options: dict[str, Any], sampler: str) -> None:
    if options:
        raise ValueError(
            f"Expected knobs of the {sampler!r} sampler (steps, {', '.join(KNOBS[sampler])}), "
            f"but found unknown {sorted(options)}."
        )


@torch.no_grad()
def ode_likelihood(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    *,
    divergence: str | None = None,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 1000,
    seed: int = 0,
) -> tuple[Tensor, int, str]:
    r"""Probability-flow ODE log-likelihoods of ``x`` ``(B, D)`` in batches, with the NFE and a description.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``, differentiable in ``x``.
        x: points ``(B, D)``.
        divergence: ``"exact"`` or ``"hutchinson"`` (None: exact up to D = 16).
        solver, rtol, atol: the torchdiffeq solver (adaptive) and its tolerances.
        eps: the start time (None: ``sde.eps``).
        prior_log_prob: :math:`\log \pi(z)` ``(B,)`` at time T (None: ``sde.prior_log_prob``).
        batch_size: points per solve.
        seed: seeds the Hutchinson vectors.

    Returns:
        ``(log_lik (B,), mean NFE per batch, description)``.
    """
    if divergence is None:
        divergence = "exact" if x.shape[-1] <= _EXACT_MAX_DIM else "hutchinson"
    generator = torch.Generator(device=x.device).manual_seed(seed)
    out, nfes = [], []
    for chunk in x.split(batch_size):
        ll, nfe = ode_log_likelihood(
            sde, score_fn, chunk, divergence=divergence, method=solver, rtol=rtol, atol=atol, eps=eps,
            prior_log_prob=prior_log_prob, generator=generator, return_nfe=True,
        )  # fmt: skip
        out.append(ll)
        nfes.append(nfe)
    nfe = round(sum(nfes) / len(nfes))
    what = (
        "exact divergence"
        if divergence == "exact"
        else "Hutchinson divergence (1 Rademacher probe, unbiased)"
    )
    t0 = sde.eps if eps is None else eps
    desc = (
        f"probability-flow ODE log-likelihood of p_eps ({what}; {solver} rtol={rtol:g} atol={atol:g}; "
        f"eps={t0:g}; mean NFE {nfe} per batch of <= {batch_size})"
    )
    return torch.cat(out), nfe, desc


def _device(method: nn.Module) -> torch.device:
    p = next(iter(method.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(method: nn.Module) -> torch.dtype:
    p = next(iter(method.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _sampler(name: str):
    def fn(method, num: int, *, generator, steps: int | None = None, **knobs: Any) -> Tensor:
        return sample_score_sde(
            method.sde_object, method.score, num, method.data_dim, sampler=name, steps=steps,
            generator=generator, device=_device(method), dtype=_dtype(method), **knobs,
        )  # fmt: skip

    fn.__name__ = f"score_sde_{name}"
    fn.__doc__ = f"``--sampler {name}`` of a score model: :func:`sample_score_sde` with ``sampler={name!r}``."
    return fn


score_sde_em, score_sde_pc, score_sde_ode = (_sampler(name) for name in SAMPLERS)


def score_sde_likelihood(
    method, x: Tensor, *, num_samples: int = 1, seed: int = 0, **options: Any
) -> tuple[Tensor, str]:
    """``probgen evaluate``'s estimator: the ODE log-likelihood (``num_samples`` is not used)."""
    ll, _, desc = ode_likelihood(method.sde_object, method.score, x.to(_dtype(method)), seed=seed, **options)
    return ll, desc
