r"""Consistency models: one network that maps any point of a probability-flow ODE path to its start.

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (arXiv:2303.01469). A forward SDE of
:mod:`probgen.sdes` (VE, as in the paper, or VP / sub-VP) has a probability-flow ODE whose solution
paths :math:`\{x_t\}_{t \in [\epsilon, T]}` carry the prior to the data. The *consistency function*
:math:`f(x_t, t) = x_\epsilon` maps every point of a path to its end at :math:`\epsilon`; a network
:math:`f_\theta` learns it, with the boundary condition :math:`f_\theta(x, \epsilon) = x` built into
its parameterization (their eq. 5 and App. C), written for any linear SDE
:math:`x_t = m_t x_0 + s_t z` through the scaled state :math:`y = x / m_t`, whose noise level is
:math:`\sigma(t) = s_t / m_t` (for VE :math:`m = 1`, :math:`\sigma = s`):

.. math::
    f_\theta(x, t) = m_\epsilon \big[c_{\text{skip}}(t)\, y + c_{\text{out}}(t)\,
    F_\theta(c_{\text{in}}(t)\, y, t)\big], \qquad
    c_{\text{skip}} = \frac{\sigma_d^2}{(\sigma - \sigma_\epsilon)^2 + \sigma_d^2}, \quad
    c_{\text{out}} = \frac{\sigma_d (\sigma - \sigma_\epsilon)}{\sqrt{\sigma_d^2 + \sigma^2}}, \quad
    c_{\text{in}} = \frac{1}{\sqrt{\sigma_d^2 + \sigma^2}},

so :math:`c_{\text{skip}}(\epsilon) = 1`, :math:`c_{\text{out}}(\epsilon) = 0` and
:math:`f_\theta(x, \epsilon) = m_\epsilon\, x / m_\epsilon = x` exactly, whatever :math:`F_\theta`.

**Training** is not variational: the consistency objective
:math:`\mathbb E\, \lambda(t_n)\, d\big(f_\theta(x_{t_{n+1}}, t_{n+1}), f_{\theta^-}(\hat x_{t_n}, t_n)\big)`
is a *distance between the outputs of two networks* (the online one and its EMA target), not a
log-density, so it has no ELBO: :meth:`Consistency.model` with data and :meth:`Consistency.elbo`
raise. :class:`ConsistencyObjective` (:meth:`Consistency.objective`) enters the distances into a
Pyro program as ``pyro.factor("consistency", -d)`` and :func:`probgen.inference.fit` drives it, by
distillation from a ``score-sde`` teacher (CD, Algorithm 2) or from data alone (CT, Algorithm 3).
Its hyperparameters live in :attr:`config` so ``probgen train consistency --set teacher=RUN_DIR``
sets them.

**Sampling** is a Pyro program (Algorithm 1): ``"x_T"`` from the SDE's prior, the deterministic
``"x_hat_0"`` :math:`= f_\theta(x_T, T)`, then for each further step a re-noising site ``"x_k"``
:math:`\sim q(x_{\tau_k} \mid x_\epsilon = \hat x_{k-1})` (:meth:`Consistency.renoise_kernel`) and a
denoising :math:`\hat x_k = f_\theta(x_k, \tau_k)`; the last denoised value is the ``Delta`` site
``"x"``. ``pyro.infer.Predictive`` runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.checkpoint import CheckpointError
from probgen.metrics import sliced_wasserstein
from probgen.models.base import Method, load_method, register
from probgen.models.ncsn import max_pairwise_distance
from probgen.nets import NetSpec
from probgen.objectives import Objective, seeded, trace_log_prob
from probgen.schedules import append_dims
from probgen.sdes import DiffusionSDE, ScoreFn, SDESpec, pf_ode_step

__all__ = [
    "DISTANCES",
    "Consistency",
    "ConsistencyObjective",
    "check_teacher",
    "consistency_distillation_loss",
    "consistency_training_loss",
    "discretization_times",
    "ct_schedule",
    "karras_sigmas",
    "load_teacher",
    "time_of_sigma",
]

DISTANCES = ("l2", "pseudo_huber")
# The SDE settings a teacher fixes: distillation follows the teacher's own probability-flow ODE.
_SDE_KEYS = ("sde", "beta_min", "beta_max", "sigma_min", "sigma_max", "T", "eps")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    r"""The discretization :math:`\sigma_i = (\sigma_{\min}^{1/\rho} + \tfrac{i-1}{N-1}(\sigma_{\max}^{1/\rho}
    - \sigma_{\min}^{1/\rho}))^\rho`, :math:`i = 1..N` (Karras et al. 2022, arXiv:2206.00364; Song et al.
    2023, Section 5), ascending, float64 ``(N,)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"Expected n >= 2 (an int), but found {n!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Expected 0 < sigma_min < sigma_max, but found {sigma_min!r}, {sigma_max!r}.")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact ends despite rounding
    return sigmas


def ct_schedule(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> tuple[int, float]:
    r"""Consistency training's step schedule :math:`N(k)` and target decay :math:`\mu(k)` (App. C).

    .. math::
        N(k) = \Big\lceil \sqrt{\tfrac{k}{K}\big((s_1 + 1)^2 - s_0^2\big) + s_0^2} - 1 \Big\rceil + 1,
        \qquad \mu(k) = \exp\Big(\frac{s_0 \log \mu_0}{N(k)}\Big).

    Args:
        k: the training step (0-based).
        K: the total number of steps.
        s0, s1: the initial and final number of discretization steps.
        mu0: the target EMA decay at the start.

    Returns:
        ``(N, mu)``.
    """
    frac = min(max(k / max(K, 1), 0.0), 1.0)
    n = math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    return n, (math.exp(s0 * math.log(mu0) / n) if mu0 > 0 else 0.0)


def _sigma_of(sde: DiffusionSDE, t: Tensor) -> Tensor:
    mean, std = sde.marginal_params(t)
    return std / mean


def time_of_sigma(sde: DiffusionSDE, sigma: Tensor, *, iters: int = 80) -> Tensor:
    r"""The time :math:`t \in [0, T]` with :math:`s_t / m_t = \sigma`, by bisection in float64.

    :math:`\sigma(t) = s_t / m_t` increases with :math:`t` for the SDEs of :mod:`probgen.sdes`.

    Args:
        sde: the forward SDE.
        sigma: noise levels, any shape, in :math:`[\sigma(0), \sigma(T)]`.
        iters: bisection steps (80 reach float64 resolution).

    Returns:
        Times shaped like ``sigma``, float64.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    lo, hi = torch.zeros_like(sigma), torch.full_like(sigma, sde.T)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = _sigma_of(sde, mid) < sigma
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def check_teacher(teacher: nn.Module, config: dict[str, Any]) -> None:
    """Raise a ``ValueError`` unless ``teacher`` is a score-sde of the SDE and data shape in ``config``."""
    name = getattr(teacher, "name", type(teacher).__name__)
    if name != "score-sde" or not hasattr(teacher, "score"):
        raise ValueError(f"Expected a teacher of method 'score-sde', but found {name!r}.")
    tc = teacher.config
    if list(tc["event_shape"]) != list(config["event_shape"]):
        raise ValueError(
            f"Expected a teacher of data shape {tuple(config['event_shape'])}, but found "
            f"{tuple(tc['event_shape'])}."
        )
    keys = ("sde",) + (("sigma_min", "sigma_max") if config["sde"] == "ve" else ("beta_min", "beta_max"))
    for key in keys + ("T",):
        if tc[key] != config[key]:
            raise ValueError(
                f"Expected a teacher of the same SDE ({key}={config[key]!r}), but found {key}={tc[key]!r}."
            )
    if teacher.sde_object.eps != config["eps"]:
        raise ValueError(
            f"Expected a teacher of the same SDE (eps={config['eps']!r}), "
            f"but found eps={teacher.sde_object.eps!r}."
        )


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {name} >= {low} (an int), but found {value!r}.")
    return value


@register("consistency")
class Consistency(Method):
    r"""A consistency model over the probability-flow ODE of a VE, VP or sub-VP SDE.

    Args:
        data_dim: flat size D of one observation.
        event_shape: shape of one observation; ``(C, H, W)`` with ``H == W`` selects a
            :class:`~probgen.nets.UNet`, anything else an :class:`~probgen.nets.MLP` (default ``(D,)``).
        sde, beta_min, beta_max, sigma_min, sigma_max, T: the forward SDE (as in ``score-sde``).
        eps: the boundary time :math:`\epsilon` (None: the SDE's default).
        sigma_data: :math:`\sigma_d` of the skip/output scalings.
        teacher: a ``score-sde`` run directory to distil (None: consistency training).
        num_scales: N of distillation (fixed, 18 in the paper's CIFAR-10 runs).
        target_decay: :math:`\mu` of the target network in distillation.
        rho: :math:`\rho` of the discretization :func:`karras_sigmas`.
        s0, s1, mu0: consistency training's schedule (:func:`ct_schedule`).
        distance: ``"l2"`` (squared Euclidean) or ``"pseudo_huber"``
            (:math:`\sqrt{\lVert a - b \rVert^2 + c^2} - c`, Song & Dhariwal 2023, arXiv:2310.14189).
        huber_c: :math:`c` of the pseudo-Huber distance (None: :math:`0.00054 \sqrt D`).
        sample_steps: steps of :meth:`sample` and of the model run without ``steps``.
        hidden, embed_dim: MLP widths and time-embedding size (also the UNet's).
        base_channels, channel_mults, num_res_blocks, dropout, attention: UNet options.
        net: a custom network ``net(x, c_noise) -> (B, *event_shape)``, not saved in :attr:`config`.

    Example:
        >>> cm = Consistency(2, sde="ve", sigma_max=8.0, sigma_data=2.0)
        >>> cm.consistency_function(x, torch.full((len(x),), 0.5))  # x: (B, 2) -> (B, 2)
        >>> cm.sample(64, steps=2)                                    # (64, 2)
    """

    samplers = {"ancestral": "ancestral", "consistency": "consistency"}
    likelihoods = {}
    teacher_method = "score-sde"

    observed_site = "x"
    finite_data = True

    def __init__(
        self,
        data_dim: int,
        *,
        event_shape: Sequence[int] | None = None,
        sde: str | DiffusionSDE = "ve",
        sigma_data: float = 0.5,
        teacher: str | None = None,
        num_scales: int = 18,
        target_decay: float = 0.95,
        rho: float = 7.0,
        s0: int = 2,
        s1: int = 150,
        mu0: float = 0.9,
        distance: str = "l2",
        huber_c: float | None = None,
        sample_steps: int = 1,
        net: nn.Module | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.sde_spec, net_options = SDESpec.from_options(sde, options)
        self.net_spec = NetSpec.from_options(net_options)
        _check_int("data_dim", data_dim, 1)
        if distance not in DISTANCES:
            raise ValueError(f"Expected distance in {DISTANCES}, but found {distance!r}.")
        _check_int("num_scales", num_scales, 2)
        _check_int("sample_steps", sample_steps, 1)
        _check_int("s0", s0, 2)
        _check_int("s1", s1, s0)
        for name, value in (("target_decay", target_decay), ("mu0", mu0)):
            if not 0 <= value < 1:
                raise ValueError(f"Expected {name} in [0, 1), but found {value!r}.")
        if not sigma_data > 0 or not rho > 0:
            raise ValueError(f"Expected sigma_data > 0 and rho > 0, but found {sigma_data!r}, {rho!r}.")
        if teacher is not None and not isinstance(teacher, str):
            raise ValueError(
                f"Expected teacher to be a run directory (a str) or None, but found {teacher!r}."
            )
        event_shape = (data_dim,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != data_dim:
            raise ValueError(f"Expected an event_shape with {data_dim} elements, but found {event_shape}.")
        self._sde = self.sde_spec.build()
        self.sde_spec = dataclasses.replace(self.sde_spec, eps=self._sde.eps)  # the config records eps
        self.config = dict(
            data_dim=data_dim, event_shape=list(event_shape), **self.sde_spec.config(),
            sigma_data=float(sigma_data), teacher=teacher, num_scales=num_scales,
            target_decay=float(target_decay), rho=float(rho), s0=s0, s1=s1, mu0=float(mu0),
            distance=distance, huber_c=None if huber_c is None else float(huber_c),
            sample_steps=sample_steps, **self.net_spec.config(),
        )  # fmt: skip
        self.data_dim, self.event_shape, self.sigma_data = data_dim, event_shape, float(sigma_data)
        self.sample_steps = sample_steps
        self.eps = self._sde.eps
        self.sigma_eps = float(_sigma_of(self._sde, torch.tensor(self.eps, dtype=torch.float64)))
        self.sigma_max_ode = float(_sigma_of(self._sde, torch.tensor(self._sde.T, dtype=torch.float64)))
        self.net = net if net is not None else self.net_spec.build(event_shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype

    # ------------------------------------------------------------------ protocol

    @property
    def sde_object(self) -> DiffusionSDE:
        """The forward SDE whose probability-flow ODE the model follows."""
        return self._sde

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """``"centered"`` ([-1, 1]) for the digits, raw values otherwise (as ``score-sde``)."""
        return "centered" if dataset_name == "digits" else "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> Consistency:
        r"""A model for ``dataset``; with ``teacher=RUN_DIR`` the SDE is the teacher's.

        Without a teacher: ``sigma_data`` the data's std, and for VE :math:`\sigma_{\max}` the data's
        diameter (as ``score-sde``). With one, the teacher is loaded (:func:`~probgen.models.load_method`)
        and checked: its data shape must be the data set's, and SDE settings given in ``kwargs`` must
        agree with it; the rest are copied from it.

        Raises:
            ValueError: the teacher is not a ``score-sde`` run, or its SDE or data shape differ.
        """
        x = dataset.x
        opts: dict[str, Any] = {"data_dim": x.shape[-1], "event_shape": list(dataset.event_shape)}
        opts.update(kwargs)
        opts.setdefault("sigma_data", float(x.std()))
        if opts.get("teacher") is not None:
            teacher = load_teacher(opts["teacher"])
            tc = teacher.config
            if list(tc["event_shape"]) != list(opts["event_shape"]):
                raise ValueError(
                    f"Expected a teacher of data shape {tuple(opts['event_shape'])}, but found "
                    f"{tuple(tc['event_shape'])} in {opts['teacher']}."
                )
            for key in _SDE_KEYS:
                value = teacher.sde_object.eps if key == "eps" else tc[key]
                if key in kwargs and kwargs[key] is not None and kwargs[key] != value:
                    raise ValueError(
                        f"Expected {key}={kwargs[key]!r} to match the teacher's SDE, but found "
                        f"{key}={value!r} in {opts['teacher']}."
                    )
                opts[key] = value
        elif opts.get("sde", "ve") == "ve":
            opts.setdefault("sigma_max", max_pairwise_distance(x))
        return cls(**opts)

    def objective(self, teacher: nn.Module | str | os.PathLike | None = None) -> ConsistencyObjective:
        """Distillation from ``teacher`` (default ``config["teacher"]``), else consistency training."""
        return ConsistencyObjective(self, teacher)

    def elbo(self) -> ELBO:
        """Consistency models have no ELBO (their objective is a distance): always raises."""
        raise NotImplementedError(
            "a consistency model has no ELBO: its objective is a distance between two networks' outputs; "
            "train it with probgen.inference.fit over Consistency.objective()"
        )

    # ------------------------------------------------------------------ the consistency function

    def sigma(self, t: Tensor) -> Tensor:
        r"""The noise level :math:`\sigma(t) = s_t / m_t` of the scaled state, shaped like ``t``."""
        return _sigma_of(self._sde, t)

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`(c_{\text{skip}}, c_{\text{out}}, c_{\text{in}})` at times ``t`` ``(B,)``, each ``(B,)``.

        The network is conditioned on :math:`1000\, t / T` (for VE, affine in :math:`\log \sigma`).
        """
        sigma, sd = self.sigma(t), self.sigma_data
        gap = sigma - self.sigma(torch.full_like(t, self.eps))  # the same arithmetic: exactly 0 at eps
        c_skip = sd**2 / (gap.pow(2) + sd**2)
        c_out = sd * gap / (sd**2 + sigma.pow(2)).sqrt()
        c_in = (sd**2 + sigma.pow(2)).rsqrt()
        return c_skip, c_out, c_in

    def consistency_function(self, x: Tensor, t: Tensor | float) -> Tensor:
        r""":math:`f_\theta(x, t)`, the estimate of :math:`x_\epsilon` on the ODE path through ``x`` at ``t``.

        Args:
            x: states ``(B, D)``.
            t: times ``(B,)`` (or a scalar) in :math:`[\epsilon, T]`.

        Returns:
            ``(B, D)``; exactly ``x`` at :math:`t = \epsilon`.
        """
        t = self._states_and_levels(x, t, "t")
        m_t, _ = self._sde.marginal_params(t)
        m_eps, _ = self._sde.marginal_params(torch.full_like(t, self.eps))
        c_skip, c_out, c_in = (append_dims(c, 2) for c in self.scalings(t))
        h = (c_in * x / append_dims(m_t, 2)).reshape(x.shape[0], *self.event_shape)
        out = self.net(h, 1000.0 * t / self._sde.T).reshape(x.shape)
        # At t = eps the ratio is exactly 1, c_skip exactly 1 and c_out exactly 0: f(x, eps) = x bit for bit.
        return c_skip * append_dims(m_eps / m_t, 2) * x + c_out * append_dims(m_eps, 2) * out

    # ------------------------------------------------------------------ the generative program

    @property
    def grid_size(self) -> int:
        r"""N of the discretization the network was trained on: ``num_scales`` for distillation (a
        ``teacher`` in the config), CT's last :math:`N(K) = s_1 + 1` otherwise (:func:`ct_schedule`)."""
        return self.config["num_scales"] if self.config["teacher"] is not None else self.config["s1"] + 1

    def training_sigmas(self) -> Tensor:
        r"""The noise levels of that discretization, :func:`karras_sigmas` from :math:`\sigma_\epsilon` to
        :math:`\sigma(T)`, ascending, float64 ``(N,)``."""
        return karras_sigmas(self.grid_size, self.sigma_eps, self.sigma_max_ode, self.config["rho"])

    def sample_sigmas(self, steps: int) -> list[float]:
        r"""The noise levels :math:`\sigma(T) = \tau_0 > \tau_1 > \dots > \tau_{K-1}` of ``steps`` = K steps.

        A fixed schedule (the paper's greedy search for the :math:`\tau_k` is not done): the points of
        the training discretization (:meth:`training_sigmas`, N levels) nearest to the evenly spaced
        positions :math:`(N - 1)(1 - k / K)`, i.e. the :math:`\rho`-spaced grid of K + 1 points from
        :math:`\sigma(T)` down to :math:`\sigma_\epsilon`, snapped to levels the network was trained at.
        The snapping matters: distillation with a fixed N only ever shows the network those N levels,
        and between them its output can be far off (digits, VP teacher, N = 18: two steps through
        :math:`\tau_1 = 5.75`, between the levels 4.53 and 7.39, gave a Fréchet distance of 9.4; through
        either level 3.2 and 3.1).

        Raises:
            ValueError: ``steps`` above N - 1 (the levels above :math:`\sigma_\epsilon`).
        """
        _check_int("steps", steps, 1)
        n = self.grid_size
        if steps > n - 1:
            raise ValueError(
                f"Expected steps <= {n - 1}, the noise levels above sigma(eps) the network was trained at, "
                f"but found {steps}."
            )
        grid = self.training_sigmas()
        index = [n - 1]
        for k in range(1, steps):
            i = round((n - 1) * (1 - k / steps))
            index.append(max(min(i, index[-1] - 1), steps - k))  # strictly decreasing, room left below
        return [float(grid[i]) for i in index]

    def renoise_kernel(self, x_eps: Tensor, t: Tensor) -> dist.Distribution:
        r""":math:`q(x_t \mid x_\epsilon)` of the linear SDE, the re-noising step of multistep sampling.

        :math:`\mathcal N\big(\tfrac{m_t}{m_\epsilon} x_\epsilon, (s_t^2 - \tfrac{m_t^2}{m_\epsilon^2}
        s_\epsilon^2) I\big)`; for VE :math:`\mathcal N(x_\epsilon, (\tau^2 - \epsilon^2) I)` (Algorithm 1).

        Args:
            x_eps: ``(B, D)``.
            t: times ``(B,)``.

        Returns:
            A ``Normal`` with batch shape ``(B,)`` and event shape ``(D,)``.
        """
        m_t, s_t = self._sde.marginal_params(t)
        m_e, s_e = self._sde.marginal_params(t.new_tensor(self.eps))
        ratio = m_t / m_e
        std = (s_t.pow(2) - ratio.pow(2) * s_e.pow(2)).clamp_min(0).sqrt()
        return dist.Normal(append_dims(ratio, 2) * x_eps, append_dims(std, 2).expand_as(x_eps)).to_event(1)

    def model(
        self,
        x: Tensor | None = None,
        batch_size: int | None = None,
        steps: int | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> Tensor:
        r"""Multistep consistency sampling (Algorithm 1) as a Pyro program.

        Sites: ``"x_T"`` from the prior; ``"x_hat_0"`` :math:`= f_\theta(x_T, T)` (deterministic); for
        k = 1..K-1 ``"x_k"`` :math:`\sim` :meth:`renoise_kernel` at :math:`\tau_k` and ``"x_hat_k"``;
        the last denoised value is the ``Delta`` site ``"x"`` (so with K = 1: ``"x_T"``, ``"x"``).

        Args:
            x: must be None (the model is generative only; see the module docstring).
            batch_size: B.
            steps: K >= 1 (None: ``sample_steps``).
            sigmas: the K noise levels :math:`\tau_k`, the first :math:`\sigma(T)`, decreasing
                (None: :meth:`sample_sigmas`).

        Returns:
            ``(B, D)`` samples.
        """
        if x is not None:
            raise NotImplementedError(
                "a consistency model scores no data: its objective is a distance between two networks' "
                "outputs, not a log-density; train it with probgen.inference.fit (Consistency.objective())"
            )
        steps = self.sample_steps if steps is None and sigmas is None else steps
        sigmas = self._check_sigmas(steps, sigmas)
        n = 1 if batch_size is None else int(batch_size)
        times = time_of_sigma(self._sde, torch.tensor(sigmas[1:], dtype=torch.float64)).tolist()
        times = [self._sde.T] + times
        zeros = self._anchor.new_zeros(n, self.data_dim)
        with pyro.plate("data", n):
            prior = dist.Normal(zeros, self._sde.prior_std).to_event(1)
            x_t = pyro.sample("x_T", prior)
            x_hat = x_t
            for k, t in enumerate(times):
                if k > 0:
                    t_vec = self._anchor.new_full((n,), t)
                    x_t = pyro.sample(f"x_{k}", self.renoise_kernel(x_hat, t_vec))
                x_hat = self.consistency_function(x_t, self._anchor.new_full((n,), t))
                if k == len(times) - 1:
                    return pyro.sample("x", dist.Delta(x_hat, event_dim=1))
                x_hat = pyro.deterministic(f"x_hat_{k}", x_hat, event_dim=1)
        raise AssertionError("unreachable")

    def _check_sigmas(self, steps: int | None, sigmas: Sequence[float] | None) -> list[float]:
        if sigmas is None:
            return self.sample_sigmas(steps)
        sigmas = [float(s) for s in sigmas]
        if steps is not None and steps != len(sigmas):
            raise ValueError(f"Expected {steps} noise levels for steps={steps}, but found {len(sigmas)}.")
        if not sigmas or not all(a > b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"Expected decreasing noise levels, but found {sigmas}.")
        if not math.isclose(sigmas[0], self.sigma_max_ode, rel_tol=1e-6):
            raise ValueError(
                f"Expected the first noise level sigma(T) = {self.sigma_max_ode}, but found {sigmas[0]}."
            )
        if sigmas[-1] <= self.sigma_eps:
            raise ValueError(
                f"Expected noise levels above sigma(eps) = {self.sigma_eps}, but found {sigmas[-1]}."
            )
        return sigmas

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """No guide: a consistency model is not trained variationally (always raises)."""
        raise NotImplementedError(
            "a consistency model has no guide: it is trained by fit over Consistency.objective(), not SVI"
        )

    @torch.no_grad()
    def sample(self, num: int, steps: int | None = None, sigmas: Sequence[float] | None = None) -> Tensor:
        """``num`` samples ``(num, D)`` by :meth:`model` with ``steps`` (None: ``sample_steps``)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        if steps is not None:
            _check_int("steps", steps, 1)
        with pyro.validation_enabled(False):
            return self.model(None, batch_size=num, steps=steps, sigmas=sigmas)


def discretization_times(sde: DiffusionSDE, n: int, eps: float, rho: float = 7.0) -> Tensor:
    r"""Times :math:`t_1 = \epsilon < \dots < t_N = T` whose :math:`\sigma(t) = s_t / m_t` are Karras' grid.

    Returns:
        ``(N,)`` float64.
    """
    ends = torch.tensor([eps, sde.T], dtype=torch.float64)
    mean, std = sde.marginal_params(ends)
    lo, hi = (std / mean).tolist()
    sigmas = karras_sigmas(n, lo, hi, rho)
    times = time_of_sigma(sde, sigmas)
    times[0], times[-1] = eps, sde.T
    return times


def _distance(a: Tensor, b: Tensor, kind: str, huber_c: float | None) -> Tensor:
    """Per-example :math:`d(a, b)`, ``(B,)``: squared L2, or pseudo-Huber with constant c."""
    sq = (a - b).pow(2).flatten(1).sum(1)
    if kind == "l2":
        return sq
    c = 0.00054 * math.sqrt(a[0].numel()) if huber_c is None else huber_c
    return (sq + c**2).sqrt() - c


def _pairs(x0: Tensor, times: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Uniform n in {1..N-1} per example: ``(t_n, t_{n+1})``, each ``(B,)``."""
    idx = torch.randint(0, len(times) - 1, (x0.shape[0],), generator=generator, device=times.device)
    return times[idx].to(x0.dtype), times[idx + 1].to(x0.dtype)


def _check_loss_inputs(sde: object, x0: object, times: object) -> tuple[Tensor, Tensor]:
    if not isinstance(sde, DiffusionSDE):
        raise ValueError(f"Expected a DiffusionSDE, but found {type(sde).__name__}.")
    if not isinstance(x0, Tensor) or x0.ndim != 2:
        raise ValueError(f"Expected x0 of shape (B, D), but found {getattr(x0, 'shape', type(x0).__name__)}.")
    times = torch.as_tensor(times)
    if times.ndim != 1 or len(times) < 2 or not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"Expected at least two increasing times (N,), but found {times.tolist()}.")
    return x0, times.to(x0.device)


def consistency_distillation_loss(
    f: ConsistencyFn,
    f_target: ConsistencyFn,
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x0: Tensor,
    times: Tensor,
    *,
    distance: str = "l2",
    huber_c: float | None = None,
    solver: str = "heun2",
    generator: torch.Generator | None = None,
    per_example: bool = False,
) -> Tensor:
    r"""The CD objective (Song et al. 2023, eq. 7 / Algorithm 2), a mean distance, **not** a log-density.

    Per example: :math:`n` uniform, :math:`x_{t_{n+1}} \sim q(\cdot \mid x_0)`, :math:`\hat x_{t_n}` one
    :func:`pf_ode_step` of the teacher, :math:`d(f(x_{t_{n+1}}, t_{n+1}), f^-(\hat x_{t_n}, t_n))`.

    Args:
        f: the online consistency function ``f(x, t) -> (B, D)``.
        f_target: the target one (evaluated without gradient).
        sde: the forward SDE (the teacher's).
        score_fn: the teacher's score ``(x, t) -> (B, D)``.
        x0: data ``(B, D)``.
        times: the increasing discretization ``(N,)`` (:func:`discretization_times`).
        distance: ``"l2"`` or ``"pseudo_huber"``.
        huber_c: the pseudo-Huber constant (None: :math:`0.00054 \sqrt D`).
        solver: the fixed-step torchdiffeq method of the teacher's step.
        generator: source of n and of the noise (default the global RNG).
        per_example: return the distances ``(B,)`` instead of their mean.

    Returns:
        A scalar: the batch mean of the distances (``(B,)`` with ``per_example``).
    """
    x0, times = _check_loss_inputs(sde, x0, times)
    t_n, t_next = _pairs(x0, times, generator)
    mean, std = (append_dims(v, 2) for v in sde.marginal_params(t_next))
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_next = mean * x0 + std * z
    with torch.no_grad():
        x_hat = pf_ode_step(sde, score_fn, x_next, t_next, t_n, method=solver)
        target = f_target(x_hat, t_n)
    distances = _distance(f(x_next, t_next), target, distance, huber_c)
    return distances if per_example else distances.mean()


def consistency_training_loss(
    f: ConsistencyFn,
    f_target: ConsistencyFn,
    sde: DiffusionSDE,
    x0: Tensor,
    times: Tensor,
    *,
    distance: str = "l2",
    huber_c: float | None = None,
    generator: torch.Generator | None = None,
    per_example: bool = False,
) -> Tensor:
    r"""The CT objective (Song et al. 2023, eq. 10 / Algorithm 3), a mean distance, **not** a log-density.

    Per example: :math:`n` uniform, one :math:`z \sim \mathcal N(0, I)`,
    :math:`d(f(m_{t_{n+1}} x_0 + s_{t_{n+1}} z, t_{n+1}), f^-(m_{t_n} x_0 + s_{t_n} z, t_n))`. Arguments as
    :func:`consistency_distillation_loss` without a teacher.
    """
    x0, times = _check_loss_inputs(sde, x0, times)
    t_n, t_next = _pairs(x0, times, generator)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    m_next, s_next = (append_dims(v, 2) for v in sde.marginal_params(t_next))
    m_n, s_n = (append_dims(v, 2) for v in sde.marginal_params(t_n))
    with torch.no_grad():
        target = f_target(m_n * x0 + s_n * z, t_n)
    distances = _distance(f(m_next * x0 + s_next * z, t_next), target, distance, huber_c)
    return distances if per_example else distances.mean()


ConsistencyFn = Callable[[Tensor, Tensor], Tensor]


def _resolve_teacher(cm: Consistency, teacher: nn.Module | str | os.PathLike | None) -> nn.Module | None:
    if teacher is None:
        teacher = cm.config.get("teacher")
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(os.fspath(teacher), device=cm._anchor.device)
    check_teacher(teacher, cm.config)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class ConsistencyObjective(Objective):
    r"""Consistency distillation (with a teacher) or consistency training (without), for ``fit``.

    Each step draws a minibatch and scores it with the per-example distances of
    :func:`consistency_distillation_loss` (N = ``num_scales``, :math:`\mu` = ``target_decay``) or
    :func:`consistency_training_loss` (N(k), :math:`\mu(k)` by :func:`ct_schedule` over the run's
    steps). The distances enter a Pyro program as ``pyro.factor("consistency", -d)`` in the data plate,
    and the loss is minus that trace's log-probability per example
    (:func:`~probgen.objectives.trace_log_prob`),
    i.e. the batch mean of the distances: a distance between two networks' outputs, not nats. After
    each step the target network (no gradient; checkpointed as the objective's state) moves
    :math:`\theta^- \leftarrow \mu \theta^- + (1 - \mu) \theta`. A separate sampling EMA is
    ``fit``'s ``ema_decay``. The default validation score is the sliced Wasserstein-2 distance of up
    to 2,000 one-step samples (common random numbers) to the validation data.

    Args:
        cm: the consistency model.
        teacher: a ``score-sde`` method or run directory (None: ``cm.config["teacher"]``; None there
            too: consistency training). It must have the model's SDE and data shape.

    Raises:
        ValueError: a teacher of another method, SDE or data shape.
    """

    val_metric = "sliced Wasserstein-2 of 1-step samples to the validation data"

    def __init__(self, cm: Consistency, teacher: nn.Module | str | os.PathLike | None = None) -> None:
        if not isinstance(cm, Consistency):
            raise ValueError(f"Expected a Consistency model, but found {type(cm).__name__}.")
        super().__init__(cm)
        self.teacher = _resolve_teacher(cm, teacher)
        self.mode = "training" if self.teacher is None else "distillation"
        self._target: Consistency | None = None
        self._grids: dict[int, Tensor] = {}

    @property
    def target(self) -> Consistency:
        """The target network :math:`\theta^-`, a frozen copy of the model made at the first step."""
        if self._target is None:
            self._target = copy.deepcopy(self.method).requires_grad_(False).eval()
        return self._target

    def _schedule(self, step: int, steps: int) -> tuple[int, float]:
        cfg = self.method.config
        if self.teacher is not None:
            return cfg["num_scales"], cfg["target_decay"]
        return ct_schedule(step, steps, cfg["s0"], cfg["s1"], cfg["mu0"])

    def _grid(self, n: int, device: torch.device) -> Tensor:
        if n not in self._grids:
            cm = self.method
            self._grids[n] = discretization_times(cm.sde_object, n, cm.eps, cm.config["rho"]).to(device)
        return self._grids[n]

    def losses(self, batch: Callable[[int], Tensor], step: int, steps: int) -> Iterator[tuple[str, Tensor]]:
        cm, x = self.method, batch(0)
        n, _ = self._schedule(step, steps)
        opts = dict(distance=cm.config["distance"], huber_c=cm.config["huber_c"], per_example=True)
        f, f_target = cm.consistency_function, self.target.consistency_function
        if self.teacher is not None:
            if next(self.teacher.parameters()).device != x.device:  # once, not every step
                self.teacher.to(x.device)
            d = consistency_distillation_loss(
                f, f_target, cm.sde_object, self.teacher.score, x, self._grid(n, x.device), **opts
            )
        else:
            d = consistency_training_loss(f, f_target, cm.sde_object, x, self._grid(n, x.device), **opts)

        def program() -> None:
            with pyro.plate("data", x.shape[0]):
                pyro.factor("consistency", -d)

        yield "model", -trace_log_prob(program, x.shape[0])

    @torch.no_grad()
    def after_step(self, step: int, steps: int) -> None:
        _, mu = self._schedule(step - 1, steps)
        torch._foreach_lerp_(
            list(self.target.parameters()), [p.detach() for p in self.method.parameters()], 1 - mu
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {f"target.{k}": v.detach().clone() for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        saved = {k[len("target.") :]: v for k, v in state.items() if k.startswith("target.")}
        self._target = None
        self.target.load_state_dict(saved if saved else self.method.state_dict())

    def validate(self, val: Tensor, seed: int) -> float:
        num = min(val.shape[0], 2000)
        with torch.no_grad(), seeded(seed, val):
            x = self.method.sample(num, steps=1)
        return sliced_wasserstein(x.flatten(1).cpu().double(), val[:num].flatten(1).cpu().double())

    def settings(self) -> dict[str, Any]:
        return {"objective": type(self).__name__, "mode": self.mode}


def load_teacher(run_dir: str, *, device: str | torch.device = "cpu") -> Method:
    """Load a ``score-sde`` teacher from ``run_dir`` (a ``ValueError`` if it is another method)."""
    try:
        teacher, _ = load_method(run_dir, device=device, expected="score-sde")
    except CheckpointError as exc:
        raise ValueError(f"Expected a score-sde teacher run in {run_dir!r}, but found: {exc}") from exc
    return teacher
