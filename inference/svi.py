r"""``fit``: the one training loop for every model/guide pair.

The objective is Pyro's: ``elbo.differentiable_loss(model, guide, x)`` for the
ELBO the method names (an ELBO, an observed likelihood, ``poutine.scale``-d
terms or ``pyro.factor`` sites all arrive this way), divided by the batch size
so the loss reads as nats per example. Parameters are updated by one native
``torch.optim`` optimizer over ``method.parameters()`` rather than
``pyro.optim``'s one-optimizer-per-parameter wrapper (see
``benchmarks/svi_overhead.py`` for the measured difference).

Minibatches are a deterministic function of ``(seed, step)``, and checkpoints
hold parameters, optimizer state and RNG state, so a resumed run continues
exactly as an uninterrupted one would. With ``ema_decay``, an exponential moving
average of the parameters (Polyak averaging, as DDPM uses) is kept beside them and is
what validation sees, what ``best`` holds and what the method holds on return. Under
``torchrun`` the same loop runs data-parallel with ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as torch_dist
from pyro import poutine
from pyro.infer import ELBO
from torch import nn
from tqdm.auto import tqdm

from probgen.checkpoint import (
    flatten_state,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from probgen.inference._util import sample_sites, seeded

__all__ = ["fit", "FitResult", "TrainingError", "ELBOLoss", "elbo_per_example"]


class TrainingError(RuntimeError):
    """A run stopped because training went wrong (e.g. a non-finite loss)."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: ``{"train": [(step, loss), ...], "val": [(step, score), ...]}``;
            train losses are means over ``log_every`` steps, in nats per example.
        step: number of optimizer steps completed.
        best_step: step of the best validation score (None without validation).
        best_val: best validation score (lower is better).
        stopped_early: whether early stopping ended the run.
        run_dir: where checkpoints were written, if anywhere.
    """

    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"train": [], "val": []})
    step: int = 0
    best_step: int | None = None
    best_val: float | None = None
    stopped_early: bool = False
    run_dir: Path | None = None


class ELBOLoss(nn.Module):
    """A method's ELBO as a module: ``forward(x)`` is the loss in nats per example.

    Wrapping the objective in a module is what lets ``DistributedDataParallel``
    synchronize the gradients of every parameter the programs use.

    Args:
        method: a PyroModule with ``model(x)`` and ``guide(x)``.
        elbo: the Pyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``, ...).
    """

    def __init__(self, method: nn.Module, elbo: ELBO) -> None:
        super().__init__()
        self.method = method
        self.elbo = elbo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.method.model, self.method.guide, x) / x.shape[0]


@torch.no_grad()
def elbo_per_example(
    method: nn.Module,
    x: torch.Tensor,
    *,
    elbo: ELBO | None = None,
    batch_size: int = 1024,
    seed: int = 0,
) -> float:
    """Mean negative ELBO of ``x`` (``(N, D)``) in nats per example, with common random numbers.

    The global RNG is forked and seeded with ``seed``, so repeated evaluations
    of the same parameters give the same value and training randomness is
    untouched.
    """
    elbo = elbo if elbo is not None else method.elbo()
    total = 0.0
    with seeded(seed, x):
        for chunk in x.split(batch_size):
            total += float(elbo.loss(method.model, method.guide, chunk))
    return total / x.shape[0]


def fit(
    method: nn.Module,
    data: torch.Tensor,
    *,
    val_data: torch.Tensor | None = None,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    loss: ELBO | None = None,
    val_every: int = 100,
    val_fn: Callable[[nn.Module, torch.Tensor], float] | None = None,
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
    callback: Callable[[int, float], None] | None = None,
    ema_decay: float | None = None,
) -> FitResult:
    r"""Fit a model/guide pair by stochastic variational inference.

    Args:
        method: a PyroModule with ``model(x)``, ``guide(x)`` and ``elbo()``
            (a :class:`probgen.models.Method`, or any module with those).
        data: training observations, ``(N, D)``.
        val_data: validation observations ``(M, D)`` for model selection and
            early stopping; the best parameters are saved as checkpoint ``best``.
        steps: total number of optimizer steps (a resumed run continues to it).
        batch_size: global minibatch size B (split across ranks when distributed).
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (native ``torch.optim``).
        weight_decay: weight decay of the optimizer.
        grad_clip: clip the global gradient norm to this value.
        loss: the Pyro ELBO; default ``method.elbo()``.
        val_every: validate every this many steps (and at the end).
        val_fn: ``val_fn(method, val_data) -> float``, lower is better; default
            the negative ELBO in nats per example (:func:`elbo_per_example`).
        patience: stop after this many validations without improvement.
        log_every: record the mean training loss every this many steps.
        seed: seeds Pyro's sampling (global RNG, offset by rank) and the
            minibatch order.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        run_dir: directory for checkpoints ``last`` and ``best``.
        checkpoint_every: save ``last`` every this many steps (default
            ``val_every``); ``last`` is also saved at the end, on Ctrl-C and
            before raising on a non-finite loss (holding the last good step).
        resume: continue from ``run_dir``'s ``last`` checkpoint.
        metadata: extra JSON-serializable metadata stored in checkpoints (e.g.
            ``{"method": "vae", "config": {...}, "data": "digits"}``).
        progress: show a tqdm progress bar with the loss.
        validate: keep Pyro's distribution and shape validation on for every
            step. By default only the first step of a run is validated (catching
            shape and support errors at once); later steps skip the checks, and a
            non-finite loss is still caught at every step.
        callback: called as ``callback(step, loss)`` after every step.
        ema_decay: keep an exponential moving average of the floating-point
            parameters, :math:`\bar\theta \leftarrow d_t \bar\theta + (1 - d_t) \theta` after
            every optimizer step ``t`` (1, 2, ...), starting from the initial parameters,
            with the customary warm-up :math:`d_t = \min(d, (1 + t) / (10 + t))` so the
            average is not dominated by the random initialization early on (Ho et al. 2020
            use :math:`d = 0.9999`); buffers are copied, not averaged. Validation and the
            ``best`` checkpoint use the averaged weights; ``last`` holds the raw weights
            (``model.*``, to resume from) and the averaged ones (``ema.*``). None: no
            average. Must lie in (0, 1).

    Returns:
        A :class:`FitResult`. On return the method holds the best parameters
        when validation was used, else the last (the averaged ones with
        ``ema_decay``: the best average with validation, else the last average).

    Raises:
        TrainingError: on a non-finite loss, naming the step and the site to blame.
        KeyboardInterrupt: after saving ``last`` when interrupted.
    """
    _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience)
    if ema_decay is not None and (
        isinstance(ema_decay, bool)
        or not isinstance(ema_decay, (int, float))
        or not 0.0 < float(ema_decay) < 1.0
    ):
        raise ValueError(f"Expected ema_decay in (0, 1) or None, but found {ema_decay!r}.")
    if hasattr(method, "check_data"):
        method.check_data(data)
    if resume and run_dir is None:
        raise ValueError("Expected a run_dir to resume from, but found None.")
    checkpoint_every = checkpoint_every or val_every
    device = torch.device(device) if device is not None else _default_device()
    rank, world = _init_distributed(device)
    if batch_size % world:
        raise ValueError(f"Expected batch_size divisible by the world size {world}, but found {batch_size}.")
    is_main = rank == 0
    run_dir = Path(run_dir) if run_dir is not None else None

    method.to(device)
    data = data.to(device)
    val_data = val_data.to(device) if val_data is not None else None
    elbo = loss if loss is not None else method.elbo()
    objective: nn.Module = ELBOLoss(method, elbo)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = _make_optimizer(optimizer, method.parameters(), lr, weight_decay)
    val_fn = val_fn or (lambda m, v: elbo_per_example(m, v, elbo=elbo, seed=seed))

    result = FitResult(run_dir=run_dir)
    torch.manual_seed(seed + rank)  # Pyro samples from torch's global RNG; nothing else is seeded
    ema = _EMA(method, float(ema_decay)) if ema_decay is not None else None
    if resume and has_checkpoint(run_dir, "last"):
        _restore(run_dir, method, opt, result, device, ema)

    def checkpoint(tag: str) -> None:
        if run_dir is None or not is_main:
            return
        tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
        meta: dict[str, Any] = dict(metadata or {})
        meta.update(
            step=result.step,
            best_step=result.best_step,
            best_val=result.best_val,
            history=result.history,
            fit=dict(
                steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, ema_decay=ema_decay
            ),
        )
        if tag == "last":
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
            opt_tensors, opt_skeleton = flatten_state(opt.state_dict(), "optim")
            tensors.update(opt_tensors)
            tensors["rng.torch"] = torch.get_rng_state()
            meta["optimizer_state"] = opt_skeleton
        save_checkpoint(run_dir, tag, tensors, meta)

    stop = _InterruptFlag()
    n = data.shape[0]
    per_rank = batch_size // world
    minibatches = _Minibatches(n, batch_size, seed)
    since_best = 0
    first = True
    best_state: dict[str, torch.Tensor] | None = None
    window: list[float] = []
    bar = tqdm(
        total=steps,
        initial=result.step,
        disable=not (progress and is_main),
        desc="fit",
        dynamic_ncols=True,
    )
    try:
        with stop:
            while result.step < steps:
                idx = minibatches(result.step)
                x = data[idx[rank * per_rank : (rank + 1) * per_rank]]
                method.train()
                try:
                    with pyro.validation_enabled(validate or first):
                        value = objective(x)
                    invalid, first = None, False
                except ValueError as exc:  # distribution validation caught a non-finite parameter
                    if "invalid values" not in str(exc):
                        raise
                    value, invalid = None, exc
                if value is None or not torch.isfinite(value):
                    if all(torch.isfinite(p).all() for p in method.parameters()):
                        checkpoint("last")
                    message = _nonfinite_message(method, x, result.step + 1, run_dir)
                    raise TrainingError(message) from invalid
                opt.zero_grad(set_to_none=True)
                value.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(method.parameters(), grad_clip)
                opt.step()
                result.step += 1
                if ema is not None:
                    ema.update(result.step)
                loss_value = value.detach().item()
                window.append(loss_value)
                if callback is not None:
                    callback(result.step, loss_value)
                if len(window) == log_every or result.step == steps:
                    mean = sum(window) / len(window)
                    result.history["train"].append((result.step, mean))
                    window.clear()
                    bar.set_postfix(loss=f"{mean:.4g}", refresh=False)
                bar.update(1)
                if val_data is not None and (result.step % val_every == 0 or result.step == steps):
                    method.eval()
                    with ema.swapped() if ema is not None else contextlib.nullcontext():
                        score = float(val_fn(method, val_data))
                        result.history["val"].append((result.step, score))
                        if result.best_val is None or score < result.best_val:
                            result.best_val, result.best_step, since_best = score, result.step, 0
                            checkpoint("best")
                            best_state = {k: v.detach().clone() for k, v in method.state_dict().items()}
                        else:
                            since_best += 1
                    bar.set_postfix(loss=f"{loss_value:.4g}", val=f"{score:.4g}", refresh=False)
                    if patience is not None and since_best >= patience:
                        result.stopped_early = True
                if result.step % checkpoint_every == 0 or result.step == steps:
                    checkpoint("last")
                if result.stopped_early:
                    break
                if stop.requested:
                    checkpoint("last")
                    raise KeyboardInterrupt
    finally:
        bar.close()
    if result.stopped_early:
        checkpoint("last")
    if result.best_step is not None:
        if best_state is not None:
            method.load_state_dict(best_state)
        elif run_dir is not None and has_checkpoint(run_dir, "best"):
            _load_model_state(method, load_checkpoint(run_dir, "best", device=device)[0])
        elif ema is not None:
            ema.copy_to_method()
    elif ema is not None:
        ema.copy_to_method()
    method.eval()
    return result


def _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() < 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"Expected data of shape (N, D), but found {shape}.")
    if val_data is not None and (
        not isinstance(val_data, torch.Tensor) or val_data.shape[1:] != data.shape[1:]
    ):
        found = tuple(val_data.shape) if isinstance(val_data, torch.Tensor) else val_data
        raise ValueError(f"Expected val_data of shape (M, *{tuple(data.shape[1:])}), but found {found}.")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("val_every", val_every),
        ("log_every", log_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} to be a positive integer, but found {value!r}.")
    if patience is not None and patience < 1:
        raise ValueError(f"Expected patience >= 1 or None, but found {patience!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Expected a positive finite lr, but found {lr!r}.")
    if batch_size > data.shape[0]:
        raise ValueError(
            f"Expected batch_size <= the number of examples {data.shape[0]}, but found {batch_size}."
        )


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, if any; return (rank, world size)."""
    if not torch_dist.is_available():
        return 0, 1
    if not torch_dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch_dist.get_rank(), torch_dist.get_world_size()


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    makers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in makers:
        raise ValueError(f"Expected optimizer in {sorted(makers)}, but found {name!r}.")
    return makers[name](params, lr=lr, weight_decay=weight_decay)


class _Minibatches:
    """Global minibatch indices for each step: a pure function of (seed, step), one permutation per
    epoch (computed once per epoch, not per step)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = max(n // batch_size, 1)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]


class _EMA:
    """Exponential moving average of a module's floating-point parameters (buffers are copied).

    The averages are updated in place with one fused ``torch._foreach_lerp_`` per step.
    """

    def __init__(self, method: nn.Module, decay: float) -> None:
        self.method, self.decay = method, decay
        named = [(k, p) for k, p in method.named_parameters() if p.is_floating_point()]
        self.names = [k for k, _ in named]
        self.live = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the parameters after optimizer step ``step`` (1-based), with the warm-up decay."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.live], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state dict with the averages in place of the parameters."""
        state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        state.update(zip(self.names, self.average))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the averages from ``state`` (keys as in the method's state dict)."""
        missing = [k for k in self.names if k not in state]
        if missing:
            raise ValueError(f"Expected EMA tensors for every parameter, but found none for {missing[:3]}.")
        with torch.no_grad():
            for k, avg in zip(self.names, self.average):
                avg.copy_(state[k])

    @torch.no_grad()
    def copy_to_method(self) -> None:
        """Overwrite the method's parameters with the averages."""
        torch._foreach_copy_(self.live, self.average)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Hold the averages in the method inside the block, the raw parameters again after it."""
        raw = [p.detach().clone() for p in self.live]
        self.copy_to_method()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, raw)


def _load_model_state(method: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    method.load_state_dict(state)


def _restore(run_dir: Path, method: nn.Module, opt, result: FitResult, device, ema: _EMA | None) -> None:
    tensors, info = load_checkpoint(run_dir, "last", device=device)
    meta = info["metadata"]
    _load_model_state(method, tensors)
    if ema is not None:
        ema_state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        # A run started without an average starts one from the restored parameters.
        ema.load_state_dict(ema_state if ema_state else method.state_dict())
    if "optimizer_state" in meta:
        opt.load_state_dict(unflatten_state(tensors, meta["optimizer_state"], "optim"))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].cpu())
    result.step = int(meta["step"])
    result.best_step = meta.get("best_step")
    result.best_val = meta.get("best_val")
    result.history = {k: [tuple(p) for p in v] for k, v in meta.get("history", {}).items()}
    result.history.setdefault("train", [])
    result.history.setdefault("val", [])


def _nonfinite_message(method, x: torch.Tensor, step: int, run_dir: Path | None) -> str:
    """Name the step and, where one is to blame, the first site with a non-finite value or log-prob."""
    culprit = None
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(method.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(x)
            for where, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in sample_sites(trace):
                    if not torch.isfinite(torch.as_tensor(site["value"], dtype=torch.float)).all():
                        culprit = f"{where} site {name!r} has a non-finite value"
                        break
                    lp = site["fn"].log_prob(site["value"])
                    if not torch.isfinite(lp).all():
                        culprit = f"{where} site {name!r} has a non-finite log-prob"
                        break
                if culprit:
                    break
    except Exception as exc:  # diagnosing must never hide the original problem
        culprit = f"could not trace the programs to find the site ({type(exc).__name__}: {exc})"
    bad_params = [n for n, p in method.named_parameters() if not torch.isfinite(p).all()]
    parts = [f"Non-finite loss at step {step}"]
    if culprit:
        parts.append(culprit)
    if bad_params:
        parts.append(f"non-finite parameters: {', '.join(bad_params[:5])}")
    if run_dir is not None:
        parts.append(f"the last good checkpoint is kept in {run_dir}")
    return "; ".join(parts) + "."


class _InterruptFlag:
    """Turn Ctrl-C into a flag checked between steps, so parameters are never half-updated."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
