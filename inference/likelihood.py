r"""Log-likelihood estimates for model/guide pairs.

The importance-weighted bound (Burda, Grosse & Salakhutdinov 2015,
arXiv:1509.00519) with K samples from the guide,

.. math::
    \log p(x) \ge \mathcal L_K(x) = \mathbb E\Big[\log \frac1K \sum_{k=1}^K
    \frac{p(x, z_k)}{q(z_k \mid x)}\Big], \quad z_k \sim q(z \mid x),

increases with K and converges to :math:`\log p(x)`. It is computed here by
running the guide and the model under one extra ``pyro.plate`` of particles,
so any model/guide pair whose sample sites all sit in the ``"data"`` plate
works unchanged.

For DDPM, :func:`ddpm_nll` is the variational bound summed over every step
(Ho et al. 2020, arXiv:2006.11239, eq. 5), read from the method's own one-step
programs with the step ``t`` conditioned on each value in turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from torch import Tensor, nn

from probgen.elbo import sample_sites
from probgen.metrics import bits_per_dim
from probgen.models.base import declared
from probgen.objectives import seeded

__all__ = [
    "ESTIMATORS",
    "ddpm_bits_per_dim",
    "ddpm_nll",
    "iwae_bits_per_dim",
    "iwae_log_likelihood",
    "log_likelihood",
    "max_plate_nesting",
    "resolve_likelihood",
]


def max_plate_nesting(method: nn.Module, x: torch.Tensor) -> int:
    """Number of plates nested in ``method``'s model and guide, read from one trace each."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(method.guide).get_trace(x[:1])
        model_trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(x[:1])
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for _, site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _per_example(trace, particle_dim: int, num: int, batch: int) -> torch.Tensor:
    """Sum of the sample sites' log-probs of ``trace`` as a ``(K, B)`` tensor."""
    total = 0.0
    for name, site in sample_sites(trace):
        data_frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
        if not data_frames:
            raise ValueError(
                f"Expected every sample site inside the 'data' plate, but found site {name!r} "
                "outside it: a per-example likelihood is not defined for global latents."
            )
        lp = site["fn"].log_prob(site["value"])
        lp = lp.reshape((1,) * (-particle_dim - lp.dim()) + lp.shape)
        k_dim, b_dim = lp.dim() + particle_dim, lp.dim() + data_frames[0].dim
        other = [d for d in range(lp.dim()) if d not in (k_dim, b_dim)]
        if other:
            lp = lp.sum(other, keepdim=True)
        total = total + lp.reshape(lp.shape[k_dim], lp.shape[b_dim]).expand(num, batch)
    return total


@torch.no_grad()
def iwae_log_likelihood(
    method: nn.Module,
    x: torch.Tensor,
    *,
    num_samples: int = 1000,
    particles_per_chunk: int = 250,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    r"""Importance-weighted estimate :math:`\mathcal L_K(x)` of :math:`\log p(x)`.

    Args:
        method: a PyroModule with ``model(x)`` and ``guide(x)``; every sample
            site inside ``pyro.plate("data", B)``.
        x: observations, ``(B, D)``.
        num_samples: K, the number of importance samples per example.
        particles_per_chunk: particles drawn at once (memory bound).
        batch_size: examples evaluated at once.
        seed: seeds a forked global RNG; the training RNG stream is untouched.

    Returns:
        Tensor ``(B,)``: the bound in nats per example (a lower bound on
        :math:`\log p(x)`, tight as K grows).
    """
    if num_samples < 1 or particles_per_chunk < 1 or batch_size < 1:
        raise ValueError(
            "Expected num_samples, particles_per_chunk and batch_size >= 1, but found "
            f"{num_samples}, {particles_per_chunk} and {batch_size}."
        )
    if x.dim() < 2:
        raise ValueError(f"Expected x of shape (B, D), but found {tuple(x.shape)}.")
    was_training = method.training
    method.eval()
    out = []
    with seeded(seed, x):
        particle_dim = -max_plate_nesting(method, x) - 1
        for xb in x.split(batch_size):
            chunks = []
            for start in range(0, num_samples, particles_per_chunk):
                k = min(particles_per_chunk, num_samples - start)
                with pyro.plate("particles", k, dim=particle_dim):
                    guide_trace = poutine.trace(method.guide).get_trace(xb)
                    model_trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(xb)
                b = xb.shape[0]
                log_w = _per_example(model_trace, particle_dim, k, b) - _per_example(
                    guide_trace, particle_dim, k, b
                )
                chunks.append(torch.logsumexp(log_w, dim=0))
            out.append(torch.logsumexp(torch.stack(chunks), dim=0) - math.log(num_samples))
    method.train(was_training)
    return torch.cat(out)


def iwae_bits_per_dim(method: nn.Module, x: torch.Tensor, **kwargs) -> float:
    """Mean IWAE negative log-likelihood of discrete ``x`` (``(B, D)``) in bits per dimension."""
    ll = iwae_log_likelihood(method, x, **kwargs)
    return float(bits_per_dim(-ll, x[0].numel()).mean())


def _site_terms(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """Per-example bound terms of each site, unscaled but masked: KL(q || p) of latents, -log p of data."""
    terms = {}
    for name, site in sample_sites(model_trace):
        if name == "t":
            continue
        if site["is_observed"]:
            term, mask = -site["fn"].log_prob(site["value"]), site["mask"]
        else:
            q_site = guide_trace.nodes[name]
            term, mask = kl_divergence(q_site["fn"], site["fn"]), q_site["mask"]
        terms[name] = term if mask is None else torch.where(mask, term, term.new_zeros(()))
    return terms


@torch.no_grad()
def ddpm_nll(method: nn.Module, x: torch.Tensor, *, batch_size: int = 8192, seed: int = 0) -> torch.Tensor:
    r"""Variational-bound negative log-likelihood of a DDPM, in nats per example.

    .. math::
        -\log p_\theta(x_0) \le L_T + \sum_{t=2}^T L_{t-1} + L_0,

    with every one of the T terms computed (no sampling of t): :math:`L_T` and the
    :math:`L_{t-1}` as analytic KLs, :math:`L_0 = -\log p_\theta(x_0 \mid x_1)`. They are read
    from the method's one-step programs ``model``/``guide`` with the site ``"t"``
    conditioned on each step (per-example site terms, without the programs' ``poutine.scale``),
    batched over steps and examples. Each term's expectation over
    :math:`x_t \sim q(x_t \mid x_0)` is estimated with one draw per step and example, as in
    Ho et al.'s evaluation. For the discretized decoder the bound is on the NLL of the discrete
    levels.

    Args:
        method: a :class:`~probgen.models.DDPM` (any method with those one-step programs).
        x: observations ``(B, D)`` in the method's data form.
        batch_size: (step, example) pairs evaluated per network call.
        seed: seeds a forked global RNG; the training RNG stream is untouched.

    Returns:
        Tensor ``(B,)``: the bound in nats per example (an upper bound on :math:`-\log p(x)`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1 (an int), but found {batch_size!r}.")
    if x.dim() != 2:
        raise ValueError(f"Expected x of shape (B, D), but found {tuple(x.shape)}.")
    T = method.T
    was_training = method.training
    method.eval()
    out = []
    with seeded(seed, x), pyro.validation_enabled(False):
        for xb in x.split(batch_size):
            b = xb.shape[0]
            per_chunk = max(1, batch_size // b)
            total = torch.zeros(b, dtype=torch.float64, device=x.device)
            for first in range(1, T + 1, per_chunk):
                ts = torch.arange(first, min(first + per_chunk, T + 1), device=x.device)
                data = {"t": ts.repeat_interleave(b)}
                xs = xb.repeat(len(ts), 1)
                guide_trace = poutine.trace(poutine.condition(method.guide, data=data)).get_trace(xs)
                model = poutine.replay(poutine.condition(method.model, data=data), trace=guide_trace)
                model_trace = poutine.trace(model).get_trace(xs)
                for name, term in _site_terms(model_trace, guide_trace).items():
                    term = term.reshape(len(ts), b).double()
                    if name != "x_T":
                        total += term.sum(0)
                    elif first == 1:  # L_T does not depend on t: count it once
                        total += term[0]
            out.append(total)
    method.train(was_training)
    return torch.cat(out).to(x.dtype if x.is_floating_point() else torch.get_default_dtype())


def ddpm_bits_per_dim(method: nn.Module, x: torch.Tensor, **kwargs) -> float:
    """Mean variational-bound NLL (:func:`ddpm_nll`) of ``x`` (``(B, D)``) in bits per dimension."""
    nll = ddpm_nll(method, x, **kwargs)
    return float(bits_per_dim(nll, x[0].numel()).mean())


# ----------------------------------------------------------------------------- declared estimators


def iwae_estimator(
    method: nn.Module, x: Tensor, *, num_samples: int = 1000, seed: int = 0
) -> tuple[Tensor, str]:
    """The IWAE bound of any model/guide pair (the default of a method with a guide)."""
    ll = iwae_log_likelihood(method, x, num_samples=num_samples, seed=seed)
    return ll, f"IWAE bound (lower bound on log p), K={num_samples}"


def ddpm_bound(method: nn.Module, x: Tensor, *, num_samples: int = 0, seed: int = 0) -> tuple[Tensor, str]:
    """DDPM's whole variational bound (every one of its T terms)."""
    nll = ddpm_nll(method, x, seed=seed)
    return -nll, f"variational bound (L_T + sum of all {method.T} terms + L_0; upper bound on NLL)"


def exact_log_prob(
    method: nn.Module, x: Tensor, *, num_samples: int = 0, seed: int = 0
) -> tuple[Tensor, str]:
    """``method.log_prob(x)``: an exact density (a normalizing flow's change of variables)."""
    with torch.no_grad():
        return method.log_prob(x), "exact log-likelihood (change of variables)"


def _ode(method: nn.Module, x: Tensor, **kwargs: Any) -> tuple[Tensor, str]:
    from probgen.inference.score_sde_sampling import score_sde_likelihood

    return score_sde_likelihood(method, x, **kwargs)


#: every likelihood estimator of the library, by the name a method's ``likelihoods`` table uses; each
#: is ``fn(method, x, *, num_samples, seed) -> (log_lik (B,), description)``.
ESTIMATORS: Mapping[str, Callable[..., tuple[Tensor, str]]] = {
    "iwae": iwae_estimator,
    "ddpm-bound": ddpm_bound,
    "exact": exact_log_prob,
    "probability-flow-ode": _ode,
}


def resolve_likelihood(method: nn.Module, estimator: str | None = None) -> Callable[..., tuple[Tensor, str]]:
    """The estimator ``estimator`` (None: the first) that ``method``'s class declares.

    Raises:
        NotImplementedError: the method declares none.
        ValueError: ``estimator`` is not declared, or a declared name is unknown.
    """
    table = getattr(type(method), "likelihoods", None) or {}
    name = getattr(method, "name", "") or type(method).__name__
    if not table:
        raise NotImplementedError(f"method {name!r} declares no log-likelihood estimator")
    key = next(iter(table)) if estimator is None else estimator
    return declared(method, "likelihoods", key, ESTIMATORS, "likelihood estimator")


def log_likelihood(
    method: nn.Module, x: Tensor, *, estimator: str | None = None, **kwargs: Any
) -> tuple[Tensor, str]:
    """Per-example log-likelihood of ``x`` (``(B, D)``) under ``method``, in nats.

    Args:
        method: a method; its class declares its estimators (:attr:`probgen.models.Method.likelihoods`).
        x: observations in the method's data form, ``(B, D)``.
        estimator: a name the method declares (None: its first, the default).
        **kwargs: passed to the estimator (``num_samples``, ``seed``).

    Returns:
        ``(log_lik, description)``: a ``(B,)`` tensor (exact, or a bound as the
        description says) and the description.

    Raises:
        NotImplementedError: the method declares no estimator.
        ValueError: ``estimator`` is not one the method declares.
    """
    fn = resolve_likelihood(method, estimator)
    return fn(method, x, **kwargs)
