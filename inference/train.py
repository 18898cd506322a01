r"""``fit``: the one training loop, for every objective of every method.

A method hands out its objective (``method.objective()``, a :class:`~probgen.objectives.Objective`):
the ELBO of its model/guide, a GAN's two players, consistency distillation or training with a
target network, a progressive-distillation stage. ``fit`` drives any of them and gives all of them
the same machinery:

* minibatches as a pure function of ``(seed, step)`` (one permutation per epoch), so the data
  order needs no saving;
* one native ``torch.optim`` optimizer per player (Adam by default; the objective may set a
  player's learning rate and betas);
* validation-based selection (checkpoint ``best``) and early stopping, an EMA of the weights
  (Polyak averaging) that validation and ``best`` use;
* atomic checkpoints ``last``/``best`` (:mod:`probgen.checkpoint`) that hold everything a resumed
  run needs: parameters, every player's optimizer state, the EMA, the objective's own state (a
  target network), every rank's RNG state, the early-stopping state and the pending loss window,
  so a resumed run equals an uninterrupted one;
* a divergence guard: ``last`` is only replaced by a state whose losses were finite for the whole
  checkpoint interval and whose parameters, optimizer state and EMA are finite; a non-finite loss,
  non-finite parameters or optimizer state, or a validation score that explodes
  (``divergence_factor``) stops the run with a :class:`TrainingError` that names the step (and the
  site, where one is to blame) and the step that ``last`` still holds;
* Ctrl-C saves ``last`` between steps; a progress bar; loss curves in :attr:`FitResult.history`;
* ``torchrun`` data parallelism: every rank joins the process group, ranks are seeded apart, each
  player's gradients are all-reduced (with the loss and the stop flag, so all ranks stop together),
  and only rank 0 writes the run directory.
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
from pyro.infer import ELBO
from torch import Tensor, nn
from tqdm.auto import tqdm

from probgen.checkpoint import (
    flatten_state,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from probgen.objectives import ELBOObjective, Objective

__all__ = ["FitResult", "TrainingError", "fit", "run_record"]

#: fit options a resumed run must share with the saved one (else it could not continue exactly).
_FIXED_ON_RESUME = ("batch_size", "seed", "optimizer", "ema_decay")


class TrainingError(RuntimeError):
    """A run stopped because training went wrong (a non-finite loss, divergence)."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: ``{name: [(step, value), ...]}``: the training loss of every player (``"train"``
            for a one-player objective; means over ``log_every`` steps) and the ``"val"`` scores.
        step: number of optimizer steps completed.
        best_step: step of the best validation score (None without validation).
        best_val: best validation score (lower is better).
        stopped_early: whether early stopping ended the run.
        run_dir: where checkpoints were written, if anywhere.
        val_metric: what the validation score is.
    """

    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"val": []})
    step: int = 0
    best_step: int | None = None
    best_val: float | None = None
    stopped_early: bool = False
    run_dir: Path | None = None
    val_metric: str = ""


def run_record(method: nn.Module) -> dict[str, Any]:
    """What :func:`probgen.models.load_method` needs to rebuild ``method``: its name, class and config.

    A module without a ``config`` dict (not a :class:`probgen.models.Method`) records its class only:
    its checkpoints hold the tensors, but ``load_method`` cannot rebuild it.
    """
    cls = type(method)
    record: dict[str, Any] = {
        "method": getattr(method, "name", "") or cls.__name__.lower(),
        "method_class": f"{cls.__module__}:{cls.__qualname__}",
    }
    config = getattr(method, "config", None)
    if isinstance(config, dict):
        record["config"] = config
    return record


def fit(
    method: nn.Module,
    data: Tensor,
    *,
    objective: Objective | None = None,
    loss: ELBO | None = None,
    val_data: Tensor | None = None,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
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
    validate: bool = False,
    callback: Callable[[int, Any], None] | None = None,
    ema_decay: float | None = None,
    divergence_factor: float = 100.0,
) -> FitResult:
    r"""Fit ``method`` by driving its objective.

    Args:
        method: a method (a :class:`probgen.models.Method`, or any module with ``objective()``, or
            with ``model``/``guide``/``elbo()``, whose objective is then the ELBO).
        data: training observations ``(N, D)``.
        objective: the objective to drive (default ``method.objective()``).
        loss: a Pyro ELBO to train model/guide with instead (``objective=ELBOObjective(method, loss)``).
        val_data: validation observations ``(M, D)`` for model selection and early stopping; the
            best parameters are saved as checkpoint ``best``.
        steps: total number of optimizer steps (a resumed run continues to it).
        batch_size: global minibatch size B (split across ranks when distributed).
        lr: learning rate of every player that does not set its own. Given with ``resume``, it
            replaces the restored optimizers' rate (recorded in the run's ``lr_history``).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (native ``torch.optim``).
        weight_decay: weight decay of the optimizers.
        grad_clip: clip each player's global gradient norm to this value.
        val_every: validate every this many steps (and at the end).
        val_fn: ``val_fn(method, val_data) -> float``, lower is better; default the objective's
            (:meth:`~probgen.objectives.Objective.validate`: the negative ELBO in nats per example
            for an ELBO, a sliced Wasserstein distance of samples for a GAN or a consistency model).
        patience: stop after this many validations without improvement.
        log_every: record the mean training losses every this many steps.
        seed: seeds the global RNG (offset by rank) that Pyro's sampling uses, and the minibatch
            order.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        run_dir: directory for checkpoints ``last`` and ``best``; the run record (method name,
            class and config, from ``method.config``) is saved with them, so
            :func:`probgen.models.load_method` rebuilds the method without further metadata.
        checkpoint_every: save ``last`` every this many steps (default ``val_every``); it is also
            saved at the end and on Ctrl-C, never from a state that failed the divergence guard.
        resume: continue from ``run_dir``'s ``last`` checkpoint (a directory without one starts
            afresh). ``batch_size``, ``seed``, ``optimizer`` and ``ema_decay`` must be the saved
            run's; ``steps``, ``lr`` and the validation options take effect.
        metadata: extra JSON-serializable metadata stored in the checkpoints (e.g. ``{"data":
            "digits", "form": "int"}``); it may not contradict the run record.
        progress: show a tqdm progress bar with the losses.
        validate: keep Pyro's distribution and shape validation on for every step (by default
            only the first step of a run is validated; a non-finite loss is caught at every step).
        callback: ``callback(step, loss)`` after every step; ``loss`` is a float for a one-player
            objective and ``{player: loss}`` otherwise.
        ema_decay: keep an exponential moving average of the floating-point parameters,
            :math:`\bar\theta \leftarrow d_t \bar\theta + (1 - d_t)\theta` after step ``t`` with
            :math:`d_t = \min(d, (1 + t)/(10 + t))`; validation, ``best`` and the returned method
            use the average, ``last`` holds both. Must lie in (0, 1) or be None.
        divergence_factor: a validation score above
            :math:`\text{best} + f \max(|\text{best}|, 1)` (or a non-finite one) is divergence, and so
            is a player's mean loss over ``log_every`` steps above
            :math:`\text{lowest} + f \max(|\text{lowest}|, 1)`, lowest its lowest single-step loss.

    Returns:
        A :class:`FitResult`. On return the method holds the best parameters when validation was
        used, else the last (the averages with ``ema_decay``).

    Raises:
        TrainingError: divergence (see the module docstring); ``last`` keeps the last good state.
        KeyboardInterrupt: after saving ``last`` when interrupted.
        ValueError: bad arguments, or options a resumed run cannot change.
    """
    _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience, ema_decay)
    if hasattr(method, "check_data"):
        method.check_data(data)
    if resume and run_dir is None:
        raise ValueError("Expected a run_dir to resume from, but found None.")
    checkpoint_every = checkpoint_every or val_every
    device = torch.device(device) if device is not None else _default_device()
    rank, world, owns_group = _init_distributed(device)
    try:
        if batch_size % world:
            raise ValueError(
                f"Expected batch_size divisible by the world size {world}, but found {batch_size}."
            )
        method.to(device)
        if loss is not None:
            if objective is not None:
                raise ValueError("Expected objective or loss (an ELBO), but found both.")
            objective = ELBOObjective(method, loss)
        elif objective is None:
            if hasattr(method, "objective"):
                objective = method.objective()
            elif all(hasattr(method, name) for name in ("model", "guide", "elbo")):
                objective = ELBOObjective(method)
            else:
                raise ValueError(
                    f"Expected a method that hands out its objective (objective()) or has model, guide "
                    f"and elbo(), but found {type(method).__name__} with neither."
                )
        if not isinstance(objective, Objective):
            raise ValueError(f"Expected an Objective, but found {type(objective).__name__}.")
        loop = _Loop(
            method, objective, data.to(device), val_data.to(device) if val_data is not None else None,
            steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
            grad_clip=grad_clip, val_every=val_every, val_fn=val_fn, patience=patience,
            log_every=log_every, seed=seed, device=device, run_dir=run_dir,
            checkpoint_every=checkpoint_every, metadata=metadata, progress=progress, validate=validate,
            callback=callback, ema_decay=ema_decay, divergence_factor=divergence_factor,
            rank=rank, world=world,
        )  # fmt: skip
        if resume and has_checkpoint(run_dir, "last"):
            loop.restore()
        return loop.run()
    finally:
        if owns_group:
            torch_dist.destroy_process_group()


class _Loop:
    """The state of one :func:`fit` call (see there for the arguments)."""

    def __init__(self, method, objective, data, val_data, **opts: Any) -> None:
        self.method, self.objective, self.data, self.val_data = method, objective, data, val_data
        self.__dict__.update(opts)
        self.run_dir = Path(self.run_dir) if self.run_dir is not None else None
        self.is_main = self.rank == 0
        self.result = FitResult(run_dir=self.run_dir, val_metric=_val_metric(objective, self.val_fn))
        self.players = objective.players()
        if not self.players:
            raise ValueError(
                f"Expected an objective with at least one player, but found none in {objective}."
            )
        self.optimizers = {
            name: _make_optimizer(self.optimizer, p.params, p.lr or self.lr, self.weight_decay, p.betas)
            for name, p in self.players.items()
        }
        self.log_names = {name: "train" if name == "model" and len(self.players) == 1 else name
                          for name in self.players}  # fmt: skip
        for key in self.log_names.values():
            self.result.history.setdefault(key, [])
        self.window: dict[str, list[float]] = {key: [] for key in self.log_names.values()}
        self.since_best = 0
        self.lowest: dict[str, float] = {}  # the lowest single-step loss of each player, for divergence
        self.best_state: dict[str, Tensor] | None = None
        self.lr_history: list[list[float]] = [[0, self.lr]]
        torch.manual_seed(self.seed + self.rank)  # Pyro samples from torch's global RNG
        self.ema = _EMA(self.method, float(self.ema_decay)) if self.ema_decay is not None else None
        self.minibatches = _Minibatches(self.data.shape[0], self.batch_size, self.seed)
        self.good_step: int | None = None  # the step that `last` holds
        self.record = dict(run_record(method)) if self.run_dir is not None else {}
        for key, value in (self.metadata or {}).items():
            if key in self.record and value != self.record[key] and key != "method":
                raise ValueError(f"Expected metadata[{key!r}] to agree with the method, but found {value!r}.")
            self.record.setdefault(key, value)
        self.settings = dict(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, seed=self.seed,
            ema_decay=self.ema_decay, val_every=self.val_every, patience=self.patience,
            checkpoint_every=self.checkpoint_every, log_every=self.log_every, world_size=self.world,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def _state_tensors(self) -> dict[str, Tensor]:
        return {f"model.{k}": v for k, v in self.method.state_dict().items()}

    def _finite_state(self) -> str | None:
        """None when parameters, optimizer state and EMA are finite, else what is not."""
        bad = [n for n, p in self.method.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            return f"non-finite parameters: {', '.join(bad[:5])}"
        for name, opt in self.optimizers.items():
            for state in opt.state.values():
                for key, value in state.items():
                    if (
                        isinstance(value, Tensor)
                        and value.is_floating_point()
                        and not bool(value.isfinite().all())
                    ):
                        return f"non-finite optimizer state ({name}: {key})"
        if self.ema is not None and not all(bool(torch.isfinite(a).all()) for a in self.ema.average):
            return "non-finite EMA weights"
        return None

    def _gather_rng(self) -> list[Tensor]:
        state = torch.get_rng_state()
        if self.world == 1:
            return [state]
        states: list[Any] = [None] * self.world
        torch_dist.all_gather_object(states, state)
        return states

    def save(self, tag: str) -> None:
        """Save checkpoint ``tag`` (rank 0); ``last`` only from a state that passes the guard."""
        if self.run_dir is None:
            return
        rng = self._gather_rng() if tag == "last" else None  # a collective: every rank takes part
        if not self.is_main:
            return
        result = self.result
        meta = dict(self.record)
        meta.update(
            step=result.step, best_step=result.best_step, best_val=result.best_val,
            since_best=self.since_best, stopped_early=result.stopped_early, history=result.history,
            window=self.window, lowest=self.lowest, fit=self.settings, lr_history=self.lr_history,
            objective=self.objective.settings(), val_metric=result.val_metric,
        )  # fmt: skip
        tensors = self._state_tensors()
        if tag == "last":
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
            tensors.update({f"objective.{k}": v for k, v in self.objective.state_dict().items()})
            skeletons = {}
            for name, opt in self.optimizers.items():
                opt_tensors, skeletons[name] = flatten_state(opt.state_dict(), f"optim.{name}")
                tensors.update(opt_tensors)
            meta["optimizer_state"] = skeletons
            for r, state in enumerate(rng):
                tensors[f"rng.{r}"] = state
        save_checkpoint(self.run_dir, tag, tensors, meta)
        if tag == "last":
            self.good_step = result.step

    def restore(self) -> None:
        tensors, info = load_checkpoint(self.run_dir, "last", device=self.device)
        meta = info["metadata"]
        saved = meta.get("fit", {})
        for key in _FIXED_ON_RESUME:
            if key in saved and saved[key] != self.settings[key]:
                raise ValueError(
                    f"Expected {key}={saved[key]!r} (the saved run's) to resume {self.run_dir} exactly, "
                    f"but found {key}={self.settings[key]!r}; start a new run to change it."
                )
        if saved.get("world_size", self.world) != self.world:
            raise ValueError(
                f"Expected {saved['world_size']} processes (the saved run's) to resume {self.run_dir} "
                f"exactly, but found {self.world}."
            )
        if self.record and meta.get("method") != self.record["method"]:
            raise ValueError(
                f"Expected a run of {self.record['method']!r} in {self.run_dir}, "
                f"but found {meta['method']!r}."
            )
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.method.load_state_dict(state)
        if self.ema is not None:
            ema_state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
            self.ema.load_state_dict(ema_state if ema_state else self.method.state_dict())
        self.objective.load_state_dict(
            {k[len("objective.") :]: v for k, v in tensors.items() if k.startswith("objective.")}
        )
        skeletons = meta.get("optimizer_state", {})
        for name, opt in self.optimizers.items():
            if name in skeletons:
                opt.load_state_dict(unflatten_state(tensors, skeletons[name], f"optim.{name}"))
        for name, opt in self.optimizers.items():  # the lr given now takes effect
            if self.players[name].lr is None:
                for group in opt.param_groups:
                    group["lr"] = self.lr
        rng = tensors.get(f"rng.{self.rank}")
        if rng is not None:
            torch.set_rng_state(rng.cpu())
        result = self.result
        result.step = int(meta["step"])
        result.best_step, result.best_val = meta.get("best_step"), meta.get("best_val")
        result.history = {k: [tuple(p) for p in v] for k, v in meta.get("history", {}).items()}
        for key in (*self.log_names.values(), "val"):
            result.history.setdefault(key, [])
        self.window = {key: list(meta.get("window", {}).get(key, [])) for key in self.log_names.values()}
        self.lowest = {k: float(v) for k, v in meta.get("lowest", {}).items()}
        self.since_best = int(meta.get("since_best", 0))
        self.lr_history = [list(p) for p in meta.get("lr_history", [[0, saved.get("lr", self.lr)]])]
        if self.lr_history[-1][1] != self.lr:
            self.lr_history.append([result.step, self.lr])
        self.good_step = result.step

    # ------------------------------------------------------------------ one step

    def _batch(self, step: int) -> Callable[[int], Tensor]:
        per_rank = self.batch_size // self.world
        lo, k_count = self.rank * per_rank, self.objective.batches_per_step

        def batch(k: int) -> Tensor:
            if not 0 <= k < k_count:
                raise ValueError(f"Expected a batch index in [0, {k_count}), but found {k}.")
            idx = self.minibatches(step * k_count + k)
            self.last_batch = self.data[idx[lo : lo + per_rank]]
            return self.last_batch

        return batch

    def _update(self, name: str, loss: Tensor, stop: _InterruptFlag) -> tuple[float, bool]:
        """Backward, all-reduce, clip and step for one player; returns (loss value, stop requested)."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            raise ValueError(f"Expected the {name!r} loss to depend on parameters, but it has no gradient.")
        if self.world == 1:
            value = loss.item()
            if not math.isfinite(value):
                return value, stop.requested
            loss.backward()
            requested = stop.requested
        else:
            loss.backward()
            value, requested = _all_reduce(
                self.players[name].params, loss.detach(), stop.requested, self.world
            )
            if not math.isfinite(value):
                return value, requested
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.players[name].params, self.grad_clip)
        opt.step()
        return value, requested

    def _diverged(self, what: str, step: int | None, player: str | None = None) -> TrainingError:
        """The error for divergence at ``step``, naming the culprit and the step ``last`` holds."""
        parts = [what if step is None else f"{what} at step {step}"]
        if player is not None:
            culprit = self.objective.diagnose(player, getattr(self, "last_batch", None))
            if culprit:
                parts.append(culprit)
        state = self._finite_state()
        if state and state not in what:
            parts.append(state)
        if self.run_dir is not None:
            if self.good_step is not None:
                parts.append(
                    f"{self.run_dir} keeps 'last' at step {self.good_step}, the last good state: resume it "
                    "with a lower learning rate (--resume --lr ...)"
                )
            else:
                parts.append(f"no good state was saved in {self.run_dir} yet")
        return TrainingError("; ".join(parts) + ".")

    def _validate(self) -> None:
        result = self.result
        self.method.eval()
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            if self.is_main or self.world == 1:
                if self.val_fn is not None:
                    score = float(self.val_fn(self.method, self.val_data))
                else:
                    score = float(self.objective.validate(self.val_data, self.seed))
            else:
                score = 0.0
            if self.world > 1:
                buf = torch.tensor([score], dtype=torch.float64, device=self.device)
                torch_dist.broadcast(buf, 0)
                score = float(buf)
            result.history["val"].append((result.step, score))
            best = result.best_val
            if not math.isfinite(score) or (
                best is not None and score > best + self.divergence_factor * max(abs(best), 1.0)
            ):
                raise self._diverged(f"Validation score {score:.4g} exploded (best {best})", result.step)
            if best is None or score < best:
                result.best_val, result.best_step, self.since_best = score, result.step, 0
                bad = self._finite_state()
                if bad:
                    raise self._diverged(f"Diverged ({bad})", result.step)
                self.save("best")
                self.best_state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
            else:
                self.since_best += 1
        if self.patience is not None and self.since_best >= self.patience:
            result.stopped_early = True

    def _checkpoint_last(self) -> None:
        bad = self._finite_state()
        if bad:
            raise self._diverged(f"Diverged ({bad})", self.result.step)
        self.save("last")

    def _log(self, losses: dict[str, list[float]], bar) -> None:
        result = self.result
        for name, values in losses.items():
            key = self.log_names[name]
            self.window[key].append(sum(values) / len(values))
            self.lowest[key] = min(self.lowest.get(key, math.inf), *values)
        lengths = [len(v) for v in self.window.values()]
        if max(lengths) >= self.log_every or result.step == self.steps:
            post = {}
            for key, values in self.window.items():
                if values:
                    mean = sum(values) / len(values)
                    low = self.lowest[key]
                    if mean > low + self.divergence_factor * max(abs(low), 1.0):
                        what = "training loss" if key == "train" else f"{key} loss"
                        raise self._diverged(
                            f"Diverged: the {what} exploded to {mean:.3g} over the last steps "
                            f"(lowest {low:.3g})",
                            result.step,
                        )
                    result.history[key].append((result.step, mean))
                    post["loss" if key == "train" else key[:4]] = f"{mean:.4g}"
                    values.clear()
            bar.set_postfix(post, refresh=False)

    def run(self) -> FitResult:
        result, method = self.result, self.method
        stop = _InterruptFlag()
        first, started = True, result.step
        bar = tqdm(
            total=self.steps, initial=result.step, disable=not (self.progress and self.is_main),
            desc=f"fit {getattr(method, 'name', '') or type(method).__name__}", dynamic_ncols=True,
        )  # fmt: skip
        try:
            with stop:
                while result.step < self.steps:
                    method.train()
                    losses: dict[str, list[float]] = {}
                    requested = False
                    stream = self.objective.losses(self._batch(result.step), result.step, self.steps)
                    while True:
                        try:
                            with pyro.validation_enabled(self.validate or first):
                                name, loss = next(stream)
                        except StopIteration:
                            break
                        except (ValueError, AssertionError, RuntimeError) as exc:
                            # Pyro's validation caught a non-finite parameter, or the programs broke on
                            # diverged parameters (non-finite ones, or finite ones that a numerical
                            # assertion, e.g. in Pyro's splines, refuses after updates that worked before):
                            # divergence. Anything else (an assertion at a run's first step, a user's
                            # RuntimeError on finite parameters) is raised as it is.
                            invalid = "invalid values" in str(exc)
                            after_updates = isinstance(exc, AssertionError) and result.step > started
                            if not (invalid or self._finite_state() or after_updates):
                                raise
                            single = next(iter(self.players)) if len(self.players) == 1 else None
                            first_line = str(exc).split(":")[0][:160]
                            detail = (
                                f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
                            )
                            what = (
                                "Non-finite loss"
                                if invalid
                                else "The objective failed on the updated parameters"
                            )
                            raise self._diverged(
                                f"{what} at step {result.step + 1} ({detail})",
                                None,
                                single,
                            ) from exc
                        value, requested = self._update(name, loss, stop)
                        if not math.isfinite(value):
                            what = "loss" if len(self.players) == 1 else f"{name} loss"
                            raise self._diverged(f"Non-finite {what}", result.step + 1, name)
                        losses.setdefault(name, []).append(value)
                    first = False
                    result.step += 1
                    self.objective.after_step(result.step, self.steps)
                    if self.ema is not None:
                        self.ema.update(result.step)
                    self._log(losses, bar)
                    if self.callback is not None:
                        means = {n: sum(v) / len(v) for n, v in losses.items()}
                        self.callback(result.step, next(iter(means.values())) if len(means) == 1 else means)
                    bar.update(1)
                    final = result.step == self.steps
                    if self.val_data is not None and (result.step % self.val_every == 0 or final):
                        self._validate()
                    if result.step % self.checkpoint_every == 0 or final or result.stopped_early:
                        self._checkpoint_last()
                    if result.stopped_early:
                        break
                    if requested or (self.world == 1 and stop.requested):
                        self._checkpoint_last()
                        raise KeyboardInterrupt
        finally:
            bar.close()
        self._finish()
        return result

    def _finish(self) -> None:
        result = self.result
        if result.best_step is not None:
            if self.best_state is not None:
                self.method.load_state_dict(self.best_state)
            elif self.run_dir is not None and has_checkpoint(self.run_dir, "best"):
                tensors = load_checkpoint(self.run_dir, "best", device=self.device)[0]
                self.method.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            elif self.ema is not None:
                self.ema.copy_to_method()
        elif self.ema is not None:
            self.ema.copy_to_method()
        self.method.eval()


def _val_metric(objective: Objective, val_fn) -> str:
    return "val_fn" if val_fn is not None else objective.val_metric


def _all_reduce(params: list[nn.Parameter], loss: Tensor, stop: bool, world: int) -> tuple[float, bool]:
    """Average the gradients of ``params`` over the ranks, with the loss and the stop flag in one call."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype),
                      loss.new_tensor([float(stop)]).to(grads[0].dtype)])  # fmt: skip
    torch_dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n
    return float(flat[-2]), bool(flat[-1] > 0)


def _check_fit_args(data, val_data, steps, batch_size, lr, val_every, log_every, patience, ema_decay) -> None:
    if not isinstance(data, Tensor) or data.dim() < 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"Expected data of shape (N, D), but found {shape}.")
    if val_data is not None and (not isinstance(val_data, Tensor) or val_data.shape[1:] != data.shape[1:]):
        found = tuple(val_data.shape) if isinstance(val_data, Tensor) else val_data
        raise ValueError(f"Expected val_data of shape (M, *{tuple(data.shape[1:])}), but found {found}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("val_every", val_every),
                        ("log_every", log_every)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} to be a positive integer, but found {value!r}.")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"Expected patience >= 1 or None, but found {patience!r}.")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Expected a positive finite lr, but found {lr!r}.")
    if batch_size > data.shape[0]:
        raise ValueError(
            f"Expected batch_size <= the number of examples {data.shape[0]}, but found {batch_size}."
        )
    if ema_decay is not None and (
        isinstance(ema_decay, bool)
        or not isinstance(ema_decay, (int, float))
        or not 0.0 < float(ema_decay) < 1.0
    ):
        raise ValueError(f"Expected ema_decay in (0, 1) or None, but found {ema_decay!r}.")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """Join the process group that ``torchrun`` describes, if any: (rank, world size, whether we made it)."""
    if not torch_dist.is_available():
        return 0, 1, False
    owns = False
    if not torch_dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1, False
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return torch_dist.get_rank(), torch_dist.get_world_size(), owns


def _make_optimizer(name: str, params, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    makers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in makers:
        raise ValueError(f"Expected optimizer in {sorted(makers)}, but found {name!r}.")
    extra = {"betas": tuple(betas)} if betas is not None and name != "sgd" else {}
    return makers[name](params, lr=lr, weight_decay=weight_decay, **extra)


class _Minibatches:
    """Global minibatch indices for each draw: a pure function of (seed, draw), one permutation per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = max(n // batch_size, 1)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]


class _EMA:
    """Exponential moving average of a module's floating-point parameters (buffers are copied)."""

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

    def state_dict(self) -> dict[str, Tensor]:
        """The method's state dict with the averages in place of the parameters."""
        state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        state.update(zip(self.names, self.average))
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.names if k not in state]
        if missing:
            raise ValueError(f"Expected EMA tensors for every parameter, but found none for {missing[:3]}.")
        with torch.no_grad():
            for k, avg in zip(self.names, self.average):
                avg.copy_(state[k])

    @torch.no_grad()
    def copy_to_method(self) -> None:
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
