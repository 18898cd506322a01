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
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch import nn

from probgen.inference._util import sample_sites, seeded
from probgen.metrics import bits_per_dim

__all__ = ["iwae_log_likelihood", "iwae_bits_per_dim", "max_plate_nesting"]


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
