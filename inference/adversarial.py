r"""Two-player fitting of GAN programs: each player's objective is read from Pyro traces.

Goodfellow et al. 2014 (arXiv:1406.2661), Algorithm 1, with the non-saturating generator
objective. A GAN (:class:`probgen.models.gan.GAN`) provides two programs: the generator
program ``model(batch_size=B)`` (sites ``"z"`` and the deterministic ``"x"``) and the
discriminator likelihood ``discriminator_program(x, real)`` (site ``"real"``, and
``"r1"`` with a gradient penalty). The objectives are log-probabilities of those traces,
scaled by ``poutine.scale(1 / B)`` so they read as nats per example:

* :func:`discriminator_loss`: minus the log-probability of the traces of the discriminator
  program on a real batch observed at ``real=True`` (with the R1 factor of Mescheder et al.
  2018, arXiv:1801.04406) and on a generated batch, taken as a constant, at ``real=False``;
* :func:`generator_loss`: minus the log-probability of the trace of the discriminator program,
  its parameters frozen, on a batch traced through the generator program, at ``real=True``.

:func:`fit_adversarial` alternates ``d_steps`` discriminator updates and one generator update,
each player with its own ``torch.optim.Adam``. It keeps the conventions of
:func:`probgen.inference.svi.fit`: minibatches as a function of ``(seed, step)``, checkpoints
``last`` (parameters, both optimizers' states, RNG state, optional EMA) and ``best`` (lowest
validation score) that :func:`probgen.models.load_method` reads, exact resume, a
:class:`~probgen.inference.svi.TrainingError` on a non-finite objective, Ctrl-C saving ``last``.

:func:`register_trainer` / :func:`trainer_for` map a method name to its training function
(``fit`` unless registered), so the command line trains every method with one call.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as torch_dist
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from probgen.checkpoint import flatten_state, has_checkpoint, load_checkpoint, save_checkpoint
from probgen.inference._util import seeded
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
    fit,
)
from probgen.metrics import sliced_wasserstein

__all__ = [
    "AdversarialResult",
    "discriminator_loss",
    "fit_adversarial",
    "generated_batch",
    "generator_loss",
    "register_trainer",
    "trainer_for",
]

_PLAYERS = ("discriminator", "generator")


@dataclass
class AdversarialResult(FitResult):
    """What :func:`fit_adversarial` returns: a :class:`~probgen.inference.svi.FitResult` whose
    history holds ``"discriminator"`` and ``"generator"`` losses (nats per example, means over
    ``log_every`` steps) and ``"val"`` scores, named by :attr:`val_metric`."""

    val_metric: str = "sliced Wasserstein-2 to the validation data"


# ----------------------------------------------------------------------------- objectives


def _log_joint(program: Callable[..., Any], batch: int, *args: Any, **kwargs: Any) -> Tensor:
    """Log-probability of a trace of ``program`` (every site, factors included), per example."""
    trace = poutine.trace(poutine.scale(program, scale=1.0 / batch)).get_trace(*args, **kwargs)
    return trace.log_prob_sum()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Hold ``module``'s parameters constant inside the block (no gradient reaches them)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def generated_batch(gan: nn.Module, batch_size: int, *, z: Tensor | None = None) -> Tensor:
    r"""Trace the generator program and return its site ``"x"``, ``(B, D)``.

    Args:
        gan: a GAN.
        batch_size: B.
        z: latents ``(B, latent_dim)`` to condition the site ``"z"`` on (default: sampled).
    """
    program = gan.model if z is None else poutine.condition(gan.model, data={"z": z})
    return poutine.trace(program).get_trace(None, batch_size=batch_size).nodes["x"]["value"]


def discriminator_loss(gan: nn.Module, x_real: Tensor, x_fake: Tensor, *, r1_gamma: float = 0.0) -> Tensor:
    r"""The discriminator's loss in nats per example, read from traces of its program.

    .. math::
        -\tfrac{1}{B}\sum_i \log \mathrm{Bern}(1 \mid \sigma(D(x_i))) - \tfrac{1}{B'}\sum_j
        \log \mathrm{Bern}(0 \mid \sigma(D(\tilde x_j))) + \tfrac{\gamma}{2B}\sum_i
        \lVert \nabla_x D(x_i) \rVert^2

    Args:
        gan: a GAN.
        x_real: data ``(B, D)``.
        x_fake: generated samples ``(B', D)``; detached, so no gradient reaches the generator.
        r1_gamma: :math:`\gamma` of the R1 penalty on the real batch.

    Returns:
        A scalar tensor; its gradient reaches the discriminator's parameters only.
    """
    real = _log_joint(gan.discriminator_program, x_real.shape[0], x_real, True, r1_gamma=r1_gamma)
    fake = _log_joint(gan.discriminator_program, x_fake.shape[0], x_fake.detach(), False)
    return -(real + fake)


def generator_loss(gan: nn.Module, batch_size: int, *, z: Tensor | None = None) -> Tensor:
    r"""The generator's non-saturating loss in nats per example, read from traces.

    A batch is traced through the generator program and scored by the discriminator program
    at ``real=True`` with the discriminator's parameters frozen:
    :math:`-\tfrac{1}{B}\sum_j \log \mathrm{Bern}(1 \mid \sigma(D(G(z_j))))`.

    Args:
        gan: a GAN.
        batch_size: B.
        z: latents ``(B, latent_dim)`` to condition the generator program on (default: sampled).

    Returns:
        A scalar tensor; its gradient reaches the generator's parameters only.
    """
    x_fake = generated_batch(gan, batch_size, z=z)
    with _frozen(gan.discriminator):
        return -_log_joint(gan.discriminator_program, batch_size, x_fake, True)


# ----------------------------------------------------------------------------- trainer registry

_TRAINERS: dict[str, Callable[..., FitResult]] = {}


def register_trainer(method_name: str, fn: Callable[..., FitResult]) -> None:
    """Train the method ``method_name`` with ``fn`` (which takes :func:`~probgen.inference.svi.fit`'s
    arguments ``(method, data, *, val_data, steps, batch_size, lr, seed, val_every, patience, device,
    run_dir, resume, metadata, progress, ema_decay)`` and returns a ``FitResult``)."""
    if not isinstance(method_name, str) or not method_name:
        raise ValueError(f"Expected a non-empty method name, but found {method_name!r}.")
    if not callable(fn):
        raise ValueError(f"Expected a callable trainer, but found {type(fn).__name__}.")
    _TRAINERS[method_name] = fn


def trainer_for(method_name: str, default: Callable[..., FitResult] = fit) -> Callable[..., FitResult]:
    """The training function registered for a method, else ``default`` (SVI's :func:`fit`)."""
    return _TRAINERS.get(method_name, default)


# ----------------------------------------------------------------------------- training loop


class _Optimizers:
    """The two players' optimizers, checkpointed as one state dict."""

    def __init__(self, gan: nn.Module, lr_g: float, lr_d: float, betas: tuple[float, float]) -> None:
        self.generator = torch.optim.Adam(gan.generator.parameters(), lr=lr_g, betas=betas)
        self.discriminator = torch.optim.Adam(gan.discriminator.parameters(), lr=lr_d, betas=betas)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in _PLAYERS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in _PLAYERS:
            getattr(self, name).load_state_dict(state[name])

    def update(self, player: str, loss: Tensor) -> None:
        opt = getattr(self, player)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _check_adversarial_args(gan, lr_g, lr_d, betas, d_steps, r1_gamma, ema_decay) -> None:
    for name in ("generator", "discriminator", "model", "discriminator_program"):
        if not hasattr(gan, name):
            raise ValueError(f"Expected a GAN with a {name!r} attribute, but found {type(gan).__name__}.")
    for name, value in (("lr_g", lr_g), ("lr_d", lr_d)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"Expected a positive finite {name} or None, but found {value!r}.")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"Expected betas as two numbers in [0, 1), but found {betas!r}.")
    if isinstance(d_steps, bool) or not isinstance(d_steps, int) or d_steps < 1:
        raise ValueError(f"Expected d_steps to be a positive integer, but found {d_steps!r}.")
    if isinstance(r1_gamma, bool) or not isinstance(r1_gamma, (int, float)) or not r1_gamma >= 0:
        raise ValueError(f"Expected r1_gamma >= 0, but found {r1_gamma!r}.")
    if ema_decay is not None and (
        isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 < ema_decay < 1
    ):
        raise ValueError(f"Expected ema_decay in (0, 1) or None, but found {ema_decay!r}.")
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        raise ValueError(
            f"Expected a single process, but found a process group of {torch_dist.get_world_size()} ranks "
            "(fit_adversarial is not distributed)."
        )


def _sample_quality(gan: nn.Module, val_data: Tensor, seed: int) -> float:
    """Sliced Wasserstein-2 between up to 2,000 generated points and the validation data."""
    num = min(val_data.shape[0], 2000)
    with torch.no_grad(), seeded(seed, val_data):
        x = generated_batch(gan, num)
    return sliced_wasserstein(x.cpu(), val_data[:num].cpu())


class _Selection:
    """Model selection on validation data: the ``best`` checkpoint, early stopping, what is returned."""

    def __init__(self, gan, val_data, val_fn, every: int, patience: int | None, ema, save) -> None:
        self.gan, self.val_data, self.val_fn, self.ema, self.save = gan, val_data, val_fn, ema, save
        self.every, self.patience = every, patience
        self.best_state: dict[str, Tensor] | None = None
        self.since_best = 0

    def after_step(self, result: AdversarialResult, final: bool) -> None:
        """Validate at every ``every``-th step and the last; record, save ``best``, count patience."""
        if self.val_data is None or not (final or result.step % self.every == 0):
            return
        self.gan.eval()
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            score = float(self.val_fn(self.gan, self.val_data))
            result.history["val"].append((result.step, score))
            improved = result.best_val is None or score < result.best_val
            if improved:
                result.best_val, result.best_step = score, result.step
                self.save("best")
                self.best_state = {k: v.detach().clone() for k, v in self.gan.state_dict().items()}
        self.since_best = 0 if improved else self.since_best + 1
        result.stopped_early = self.patience is not None and self.since_best >= self.patience

    def finish(self, result: AdversarialResult, device: torch.device) -> None:
        """Leave the best parameters (else the last; the averages with an EMA) in the GAN."""
        run_dir = result.run_dir
        if self.best_state is not None:
            self.gan.load_state_dict(self.best_state)
        elif result.best_step is not None and run_dir is not None and has_checkpoint(run_dir, "best"):
            _load_model_state(self.gan, load_checkpoint(run_dir, "best", device=device)[0])
        elif self.ema is not None:
            self.ema.copy_to_method()
        self.gan.eval()


def _nonfinite(
    player: str, step: int, gan: nn.Module, x: Tensor | None, run_dir: Path | None
) -> TrainingError:
    parts = [f"Non-finite {player} objective at step {step}"]
    if x is not None and not torch.isfinite(x).all():
        parts.append("the data batch has non-finite values")
    bad = [n for n, p in gan.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        parts.append(f"non-finite parameters: {', '.join(bad[:5])}")
    if run_dir is not None:
        parts.append(f"the last good checkpoint is kept in {run_dir}")
    return TrainingError("; ".join(parts) + ".")


def _checked(validate: bool, objective: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor | None:
    """``objective(*args, **kwargs)``, or None where it is non-finite (or validation finds invalid values)."""
    try:
        with pyro.validation_enabled(validate):
            value = objective(*args, **kwargs)
    except ValueError as exc:  # distribution validation caught a non-finite parameter
        if "invalid values" not in str(exc):
            raise
        return None
    return value if torch.isfinite(value) else None


def fit_adversarial(
    gan: nn.Module,
    data: Tensor,
    *,
    val_data: Tensor | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-4,
    lr_g: float | None = None,
    lr_d: float | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
    d_steps: int = 1,
    r1_gamma: float = 0.0,
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
    validate: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    ema_decay: float | None = None,
) -> AdversarialResult:
    r"""Fit a GAN by alternating updates of its two players (Goodfellow et al. 2014, Algorithm 1).

    Every step makes ``d_steps`` discriminator updates (each on a fresh data minibatch and a
    fresh generated batch of the same size, :func:`discriminator_loss`) and then one generator
    update (:func:`generator_loss`), each with its own Adam optimizer. Single process only.

    Args:
        gan: a :class:`probgen.models.gan.GAN` (or a module with ``generator``,
            ``discriminator``, ``model`` and ``discriminator_program``).
        data: training observations ``(N, D)``.
        val_data: validation observations ``(M, D)``; the parameters with the lowest
            ``val_fn`` are saved as checkpoint ``best`` and returned.
        steps: total number of generator updates (a resumed run continues to it).
        batch_size: minibatch size B of both players.
        lr: learning rate of both players unless ``lr_g`` / ``lr_d`` are given.
        lr_g, lr_d: the generator's and the discriminator's learning rates.
        betas: Adam's betas; (0.5, 0.999) as in DCGAN (Radford et al. 2015,
            arXiv:1511.06434), (0.0, 0.9) is common with a gradient penalty.
        d_steps: discriminator updates per generator update (k in Algorithm 1).
        r1_gamma: :math:`\gamma` of the R1 penalty (0: none).
        val_every: validate every this many steps (and at the end).
        val_fn: ``val_fn(gan, val_data) -> float``, lower is better; default the sliced
            Wasserstein-2 distance between up to 2,000 samples (common random numbers from
            ``seed``) and the validation data.
        patience: stop after this many validations without improvement.
        log_every: record the players' mean losses every this many steps.
        seed: seeds Pyro's sampling (torch's global RNG) and the minibatch order.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        run_dir: directory for checkpoints ``last`` and ``best``.
        checkpoint_every: save ``last`` every this many steps (default ``val_every``); also at
            the end and on Ctrl-C.
        resume: continue from ``run_dir``'s ``last`` checkpoint.
        metadata: extra JSON-serializable metadata for the checkpoints (e.g.
            ``{"method": "gan", "config": gan.config, "data": "eight_gaussians"}``).
        progress: show a tqdm progress bar with both players' losses.
        validate: keep Pyro's validation on for every step (default: the first step only).
        callback: called as ``callback(step, {"discriminator": loss, "generator": loss})``
            after every step.
        ema_decay: keep an exponential moving average of the parameters as
            :func:`~probgen.inference.svi.fit` does (for the generator this is the averaging of
            Yazıcı et al. 2019, arXiv:1806.04498); validation, ``best`` and the returned GAN use it.

    Returns:
        An :class:`AdversarialResult`; the GAN holds the best parameters when validation was
        used, else the last (the averages with ``ema_decay``).

    Raises:
        TrainingError: on a non-finite objective, naming the step and the player. ``last`` holds
            the last good state: it is saved before raising when the step had not yet updated any
            parameter, else the previous ``last`` is kept.
        KeyboardInterrupt: after saving ``last`` when interrupted.
    """
    _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience)
    _check_adversarial_args(gan, lr_g, lr_d, betas, d_steps, r1_gamma, ema_decay)
    if hasattr(gan, "check_data"):
        gan.check_data(data)
    if resume and run_dir is None:
        raise ValueError("Expected a run_dir to resume from, but found None.")
    lr_g, lr_d = lr_g or lr, lr_d or lr
    checkpoint_every = checkpoint_every or val_every
    device = torch.device(device) if device is not None else _default_device()
    run_dir = Path(run_dir) if run_dir is not None else None
    gan.to(device)
    data = data.to(device)
    val_data = val_data.to(device) if val_data is not None else None
    val_fn = val_fn or (lambda m, v: _sample_quality(m, v, seed))
    opts = _Optimizers(gan, lr_g, lr_d, tuple(betas))
    ema = _EMA(gan, float(ema_decay)) if ema_decay is not None else None
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, lr_g=lr_g, lr_d=lr_d, betas=list(betas),
        d_steps=d_steps, r1_gamma=r1_gamma, seed=seed, ema_decay=ema_decay,
    )  # fmt: skip

    result = AdversarialResult(run_dir=run_dir, history={"discriminator": [], "generator": [], "val": []})
    torch.manual_seed(seed)  # Pyro samples from torch's global RNG; nothing else is seeded
    if resume and has_checkpoint(run_dir, "last"):
        _restore(run_dir, gan, opts, result, device, ema)
        result.history = {k: result.history.get(k, []) for k in (*_PLAYERS, "val")}

    def save(tag: str) -> None:
        if run_dir is None:
            return
        tensors = {f"model.{k}": v for k, v in gan.state_dict().items()}
        meta: dict[str, Any] = {**(metadata or {}), "step": result.step, "fit": settings}
        meta.update(best_step=result.best_step, best_val=result.best_val, history=result.history)
        if tag == "last":
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
            opt_tensors, meta["optimizer_state"] = flatten_state(opts.state_dict(), "optim")
            tensors.update(opt_tensors, **{"rng.torch": torch.get_rng_state()})
        save_checkpoint(run_dir, tag, tensors, meta)

    start = result.step

    def objective(player: str, x: Tensor | None, first_update: bool, fn: Callable[..., Tensor], *args, **kw):
        loss = _checked(validate or result.step == start, fn, *args, **kw)
        if loss is None:
            # Only before the step's first update is the state a consistent step to save.
            if first_update and all(torch.isfinite(p).all() for p in gan.parameters()):
                save("last")
            raise _nonfinite(player, result.step + 1, gan, x, run_dir)
        return loss

    selection = _Selection(gan, val_data, val_fn, val_every, patience, ema, save)
    minibatches = _Minibatches(data.shape[0], batch_size, seed)
    window: dict[str, list[float]] = {key: [] for key in _PLAYERS}
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="fit_adversarial", dynamic_ncols=True)
    stop = _InterruptFlag()
    try:
        with stop:
            while result.step < steps:
                gan.train()
                for k in range(d_steps):
                    x = data[minibatches(result.step * d_steps + k)]
                    with torch.no_grad():
                        x_fake = generated_batch(gan, batch_size)
                    d_loss = objective(
                        "discriminator", x, k == 0, discriminator_loss, gan, x, x_fake, r1_gamma=r1_gamma
                    )
                    opts.update("discriminator", d_loss)
                g_loss = objective("generator", None, False, generator_loss, gan, batch_size)
                opts.update("generator", g_loss)
                result.step += 1
                if ema is not None:
                    ema.update(result.step)
                losses = {"discriminator": d_loss.item(), "generator": g_loss.item()}
                if callback is not None:
                    callback(result.step, dict(losses))
                for key, value in losses.items():
                    window[key].append(value)
                if len(window["generator"]) == log_every or result.step == steps:
                    for key, values in window.items():
                        result.history[key].append((result.step, sum(values) / len(values)))
                        values.clear()
                    d, g = (result.history[key][-1][1] for key in _PLAYERS)
                    bar.set_postfix(d=f"{d:.4g}", g=f"{g:.4g}", refresh=False)
                bar.update(1)
                selection.after_step(result, final=result.step == steps)
                if result.step % checkpoint_every == 0 or result.step == steps or result.stopped_early:
                    save("last")
                if result.stopped_early:
                    break
                if stop.requested:
                    save("last")
                    raise KeyboardInterrupt
    finally:
        bar.close()
    selection.finish(result, device)
    return result


register_trainer("gan", fit_adversarial)
