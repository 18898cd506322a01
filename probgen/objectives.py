r"""Objectives: what one training step optimizes, handed out by a method, driven by the one loop.

An :class:`Objective` is what ``method.objective()`` returns and what
:func:`probgen.inference.fit` drives, whatever the method. For a step it yields the losses of
its *players* in update order (``losses``); the loop updates a player (backward, all-reduce of
its gradients under ``torchrun``, clipping, its optimizer's step) before it asks for the next
loss, so a GAN's generator loss sees the discriminator that was just updated. Every loss is
derived from the method's Pyro programs: an ELBO of model/guide (:class:`ELBOObjective`), the
log-probability of a trace (:func:`trace_log_prob`: observed Bernoulli label sites of a GAN, a
``pyro.factor`` holding a consistency distance), divided by the batch size so it reads per
example.

The loop knows nothing else about a method: the players (:meth:`Objective.players`, parameter
groups with their own optimizer options), any state the objective keeps beside the method's
parameters (:meth:`Objective.state_dict`, e.g. a target network, checkpointed and restored
with the run), what happens after each step (:meth:`Objective.after_step`), the default
validation score (:meth:`Objective.validate`, lower is better) and how to name a culprit when a
loss is not finite (:meth:`Objective.diagnose`).

Like Pyro's ELBOs (``pyro/infer/elbo.py``: every ELBO answers ``loss(model, guide)``) and its
MCMC kernels (``setup``, ``sample``), the contract is small so that the loop never asks which
objective it drives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.elbo import sample_sites

__all__ = [
    "ELBOObjective",
    "Objective",
    "Player",
    "elbo_per_example",
    "nonfinite_site",
    "seeded",
    "trace_log_prob",
]


@dataclass
class Player:
    """A parameter group with its own optimizer.

    Attributes:
        params: the parameters this player's loss moves.
        lr: its learning rate (None: the loop's ``lr``).
        betas: Adam's betas (None: the optimizer's defaults).
    """

    params: list[nn.Parameter]
    lr: float | None = None
    betas: tuple[float, float] | None = None


class Objective:
    r"""Base class of objectives: one player ``"model"`` over all of the method's parameters.

    Subclasses define :meth:`losses`; the rest has defaults.

    Attributes:
        method: the method being trained.
        batches_per_step: minibatches one step draws (a GAN with ``d_steps`` discriminator updates
            per step draws ``d_steps``).
        val_metric: what :meth:`validate` reports (lower is better).
    """

    batches_per_step: int = 1
    val_metric: str = "validation score (lower is better)"

    def __init__(self, method: nn.Module) -> None:
        self.method = method

    def players(self) -> dict[str, Player]:
        """The parameter groups, each updated by its own optimizer, in a fixed order."""
        return {"model": Player([p for p in self.method.parameters() if p.requires_grad])}

    def losses(self, batch: Callable[[int], Tensor], step: int, steps: int) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(player, loss)`` in update order for optimizer step ``step`` (0-based) of ``steps``.

        Args:
            batch: ``batch(k)`` is this step's k-th minibatch ``(B, D)``, ``k < batches_per_step``.
            step: the number of steps done before this one.
            steps: the run's total number of steps.
        """
        raise NotImplementedError

    def after_step(self, step: int, steps: int) -> None:
        """Called after every completed step ``step`` (1-based), e.g. to move a target network."""

    def state_dict(self) -> dict[str, Tensor]:
        """State kept beside the method's parameters (flat tensors), saved in ``last``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (an empty ``state``: start the state from the method)."""

    def validate(self, val: Tensor, seed: int) -> float:
        """The validation score of the method on ``val`` ``(M, D)``, lower is better."""
        raise NotImplementedError(f"{type(self).__name__} has no default validation score; pass val_fn")

    def diagnose(self, player: str, x: Tensor | None) -> str | None:
        """Name what made ``player``'s loss non-finite on batch ``x`` (None: nothing specific)."""
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return "the data batch has non-finite values"
        return None

    def settings(self) -> dict[str, Any]:
        """JSON-serializable options of the objective, recorded in the run directory."""
        return {"objective": type(self).__name__}


def trace_log_prob(program: Callable[..., Any], batch: int, *args: Any, **kwargs: Any) -> Tensor:
    r"""Log-probability of one trace of ``program`` (every site, factors included), per example.

    The program runs under ``poutine.scale(1 / batch)``, so the sum over its sites reads in nats
    per example. Used for objectives that are the log-likelihood of observed (label) sites or of a
    ``pyro.factor``.
    """
    trace = poutine.trace(poutine.scale(program, scale=1.0 / batch)).get_trace(*args, **kwargs)
    return trace.log_prob_sum()


class ELBOObjective(Objective):
    r"""The negative ELBO of the method's model/guide, in nats per example (one player, ``"model"``).

    The loss is ``elbo.differentiable_loss(model, guide, x) / B`` for the ELBO the method names
    (``method.elbo()``): an ELBO, an observed likelihood, ``poutine.scale``-d terms and
    ``pyro.factor`` sites all arrive this way.

    Args:
        method: a module with ``model(x)`` and ``guide(x)``.
        elbo: the Pyro ELBO (default ``method.elbo()``).
    """

    val_metric = "negative ELBO, nats per example"

    def __init__(self, method: nn.Module, elbo: ELBO | None = None) -> None:
        super().__init__(method)
        self.elbo = elbo if elbo is not None else method.elbo()

    def losses(self, batch: Callable[[int], Tensor], step: int, steps: int) -> Iterator[tuple[str, Tensor]]:
        x = batch(0)
        yield "model", self.elbo.differentiable_loss(self.method.model, self.method.guide, x) / x.shape[0]

    def validate(self, val: Tensor, seed: int) -> float:
        return elbo_per_example(self.method, val, elbo=self.elbo, seed=seed)

    def diagnose(self, player: str, x: Tensor | None) -> str | None:
        return super().diagnose(player, x) or (nonfinite_site(self.method, x) if x is not None else None)

    def settings(self) -> dict[str, Any]:
        return {"objective": type(self).__name__, "elbo": type(self.elbo).__name__}


@contextlib.contextmanager
def seeded(seed: int, like: Tensor | None = None) -> Iterator[None]:
    """Run a block with the global RNG forked and seeded, leaving the outer stream untouched."""
    devices = [like.device.index or 0] if like is not None and like.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def elbo_per_example(
    method: nn.Module,
    x: Tensor,
    *,
    elbo: ELBO | None = None,
    batch_size: int = 1024,
    seed: int = 0,
) -> float:
    """Mean negative ELBO of ``x`` (``(N, D)``) in nats per example, with common random numbers.

    The global RNG is forked and seeded with ``seed``, so repeated evaluations of the same
    parameters give the same value and the training randomness is untouched.
    """
    elbo = elbo if elbo is not None else method.elbo()
    total = 0.0
    with seeded(seed, x):
        for chunk in x.split(batch_size):
            total += float(elbo.loss(method.model, method.guide, chunk))
    return total / x.shape[0]


def nonfinite_site(method: nn.Module, x: Tensor) -> str | None:
    """The first site of the guide, then the model, with a non-finite value or log-prob on ``x``."""
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(method.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(x)
            for where, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in sample_sites(trace):
                    if not torch.isfinite(torch.as_tensor(site["value"], dtype=torch.float)).all():
                        return f"{where} site {name!r} has a non-finite value"
                    if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                        return f"{where} site {name!r} has a non-finite log-prob"
    except Exception as exc:  # diagnosing must never hide the original problem
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"could not trace the programs to find the site ({detail})"
    return None
