r"""A progressively distilled DDIM sampler of a DDPM, as a Pyro program.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
(arXiv:2202.00512). A student with K sampling steps is trained so that one of its
deterministic DDIM steps (eta = 0) matches *two* DDIM steps of its teacher, which samples
with 2K steps; the student then teaches the next student (K/2 steps), and so on.

**Time grid.** The teacher DDPM is discrete (steps 1..T, :math:`\bar\alpha_0 = 1`). A K-step
sampler runs on :func:`step_grid` ``(T, K)``: :math:`t_i = \lfloor i T / K + 1/2 \rceil`,
``i = 0..K``, from :math:`t_K = T` down to :math:`t_0 = 0`. Grids nest exactly (the grid of
K/2 steps is every second time of the grid of K), so halving is exact and the teacher's
midpoint :math:`t'` of a student step :math:`t_i \to t_{i-1}` is a grid time of the 2K-step
grid. Every time is a step the DDPM was trained at, so no :math:`\bar\alpha` is interpolated;
grids need ``K <= T`` (e.g. a first teacher of 512 or 256 steps for ``T = 1000``).

**Parameterization.** With :math:`\alpha_t = \sqrt{\bar\alpha_t}`, :math:`\sigma_t =
\sqrt{1 - \bar\alpha_t}` (so :math:`\alpha_t^2 + \sigma_t^2 = 1`), the student's network (the
teacher DDPM's architecture, initialized from its weights) predicts ``"v"``
(:math:`v = \alpha_t \epsilon - \sigma_t x`, giving :math:`\hat x = \alpha_t z_t - \sigma_t \hat v`,
:math:`\hat\epsilon = \sigma_t z_t + \alpha_t \hat v`) or ``"x0"`` directly. The paper (sec. 4)
shows that predicting :math:`\epsilon` fails at few steps: :math:`\hat x = (z_t - \sigma_t
\hat\epsilon)/\alpha_t` amplifies errors by :math:`1/\alpha_t` (about 150 at ``t = T`` for the
linear schedule), and with one step it is the whole sample. The first student therefore starts
from the eps-teacher's weights with a new reading of the output (near the data, where
:math:`\alpha_t \approx 1`, :math:`v \approx \epsilon`, so it starts close; near the prior it
has to learn :math:`v \approx -x`).

**Objective (Algorithm 2).** For data :math:`x`, a student step :math:`i \sim \mathcal U\{1..K\}`
(times :math:`t = t_i`, :math:`t' ` the 2K-grid midpoint, :math:`t'' = t_{i-1}`) and
:math:`z_t \sim q(z_t \mid x)`, the teacher takes two DDIM steps
:math:`z_t \to z_{t'} \to z_{t''}`, and the target

.. math::
    \tilde x = \frac{z_{t''} - (\sigma_{t''} / \sigma_t)\, z_t}
                    {\alpha_{t''} - (\sigma_{t''} / \sigma_t)\, \alpha_t}

is the :math:`\hat x` with which *one* DDIM step :math:`z_{t''} = \alpha_{t''} \hat x + \sigma_{t''}
(z_t - \alpha_t \hat x)/\sigma_t` lands exactly on the teacher's :math:`z_{t''}`. The loss is
:math:`w_t \lVert \tilde x - \hat x_\theta(z_t) \rVert^2` with the paper's "truncated SNR"
weight :math:`w_t = \max(\alpha_t^2/\sigma_t^2, 1)` (or "SNR+1", :math:`w_t = 1/\sigma_t^2`).

**As a Pyro program.** :meth:`Distilled.model` reads the teacher's target as an observation of
the student: site ``"x_target"`` :math:`\sim \mathcal N(\hat x_\theta(z_t), I)` with
``obs`` :math:`= \tilde x`, under ``poutine.scale(w_t)``; ``"t"`` and ``"z_t"`` are sampled
with the same distribution in model and guide (their analytic KL is exactly 0), as in
:mod:`probgen.models.ddpm`. The negative ELBO is then
:math:`\mathbb E[w_t (\tfrac12 \lVert \tilde x - \hat x_\theta \rVert^2 + \tfrac D2 \log 2\pi)]`:
the paper's loss up to a factor 1/2 and a parameter-free constant. This is a weighted
(pseudo-)likelihood rather than the density of a generative process: the unit-variance Gaussian
is the observation model that makes the squared error a log-density, and the weight is
``poutine.scale``, the device DDPM's L_simple uses. Run with nothing observed, the model is the
K-step DDIM sampler (site ``"x_T"``, then the deterministic ``"x"``).
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.checkpoint import CheckpointError
from probgen.distributions import UniformSteps
from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, load_method, register
from probgen.models.ddpm import DDPM
from probgen.schedules import append_dims, ddim_step

__all__ = ["Distilled", "PARAMETERIZATIONS", "WEIGHTINGS", "ddim_on_grid", "distillation_target", "step_grid"]

PARAMETERIZATIONS = ("v", "x0")
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def step_grid(T: int, steps: int) -> list[int]:
    r"""The times :math:`t_i = \lfloor i T / K + 1/2 \rfloor`, ``i = 0..K``, of a K-step sampler (ascending).

    ``t_0 = 0`` is the data and ``t_K = T`` the prior; the grid of K steps is every second time
    of the grid of 2K steps, exactly.

    Args:
        T: the DDPM's number of steps.
        steps: K, in ``1..T``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"Expected steps in [1, {T}] (the teacher's T), but found {steps!r}.")
    return [(2 * i * T + steps) // (2 * steps) for i in range(steps + 1)]


def _alpha_sigma(method: Any, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\alpha_t, \sigma_t` at integer times ``t`` ``(B,)`` in ``0..T``, broadcastable to ``like``."""
    abar = method.schedule.alpha_bars.to(like.device, torch.float64)
    abar = torch.cat([abar.new_ones(1), abar])[t.long()]
    alpha, sigma = abar.sqrt().to(like.dtype), (1 - abar).sqrt().to(like.dtype)
    return append_dims(alpha, like.ndim), append_dims(sigma, like.ndim)


def distillation_target(
    z_t: Tensor, z_end: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_end: Tensor, sigma_end: Tensor
) -> Tensor:
    r"""The :math:`\tilde x` with which one DDIM step from :math:`z_t` lands on :math:`z_{t''}` (Alg. 2).

    Args:
        z_t: states at time t, ``(B, D)``.
        z_end: the teacher's states at t'' < t after its two steps, ``(B, D)``.
        alpha_t, sigma_t, alpha_end, sigma_end: the coefficients at t and t'', broadcastable.

    Returns:
        :math:`\tilde x = (z_{t''} - (\sigma_{t''}/\sigma_t) z_t) / (\alpha_{t''} - (\sigma_{t''}/\sigma_t)
        \alpha_t)`, ``(B, D)``; the denominator is :math:`\sigma_{t''}` times the (positive) gap of
        :math:`\alpha/\sigma` between t'' and t.
    """
    ratio = sigma_end / sigma_t
    return (z_end - ratio * z_t) / (alpha_end - ratio * alpha_t)


@torch.no_grad()
def ddim_on_grid(method: Any, z_T: Tensor, steps: int) -> Tensor:
    r"""Deterministic DDIM (Song et al. 2021, arXiv:2010.02502, eq. 12, eta = 0) on :func:`step_grid`.

    Works for a :class:`~probgen.models.DDPM` (any K <= T) and a :class:`Distilled` student
    (its own K); both give ``predict(z, t) -> (eps_hat, x0_hat)``.

    Args:
        method: the predictor.
        z_T: prior states at t = T, ``(B, D)``.
        steps: K.

    Returns:
        :math:`\hat x`, ``(B, D)``, in the diffusion's space (bin centres for levels).
    """
    grid = step_grid(method.T, steps)
    z = z_T
    for i in range(steps, 0, -1):
        t = torch.full((z.shape[0],), grid[i], device=z.device, dtype=torch.long)
        eps_hat, x0_hat = method.predict(z, t)
        alpha_s, sigma_s = _alpha_sigma(method, t.new_full(t.shape, grid[i - 1]), z)
        z = ddim_step(x0_hat, eps_hat, alpha_s, sigma_s)
    return z


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected {what} in {choices}, but found {value!r}.")


@register("distilled")
class Distilled(Method):
    r"""A K-step DDIM student of a DDPM (progressive distillation, arXiv:2202.00512).

    Args:
        ddpm: the constructor arguments (``config``) of the DDPM whose network, schedule and
            decoder the student shares.
        steps: K, the student's number of sampling steps, in ``1..T``.
        parameterization: ``"v"`` or ``"x0"`` (see the module docstring).
        weighting: ``"truncated_snr"`` (:math:`\max(\mathrm{SNR}, 1)`) or ``"snr_plus_one"``.
    """

    samplers = {"ancestral": "distilled-ddim", "ddim": "distilled-ddim"}
    likelihoods = {}
    teacher_method = "ddpm"

    def __init__(
        self,
        ddpm: dict[str, Any],
        steps: int,
        parameterization: str = "v",
        weighting: str = "truncated_snr",
    ) -> None:
        super().__init__()
        if not isinstance(ddpm, dict):
            raise ValueError(f"Expected the DDPM's config as a dict, but found {type(ddpm).__name__}.")
        _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        _check_choice("weighting", weighting, WEIGHTINGS)
        self.ddpm = DDPM(**ddpm)
        step_grid(self.ddpm.T, steps)  # validates steps
        self.config = dict(
            ddpm=dict(ddpm), steps=steps, parameterization=parameterization, weighting=weighting
        )
        self.steps, self.parameterization, self.weighting = steps, parameterization, weighting
        self._teacher: tuple[nn.Module, ...] = ()  # kept out of the module tree: not trained, not saved

    # ------------------------------------------------------------------ protocol

    @property
    def T(self) -> int:
        """The DDPM's number of steps."""
        return self.ddpm.T

    @property
    def schedule(self):
        """The DDPM's :class:`~probgen.schedules.DiffusionSchedule`."""
        return self.ddpm.schedule

    @property
    def data_dim(self) -> int:
        return self.ddpm.data_dim

    @property
    def event_dim(self) -> int:
        return self.ddpm.data_dim

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """The teacher DDPM's form: integer levels for level data, raw values for the toys."""
        return "int"

    def check_data(self, x: Tensor) -> Tensor:
        """Validate a batch ``x`` of shape ``(B, D)`` as the DDPM does."""
        return self.ddpm.check_data(x)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO()

    @classmethod
    def from_teacher(
        cls, teacher: nn.Module, steps: int, *, parameterization: str = "v", weighting: str = "truncated_snr"
    ) -> Distilled:
        """A student of ``teacher`` (a DDPM, or a Distilled of 2K steps) with K steps, initialized from it.

        Raises:
            ValueError: the teacher is neither, or a Distilled teacher does not take 2K steps.
        """
        if isinstance(teacher, Distilled):
            if teacher.steps != 2 * steps:
                raise ValueError(
                    f"Expected a teacher with 2 * {steps} = {2 * steps} steps for a {steps}-step student, "
                    f"but found {teacher.steps}."
                )
            student = cls(teacher.config["ddpm"], steps, parameterization, weighting)
            student.load_state_dict(teacher.state_dict())
        elif isinstance(teacher, DDPM):
            step_grid(teacher.T, 2 * steps)
            student = cls(teacher.config, steps, parameterization, weighting)
            student.ddpm.load_state_dict(teacher.state_dict())
        else:
            name = getattr(teacher, "name", "") or type(teacher).__name__
            raise ValueError(
                f"Expected a teacher of method 'ddpm' or 'distilled' (a discrete-time VP diffusion), "
                f"but found {name!r}."
            )
        return student.to(next(iter(teacher.parameters())).device)

    @classmethod
    def from_data(
        cls,
        dataset: Any,
        *,
        teacher: str,
        steps: int = 4,
        parameterization: str = "v",
        weighting: str = "truncated_snr",
    ) -> Distilled:
        """One distillation stage from a DDPM run: a ``steps``-step student of its DDIM-``2 * steps``.

        The teacher is loaded from the run directory ``teacher`` and attached (frozen), so ``fit`` trains
        the student at once; :func:`probgen.inference.distill.progressive_distill` chains such stages.

        Raises:
            ValueError: the run is not a DDPM's, or its data shape is not the data set's.
        """
        try:
            ddpm, _ = load_method(teacher, expected="ddpm")
        except CheckpointError as exc:
            raise ValueError(f"Expected a ddpm teacher run in {teacher!r}, but found: {exc}") from exc
        if ddpm.data_dim != dataset.x.shape[-1]:
            raise ValueError(
                f"Expected a teacher of data dimension {dataset.x.shape[-1]}, but found {ddpm.data_dim}."
            )
        student = cls.from_teacher(ddpm, steps, parameterization=parameterization, weighting=weighting)
        student.attach_teacher(ddpm.requires_grad_(False).eval())
        return student

    def attach_teacher(self, teacher: nn.Module | None) -> None:
        """Set (or with None, clear) the teacher whose two DDIM steps :meth:`model` distils."""
        if teacher is None:
            self._teacher = ()
            return
        steps = teacher.steps if isinstance(teacher, Distilled) else 2 * self.steps
        if not isinstance(teacher, (DDPM, Distilled)) or steps != 2 * self.steps:
            found = f" with {steps} steps" if isinstance(teacher, Distilled) else ""
            raise ValueError(
                f"Expected a DDPM or a {2 * self.steps}-step Distilled teacher, but found "
                f"{type(teacher).__name__}{found}."
            )
        if teacher.T != self.T or teacher.data_dim != self.data_dim:
            raise ValueError(
                f"Expected a teacher with T={self.T} and D={self.data_dim}, but found T={teacher.T} and "
                f"D={teacher.data_dim}."
            )
        self._teacher = (teacher,)

    # ------------------------------------------------------------------ building blocks

    def encode(self, x: Tensor) -> Tensor:
        """Data ``(B, D)`` in the diffusion's space (the DDPM's encoding)."""
        return self.ddpm.encode(x)

    def predict(self, z: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        r"""The student's :math:`(\hat\epsilon, \hat x)` at states ``z`` ``(B, D)``, times ``t`` (1..T)."""
        if isinstance(t, int):
            t = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        out = self.ddpm._net(z, t)
        alpha, sigma = _alpha_sigma(self, t, z)
        if self.parameterization == "v":
            return sigma * z + alpha * out, alpha * z - sigma * out
        return (z - alpha * out) / sigma, out

    def loss_weight(self, t: Tensor) -> Tensor:
        r"""The weight :math:`w_t` of the x-space error at times ``t`` (``(B,)``): ``(B,)``."""
        abar = torch.cat([self.schedule.alpha_bars.new_ones(1), self.schedule.alpha_bars])[t.long().cpu()]
        snr = abar / (1 - abar)
        w = snr.clamp(min=1.0) if self.weighting == "truncated_snr" else snr + 1
        return w.to(device=t.device, dtype=self.ddpm._anchor.dtype)

    def decode(self, x0_hat: Tensor, final: str = "mode") -> Tensor:
        """The last state ``(B, D)`` as a sample: levels (the bin holding it) or a decoder draw."""
        if final == "sample":
            return self.ddpm.decoder_dist(x0_hat, self.ddpm.tables(x0_hat).sigma[0]).sample()
        if final != "mode":
            raise ValueError(f"Expected final in ('mode', 'sample'), but found {final!r}.")
        if self.ddpm.decoder == "discretized":
            levels = self.ddpm.num_levels
            return ((x0_hat + 1) * (levels / 2)).floor().clamp(0, levels - 1)
        return x0_hat

    # ------------------------------------------------------------------ programs

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        r"""The distillation program (Algorithm 2); with ``x=None``, the K-step DDIM sampler.

        Args:
            x: observations ``(B, D)`` (levels for the discretized decoder), or None.
            batch_size: number of samples when ``x`` is None.
        """
        if x is None:
            n = self._batch_size(None, batch_size)
            with pyro.plate("data", n):
                zeros = self.ddpm._anchor.new_zeros(()).expand(n, self.data_dim)
                z_T = pyro.sample("x_T", dist.Normal(zeros, 1.0).to_event(1))
                pyro.deterministic("x", self.decode(ddim_on_grid(self, z_T, self.steps)), event_dim=1)
            return
        if not self._teacher:
            raise ValueError(
                "Expected a teacher attached with attach_teacher() to distil from, but found none."
            )
        teacher = self._teacher[0]
        x0 = self.encode(x)
        n = x0.shape[0]
        fine = torch.tensor(step_grid(self.T, 2 * self.steps), device=x0.device)
        with pyro.plate("data", n):
            i = pyro.sample("t", UniformSteps(self.steps, device=x0.device).expand([n]))
            t, t_mid, t_end = fine[2 * i], fine[2 * i - 1], fine[2 * i - 2]
            alpha, sigma = _alpha_sigma(self, t, x0)
            z_t = pyro.sample("z_t", dist.Normal(alpha * x0, sigma.expand_as(x0)).to_event(1))
            with torch.no_grad():
                eps_hat, x0_hat = teacher.predict(z_t, t)
                z_mid = ddim_step(x0_hat, eps_hat, *_alpha_sigma(self, t_mid, x0))
                eps_hat, x0_hat = teacher.predict(z_mid, t_mid)
                alpha_end, sigma_end = _alpha_sigma(self, t_end, x0)
                z_end = ddim_step(x0_hat, eps_hat, alpha_end, sigma_end)
                target = distillation_target(z_t, z_end, alpha, sigma, alpha_end, sigma_end)
            _, x_hat = self.predict(z_t, t)
            with poutine.scale(scale=self.loss_weight(t)):
                pyro.sample("x_target", dist.Normal(x_hat, 1.0).to_event(1), obs=target)

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        r"""The student's step and the noised data, as in the model. ``x``: observations ``(B, D)``."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x0 = self.encode(x)
        n = x0.shape[0]
        fine = torch.tensor(step_grid(self.T, 2 * self.steps), device=x0.device)
        with pyro.plate("data", n):
            i = pyro.sample("t", UniformSteps(self.steps, device=x0.device).expand([n]))
            alpha, sigma = _alpha_sigma(self, fine[2 * i], x0)
            pyro.sample("z_t", dist.Normal(alpha * x0, sigma.expand_as(x0)).to_event(1))

    @torch.no_grad()
    def sample(self, num: int) -> Tensor:
        """K-step DDIM samples ``(num, D)`` (levels for the discretized decoder; the decoder's mode)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        with pyro.validation_enabled(False):
            trace = poutine.trace(self.model).get_trace(None, batch_size=num)
        return trace.nodes["x"]["value"]
