r"""Score-based generative modelling through SDEs: continuous-time denoising score matching as a Pyro program.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations" (arXiv:2011.13456); Song, Durkan, Murray & Ermon 2021, "Maximum
Likelihood Training of Score-Based Diffusion Models" (arXiv:2101.09258). A forward SDE
(:class:`~probgen.sdes.VPSDE`, :class:`~probgen.sdes.SubVPSDE`, :class:`~probgen.sdes.VESDE`) has
Gaussian transitions :math:`x_t = m_t x_0 + s_t \epsilon`; a network learns the scores of the
marginals :math:`p_t` by the weighted objective (their eq. 7, with the factor 1/2 of Song, Durkan et al.)

.. math::
    \mathcal J(\theta; \lambda) = \int_{t_{\min}}^T \lambda(t)\,
    \mathbb E_{x_0, \epsilon}\big[\tfrac12 \lVert s_\theta(x_t, t) + \epsilon / s_t \rVert^2\big]\, dt,

since :math:`-\epsilon / s_t = \nabla_{x_t} \log q(x_t \mid x_0)` (Vincent 2011).

**The program.** Per example, :meth:`ScoreSDE.model` draws the time ``"t"`` from a law :math:`q(t)` on
:math:`[t_{\min}, T]`, the state ``"x_t"`` :math:`\sim q(x_t \mid x_0)` (the SDE's ``marginal``), and
observes :math:`\epsilon = (x_t - m_t x_0)/s_t` under :math:`\mathcal N(-s_t\, s_\theta(x_t, t), I)`
(:func:`dsm_sites`), whose log-likelihood is

.. math::
    -\tfrac12 \lVert \epsilon + s_t s_\theta \rVert^2 - \tfrac D2 \log 2\pi
    = -s_t^2\, \tfrac12 \lVert s_\theta + \epsilon / s_t \rVert^2 - \tfrac D2 \log 2\pi,

the :math:`\lambda = s_t^2` term. The observed site sits in ``poutine.scale`` by
:math:`w(t) = \lambda(t) / (s_t^2\, q(t))` per example, so the negative log-likelihood of one draw
is an unbiased estimate of :math:`\mathcal J(\theta; \lambda) + \tfrac D2 \log 2\pi \int \lambda / s^2`:

.. math::
    \mathbb E_{t \sim q}\Big[\frac{\lambda(t)}{s_t^2\, q(t)}\, s_t^2\, \ell(t)\Big]
    = \int_{t_{\min}}^T \lambda(t)\, \ell(t)\, dt, \qquad
    \ell(t) = \mathbb E\big[\tfrac12 \lVert s_\theta + \epsilon/s_t \rVert^2\big].

:meth:`ScoreSDE.guide` draws ``"t"`` and ``"x_t"`` with the *same* laws, so under
:class:`~probgen.elbo.AnalyticKL_ELBO` their KL terms are exactly 0 and the loss is the scaled observed
term alone.

* ``weighting="sigma2"`` (default): :math:`\lambda(t) = s_t^2` (Song et al. 2021), ``"t"`` uniform,
  :math:`w = T - t_{\min}`: the plain noise-prediction loss.
* ``weighting="likelihood"``: :math:`\lambda(t) = g(t)^2`, for which :math:`\mathcal J` bounds the KL
  divergence from the data to the model, up to constants (Song, Durkan et al. 2021, Theorem 1).
  Under uniform ``"t"`` the weight :math:`w = (T - t_{\min})\, g^2/s^2` grows like :math:`1/t` near
  :math:`t_{\min}` (for all three SDEs :math:`g^2/s^2 \approx c/t` at small t: c = 1 for VP and VE,
  2 for sub-VP), so the estimate has a huge variance. With ``importance_sampling=True`` (the default
  for this weighting), ``"t"`` is drawn from :class:`TimeProposal`, a piecewise-uniform density
  proportional to :math:`g^2/s^2` (their Section 5), and :math:`w = g(t)^2 / (s_t^2 q(t))` uses the
  proposal's *own* density, so the objective is unbiased whatever the grid
  (``tests/models/test_score_sde.py`` checks it against a quadrature of the exact Gaussian objective)
  and, the density being within a grid cell's variation of :math:`g^2/s^2`, the weight is nearly
  constant.

**The score.** :math:`s_\theta(x, t) = -\mathrm{net}(c_{\text{in}} x,\, 1000\, t / T) / s_t` with
:math:`c_{\text{in}} = 1/\sqrt{m_t^2 \sigma_{\text{data}}^2 + s_t^2}`: the network predicts
:math:`\epsilon` (the DDPM parameterization, which keeps its output of unit scale at every t) from an
input of unit scale (Karras et al. 2022, arXiv:2206.00364). For the VE SDE :math:`\log \sigma(t)` is
affine in t, so conditioning on :math:`1000\, t/T` is conditioning on :math:`\log \sigma(t)`.

**Sampling.** Running :meth:`ScoreSDE.model` with nothing observed runs Euler-Maruyama of the reverse
SDE (Song et al. 2021, eq. 6) as a Pyro Markov chain: ``"x_T"`` from the prior, one site per step on a
uniform grid from T to the SDE's ``eps``, and ``"x"`` the last step's mean.
``probgen.inference.score_sde_sampling`` registers faster samplers on plain tensors (``em``, ``pc``,
``ode``) and the probability-flow ODE likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.distributions import register_kl

from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, register
from probgen.models.ncsn import max_pairwise_distance
from probgen.nets import NetSpec
from probgen.schedules import append_dims
from probgen.sdes import DiffusionSDE, SDESpec

__all__ = [
    "SDES",
    "WEIGHTINGS",
    "ScoreSDE",
    "TimeProposal",
    "build_sde",
    "dsm_sites",
    "marginal",
    "weight_over_var",
]

SDES = ("vp", "subvp", "ve")
WEIGHTINGS = ("sigma2", "likelihood")


def build_sde(kind: str, **params: Any) -> DiffusionSDE:
    """The forward SDE ``kind`` in :data:`SDES` with ``params`` (``eps`` None: the SDE's own default)."""
    return SDESpec.from_options(kind, params)[0].build()


def weight_over_var(sde: DiffusionSDE, weighting: str, t: Tensor) -> Tensor:
    r""":math:`\lambda(t) / s_t^2` at ``t`` ``(B,)``: 1 (``"sigma2"``), :math:`g^2/s^2` (``"likelihood"``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Expected weighting in {WEIGHTINGS}, but found {weighting!r}.")
    if weighting == "sigma2":
        return torch.ones_like(t)
    _, std = sde.marginal_params(t)
    return sde.diffusion(t).pow(2) / std.pow(2)


class TimeProposal(TorchDistribution):
    r"""A piecewise-uniform density on ``edges[0] .. edges[-1]``: cell k has mass ``probs[k]``.

    Built by :meth:`proportional_to` with masses from the trapezoid rule on a geometric grid, it is
    the importance-sampling law of the time (Song, Durkan et al. 2021, arXiv:2101.09258, Section 5).
    It has no parameters, so, like :class:`~probgen.distributions.UniformSteps`, ``rsample = sample``
    (the pathwise gradient is exactly zero) and the KL between two with the same cells is in closed
    form (0 between equal ones).

    Args:
        edges: increasing cell edges ``(K + 1,)``.
        probs: cell masses ``(K,)``, positive, summing to 1.
        batch_shape: batch shape of the draws.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, edges: Tensor, probs: Tensor, batch_shape=torch.Size(), validate_args=None) -> None:
        if edges.dim() != 1 or probs.shape != (edges.numel() - 1,) or probs.numel() < 1:
            raise ValueError(
                f"Expected edges (K + 1,) and probs (K,), but found {tuple(edges.shape)} and "
                f"{tuple(probs.shape)}."
            )
        if not bool((edges[1:] > edges[:-1]).all()) or not bool((probs > 0).all()):
            raise ValueError("Expected increasing edges and positive cell masses, but found otherwise.")
        self.edges, self.probs = edges, probs / probs.sum()
        self._cdf = torch.cat([probs.new_zeros(1), self.probs.cumsum(0)])
        self._log_density = (self.probs / (edges[1:] - edges[:-1])).log()
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    @classmethod
    def proportional_to(
        cls, fn: Callable[[Tensor], Tensor], low: float, high: float, *, cells: int = 2000, dtype=None
    ) -> TimeProposal:
        r"""Cells geometric in t from ``low`` to ``high``, masses by the trapezoid rule on ``fn``."""
        if not 0 < low < high:
            raise ValueError(f"Expected 0 < low < high, but found low={low!r}, high={high!r}.")
        edges = torch.logspace(math.log10(low), math.log10(high), cells + 1, dtype=torch.float64)
        values = fn(edges)
        masses = 0.5 * (values[1:] + values[:-1]) * (edges[1:] - edges[:-1])
        dtype = dtype or torch.get_default_dtype()
        return cls(edges.to(dtype), masses.to(dtype))

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(float(self.edges[0]), float(self.edges[-1]))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TimeProposal, _instance)
        new.edges, new.probs, new._cdf, new._log_density = (
            self.edges,
            self.probs,
            self._cdf,
            self._log_density,
        )
        super(TimeProposal, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        u = torch.rand(self._extended_shape(sample_shape), dtype=self.probs.dtype, device=self.probs.device)
        k = torch.searchsorted(self._cdf[1:-1], u, right=True)
        frac = ((u - self._cdf[k]) / self.probs[k]).clamp(0.0, 1.0)
        return self.edges[k] + frac * (self.edges[k + 1] - self.edges[k])

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k = torch.searchsorted(self.edges[1:-1], value.to(self.edges.dtype), right=True)
        return self._log_density[k].expand(torch.broadcast_shapes(value.shape, self.batch_shape))


@register_kl(TimeProposal, TimeProposal)
def _kl_time_proposal(p: TimeProposal, q: TimeProposal) -> Tensor:
    if p.edges.shape != q.edges.shape or not torch.equal(p.edges, q.edges):
        raise NotImplementedError
    kl = (p.probs * (p.probs / q.probs).log()).sum()
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


def marginal(sde: DiffusionSDE, x0: Tensor, t: Tensor) -> dist.Distribution:
    r"""The transition :math:`q(x_t \mid x_0) = \mathcal N(m_t x_0, s_t^2 I)` as a Pyro distribution.

    ``sde.marginal`` is a ``torch.distributions`` object, which a Pyro site cannot take.

    Args:
        sde: the forward SDE.
        x0: ``(B, D)``.
        t: times ``(B,)``.
    """
    mean, std = (append_dims(v, x0.ndim) for v in sde.marginal_params(t))
    return dist.Normal(mean * x0, std.expand_as(x0)).to_event(1)


def dsm_sites(
    sde: DiffusionSDE,
    score_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    t: Tensor,
    *,
    scale: Tensor | float | None = None,
) -> Tensor:
    r"""The model's DSM sites: ``"x_t"`` :math:`\sim q(x_t \mid x_0)`, the observed ``"eps"``.

    Call inside ``pyro.plate("data", B)``; the guide samples ``"x_t"`` from :func:`marginal`. Only
    ``"eps"`` is scaled, so ``"x_t"`` has the same law *and* scale in model and guide (Pyro's
    ``Trace_ELBO`` then cancels it exactly, as the analytic KL does). The observed site is
    :math:`\epsilon = (x_t - m_t x_0)/s_t \sim \mathcal N(-s_t\, s(x_t, t), I)`, log-probability
    :math:`-s_t^2 \tfrac12 \lVert s + \epsilon/s_t \rVert^2 - \tfrac D2 \log 2\pi` (module docstring).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x0: clean data ``(B, D)``.
        t: times ``(B,)``.
        scale: the weight of the observed site, ``(B,)`` or a scalar (None: 1).

    Returns:
        ``x_t``, ``(B, D)``.
    """
    x_t = pyro.sample("x_t", marginal(sde, x0, t))
    mean, std = (append_dims(v, x0.ndim) for v in sde.marginal_params(t))
    eps = (x_t - mean * x0) / std
    with poutine.scale(scale=1.0 if scale is None else scale):
        pyro.sample("eps", dist.Normal(-std * score_fn(x_t, t), 1.0).to_event(1), obs=eps)
    return x_t


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected {what} in {choices}, but found {value!r}.")


@register("score-sde")
class ScoreSDE(Method):
    r"""Score-based diffusion with a VP, sub-VP or VE SDE, trained by weighted continuous-time DSM.

    Args:
        data_dim: flat size D of one observation.
        event_shape: shape of one observation; ``(C, H, W)`` with ``H == W`` selects a
            :class:`~probgen.nets.UNet`, anything else an :class:`~probgen.nets.MLP` (default ``(D,)``).
        sde: ``"vp"``, ``"subvp"`` or ``"ve"``.
        beta_min, beta_max: the linear :math:`\beta(t)` of VP and sub-VP.
        sigma_min, sigma_max: the geometric :math:`\sigma(t)` of VE.
        T: the end time.
        eps: the SDE's smallest time for sampling and likelihoods (None: 1e-3 for VP and sub-VP,
            1e-5 for VE, as in the paper).
        t_min: the smallest training time :math:`t_{\min}` (1e-5 as in the authors' code).
        weighting: ``"sigma2"`` (:math:`\lambda = s_t^2`) or ``"likelihood"`` (:math:`\lambda = g^2`).
        importance_sampling: draw ``"t"`` from :class:`TimeProposal` :math:`\propto \lambda/s^2` (None:
            True for the likelihood weighting, False otherwise; for ``"sigma2"`` it is uniform anyway).
        sigma_data: the data scale in the input scaling :math:`c_{\text{in}}`.
        sample_steps: steps of the Pyro sampling chain (:meth:`chain_model`).
        hidden, embed_dim: MLP widths and time-embedding size (also the UNet's).
        base_channels, channel_mults, num_res_blocks, dropout, attention: UNet options.
        net: a custom network ``net(x, c_noise) -> (B, *event_shape)``, not saved in :attr:`config`.

    Example:
        >>> m = ScoreSDE(2, sde="subvp")
        >>> loss = m.elbo().differentiable_loss(m.model, m.guide, x)  # x: (B, 2)
        >>> s = m.score(x, torch.full((len(x),), 0.5))                # (B, 2)
    """

    samplers = {
        "ancestral": "ancestral",
        "em": "reverse-sde",
        "pc": "predictor-corrector",
        "ode": "probability-flow-ode",
    }
    likelihoods = {"ode": "probability-flow-ode"}

    finite_data = True

    def __init__(
        self,
        data_dim: int,
        *,
        event_shape: Sequence[int] | None = None,
        sde: str | DiffusionSDE = "vp",
        t_min: float = 1e-5,
        weighting: str = "sigma2",
        importance_sampling: bool | None = None,
        sigma_data: float = 1.0,
        sample_steps: int = 1000,
        net: nn.Module | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.sde_spec, net_options = SDESpec.from_options(sde, options)
        self.net_spec = NetSpec.from_options(net_options)
        T = self.sde_spec.T
        if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"Expected data_dim >= 1 (an int), but found {data_dim!r}.")
        _check_choice("weighting", weighting, WEIGHTINGS)
        if isinstance(sample_steps, bool) or not isinstance(sample_steps, int) or sample_steps < 1:
            raise ValueError(f"Expected sample_steps >= 1 (an int), but found {sample_steps!r}.")
        if not sigma_data > 0:
            raise ValueError(f"Expected sigma_data > 0, but found {sigma_data!r}.")
        if not 0 < t_min < T:
            raise ValueError(f"Expected 0 < t_min < T = {T}, but found {t_min!r}.")
        if importance_sampling is None:
            importance_sampling = weighting == "likelihood"
        event_shape = (data_dim,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != data_dim:
            raise ValueError(f"Expected an event_shape with {data_dim} elements, but found {event_shape}.")
        self._sde = self.sde_spec.build()
        self.config = dict(
            data_dim=data_dim,
            event_shape=list(event_shape),
            **self.sde_spec.config(),
            t_min=float(t_min),
            weighting=weighting,
            importance_sampling=bool(importance_sampling),
            sigma_data=float(sigma_data),
            sample_steps=sample_steps,
            **self.net_spec.config(),
        )
        self.data_dim, self.event_shape, self.weighting = data_dim, event_shape, weighting
        self.importance_sampling, self.sample_steps = bool(importance_sampling), sample_steps
        self.t_min, self.sigma_data = float(t_min), float(sigma_data)
        self.net = net if net is not None else self.net_spec.build(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype
        self._proposals: dict[tuple[torch.device, torch.dtype], TimeProposal] = {}

    # ------------------------------------------------------------------ protocol

    @property
    def sde_object(self) -> DiffusionSDE:
        """The forward SDE (a :class:`probgen.sdes.DiffusionSDE`)."""
        return self._sde

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Dequantized values rescaled to [-1, 1] for the digits (``"centered"``), raw values otherwise.

        ``probgen evaluate`` turns the density on centered data into a bound on the 17-level data,
        counting the rescaling's Jacobian (``probgen.metrics.discrete_nll_from_density``, scale 2).
        """
        return "centered" if dataset_name == "digits" else "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> ScoreSDE:
        r"""A model for ``dataset``: ``sigma_data`` its std; for VE, :math:`\sigma_{\max}` its diameter.

        The VE choice is Technique 1 of Song & Ermon 2020 (arXiv:2006.09011), which Song et al. 2021
        follow; ``kwargs`` override everything.
        """
        x = dataset.x
        opts: dict[str, Any] = {"data_dim": x.shape[-1], "event_shape": list(dataset.event_shape)}
        opts.update(kwargs)
        opts.setdefault("sigma_data", float(x.std()))
        if opts.get("sde", "vp") == "ve":
            opts.setdefault("sigma_max", max_pairwise_distance(x))
        return cls(**opts)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO()

    # ------------------------------------------------------------------ the score

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        r"""The score :math:`s_\theta(x, t) = -\mathrm{net}(c_{\text{in}} x, 1000 t/T) / s_t`.

        Args:
            x: states ``(B, D)``.
            t: times ``(B,)`` (or a scalar) in :math:`(0, T]`.

        Returns:
            ``(B, D)``.
        """
        t = self._states_and_levels(x, t, "t")
        mean, std = self._sde.marginal_params(t)
        c_in = (mean.pow(2) * self.sigma_data**2 + std.pow(2)).rsqrt()
        h = (append_dims(c_in, 2) * x).reshape(x.shape[0], *self.event_shape)
        eps_hat = self.net(h, 1000.0 * t / self._sde.T).reshape(x.shape)
        return -eps_hat / append_dims(std, 2)

    # ------------------------------------------------------------------ programs

    def time_law(self, n: int, like: Tensor) -> dist.Distribution:
        """The law of ``"t"``: uniform on ``[t_min, T]`` or the :class:`TimeProposal`, batch ``(n,)``."""
        if not self.importance_sampling:
            lo = like.new_tensor(self.t_min)
            return dist.Uniform(lo, like.new_tensor(self._sde.T)).expand([n])
        key = (like.device, like.dtype)
        if key not in self._proposals:
            proposal = TimeProposal.proportional_to(
                lambda t: weight_over_var(self._sde, self.weighting, t), self.t_min, self._sde.T
            )
            self._proposals[key] = TimeProposal(
                proposal.edges.to(like.device, like.dtype), proposal.probs.to(like.device, like.dtype)
            )
        return self._proposals[key].expand([n])

    def time_weight(self, t: Tensor, law: dist.Distribution) -> Tensor:
        r"""The per-example scale :math:`w(t) = \lambda(t) / (s_t^2 q(t))` of the observed site, ``(B,)``."""
        return weight_over_var(self._sde, self.weighting, t) * (-law.log_prob(t)).exp()

    def _data(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"Expected data of shape (B, {self.data_dim}), but found {tuple(x.shape)}.")
        return x.to(self._anchor.dtype)

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> Tensor | None:
        r"""Sites ``"t"``, ``"x_t"`` and the scaled observed ``"eps"``; with ``x=None``, :meth:`chain_model`.

        Args:
            x: observations ``(B, D)``, or None to sample.
            batch_size: number of samples when ``x`` is None.
        """
        if x is None:
            return self.chain_model(batch_size)
        x0 = self._data(x)
        n = x0.shape[0]
        with pyro.plate("data", n):
            law = self.time_law(n, x0)
            t = pyro.sample("t", law)
            dsm_sites(self._sde, self.score, x0, t, scale=self.time_weight(t, law))
        return None

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """``"t"`` and ``"x_t"`` with the model's laws (their KL is 0). ``x``: ``(B, D)``."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x0 = self._data(x)
        n = x0.shape[0]
        with pyro.plate("data", n):
            t = pyro.sample("t", self.time_law(n, x0))
            pyro.sample("x_t", marginal(self._sde, x0, t))

    def chain_model(self, batch_size: int | None = None) -> Tensor:
        r"""The reverse SDE by Euler-Maruyama as a Pyro chain: ``"x_T"``, ``"x_1"`` .. ``"x_{N-1}"``, ``"x"``.

        On the grid :math:`t_i = T - i \Delta t`, :math:`\Delta t = (T - \epsilon)/N`, step i moves
        :math:`x \sim \mathcal N(x - [f(x, t_i) - g(t_i)^2 s_\theta(x, t_i)] \Delta t, g(t_i)^2 \Delta t I)`
        (Song et al. 2021, eq. 6; unlike the reverse-diffusion predictor, defined for any N); the last
        step returns its mean as the ``Delta`` site ``"x"``. Returns ``(B, D)``.
        """
        n = 1 if batch_size is None else int(batch_size)
        sde, steps = self._sde, self.sample_steps
        ts = torch.linspace(sde.T, sde.eps, steps + 1, dtype=torch.float64).tolist()
        with pyro.plate("data", n):
            zeros = self._anchor.new_zeros(n, self.data_dim)
            x = pyro.sample("x_T", dist.Normal(zeros, sde.prior_std).to_event(1))
            for i in range(steps):
                t, dt = self._anchor.new_full((n,), ts[i]), ts[i] - ts[i + 1]
                drift, g = sde.sde(x, t)
                g = append_dims(g, 2)
                loc = x - (drift - g.pow(2) * self.score(x, t)) * dt
                if i == steps - 1:
                    return pyro.sample("x", dist.Delta(loc, event_dim=1))
                x = pyro.sample(
                    f"x_{i + 1}", dist.Normal(loc, (g * math.sqrt(dt)).expand_as(loc)).to_event(1)
                )
        raise AssertionError("unreachable")

    @torch.no_grad()
    def sample(self, num: int) -> Tensor:
        """``num`` samples ``(num, D)`` by the reverse-SDE chain (:meth:`chain_model`)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        with pyro.validation_enabled(False):
            return self.chain_model(num)
