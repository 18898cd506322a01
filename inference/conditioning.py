r"""Conditioning a trained score model: inpainting by SMC, and the model as a Pyro distribution.

**Inpainting** (:func:`inpaint`). Given the known coordinates :math:`k_0 = y` of :math:`x = (u, k)`,
sample the unknown :math:`u` from :math:`p(u \mid k_0 = y)`. Song et al. 2021 (arXiv:2011.13456,
App. I.2) run the reverse SDE on all coordinates and, after every step, *replace* the known ones by a
forward-noised copy of :math:`y` at the current time. That is an approximation: it follows the
score of :math:`p_t(u_t \mid k_t)` where the exact sampler needs :math:`p_t(u_t \mid k_0 = y)`. For a
correlated Gaussian the error does not vanish with the step size: for unit variances, correlation
0.8 and :math:`y = 1.5`, replacement gives :math:`u` with mean 0.75 and variance 0.49 against the
exact 1.2 and 0.36, for VP, sub-VP and VE alike (``tests/inference/test_score_sde_sampling.py``).

With ``particles > 1`` the same moves become the proposal of a sequential Monte Carlo sampler
(SMCDiff: Trippe et al. 2022, arXiv:2206.04119): the known coordinates follow *one* forward-noised
path :math:`k_{t_0}, \dots, k_{t_N}` of :math:`y` (drawn backwards in time from the Gaussian bridges
:math:`q(k_s \mid k_t, k_0 = y)`), each particle's unknown coordinates move by an Euler-Maruyama step of the
reverse SDE, and a particle is weighted by the density its reverse step gives to the next known value,
:math:`w \mathrel{*}= \mathcal N(k_{t_{i+1}}; \mu_k(x_{t_i}), G_i^2 I)`, with multinomial resampling
whenever the effective sample size falls below ``ess_threshold`` times the particle count. As the
number of particles grows this targets :math:`p_\theta(u_0 \mid k_{0:N})`, which for a model whose
reverse process matches the forward one (an exact score, small steps) has the exact conditional
:math:`p(u \mid y)` as its marginal. One particle, drawn by the final weights, is returned per row.
``particles=1`` is the replacement method.

**The model as a distribution** (:class:`ScoreSDEDistribution`): ``sample`` runs a reverse-time
sampler (``"em"``, ``"pc"`` or ``"ode"``) and ``log_prob`` the probability-flow ODE likelihood, so a
trained score model can be a site ``pyro.sample("x", ScoreSDEDistribution(method), obs=x)`` inside
another Pyro program; its log-probability then sits in the trace like any other.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from probgen.inference.score_sde_sampling import SAMPLERS, ode_likelihood, sample_score_sde
from probgen.inference.sde import check_sde_inputs
from probgen.schedules import append_dims
from probgen.sdes import DiffusionSDE, ScoreFn

__all__ = ["ScoreSDEDistribution", "inpaint"]


def _bridge(sde: DiffusionSDE, y: Tensor, k_t: Tensor, t: float, s: float, generator) -> Tensor:
    r"""A draw of :math:`q(x_s \mid x_t, x_0 = y)` for :math:`s < t` (the forward path run backwards)."""
    (m_s, m_t), (sd_s, sd_t) = sde.marginal_params(torch.tensor([s, t], dtype=torch.float64))
    r = float(m_t / m_s)
    v = float(sd_t**2 - r**2 * sd_s**2)  # variance of q(x_t | x_s)
    var = 1.0 / (1.0 / float(sd_s**2) + r**2 / v)
    mean = var * (float(m_s) * y / float(sd_s**2) + r * k_t / v)
    return mean + math.sqrt(var) * torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)


@torch.no_grad()
def inpaint(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    y: Tensor,
    mask: Tensor,
    *,
    steps: int = 500,
    particles: int = 1,
    ess_threshold: float = 0.5,
    eps: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill in the unknown coordinates of ``y``: replacement (``particles=1``) or SMC (module docstring).

    The time grid is :math:`t_i = T - i (T - \epsilon)/N`; each step is Euler-Maruyama of the
    reverse SDE, :math:`x \sim \mathcal N(x - [f - g^2 s_\theta] \Delta t, g^2 \Delta t\, I)`; the
    result is :func:`~probgen.inference.sde.tweedie_denoise` at :math:`\epsilon` with the known
    coordinates set to ``y``.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)`` of the *joint* model.
        y: observations ``(B, D)``; entries where ``mask`` is False are ignored.
        mask: ``(B, D)`` or ``(D,)`` bool, True where the coordinate is known.
        steps: :math:`N`.
        particles: particles per row (1: the replacement method of Song et al. 2021, App. I.2).
        ess_threshold: resample when the effective sample size is below this fraction of ``particles``.
        eps: the end time (None: ``sde.eps``).
        generator: source of every draw (default the global RNG).

    Returns:
        ``(B, D)``: ``y`` on the known coordinates, one completion of the unknown ones per row.
    """
    y, eps = check_sde_inputs(sde, y, eps)
    B, D = y.shape
    mask = torch.as_tensor(mask, device=y.device)
    if mask.dtype != torch.bool or mask.shape not in ((D,), (B, D)):
        raise ValueError(
            f"Expected a bool mask of shape ({D},) or ({B}, {D}), but found {mask.dtype} {tuple(mask.shape)}."
        )
    for name, value in (("steps", steps), ("particles", particles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} >= 1 (an int), but found {value!r}.")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"Expected ess_threshold in [0, 1], but found {ess_threshold!r}.")
    mask = mask.expand(B, D)
    P, dt = particles, (sde.T - eps) / steps
    ts = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()

    def noise(shape):
        return torch.randn(shape, generator=generator, device=y.device, dtype=y.dtype)

    m_T, s_T = (float(v) for v in sde.marginal_params(torch.tensor(sde.T, dtype=torch.float64)))
    k = m_T * y + s_T * noise((B, D))  # the known coordinates' forward path, drawn from t = T down
    x = torch.where(mask[:, None], k[:, None], sde.prior_std * noise((B, P, D)))
    log_w = y.new_zeros(B, P)
    for i in range(steps):
        flat = x.reshape(B * P, D)
        t = flat.new_full((B * P,), ts[i])
        drift, g = sde.sde(flat, t)
        g = append_dims(g, 2)
        loc = (flat - (drift - g**2 * score_fn(flat, t)) * dt).reshape(B, P, D)
        g = g.reshape(B, P, 1) * math.sqrt(dt)
        k = _bridge(sde, y, k, ts[i], ts[i + 1], generator)
        if P > 1:  # the density of the next known value under each particle's reverse step
            log_w = log_w - 0.5 * ((k[:, None] - loc) / g).pow(2).masked_fill(~mask[:, None], 0).sum(-1)
        x = torch.where(mask[:, None], k[:, None], loc + g * noise((B, P, D)))
        if P > 1:
            w = torch.softmax(log_w, -1)
            low = 1.0 / w.pow(2).sum(-1) < ess_threshold * P
            if bool(low.any()):
                idx = torch.multinomial(w[low], P, replacement=True, generator=generator)
                x[low] = torch.gather(x[low], 1, idx[..., None].expand(-1, -1, D))
                log_w[low] = 0.0
    flat = x.reshape(B * P, D)
    t = flat.new_full((B * P,), eps)
    mean, std = (append_dims(v, 2) for v in sde.marginal_params(t))
    x0 = ((flat + std**2 * score_fn(flat, t)) / mean).reshape(B, P, D)
    pick = torch.multinomial(torch.softmax(log_w, -1), 1, generator=generator)[:, 0]
    return torch.where(mask, y, x0[torch.arange(B, device=y.device), pick])


class ScoreSDEDistribution(TorchDistribution):
    r"""A score model as a distribution on :math:`\mathbb R^D`: reverse-time sampling, ODE log-density.

    ``sample`` draws prior points and runs the sampler (:func:`~probgen.inference.score_sde_sampling.
    sample_score_sde`); ``log_prob`` is the probability-flow ODE log-likelihood
    (:func:`~probgen.inference.score_sde_sampling.ode_likelihood`, of the model's :math:`p_\epsilon`),
    a value only (not differentiable). Both use the global RNG, as Pyro's distributions do.

    Args:
        source: a trained ``ScoreSDE`` (anything with ``sde_object``, ``score`` and ``data_dim``), or
            a tuple ``(sde, score_fn, D)``.
        sampler: ``"em"``, ``"pc"`` or ``"ode"``.
        steps: the sampler's steps (None: its default).
        sampler_options: further options of the sampler (``snr``, ``rtol``, ...).
        likelihood_options: options of the ODE likelihood (``divergence``, ``rtol``, ``atol``, ...).
        batch_shape: batch shape of the distribution.

    Example:
        >>> def program(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", ScoreSDEDistribution(method), obs=x)
        >>> poutine.trace(program).get_trace(x).log_prob_sum()  # the ODE log-likelihood of x
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        source: Any,
        *,
        sampler: str = "em",
        steps: int | None = None,
        sampler_options: dict[str, Any] | None = None,
        likelihood_options: dict[str, Any] | None = None,
        batch_shape=torch.Size(),
        validate_args=None,
    ) -> None:
        if isinstance(source, tuple):
            if len(source) != 3:
                raise ValueError(f"Expected a tuple (sde, score_fn, D), but found {len(source)} items.")
            sde, score_fn, dim = source
            like = None
        else:
            sde, score_fn, dim = source.sde_object, source.score, source.data_dim
            like = next(iter(source.parameters()), None) if hasattr(source, "parameters") else None
        if not isinstance(sde, DiffusionSDE) or not callable(score_fn):
            raise ValueError(
                f"Expected a DiffusionSDE and a callable score, but found {type(sde).__name__} and "
                f"{type(score_fn).__name__}."
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Expected D >= 1 (an int), but found {dim!r}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"Expected sampler in {SAMPLERS}, but found {sampler!r}.")
        self.sde, self.score_fn, self.dim = sde, score_fn, dim
        self.sampler, self.steps = sampler, steps
        self.sampler_options = dict(sampler_options or {})
        self.likelihood_options = dict(likelihood_options or {})
        self._device = like.device if like is not None else torch.device("cpu")
        self._dtype = like.dtype if like is not None else torch.get_default_dtype()
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ScoreSDEDistribution, _instance)
        for name in ("sde", "score_fn", "dim", "sampler", "steps", "sampler_options", "likelihood_options"):
            setattr(new, name, getattr(self, name))
        new._device, new._dtype = self._device, self._dtype
        super(ScoreSDEDistribution, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        num = math.prod(shape[:-1])
        x = sample_score_sde(
            self.sde, self.score_fn, num, self.dim, sampler=self.sampler, steps=self.steps,
            device=self._device, dtype=self._dtype, **self.sampler_options,
        )  # fmt: skip
        return x.reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self._dtype, device=self._device)
        flat = value.reshape(-1, self.dim)
        seed = int(torch.randint(2**31 - 1, ()))  # Hutchinson vectors from the global RNG
        ll, _, _ = ode_likelihood(self.sde, self.score_fn, flat, seed=seed, **self.likelihood_options)
        ll = ll.reshape(value.shape[:-1])
        return ll.expand(torch.broadcast_shapes(ll.shape, self.batch_shape))
