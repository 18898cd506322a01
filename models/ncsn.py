r"""Noise-conditional score network (NCSN): denoising score matching at many noise levels.

Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution"
(arXiv:1907.05600). A network :math:`s_\theta(x, \sigma)` learns the scores of the perturbed
densities :math:`q_{\sigma_i} = p * \mathcal N(0, \sigma_i^2 I)` at geometric noise levels
:math:`\sigma_1 > \dots > \sigma_L` by minimizing (their eq. 5-6)

.. math::
    \frac1L \sum_{i=1}^L \lambda(\sigma_i)\, \tfrac12\,
    \mathbb E_{x, \epsilon} \lVert s_\theta(x + \sigma_i \epsilon, \sigma_i) + \epsilon / \sigma_i \rVert^2,
    \qquad \lambda(\sigma) = \sigma^2,

and samples by annealed Langevin dynamics (their Algorithm 1).

**The program.** :meth:`NCSN.model` draws, per example, the level as a site ``"level"``
:math:`\sim \mathcal U\{1..L\}` (:class:`~probgen.distributions.UniformSteps`), the perturbed point
``"x_tilde"`` :math:`\sim \mathcal N(x, \sigma^2 I)` with :math:`\sigma = \sigma_{\text{level}}`, and
observes :math:`\epsilon = (\tilde x - x)/\sigma` under :math:`\mathcal N(-\sigma s_\theta(\tilde x,
\sigma), I)` (:func:`~probgen.models.score_matching.denoising_sites`). Its log-likelihood is

.. math::
    -\tfrac12 \lVert \epsilon + \sigma s_\theta \rVert^2 - \tfrac D2 \log 2\pi
    = -\lambda(\sigma)\, \tfrac12 \lVert s_\theta(\tilde x, \sigma) + \epsilon / \sigma \rVert^2
    - \tfrac D2 \log 2\pi,

the :math:`\sigma^2`-weighted DSM loss (Vincent 2011) up to a constant. :meth:`NCSN.guide` draws
``"level"`` and ``"x_tilde"`` with the *same* laws, so with :class:`~probgen.elbo.AnalyticKL_ELBO`
their KL terms are exactly 0 and the negative ELBO of a batch is
:math:`\sum_b \lambda(\sigma_b) \tfrac12 \lVert s_\theta + \epsilon_b/\sigma_b \rVert^2 + B \tfrac D2
\log 2\pi`: a one-sample estimate of :math:`B` times the objective above, plus the constant.

**Improved techniques** (Song & Ermon 2020, arXiv:2006.09011), used by :meth:`NCSN.from_data`:
:math:`\sigma_1` is the largest pairwise distance of the data (Technique 1,
:func:`max_pairwise_distance`); the ratio :math:`\gamma = \sigma_{i-1}/\sigma_i` solves
:math:`\Phi(\sqrt{2D}(\gamma - 1) + 3\gamma) - \Phi(\sqrt{2D}(\gamma - 1) - 3\gamma) = 0.5` (Technique 2,
:func:`level_ratio`; in very low D every ratio satisfies it and ``max_ratio`` caps it); the score
is :math:`s_\theta(x, \sigma) = \mathrm{net}(x, \sigma)/\sigma` (Technique 3), here with the input
scaled by :math:`1/\sqrt{\sigma_{\text{data}}^2 + \sigma^2}` (Karras et al. 2022, arXiv:2206.00364)
and the network conditioned on :math:`\log \sigma` mapped to :math:`[0, 1000]`; the Langevin
step :math:`\epsilon` makes the variance ratio of their Proposition 3 closest to 1 for the
chosen steps per level (Technique 4, :func:`langevin_step_size`). Use an EMA of the weights
(Technique 5: ``fit(..., ema_decay=0.999)``).

**Sampling.** Running :meth:`NCSN.model` with nothing observed runs annealed Langevin dynamics
as a Pyro Markov chain (:func:`~probgen.models.score_matching.langevin_chain`): uniform starts
over the data range, then at level :math:`i` ``steps_per_level`` steps
:math:`x \leftarrow x + \tfrac{\alpha_i}{2} s_\theta(x, \sigma_i) + \sqrt{\alpha_i} z` with
:math:`\alpha_i = \epsilon \sigma_i^2/\sigma_L^2`, and a final denoising step. The same algorithm
on plain tensors (faster, with a generator) is ``probgen.inference.langevin.annealed_langevin``
(the CLI's ``annealed-langevin`` sampler), which reads :attr:`NCSN.sampling_defaults`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.distributions import UniformSteps
from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, register
from probgen.models.score_matching import denoising_sites, langevin_chain, perturbation
from probgen.nets import NetSpec
from probgen.schedules import append_dims

__all__ = ["NCSN", "geometric_sigmas", "langevin_step_size", "level_ratio", "max_pairwise_distance"]


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> Tensor:
    r"""Geometric levels :math:`\sigma_{\max} = \sigma_1 > \dots > \sigma_L = \sigma_{\min}`, ``(L,)``."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"Expected num_levels >= 1 (an int), but found {num_levels!r}.")
    if not 0 < sigma_min <= sigma_max or (num_levels > 1 and sigma_min == sigma_max):
        raise ValueError(
            f"Expected 0 < sigma_min < sigma_max (equal only for one level), but found "
            f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r} with {num_levels} levels."
        )
    if num_levels == 1:
        return torch.tensor([float(sigma_max)])
    logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    return logs.exp().to(torch.get_default_dtype())


def max_pairwise_distance(x: Tensor, *, max_points: int = 4000) -> float:
    r"""The largest Euclidean distance between two rows of ``x`` ``(N, D)`` (Technique 1's :math:`\sigma_1`).

    Computed on an evenly strided subset of at most ``max_points`` rows (deterministic).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"Expected at least two points of shape (N, D), but found {tuple(x.shape)}.")
    stride = max(1, math.ceil(x.shape[0] / max_points))
    sub = x[::stride].to(torch.float64)
    return float(torch.cdist(sub, sub).max())


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def level_ratio(data_dim: int, *, target: float = 0.5, max_ratio: float = 2.0) -> float:
    r"""Technique 2's level ratio :math:`\gamma = \sigma_{i-1} / \sigma_i` for data of dimension D.

    It solves :math:`\Phi(\sqrt{2D}(\gamma-1)+3\gamma) - \Phi(\sqrt{2D}(\gamma-1)-3\gamma) = 0.5`.

    The left side is the probability that a point of :math:`\mathcal N(0, \sigma_i^2 I)` lies within
    three standard deviations of the radius typical of level :math:`i - 1`. In low D it stays
    above the target for every :math:`\gamma`; the result is then ``max_ratio``.
    """

    def coverage(g: float) -> float:
        a = math.sqrt(2 * data_dim) * (g - 1)
        return _normal_cdf(a + 3 * g) - _normal_cdf(a - 3 * g)

    if coverage(max_ratio) >= target:
        return float(max_ratio)
    lo, hi = 1.0, float(max_ratio)  # coverage(1) = 0.997 > target >= coverage(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if coverage(mid) >= target else (lo, mid)
    return lo


def langevin_step_size(ratio: float, sigma_min: float, steps_per_level: int) -> float:
    r"""Technique 4's step :math:`\epsilon` for ``steps_per_level`` steps T and level ratio :math:`\gamma`.

    For the step :math:`x \leftarrow x + \tfrac{\alpha}{2} s + \sqrt\alpha z` with
    :math:`\alpha_i = \epsilon \sigma_i^2/\sigma_L^2`, started at variance :math:`\gamma^2\sigma_i^2`
    on the score of :math:`\mathcal N(0, \sigma_i^2 I)`, the variance after T steps over
    :math:`\sigma_i^2` is :math:`r^{2T}(\gamma^2 - c) + c` with :math:`r = 1 - \epsilon/(2\sigma_L^2)`
    and :math:`c = 1/(1 - \epsilon/(4\sigma_L^2))` (Song & Ermon 2020, Proposition 3, in this step
    convention). It is above 1 for every :math:`\epsilon`; the returned :math:`\epsilon` minimizes it
    (a log-spaced search).
    """
    if not ratio >= 1 or not sigma_min > 0 or steps_per_level < 1:
        raise ValueError(
            f"Expected ratio >= 1, sigma_min > 0 and steps_per_level >= 1, but found {ratio!r}, "
            f"{sigma_min!r} and {steps_per_level!r}."
        )
    u = torch.logspace(-8, math.log10(1.99), 4000, dtype=torch.float64)  # u = eps / sigma_L^2
    r, c = 1 - u / 2, 1 / (1 - u / 4)
    variance = r.pow(2 * steps_per_level) * (ratio**2 - c) + c
    return float(u[variance.argmin()] * sigma_min**2)


@register("ncsn")
class NCSN(Method):
    r"""NCSN: the :math:`\sigma^2`-weighted DSM objective as an observed Gaussian site, at L noise levels.

    Args:
        data_dim: flat size D of one observation.
        event_shape: shape of one observation; ``(C, H, W)`` with ``H == W`` selects a
            :class:`~probgen.nets.UNet`, anything else an :class:`~probgen.nets.MLP` (default ``(D,)``).
        sigma_max, sigma_min, num_levels: geometric levels :math:`\sigma_1 > \dots > \sigma_L`.
        sigma_data: data scale in the input scaling :math:`1/\sqrt{\sigma_{\text{data}}^2 + \sigma^2}`.
        init_low, init_high: Langevin chains start uniform in ``[init_low, init_high]^D``.
        step_size: Langevin :math:`\epsilon` (the step at :math:`\sigma_L`).
        steps_per_level: Langevin steps per level.
        denoise: end sampling with :math:`x + \sigma_L^2 s_\theta(x, \sigma_L)`.
        hidden, embed_dim: MLP widths and noise-embedding size (also the UNet's).
        base_channels, channel_mults, num_res_blocks, dropout, attention: UNet options.
        net: a custom network ``net(x, c_noise) -> (B, *event_shape)``, not saved in :attr:`config`.

    Example:
        >>> ncsn = NCSN(2, sigma_max=8.0, sigma_min=0.01, num_levels=11)
        >>> loss = ncsn.elbo().differentiable_loss(ncsn.model, ncsn.guide, x)  # x: (B, 2)
        >>> s = ncsn.score(x, ncsn.sigmas[-1].expand(len(x)))                  # (B, 2)
    """

    samplers = {"ancestral": "ancestral", "annealed-langevin": "annealed-langevin"}
    likelihoods = {}

    finite_data = True

    def __init__(
        self,
        data_dim: int,
        *,
        event_shape: Sequence[int] | None = None,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        num_levels: int = 10,
        sigma_data: float = 1.0,
        init_low: float = 0.0,
        init_high: float = 1.0,
        step_size: float = 2e-5,
        steps_per_level: int = 100,
        denoise: bool = True,
        net: nn.Module | None = None,
        **net_options: Any,
    ) -> None:
        super().__init__()
        self.net_spec = NetSpec.from_options(net_options)
        if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"Expected data_dim >= 1 (an int), but found {data_dim!r}.")
        if isinstance(steps_per_level, bool) or not isinstance(steps_per_level, int) or steps_per_level < 1:
            raise ValueError(f"Expected steps_per_level >= 1 (an int), but found {steps_per_level!r}.")
        for what, value in (("sigma_data", sigma_data), ("step_size", step_size)):
            if not value > 0:
                raise ValueError(f"Expected {what} > 0, but found {value!r}.")
        if not init_high > init_low:
            raise ValueError(f"Expected init_high > init_low, but found [{init_low}, {init_high}].")
        sigmas = geometric_sigmas(sigma_max, sigma_min, num_levels)
        event_shape = (data_dim,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != data_dim:
            raise ValueError(f"Expected an event_shape with {data_dim} elements, but found {event_shape}.")
        self.config = dict(
            data_dim=data_dim,
            event_shape=list(event_shape),
            sigma_max=float(sigma_max),
            sigma_min=float(sigma_min),
            num_levels=num_levels,
            sigma_data=float(sigma_data),
            init_low=float(init_low),
            init_high=float(init_high),
            step_size=float(step_size),
            steps_per_level=steps_per_level,
            denoise=bool(denoise),
            **self.net_spec.config(),
        )
        self.data_dim, self.event_shape, self.num_levels = data_dim, event_shape, num_levels
        self.steps_per_level, self.denoise = steps_per_level, bool(denoise)
        self._log_sigma_max = math.log(sigma_max)
        self._log_span = math.log(sigma_max / sigma_min) if num_levels > 1 else 1.0
        self.net = net if net is not None else self.net_spec.build(event_shape)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)), persistent=False)
        init_range = torch.tensor([float(init_low), float(init_high)])
        self.register_buffer("init_range", init_range, persistent=False)

    # ------------------------------------------------------------------ protocol

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Annealed Langevin keyword arguments: ``step_size``, ``steps_per_level``, ``denoise``."""
        return dict(
            step_size=self.config["step_size"], steps_per_level=self.steps_per_level, denoise=self.denoise
        )

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Uniformly dequantized values in [0, 1] for the digits (NCSN's choice), raw values otherwise."""
        return "dequantized" if dataset_name == "digits" else "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> NCSN:
        r"""An NCSN for ``dataset`` with the improved techniques' settings; ``kwargs`` override them.

        :math:`\sigma_1` from Technique 1, :math:`\sigma_L = 0.01`, L from Technique 2, about 1000
        Langevin steps in all (``steps_per_level = round(1000 / L)``, at least 5), the step from
        Technique 4 for the resulting ratio; chains start uniform over the data range.
        """
        x = dataset.x
        opts: dict[str, Any] = {"data_dim": x.shape[-1], "event_shape": list(dataset.event_shape)}
        opts.update(kwargs)
        opts.setdefault("sigma_max", max_pairwise_distance(x))
        opts.setdefault("sigma_min", 0.01)
        ratio_of_levels = opts["sigma_max"] / opts["sigma_min"]
        if "num_levels" not in opts:
            gamma = level_ratio(x.shape[-1])
            opts["num_levels"] = max(2, math.ceil(1 + math.log(ratio_of_levels) / math.log(gamma)))
        opts.setdefault("steps_per_level", max(5, round(1000 / opts["num_levels"])))
        if "step_size" not in opts:
            gamma = ratio_of_levels ** (1 / max(opts["num_levels"] - 1, 1))
            opts["step_size"] = langevin_step_size(gamma, opts["sigma_min"], opts["steps_per_level"])
        opts.setdefault("sigma_data", float(x.std()))
        opts.setdefault("init_low", float(x.min()))
        opts.setdefault("init_high", float(x.max()))
        return cls(**opts)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO()

    # ------------------------------------------------------------------ the score

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        r"""The score :math:`s_\theta(x, \sigma) = \mathrm{net}(c_{\text{in}} x, c(\sigma)) / \sigma`.

        :math:`c_{\text{in}} = 1/\sqrt{\sigma_{\text{data}}^2 + \sigma^2}`, and :math:`c(\sigma)` maps
        :math:`\log\sigma` linearly from :math:`\sigma_1 \mapsto 0` to :math:`\sigma_L \mapsto 1000`.

        Args:
            x: points ``(B, D)``.
            sigma: noise levels ``(B,)`` (or a scalar), any positive values.

        Returns:
            ``(B, D)``.
        """
        sigma = self._states_and_levels(x, sigma, "sigma")
        c_in = (self.sigma_data.to(x.dtype) ** 2 + sigma**2).rsqrt()
        c_noise = 1000.0 * (self._log_sigma_max - sigma.log()) / self._log_span
        h = (append_dims(c_in, 2) * x).reshape(x.shape[0], *self.event_shape)
        return self.net(h, c_noise).reshape(x.shape) / append_dims(sigma, 2)

    # ------------------------------------------------------------------ programs

    def _levels(self, x: Tensor) -> Tensor:
        """Site ``"level"`` (1..L, level 1 the largest noise) and its noise level, ``(B,)``."""
        n = x.shape[0]
        level = pyro.sample("level", UniformSteps(self.num_levels, device=x.device).expand([n]))
        return self.sigmas.to(x.dtype)[level - 1]

    def _data(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"Expected data of shape (B, {self.data_dim}), but found {tuple(x.shape)}.")
        return x.to(self.sigmas.dtype)

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> Tensor | None:
        r"""Sites ``"level"``, ``"x_tilde"`` and the observed ``"eps"``; with ``x=None``, annealed Langevin.

        Args:
            x: observations ``(B, D)``, or None to sample.
            batch_size: number of chains when ``x`` is None.
        """
        if x is None:
            return self.chain_model(batch_size)
        x = self._data(x)
        with pyro.plate("data", x.shape[0]):
            denoising_sites(self.score, x, self._levels(x))
        return None

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """``"level"`` and ``"x_tilde"`` with the model's laws (their KL is 0). ``x``: ``(B, D)``."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x = self._data(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x_tilde", perturbation(x, self._levels(x)))

    def step_sizes(self) -> Tensor:
        r"""Langevin steps :math:`\alpha_i = \epsilon \sigma_i^2 / \sigma_L^2`, ``(L,)``."""
        return self.config["step_size"] * (self.sigmas / self.sigmas[-1]) ** 2

    def init_sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """Langevin start points, uniform in ``[init_low, init_high]^D``: ``(num, D)``."""
        lo, hi = self.init_range
        u = torch.rand(num, self.data_dim, generator=generator, device=lo.device, dtype=lo.dtype)
        return lo + (hi - lo) * u

    def chain_model(self, batch_size: int | None = None) -> Tensor:
        """Annealed Langevin dynamics, sites ``"x_init"``, ``"x_{i}_{m}"``, ``"x"``; returns ``(B, D)``."""
        n = 1 if batch_size is None else int(batch_size)
        lo, hi = self.init_range
        with pyro.plate("data", n):
            x = pyro.sample("x_init", dist.Uniform(lo, hi).expand([n, self.data_dim]).to_event(1))
            return langevin_chain(
                self.score, x, self.sigmas, self.step_sizes(), self.steps_per_level, denoise=self.denoise
            )

    @torch.no_grad()
    def sample(self, num: int) -> Tensor:
        """``num`` samples ``(num, D)`` by annealed Langevin dynamics (:meth:`chain_model`)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        with pyro.validation_enabled(False):
            return self.chain_model(num)
