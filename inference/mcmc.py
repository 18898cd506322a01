r"""Langevin MCMC kernels for Pyro models: ULA, MALA, SGLD and kinetic (underdamped) Langevin.

Each kernel is a :class:`pyro.infer.mcmc.MCMCKernel`, so ``pyro.infer.MCMC(kernel, num_samples,
warmup_steps).run(*args)`` samples any Pyro model whose latent sites are continuous, and
``summary()`` / ``diagnostics()`` report ESS and split R-hat. Like Pyro's HMC, a kernel moves in
the unconstrained space that :func:`pyro.infer.mcmc.util.initialize_model` builds (constrained
sites such as a ``HalfNormal`` scale go through their bijections and the log-Jacobian enters the
potential energy :math:`U = -\log p(z, x)`). Instead of a model, a ``potential_fn`` over a dict of
unconstrained tensors may be given together with ``initial_params``; when it returns energies of
shape ``(C,)`` for tensors with a leading dimension ``C``, the rows are ``C`` independent chains
(accepted or rejected one by one), which is how many chains run vectorized.

Randomness comes from torch's global generator, as in Pyro's kernels: seed a run with
``pyro.set_rng_seed``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.integrator import _EXCEPTION_HANDLERS
from pyro.poutine.subsample_messenger import _Subsample
from pyro.util import optional
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["KineticLangevin", "LangevinKernel", "MALA", "SGLD", "ULA"]

Params = dict[str, Tensor]


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"Expected {name} to be a positive finite number, but found {value!r}.")
    return float(value)


def _chain_sum(x: Tensor, batch_ndim: int) -> Tensor:
    """Sum over everything but the leading ``batch_ndim`` chain dimensions."""
    return x.reshape(x.shape[:batch_ndim] + (-1,)).sum(-1)


def _select(accept: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per-chain choice between ``new`` and ``old``, ``accept`` of the chain batch shape."""
    return torch.where(accept.reshape(accept.shape + (1,) * (new.dim() - accept.dim())), new, old)


class _StepSizeAdapter:
    """Dual averaging of the log step size toward a target acceptance probability during warm-up.

    Hoffman & Gelman 2014 (arXiv:1111.4246), Algorithm 5, through Pyro's ``DualAveraging``; the
    averaged iterate is frozen at the end of warm-up.
    """

    def __init__(self, target_accept_prob: float):
        self.target_accept_prob = target_accept_prob
        self._scheme = DualAveraging()

    def reset(self, step_size: float) -> None:
        self._scheme.prox_center = math.log(10 * step_size)
        self._scheme.reset()

    def update(self, accept_prob: float) -> float:
        self._scheme.step(self.target_accept_prob - accept_prob)
        return math.exp(self._scheme.get_state()[0])

    def final(self) -> float:
        return math.exp(self._scheme.get_state()[1])


class _TracePotential:
    r""":math:`U(z) = -\log p(T^{-1}(z), x) - \log|\det J_{T^{-1}}(z)|` from a fresh trace per call.

    Unlike Pyro's own potential it accepts subsampled plates: each call redraws the subsample and
    the plate scales the likelihood by N / B (what SGLD needs).
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict, transforms: dict):
        self.model, self.args, self.kwargs, self.transforms = model, args, kwargs, transforms

    def __call__(self, params: Params) -> Tensor:
        constrained = {k: self.transforms[k].inv(v) for k, v in params.items()}
        trace = poutine.trace(poutine.condition(self.model, constrained)).get_trace(*self.args, **self.kwargs)
        log_joint = trace.log_prob_sum()
        for name, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(constrained[name], params[name]).sum()
        return -log_joint


class LangevinKernel(MCMCKernel):
    r"""Base of the gradient-based Langevin kernels: one place for :math:`U`, :math:`\nabla U`, state, stats.

    A subclass implements ``_step()``, which moves ``self._z`` (with its cached ``self._potential``
    and ``self._grads``) one step and returns the per-chain acceptance probability, or ``None``
    for an unadjusted kernel.

    Args:
        model: Pyro model with continuous latent sites (exactly one of ``model``/``potential_fn``).
        potential_fn: :math:`U` over a dict of unconstrained tensors; returns shape ``()`` or
            ``(C,)`` for ``C`` vectorized chains.
        step_size: step size :math:`h` (initial value when adapted).
        adapt_step_size: adapt :math:`h` by dual averaging during warm-up (Metropolis-adjusted kernels).
        target_accept_prob: acceptance probability the adaptation aims at.
        transforms: site name -> transform to unconstrained space (default: ``biject_to(support).inv``).
        max_plate_nesting: passed to :func:`~pyro.infer.mcmc.util.initialize_model`.
        init_strategy: per-site initialization (Pyro's ``init_to_*``).
    """

    metropolis = False

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[Params], Tensor] | None = None,
        *,
        step_size: float = 0.1,
        adapt_step_size: bool = False,
        target_accept_prob: float = 0.574,
        transforms: dict | None = None,
        max_plate_nesting: int | None = None,
        init_strategy: Callable = init_to_uniform,
    ):
        if (model is None) == (potential_fn is None):
            found = "both" if model is not None else "neither"
            raise ValueError(f"Expected exactly one of `model` or `potential_fn`, but found {found}.")
        if not 0 < target_accept_prob < 1:
            raise ValueError(f"Expected target_accept_prob in (0, 1), but found {target_accept_prob!r}.")
        if adapt_step_size and not self.metropolis:
            raise ValueError(
                f"Expected adapt_step_size=False for the unadjusted {type(self).__name__} (there is no "
                "acceptance probability to adapt to), but found True."
            )
        self.model = model
        self.potential_fn = potential_fn
        self.transforms = transforms
        self._step_size = _check_positive("step_size", step_size)
        self._init_step_size = self._step_size
        self._adapter = _StepSizeAdapter(target_accept_prob) if adapt_step_size else None
        self._max_plate_nesting = max_plate_nesting
        self._init_strategy = init_strategy
        self._initial_params: Params | None = None
        self._warmup_steps = 0
        self._reset()

    def _reset(self) -> None:
        self._t = 0
        self._accept_sum = 0.0  # post-warm-up sum of chain-averaged accept indicators
        self._mean_accept_prob = 0.0
        self._z: Params | None = None
        self._potential: Tensor | None = None
        self._grads: Params | None = None

    @property
    def step_size(self) -> float:
        return self._step_size

    @property
    def initial_params(self) -> Params | None:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: Params) -> None:
        self._initial_params = params

    def _initialize_model(self, args: tuple, kwargs: dict) -> None:
        try:
            init, potential_fn, transforms, _ = initialize_model(
                self.model,
                args,
                kwargs,
                transforms=self.transforms,
                max_plate_nesting=self._max_plate_nesting,
                init_strategy=self._init_strategy,
                initial_params=self._initial_params,
            )
        except NotImplementedError as err:  # Pyro refuses subsampled plates outside SGLD
            raise ValueError(
                f"Expected a model without subsampled plates for {type(self).__name__} "
                f"(use SGLD for minibatches), but found one: {err}"
            ) from err
        self._initial_params, self.potential_fn, self.transforms = init, potential_fn, transforms

    def _potential_and_grad(self, z: Params) -> tuple[Tensor, Params]:
        r""":math:`U(z)` (chain batch shape) and :math:`\nabla U(z)` per site, both detached."""
        z = {k: v.detach().requires_grad_(True) for k, v in z.items()}
        try:
            potential = self.potential_fn(z)
        except Exception as e:  # e.g. a failed Cholesky: the proposal is rejected
            if any(handler(e) for handler in _EXCEPTION_HANDLERS.values()):
                nan = next(iter(z.values())).new_tensor(math.nan)
                return nan, {k: torch.full_like(v, math.nan) for k, v in z.items()}
            raise
        grads = torch.autograd.grad(potential.sum(), list(z.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(z.items(), grads)}
        return potential.detach(), grads

    def _set_state(self, z: Params) -> None:
        self._z = {k: v.detach().clone() for k, v in z.items()}
        if self._z:
            self._potential, self._grads = self._potential_and_grad(self._z)

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Expected warmup_steps to be a non-negative int, but found {warmup_steps!r}.")
        self._warmup_steps = warmup_steps
        self._reset()
        if self.model is not None:
            self._initialize_model(args, kwargs)
        elif self._initial_params is None:
            raise ValueError("Expected initial_params (unconstrained) with a potential_fn, but found None.")
        self._step_size = self._init_step_size
        if self._adapter is not None:
            self._adapter.reset(self._step_size)
        self._set_state(self._initial_params)

    def cleanup(self) -> None:
        self._reset()
        self._initial_params = None

    def _check_finite(self) -> None:
        if not (
            torch.isfinite(self._potential).all() and all(g.isfinite().all() for g in self._grads.values())
        ):
            raise RuntimeError(
                f"Expected a finite potential energy and gradient, but found U = {self._potential} at step "
                f"{self._t} of {type(self).__name__}: the chain diverged; reduce step_size."
            )

    def _step(self) -> Tensor | None:
        raise NotImplementedError

    def sample(self, params: Params) -> Params:
        if self._z is None:  # cache cleared: continue from the params handed in
            self._set_state(params)
        if not self._z:
            self._t += 1
            return params
        warming_up = self._t < self._warmup_steps
        with optional(pyro.validation_enabled(False), warming_up):
            accept_prob = self._step()
        self._t += 1
        if accept_prob is not None:
            mean_prob = accept_prob.mean().item()
            if warming_up and self._adapter is not None:
                self._step_size = self._adapter.update(mean_prob)
                if self._t == self._warmup_steps:
                    self._step_size = self._adapter.final()
            n = self._t - self._warmup_steps if not warming_up else self._t
            self._mean_accept_prob += (mean_prob - self._mean_accept_prob) / n
            if not warming_up:
                self._accept_sum += self._last_accept.float().mean().item()
        else:
            self._check_finite()
        return {k: v.clone() for k, v in self._z.items()}

    def _metropolis(
        self, z_new: Params, log_ratio: Tensor, potential_new: Tensor, grads_new: Params
    ) -> Tensor:
        r"""Accept per chain with probability :math:`\min(1, e^{\text{log ratio}})` (NaN rejects)."""
        log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
        accept_prob = log_ratio.clamp(max=0.0).exp()
        accept = torch.rand_like(accept_prob) < accept_prob
        self._z = {k: _select(accept, z_new[k], v) for k, v in self._z.items()}
        self._grads = {k: _select(accept, grads_new[k], v) for k, v in self._grads.items()}
        self._potential = torch.where(accept, potential_new, self._potential)
        self._last_accept = accept
        return accept_prob

    def logging(self) -> OrderedDict:
        log = OrderedDict([("step size", f"{self.step_size:.2e}")])
        if self.metropolis:
            log["acc. prob"] = f"{self._mean_accept_prob:.3f}"
        return log

    def diagnostics(self) -> dict:
        diag = {"step size": self.step_size}
        if self.metropolis:
            diag["acceptance rate"] = self._accept_sum / max(self._t - self._warmup_steps, 1)
        return diag


class ULA(LangevinKernel):
    r"""Unadjusted Langevin algorithm: :math:`z' = z - h \nabla U(z) + \sqrt{2h}\,\xi`, no correction.

    The Euler-Maruyama step of the overdamped Langevin diffusion. Its stationary law is biased at
    :math:`O(h)`: on :math:`N(0, \Sigma)` it is exactly :math:`N(0, \Sigma (I - h \Sigma^{-1}/2)^{-1})`.

    References:
        Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and their
        discrete approximations", Bernoulli 2(4).

    Example:
        >>> mcmc = pyro.infer.MCMC(ULA(model, step_size=1e-3), num_samples=1000, warmup_steps=200)
        >>> mcmc.run(data)  # doctest: +SKIP
    """

    def _step(self) -> None:
        h = self.step_size
        self._set_state(
            {k: v - h * self._grads[k] + math.sqrt(2 * h) * torch.randn_like(v) for k, v in self._z.items()}
        )
        return None


class MALA(LangevinKernel):
    r"""Metropolis-adjusted Langevin algorithm with dual-averaging step-size adaptation in warm-up.

    Proposal :math:`z' = z - h \nabla U(z) + \sqrt{2h}\,\xi`, accepted with probability
    :math:`\min\{1, e^{U(z) - U(z')} q(z \mid z') / q(z' \mid z)\}`, where
    :math:`\log q(z' \mid z) = -\lVert z' - z + h \nabla U(z) \rVert^2 / (4h)` + const. During
    warm-up :math:`h` is adapted toward ``target_accept_prob`` (0.574, optimal for MALA in high
    dimension, Roberts & Rosenthal 1998) and frozen afterwards.

    References:
        Roberts & Tweedie 1996, Bernoulli 2(4), 341-363; Roberts & Rosenthal 1998, JRSS B 60(1).

    Example:
        >>> mcmc = pyro.infer.MCMC(MALA(model), num_samples=1000, warmup_steps=500)
        >>> mcmc.run(data)  # doctest: +SKIP
        >>> mcmc.summary()  # doctest: +SKIP
    """

    metropolis = True

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        step_size: float = 0.1,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        **kwargs,
    ):
        super().__init__(
            model,
            potential_fn,
            step_size=step_size,
            adapt_step_size=adapt_step_size,
            target_accept_prob=target_accept_prob,
            **kwargs,
        )

    def _step(self) -> Tensor:
        h, z, grads = self.step_size, self._z, self._grads
        z_new = {k: v - h * grads[k] + math.sqrt(2 * h) * torch.randn_like(v) for k, v in z.items()}
        potential_new, grads_new = self._potential_and_grad(z_new)
        batch = self._potential.dim()
        log_q_fwd = sum(_chain_sum((z_new[k] - v + h * grads[k]) ** 2, batch) for k, v in z.items())
        log_q_rev = sum(_chain_sum((v - z_new[k] + h * grads_new[k]) ** 2, batch) for k, v in z.items())
        log_ratio = self._potential - potential_new + (log_q_fwd - log_q_rev) / (4 * h)
        return self._metropolis(z_new, log_ratio, potential_new, grads_new)


class SGLD(LangevinKernel):
    r"""Stochastic gradient Langevin dynamics with a decreasing step-size schedule.

    :math:`z_{t+1} = z_t - \tfrac{\epsilon_t}{2} \nabla \hat U(z_t) + \sqrt{\epsilon_t}\,\xi_t`, with
    :math:`\epsilon_t = \epsilon_0 (1 + t / b)^{-\gamma}` (Welling & Teh's :math:`a (b + t)^{-\gamma}`
    with :math:`a = \epsilon_0 b^\gamma`; :math:`\gamma \in (0.5, 1]` for their convergence result,
    :math:`\gamma = 0` for a constant step). :math:`\hat U` is the minibatch potential: the model is
    re-traced at every step, so a ``pyro.plate("data", N, subsample_size=B)`` draws a fresh
    subsample and scales its log-likelihood by :math:`N / B` (an unbiased estimate of the full
    one). No Metropolis correction; ``t`` counts warm-up steps too.

    References:
        Welling & Teh 2011, "Bayesian learning via stochastic gradient Langevin dynamics", ICML.

    Example:
        >>> def model(x, y):  # x: (N, D), y: (N,)
        ...     w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        ...     with pyro.plate("data", x.shape[0], subsample_size=32) as idx:
        ...         pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])
        >>> kernel = SGLD(model, step_size=1e-3, step_decay=0.55, step_offset=100.0)
        >>> mcmc = pyro.infer.MCMC(kernel, num_samples=2000, warmup_steps=500)
        >>> mcmc.run(x, y)  # doctest: +SKIP

    Args:
        model, potential_fn: as in :class:`LangevinKernel`; a ``potential_fn`` may be stochastic.
        step_size: :math:`\epsilon_0`.
        step_offset: :math:`b > 0`, the number of steps the step size stays near :math:`\epsilon_0`.
        step_decay: :math:`\gamma \in [0, 1]`.
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        step_size: float = 1e-3,
        step_offset: float = 100.0,
        step_decay: float = 0.55,
        **kwargs,
    ):
        super().__init__(model, potential_fn, step_size=step_size, **kwargs)
        self.step_offset = _check_positive("step_offset", step_offset)
        if (
            isinstance(step_decay, bool)
            or not isinstance(step_decay, (int, float))
            or not 0 <= step_decay <= 1
        ):
            raise ValueError(f"Expected step_decay in [0, 1], but found {step_decay!r}.")
        self.step_decay = float(step_decay)

    @property
    def step_size(self) -> float:
        r""":math:`\epsilon_t` of the next step."""
        return self._init_step_size * (1 + self._t / self.step_offset) ** -self.step_decay

    def _initialize_model(self, args: tuple, kwargs: dict) -> None:
        for name, site in poutine.trace(self.model).get_trace(*args, **kwargs).iter_stochastic_nodes():
            if site["fn"].has_enumerate_support and not isinstance(site["fn"], _Subsample):
                raise ValueError(
                    f"Expected continuous latent sites for SGLD, but found discrete site {name!r}."
                )
        trace = poutine.trace(InitMessenger(self._init_strategy)(self.model)).get_trace(*args, **kwargs)
        transforms = dict(self.transforms or {})
        init = {}
        for name, site in trace.iter_stochastic_nodes():
            if isinstance(site["fn"], _Subsample):
                continue
            transforms.setdefault(name, biject_to(site["fn"].support).inv)
            init[name] = transforms[name](site["value"].detach())
        self.transforms = transforms
        self.potential_fn = _TracePotential(self.model, args, kwargs, transforms)
        if self._initial_params is None:
            self._initial_params = init

    def _step(self) -> None:
        eps = self.step_size
        z = {
            k: v - 0.5 * eps * self._grads[k] + math.sqrt(eps) * torch.randn_like(v)
            for k, v in self._z.items()
        }
        self._set_state(z)
        return None


class KineticLangevin(LangevinKernel):
    r"""Kinetic (underdamped) Langevin dynamics discretized by the BAOAB splitting.

    The diffusion :math:`dz = v\,dt`, :math:`dv = -\nabla U(z)\,dt - \gamma v\,dt + \sqrt{2\gamma}\,dW`
    (unit mass, the kinetic Langevin diffusion of Dalalyan & Riou-Durand 2018) is integrated by
    BAOAB (Leimkuhler & Matthews 2013): half kick
    :math:`v \leftarrow v - \tfrac{h}{2}\nabla U(z)`, half drift :math:`z \leftarrow z + \tfrac{h}{2} v`,
    exact Ornstein-Uhlenbeck step :math:`v \leftarrow e^{-\gamma h} v + \sqrt{1 - e^{-2\gamma h}}\,\xi`,
    half drift, half kick: one gradient per step. Unadjusted; its configurational bias is
    :math:`O(h^2)` and vanishes for Gaussian targets. The velocity persists between steps and is
    redrawn from :math:`N(0, I)` at ``setup``.

    References:
        Dalalyan & Riou-Durand 2018, "On sampling from a log-concave density using kinetic
        Langevin diffusions", arXiv:1807.09382; Leimkuhler & Matthews 2013, "Rational construction
        of stochastic numerical methods for molecular sampling", arXiv:1203.5428.

    Args:
        step_size: :math:`h`.
        friction: :math:`\gamma > 0`.
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        step_size: float = 0.1,
        friction: float = 1.0,
        **kwargs,
    ):
        super().__init__(model, potential_fn, step_size=step_size, **kwargs)
        self.friction = _check_positive("friction", friction)

    def _set_state(self, z: Params) -> None:
        super()._set_state(z)
        if getattr(self, "_velocity", None) is None or self._velocity.keys() != self._z.keys():
            self._velocity = {k: torch.randn_like(v) for k, v in self._z.items()}

    def _reset(self) -> None:
        super()._reset()
        self._velocity = None

    def _step(self) -> None:
        h, v = self.step_size, self._velocity
        decay = math.exp(-self.friction * h)
        noise = math.sqrt(-math.expm1(-2 * self.friction * h))
        v = {k: u - 0.5 * h * self._grads[k] for k, u in v.items()}
        z = {k: x + 0.5 * h * v[k] for k, x in self._z.items()}
        v = {k: decay * u + noise * torch.randn_like(u) for k, u in v.items()}
        self._z = {k: x + 0.5 * h * v[k] for k, x in z.items()}
        self._potential, self._grads = self._potential_and_grad(self._z)
        self._velocity = {k: u - 0.5 * h * self._grads[k] for k, u in v.items()}
        return None
