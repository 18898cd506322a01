r"""Discrete Langevin proposal (DLP) kernels for Bernoulli and one-hot categorical sites: DULA, DMALA.

Zhang, Liu & Liu 2022, "A Langevin-like sampler for discrete distributions" (ICML,
arXiv:2206.09914). For a target :math:`\pi(\theta) \propto e^{f(\theta)}` with a differentiable
extension :math:`f` (here :math:`f = -U`), the proposal factorizes over coordinates,

.. math:: q(\theta' \mid \theta) = \prod_i \operatorname{Softmax}_{\theta'_i}\Big(
    \tfrac12 \nabla f(\theta)_i^\top (\theta'_i - \theta_i)
    - \tfrac{1}{2\alpha}\lVert\theta'_i - \theta_i\rVert^2\Big),

so every coordinate may change in one step. For a binary coordinate this is a flip with
probability :math:`\sigma(\tfrac12 \nabla f_i (1 - 2\theta_i) - \tfrac{1}{2\alpha})`; for a one-hot
categorical coordinate (the paper's encoding) the logits over categories are
:math:`\tfrac12 \nabla f_i + \theta_i / \alpha` (a move costs :math:`\lVert\Delta\rVert^2 = 2`).
DULA takes the proposal as is (biased, exact for log-quadratic :math:`f` as :math:`\alpha \to 0`);
DMALA adds the Metropolis-Hastings test and is exact.

On a Pyro model the latent sites must be ``Bernoulli`` or ``OneHotCategorical`` (possibly
``.expand``-ed, ``.to_event``-ed or inside plates); :math:`f` is the model's trace log-density with
each latent site's term written linearly in its value (:math:`\theta \ell - \operatorname{softplus}(\ell)`
for Bernoulli logits :math:`\ell`, :math:`\theta^\top \log p` for one-hot), equal to the exact
log-probability on the lattice and differentiable off it. Downstream code must use the values
arithmetically (``b @ W``, ``z @ locs``): where a value reaches the density only through indexing,
its gradient is zero and the proposal for it is gradient-blind (still exact under DMALA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from torch.distributions import Bernoulli, Independent, OneHotCategorical, constraints

from probgen.inference.mcmc import LangevinKernel, Params, _chain_sum

__all__ = ["DMALA", "DULA", "DiscreteLangevin", "dlp_proposal"]


def _site_kind(name: str, fn) -> str:
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.boolean:
        return "binary"
    if support is constraints.one_hot:
        return "one_hot"
    raise ValueError(
        f"Expected Bernoulli or OneHotCategorical latent sites (write a categorical site as "
        f"OneHotCategorical and use its value arithmetically), but found {type(fn).__name__} "
        f"with support {fn.support} at site {name!r}."
    )


def _linear_log_prob(fn, value: Tensor) -> Tensor:
    """The site's log-probability written linearly in ``value`` (differentiable in it)."""
    if isinstance(fn, Independent):
        return sum_rightmost(_linear_log_prob(fn.base_dist, value), fn.reinterpreted_batch_ndims)
    if isinstance(fn, Bernoulli):
        return value * fn.logits - torch.nn.functional.softplus(fn.logits)
    if isinstance(fn, OneHotCategorical):
        return (value * fn.logits).sum(-1)  # torch normalizes logits to log-probabilities
    raise ValueError(f"Expected a Bernoulli or OneHotCategorical site, but found {type(fn).__name__}.")


def dlp_proposal(value: Tensor, grad_potential: Tensor, step_size: float, one_hot: bool = False):
    r"""The DLP proposal :math:`q(\cdot \mid \theta)` of one site as a factorized torch distribution.

    Args:
        value: current :math:`\theta`, shape ``(..., D)`` in {0, 1} or ``(..., D, K)`` one-hot.
        grad_potential: :math:`\nabla U(\theta) = -\nabla f(\theta)`, shaped like ``value``.
        step_size: :math:`\alpha > 0`.
        one_hot: whether the last dimension of ``value`` is a one-hot category.

    Returns:
        ``Bernoulli`` over the new binary values or ``OneHotCategorical`` over the new one-hot
        values, batch shape ``value.shape`` (binary) or ``value.shape[:-1]`` (one-hot).
    """
    if one_hot:
        return OneHotCategorical(logits=-0.5 * grad_potential + value / step_size, validate_args=False)
    return Bernoulli(logits=-0.5 * grad_potential + (2 * value - 1) / (2 * step_size), validate_args=False)


class _DiscreteTracePotential:
    r""":math:`U(\theta) = -f(\theta)` of a Pyro model, the latent sites' terms linear in their values."""

    def __init__(self, model: Callable, args: tuple, kwargs: dict):
        self.model, self.args, self.kwargs = model, args, kwargs

    def __call__(self, params: Params) -> Tensor:
        trace = poutine.trace(poutine.condition(self.model, params)).get_trace(*self.args, **self.kwargs)
        log_joint = 0.0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if name in params:
                log_prob = _linear_log_prob(site["fn"], site["value"])
            else:
                log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            log_joint = log_joint + scale_and_mask(log_prob, site["scale"], site["mask"]).sum()
        return -log_joint


class DiscreteLangevin(LangevinKernel):
    r"""Discrete Langevin proposal kernel (DMALA when ``metropolis=True``, DULA otherwise).

    Args:
        model: Pyro model whose latent sites are Bernoulli / OneHotCategorical (exactly one of
            ``model``/``potential_fn``).
        potential_fn: :math:`U = -\log \pi` over a dict of float tensors with values in {0, 1}
            (one-hot along the last dimension for the sites in ``one_hot_sites``); returns shape
            ``()`` or ``(C,)`` for ``C`` vectorized chains. Needs ``initial_params``.
        step_size: :math:`\alpha > 0`.
        metropolis: apply the Metropolis-Hastings test (DMALA).
        one_hot_sites: with a ``potential_fn``, the names of its one-hot categorical sites.
        adapt_step_size, target_accept_prob: dual-averaging adaptation of :math:`\alpha` in warm-up
            (off by default: the paper tunes :math:`\alpha` by hand).
        init_strategy: per-site initialization for a model (default: a prior draw).

    References:
        Zhang, Liu & Liu 2022, arXiv:2206.09914 (Algorithms 1 and 2).

    Example:
        >>> def ising(J, h):  # spins s = 2b - 1 in {-1, 1}^D
        ...     b = pyro.sample("b", dist.Bernoulli(0.5 * torch.ones(len(h))).to_event(1))
        ...     s = 2 * b - 1
        ...     pyro.factor("energy", 0.5 * s @ J @ s + h @ s)
        >>> mcmc = pyro.infer.MCMC(DMALA(ising, step_size=0.5), num_samples=2000, warmup_steps=200)
        >>> mcmc.run(J, h)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[Params], Tensor] | None = None,
        *,
        step_size: float = 0.5,
        metropolis: bool = True,
        one_hot_sites: Iterable[str] = (),
        adapt_step_size: bool = False,
        target_accept_prob: float = 0.574,
        init_strategy: Callable = init_to_sample,
    ):
        self.metropolis = bool(metropolis)  # before the base checks adapt_step_size against it
        super().__init__(
            model,
            potential_fn,
            step_size=step_size,
            adapt_step_size=adapt_step_size,
            target_accept_prob=target_accept_prob,
            init_strategy=init_strategy,
        )
        if isinstance(one_hot_sites, str):
            raise ValueError(
                f"Expected one_hot_sites to be a collection of names, but found {one_hot_sites!r}."
            )
        self._one_hot = set(one_hot_sites)
        self.transforms = {}  # the values are sampled as they are

    def _initialize_model(self, args: tuple, kwargs: dict) -> None:
        trace = poutine.trace(InitMessenger(self._init_strategy)(self.model)).get_trace(*args, **kwargs)
        init, self._one_hot = {}, set()
        for name, site in trace.iter_stochastic_nodes():
            if isinstance(site["fn"], _Subsample):
                continue
            if _site_kind(name, site["fn"]) == "one_hot":
                self._one_hot.add(name)
            init[name] = site["value"].detach().to(torch.get_default_dtype())
        self.potential_fn = _DiscreteTracePotential(self.model, args, kwargs)
        if self._initial_params is None:
            self._initial_params = init

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        super().setup(warmup_steps, *args, **kwargs)
        unknown = self._one_hot - set(self._z)
        if unknown:
            raise ValueError(f"Expected one_hot_sites among {sorted(self._z)}, but found {sorted(unknown)}.")

    def _proposal(self, z: Params, grads: Params) -> dict:
        return {
            k: dlp_proposal(v, grads[k], self.step_size, one_hot=k in self._one_hot) for k, v in z.items()
        }

    def _log_q(self, proposal: dict, target: Params) -> Tensor:
        batch = self._potential.dim()
        return sum(_chain_sum(q.log_prob(target[k]), batch) for k, q in proposal.items())

    def _step(self) -> Tensor | None:
        forward = self._proposal(self._z, self._grads)
        z_new = {k: q.sample() for k, q in forward.items()}
        if not self.metropolis:
            self._set_state(z_new)
            return None
        potential_new, grads_new = self._potential_and_grad(z_new)
        reverse = self._proposal(z_new, grads_new)
        log_ratio = (
            self._potential - potential_new + self._log_q(reverse, self._z) - self._log_q(forward, z_new)
        )
        return self._metropolis(z_new, log_ratio, potential_new, grads_new)


class DMALA(DiscreteLangevin):
    r"""Discrete Metropolis-adjusted Langevin algorithm (Zhang et al. 2022, arXiv:2206.09914, Alg. 2)."""

    def __init__(self, model: Callable | None = None, potential_fn: Callable | None = None, **kwargs):
        super().__init__(model, potential_fn, metropolis=True, **kwargs)


class DULA(DiscreteLangevin):
    r"""Discrete unadjusted Langevin algorithm (Zhang et al. 2022, arXiv:2206.09914, Alg. 1)."""

    def __init__(self, model: Callable | None = None, potential_fn: Callable | None = None, **kwargs):
        super().__init__(model, potential_fn, metropolis=False, **kwargs)
