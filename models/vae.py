r"""Variational autoencoder as a Pyro model/guide pair.

Kingma & Welling 2013, "Auto-Encoding Variational Bayes" (arXiv:1312.6114).
The model is :math:`z \sim \mathcal N(0, I)`, :math:`x \mid z \sim p_\theta(x \mid z)`
with a likelihood suited to the data; the guide is the amortized Gaussian
:math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \operatorname{diag}\sigma^2_\phi(x))`.
Pyro's ELBO over the pair is
:math:`\mathbb E_q[\log p_\theta(x \mid z)] - \mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))`
(the seed notes print a plus sign before the KL: that is a slip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO
from torch import nn

from probgen.distributions import DiscretizedLogistic
from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, register
from probgen.nets import MLP

__all__ = ["VAE", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "categorical", "logistic", "gaussian")


@register("vae")
class VAE(Method):
    r"""Gaussian-latent VAE with a Bernoulli, categorical, discretized-logistic or Gaussian decoder.

    Args:
        data_dim: flat size D of one observation.
        latent_dim: size of z.
        hidden: widths of the encoder's and decoder's hidden layers.
        likelihood: ``"bernoulli"`` for binary data in {0, 1}; ``"categorical"``
            for integer levels ``0 .. num_levels - 1`` (one ``num_levels``-way
            categorical per dimension, e.g. the 17-level digits); ``"gaussian"``
            for real vectors (2-D points), with a learned per-dimension scale.
        num_levels: number of levels of categorical data.
        analytic_kl: train with ``TraceMeanField_ELBO`` (analytic KL) instead of
            ``Trace_ELBO`` (Monte Carlo KL).

    Example:
        >>> vae = VAE(data_dim=64, likelihood="categorical", num_levels=17)
        >>> loss = vae.elbo().differentiable_loss(vae.model, vae.guide, x)  # x: (B, 64)
        >>> samples = vae.sample(16)                                          # (16, 64)
    """

    def __init__(
        self,
        data_dim: int,
        *,
        latent_dim: int = 16,
        hidden: Sequence[int] = (256, 256),
        likelihood: str = "categorical",
        num_levels: int = 17,
        num_mixtures: int = 3,
        analytic_kl: bool = True,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"Expected likelihood in {LIKELIHOODS}, but found {likelihood!r}.")
        if data_dim < 1 or latent_dim < 1:
            raise ValueError(
                f"Expected data_dim >= 1 and latent_dim >= 1, but found {data_dim} and {latent_dim}."
            )
        if likelihood == "categorical" and num_levels < 2:
            raise ValueError(f"Expected num_levels >= 2, but found {num_levels}.")
        self.config = dict(
            data_dim=data_dim,
            latent_dim=latent_dim,
            hidden=list(hidden),
            likelihood=likelihood,
            num_levels=num_levels,
            num_mixtures=num_mixtures,
            analytic_kl=analytic_kl,
        )
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.num_levels = num_levels if likelihood in ("categorical", "logistic") else 1
        self.num_mixtures = num_mixtures
        self.analytic_kl = analytic_kl
        per_dim = {"categorical": num_levels, "logistic": (3 if num_mixtures > 1 else 2) * num_mixtures}
        per_dim = per_dim.get(likelihood, 1)
        out = data_dim * per_dim
        self.encoder = MLP(data_dim, 2 * latent_dim, hidden)
        self.decoder = MLP(latent_dim, out, tuple(reversed(hidden)))
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(data_dim))
        # Inputs to the encoder are rescaled to about [-1, 1] whatever the data's units.
        self.register_buffer("_in_scale", torch.tensor(2.0 / max(self.num_levels - 1, 1)))
        self.register_buffer("_prior_loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("_prior_scale", torch.ones(latent_dim), persistent=False)

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> VAE:
        """A VAE for ``dataset``: discretized-logistic decoder for integer-level images,
        Bernoulli for binary data, Gaussian for real vectors (the 2-D toys)."""
        x = dataset.x
        defaults: dict[str, Any] = {"data_dim": x.shape[-1]}
        if dataset.num_levels is not None and dataset.num_levels > 2:
            defaults.update(likelihood="logistic", num_levels=dataset.num_levels, num_mixtures=1)
        elif bool(((x == 0) | (x == 1)).all()):
            defaults.update(likelihood="bernoulli")
        else:
            defaults.update(likelihood="gaussian", latent_dim=2, hidden=(128, 128))
        defaults.update(kwargs)
        return cls(**defaults)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO() if self.analytic_kl else Trace_ELBO()

    def likelihood_dist(self, z: torch.Tensor) -> dist.Distribution:
        """:math:`p_\\theta(x \\mid z)` for latents ``z`` of shape ``(..., latent_dim)``.

        Returns:
            A distribution with batch shape ``z.shape[:-1]`` and event shape ``(D,)``.
        """
        out = self.decoder(z)
        if self.likelihood == "categorical":
            logits = out.unflatten(-1, (self.data_dim, self.num_levels))
            return dist.Categorical(logits=logits).to_event(1)
        if self.likelihood == "logistic":
            half = (self.num_levels - 1) / 2
            k = self.num_mixtures
            params = out.unflatten(-1, (self.data_dim, 3 if k > 1 else 2, k))
            loc, raw_scale = params[..., -2, :], params[..., -1, :]
            component = DiscretizedLogistic(
                half + half * loc, nn.functional.softplus(raw_scale) + 0.05, self.num_levels
            )
            if k == 1:
                single = DiscretizedLogistic(component.loc[..., 0], component.scale[..., 0], self.num_levels)
                return single.to_event(1)
            mixing = dist.Categorical(logits=params[..., 0, :])
            return dist.MixtureSameFamily(mixing, component).to_event(1)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, nn.functional.softplus(self.log_scale) + 1e-3).to_event(1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of :math:`q_\\phi(z \\mid x)`, each ``(..., latent_dim)``."""
        h = x.to(self._in_scale.dtype)
        if self.likelihood in ("categorical", "logistic"):
            h = h * self._in_scale - 1.0
        loc, raw_scale = self.encoder(h).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw_scale) + 1e-4

    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        """Generative program. ``x``: ``(B, D)`` observations, or None to sample ``batch_size``."""
        num = self._batch_size(x, batch_size)
        with pyro.plate("data", num):
            z = pyro.sample("z", dist.Normal(self._prior_loc, self._prior_scale).to_event(1))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        """Amortized Gaussian posterior. ``x``: ``(B, D)`` observations."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of ``x`` (``(B, D)``) to the likelihood's mode, ``(B, D)``."""
        d = self.likelihood_dist(self.encode(x)[0])
        base = d.base_dist
        if self.likelihood == "categorical":
            return base.logits.argmax(-1).to(x.dtype)
        if self.likelihood == "logistic":
            return base.mean.round()
        if self.likelihood == "bernoulli":
            return (base.logits > 0).to(x.dtype)
        return base.loc
