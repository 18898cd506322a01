r"""``AnalyticKL_ELBO``: the mean-field ELBO computed from Pyro traces with nothing wasted.

For a model/guide pair whose latent sites are all reparameterized,

.. math::
    \mathrm{ELBO} = \sum_{\text{observed } s} \log p(x_s \mid \cdot)
    \;-\; \sum_{\text{latent } s} \mathrm{KL}\big(q(z_s \mid \cdot) \,\|\, p(z_s \mid \cdot)\big),

with the KL taken in closed form where one is registered (else its one-sample
estimate :math:`\log q(z_s) - \log p(z_s)`). Scales and masks follow Pyro:
observed terms carry their site's ``poutine.scale``/``poutine.mask``, a KL
carries the guide site's; ``pyro.factor`` sites are observed sites and enter
as their factor. This is what Pyro's ``TraceMeanField_ELBO`` computes,
but that class first evaluates :math:`\log p` and :math:`\log q` of every
latent site (``compute_log_prob`` / ``compute_score_parts``) and then discards
them in favour of the KL; skipping that work is most of the difference
measured in ``benchmarks/svi_overhead.py``. The value is the same to float
rounding (``tests/inference/test_elbo.py`` checks it against Pyro's classes).

Non-reparameterized guide sites need score-function terms: use Pyro's
``Trace_ELBO`` / ``TraceGraph_ELBO`` for those (this class raises).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match

__all__ = ["AnalyticKL_ELBO", "sample_sites"]


def sample_sites(trace) -> Iterator[tuple[str, dict]]:
    """The ``(name, site)`` pairs of a trace's sample sites, plates' subsample sites excluded."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _check_batch_shape(name: str, site: dict) -> None:
    """Every batch dim of a site's distribution lies in a plate of that size (or is 1)."""
    sizes = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
    batch_shape = tuple(site["fn"].batch_shape)
    for i, size in enumerate(reversed(batch_shape)):
        dim = -1 - i
        expected = sizes.get(dim, 1)
        if size not in (expected, 1):
            raise ValueError(
                f"Expected site {name!r} to have batch size {expected} at dim {dim} "
                f"(its plates: {sizes or 'none'}), but found batch shape {batch_shape}."
            )


class AnalyticKL_ELBO(ELBO):
    r"""Mean-field ELBO with analytic KL terms, evaluated lazily from Pyro traces.

    Args:
        num_particles: number of independent samples averaged (sequentially).

    References:
        Kingma & Welling 2013 (arXiv:1312.6114), eq. (10); Pyro's
        ``TraceMeanField_ELBO``.
    """

    def __init__(self, num_particles: int = 1) -> None:
        super().__init__(num_particles=num_particles)
        self._kl_available: dict[tuple[type, type], bool] = {}

    def _particle(self, model, guide, args, kwargs) -> torch.Tensor:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        validate = is_validation_enabled()
        if validate:
            check_model_guide_match(model_trace, guide_trace)
        elbo = 0.0
        for name, site in sample_sites(model_trace):
            if validate:
                _check_batch_shape(name, site)
            fn, value = site["fn"], site["value"]
            if site["is_observed"]:
                elbo = elbo + scale_and_mask(fn.log_prob(value), site["scale"], site["mask"]).sum()
                continue
            q_site = guide_trace.nodes[name]
            q = q_site["fn"]
            if not q.has_rsample:
                raise ValueError(
                    f"Expected a reparameterized guide site, but found {name!r} with "
                    f"{type(q).__name__}: use Trace_ELBO or TraceGraph_ELBO for score-function terms."
                )
            kl = self._kl(q, fn)
            if kl is not None:  # as in Pyro: the KL carries the guide site's scale and mask
                elbo = elbo - scale_and_mask(kl, q_site["scale"], q_site["mask"]).sum()
            else:
                log_p = scale_and_mask(fn.log_prob(value), site["scale"], site["mask"]).sum()
                log_q = scale_and_mask(q.log_prob(value), q_site["scale"], q_site["mask"]).sum()
                elbo = elbo + log_p - log_q
        return -elbo

    def _kl(self, q, p) -> torch.Tensor | None:
        """Closed-form KL(q || p), or None where none is registered (remembered per type pair)."""
        key = (type(q), type(p))
        if self._kl_available.get(key, True):
            try:
                return kl_divergence(q, p)
            except NotImplementedError:
                self._kl_available[key] = False
        return None

    def _get_trace(self, model, guide, args, kwargs):  # required by pyro.infer.ELBO; unused
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Negative ELBO, differentiable, averaged over ``num_particles``."""
        loss = self._particle(model, guide, args, kwargs)
        for _ in range(self.num_particles - 1):
            loss = loss + self._particle(model, guide, args, kwargs)
        return loss / self.num_particles if self.num_particles > 1 else loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Negative ELBO as a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Negative ELBO as a float, after back-propagating it (for ``pyro.infer.SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return torch_item(loss)
