r"""Training and sampling of consistency models (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469).

**The objective is not a log-density.** Consistency distillation (CD, Algorithm 2) and consistency
training (CT, Algorithm 3) minimize

.. math::
    \mathcal L(\theta, \theta^-) = \mathbb E_{n, x, z}\big[\lambda(t_n)\,
    d\big(f_\theta(x_{t_{n+1}}, t_{n+1}),\, f_{\theta^-}(\hat x_{t_n}, t_n)\big)\big],

a distance :math:`d` (squared L2, or pseudo-Huber) between the outputs of the online network and of its
EMA target :math:`\theta^-` (no gradient), with :math:`\lambda = 1`, :math:`n` uniform on
:math:`\{1, \dots, N-1\}` and :math:`x_{t_{n+1}} \sim q(x_{t_{n+1}} \mid x)`. No ELBO, likelihood or
Pyro factor corresponds to it, so it lives here, outside ``fit``'s ELBO path:

* CD: :math:`\hat x_{t_n}` is one Heun step of the teacher's probability-flow ODE from
  :math:`t_{n+1}` to :math:`t_n` (:func:`pf_ode_step`, torchdiffeq's ``heun2``), N and
  :math:`\mu` fixed;
* CT: :math:`x_{t_n} = m_{t_n} x + s_{t_n} z` with the *same* :math:`z` as
  :math:`x_{t_{n+1}}`, and N, :math:`\mu` grow with the step by
  :func:`~probgen.models.consistency.ct_schedule`.

The times :math:`t_1 = \epsilon < \dots < t_N = T` are those whose noise levels
:math:`\sigma(t) = s_t / m_t` form :func:`~probgen.models.consistency.karras_sigmas`.

:func:`fit_consistency` is registered as the trainer of ``"consistency"`` (``probgen train
consistency``) with :func:`~probgen.inference.svi.fit`'s conventions: minibatches as a function of
``(seed, step)``, checkpoints ``last`` (online ``model.*``, target ``target.*``, optional sampling EMA
``ema.*``, optimizer and RNG state) and ``best``, exact resume, Ctrl-C saving ``last``, a
:class:`~probgen.inference.svi.TrainingError` on a non-finite objective. The sampler
``"consistency"`` (``probgen sample RUN --sampler consistency --steps K``) runs the model's Pyro
program with K steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint
from tqdm.auto import tqdm

from probgen.checkpoint import flatten_state, has_checkpoint, load_checkpoint, save_checkpoint
from probgen.inference._util import seeded
from probgen.inference.adversarial import register_trainer
from probgen.inference.sampling import register_sampler
from probgen.inference.svi import (
    _EMA,
    FitResult,
    TrainingError,
    _check_fit_args,
    _default_device,
    _InterruptFlag,
    _load_model_state,
    _Minibatches,
    _restore,
)
from probgen.metrics import sliced_wasserstein
from probgen.models.consistency import (
    Consistency,
    check_teacher,
    ct_schedule,
    karras_sigmas,
    load_teacher,
    time_of_sigma,
)
from probgen.schedules import append_dims
from probgen.sdes import DiffusionSDE, ProbabilityFlowODE, ScoreFn

__all__ = [
    "ConsistencyResult",
    "consistency_distillation_loss",
    "consistency_training_loss",
    "discretization_times",
    "fit_consistency",
    "pf_ode_step",
    "sample_consistency",
]

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ConsistencyResult(FitResult):
    """What :func:`fit_consistency` returns: a :class:`~probgen.inference.svi.FitResult` whose
    ``"train"`` history is the consistency objective (a distance, not nats) and ``"val"`` the
    validation score named by :attr:`val_metric`; :attr:`mode` is ``"distillation"`` or ``"training"``."""

    val_metric: str = "sliced Wasserstein-2 of 1-step samples to the validation data"
    mode: str = "training"


# ----------------------------------------------------------------------------- pieces


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


class _IntervalODE(nn.Module):
    """The PF-ODE over per-example intervals, rescaled to :math:`u \\in [0, 1]`: :math:`t = a + u (b - a)`."""

    def __init__(self, ode: ProbabilityFlowODE, t_from: Tensor, t_to: Tensor) -> None:
        super().__init__()
        self.ode, self.t_from, self.span = ode, t_from, t_to - t_from

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        t = self.t_from + u * self.span
        return self.ode.drift(y, t) * append_dims(self.span, y.ndim)


@torch.no_grad()
def pf_ode_step(
    sde: DiffusionSDE,
    score_fn: ScoreFn,
    x: Tensor,
    t_from: Tensor,
    t_to: Tensor,
    *,
    method: str = "heun2",
) -> Tensor:
    r"""One step of the probability-flow ODE from ``t_from`` to ``t_to``, each example on its own interval.

    Solves :math:`dx/du = \tilde f(x, a + u (b - a))\, (b - a)` over :math:`u \in [0, 1]` with one step of
    the fixed-step torchdiffeq ``method`` (``"heun2"``: Heun's second-order step, the paper's CD solver;
    ``"euler"``; ``"rk4"``, ...), :math:`\tilde f` the drift of :class:`~probgen.sdes.ProbabilityFlowODE`.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> (B, D)``.
        x: states at ``t_from``, ``(B, D)``.
        t_from, t_to: ``(B,)`` times.
        method: a fixed-step torchdiffeq method.

    Returns:
        ``(B, D)`` states at ``t_to``.
    """
    func = _IntervalODE(ProbabilityFlowODE(sde, score_fn), t_from.to(x.dtype), t_to.to(x.dtype))
    return odeint(func, x, torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device), method=method)[-1]


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

    Returns:
        A scalar: the batch mean of the distances.
    """
    x0, times = _check_loss_inputs(sde, x0, times)
    t_n, t_next = _pairs(x0, times, generator)
    mean, std = (append_dims(v, 2) for v in sde.marginal_params(t_next))
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_next = mean * x0 + std * z
    with torch.no_grad():
        x_hat = pf_ode_step(sde, score_fn, x_next, t_next, t_n, method=solver)
        target = f_target(x_hat, t_n)
    return _distance(f(x_next, t_next), target, distance, huber_c).mean()


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
    return _distance(f(m_next * x0 + s_next * z, t_next), target, distance, huber_c).mean()


# ----------------------------------------------------------------------------- sampling


def sample_consistency(
    cm: Consistency,
    num: int,
    *,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``num`` samples ``(num, D)`` by K-step consistency sampling (Algorithm 1), the model's Pyro program.

    Args:
        cm: a :class:`~probgen.models.consistency.Consistency`.
        num: number of samples.
        steps: K >= 1 (None: ``cm.sample_steps``, or ``len(sigmas)``).
        sigmas: the noise levels :math:`\tau_0 = \sigma(T) > \dots > \tau_{K-1}` (None: the fixed
            schedule :meth:`~probgen.models.consistency.Consistency.sample_sigmas`).
        generator: seeds the program's draws (Pyro samples from torch's global RNG, which is forked).
    """
    if not isinstance(cm, Consistency):
        raise ValueError(f"Expected a Consistency model, but found {type(cm).__name__}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Expected steps >= 1 (an int), but found {steps!r}.")
    device = cm._anchor.device
    seed = (
        None
        if generator is None
        else int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    )
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        return cm.sample(num, steps=steps, sigmas=sigmas)


def _consistency_sampler(
    method, num: int, *, steps: int | None, eta: float, generator, sigmas=None
) -> Tensor:
    """``--sampler consistency --steps K`` (``--option sigmas=[...]`` for other noise levels)."""
    if eta != 0:
        raise ValueError(f"Expected eta = 0 (DDIM's option) for the consistency sampler, but found {eta!r}.")
    return sample_consistency(method, num, steps=steps, sigmas=sigmas, generator=generator)


register_sampler("consistency", "consistency", _consistency_sampler)


# ----------------------------------------------------------------------------- training loop


def _sample_quality(cm: nn.Module, val_data: Tensor, seed: int) -> float:
    """Sliced Wasserstein-2 between up to 2,000 one-step samples (common random numbers) and ``val_data``."""
    num = min(val_data.shape[0], 2000)
    with torch.no_grad(), seeded(seed, val_data):
        x = cm.sample(num, steps=1)
    return sliced_wasserstein(x.flatten(1).cpu().double(), val_data[:num].flatten(1).cpu().double())


def _resolve_teacher(
    cm: Consistency, teacher: nn.Module | str | os.PathLike | None, device
) -> nn.Module | None:
    if teacher is None:
        teacher = cm.config.get("teacher")
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_teacher(os.fspath(teacher), device=device)
    check_teacher(teacher, cm.config)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def fit_consistency(
    cm: Consistency,
    data: Tensor,
    *,
    val_data: Tensor | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    teacher: nn.Module | str | os.PathLike | None = None,
    grad_clip: float | None = None,
    val_every: int = 100,
    val_fn: Callable[[nn.Module, Tensor], float] | None = None,
    patience: int | None = None,
    log_every: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    run_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    ema_decay: float | None = None,
) -> ConsistencyResult:
    r"""Train a consistency model by distillation (with a teacher) or by consistency training (without).

    Each step draws a minibatch, evaluates :func:`consistency_distillation_loss` (teacher: ``teacher``,
    else ``cm.config["teacher"]``, N = ``num_scales``, :math:`\mu` = ``target_decay``) or
    :func:`consistency_training_loss` (N(k), :math:`\mu(k)` by
    :func:`~probgen.models.consistency.ct_schedule` over ``steps``), takes an Adam step on the online
    network and moves the target :math:`\theta^- \leftarrow \mu \theta^- + (1 - \mu) \theta` (no gradient).
    ``ema_decay`` keeps a *separate* average for sampling, as :func:`~probgen.inference.svi.fit` does.

    Args:
        cm: a :class:`~probgen.models.consistency.Consistency`.
        data: training observations ``(N, D)``.
        val_data: validation observations ``(M, D)``; the parameters with the lowest ``val_fn`` are
            saved as checkpoint ``best`` and returned.
        steps: total number of optimizer steps K (a resumed run continues to it; CT's schedule uses it).
        batch_size: minibatch size B.
        lr: Adam's learning rate.
        teacher: a ``score-sde`` method or run directory (None: ``cm.config["teacher"]``; None there too:
            consistency training). It must have the model's SDE and data shape.
        grad_clip: clip the global gradient norm to this value.
        val_every: validate every this many steps (and at the end).
        val_fn: ``val_fn(cm, val_data) -> float``, lower is better; default the sliced Wasserstein-2
            distance of up to 2,000 one-step samples (common random numbers from ``seed``).
        patience: stop after this many validations without improvement.
        log_every: record the mean objective every this many steps.
        seed: seeds the global RNG (n, z) and the minibatch order.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        run_dir: directory for checkpoints ``last`` and ``best``.
        checkpoint_every: save ``last`` every this many steps (default ``val_every``).
        resume: continue from ``run_dir``'s ``last`` checkpoint.
        metadata: extra JSON-serializable checkpoint metadata (``{"method": "consistency", "config": ...}``).
        progress: show a tqdm progress bar.
        callback: ``callback(step, loss)`` after every step.
        ema_decay: the sampling EMA's decay in (0, 1), or None.

    Returns:
        A :class:`ConsistencyResult`; ``cm`` holds the best parameters with validation, else the last
        (the sampling averages with ``ema_decay``).

    Raises:
        ValueError: bad arguments, or a teacher of another method, SDE or data shape.
        TrainingError: on a non-finite objective (``last`` keeps the last good state).
        KeyboardInterrupt: after saving ``last`` when interrupted.
    """
    if not isinstance(cm, Consistency):
        raise ValueError(f"Expected a Consistency model, but found {type(cm).__name__}.")
    _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience)
    if ema_decay is not None and (isinstance(ema_decay, bool) or not 0 < float(ema_decay) < 1):
        raise ValueError(f"Expected ema_decay in (0, 1) or None, but found {ema_decay!r}.")
    cm.check_data(data)
    if resume and run_dir is None:
        raise ValueError("Expected a run_dir to resume from, but found None.")
    checkpoint_every = checkpoint_every or val_every
    device = torch.device(device) if device is not None else _default_device()
    run_dir = Path(run_dir) if run_dir is not None else None
    cm.to(device)
    teacher = _resolve_teacher(cm, teacher, device)
    mode = "training" if teacher is None else "distillation"
    data = data.to(device)
    val_data = val_data.to(device) if val_data is not None else None
    val_fn = val_fn or (lambda m, v: _sample_quality(m, v, seed))
    cfg = cm.config
    opt = torch.optim.Adam(cm.parameters(), lr=lr)
    target = copy.deepcopy(cm).requires_grad_(False).eval()
    ema = _EMA(cm, float(ema_decay)) if ema_decay is not None else None
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, mode=mode)

    result = ConsistencyResult(run_dir=run_dir, mode=mode)
    torch.manual_seed(seed)  # n and z come from torch's global RNG; nothing else is seeded
    if resume and has_checkpoint(run_dir, "last"):
        _restore(run_dir, cm, opt, result, device, ema)
        tensors = load_checkpoint(run_dir, "last", device=device)[0]
        saved = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
        target.load_state_dict(saved if saved else cm.state_dict())

    def save(tag: str) -> None:
        if run_dir is None:
            return
        tensors = {f"model.{k}": v for k, v in cm.state_dict().items()}
        meta: dict[str, Any] = {**(metadata or {}), "step": result.step, "fit": settings}
        meta.update(best_step=result.best_step, best_val=result.best_val, history=result.history)
        if tag == "last":
            tensors.update({f"target.{k}": v for k, v in target.state_dict().items()})
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
            opt_tensors, meta["optimizer_state"] = flatten_state(opt.state_dict(), "optim")
            tensors.update(opt_tensors, **{"rng.torch": torch.get_rng_state()})
        save_checkpoint(run_dir, tag, tensors, meta)

    grids: dict[int, Tensor] = {}

    def grid(n: int) -> Tensor:
        if n not in grids:
            grids[n] = discretization_times(cm.sde_object, n, cm.eps, cfg["rho"]).to(device)
        return grids[n]

    sde, opts = cm.sde_object, dict(distance=cfg["distance"], huber_c=cfg["huber_c"])
    minibatches = _Minibatches(data.shape[0], batch_size, seed)
    since_best, best_state, window = 0, None, []
    bar = tqdm(
        total=steps, initial=result.step, disable=not progress, desc="fit_consistency", dynamic_ncols=True
    )
    stop = _InterruptFlag()
    try:
        with stop:
            while result.step < steps:
                x = data[minibatches(result.step)]
                cm.train()
                if teacher is not None:
                    n, mu = cfg["num_scales"], cfg["target_decay"]
                    loss = consistency_distillation_loss(
                        cm.consistency_function,
                        target.consistency_function,
                        sde,
                        teacher.score,
                        x,
                        grid(n),
                        **opts,
                    )
                else:
                    n, mu = ct_schedule(result.step, steps, cfg["s0"], cfg["s1"], cfg["mu0"])
                    loss = consistency_training_loss(
                        cm.consistency_function, target.consistency_function, sde, x, grid(n), **opts
                    )
                if not torch.isfinite(loss):
                    if all(torch.isfinite(p).all() for p in cm.parameters()):
                        save("last")
                    where = f"; the last good checkpoint is kept in {run_dir}" if run_dir is not None else ""
                    raise TrainingError(f"Non-finite consistency objective at step {result.step + 1}{where}.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(cm.parameters(), grad_clip)
                opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(
                        list(target.parameters()), [p.detach() for p in cm.parameters()], 1 - mu
                    )
                result.step += 1
                if ema is not None:
                    ema.update(result.step)
                value = loss.item()
                window.append(value)
                if callback is not None:
                    callback(result.step, value)
                if len(window) == log_every or result.step == steps:
                    result.history["train"].append((result.step, sum(window) / len(window)))
                    window.clear()
                    bar.set_postfix(loss=f"{result.history['train'][-1][1]:.4g}", N=n, refresh=False)
                bar.update(1)
                if val_data is not None and (result.step % val_every == 0 or result.step == steps):
                    cm.eval()
                    with ema.swapped() if ema is not None else contextlib.nullcontext():
                        score = float(val_fn(cm, val_data))
                        result.history["val"].append((result.step, score))
                        if result.best_val is None or score < result.best_val:
                            result.best_val, result.best_step, since_best = score, result.step, 0
                            save("best")
                            best_state = {k: v.detach().clone() for k, v in cm.state_dict().items()}
                        else:
                            since_best += 1
                    result.stopped_early = patience is not None and since_best >= patience
                if result.step % checkpoint_every == 0 or result.step == steps or result.stopped_early:
                    save("last")
                if result.stopped_early:
                    break
                if stop.requested:
                    save("last")
                    raise KeyboardInterrupt
    finally:
        bar.close()
    if best_state is not None:
        cm.load_state_dict(best_state)
    elif result.best_step is not None and run_dir is not None and has_checkpoint(run_dir, "best"):
        _load_model_state(cm, load_checkpoint(run_dir, "best", device=device)[0])
    elif ema is not None:
        ema.copy_to_method()
    cm.eval()
    return result


register_trainer("consistency", fit_consistency)
