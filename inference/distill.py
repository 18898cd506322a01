r"""Progressive distillation: halve a DDIM sampler's steps again and again, each stage checkpointed.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
(arXiv:2202.00512), Algorithm 2. The teacher is a trained :class:`~probgen.models.DDPM`
sampled with deterministic DDIM on ``start_steps`` steps of the grid of
:func:`~probgen.models.distilled.step_grid`; each stage trains a
:class:`~probgen.models.distilled.Distilled` student of half as many steps with :func:`fit`
(the objective is the Pyro program :meth:`Distilled.model`), and the student becomes the next
teacher, down to ``to_steps``.

A run directory holds one fit run per stage, ``OUT/stage-K`` (checkpoints ``last``, with the
EMA weights where kept; ``probgen sample OUT/stage-K`` loads it), and ``OUT/distill.json``
listing the stages. A stage whose ``last`` checkpoint has reached its step budget is loaded
rather than trained again, and a partial one is resumed, so an interrupted run continues where
it stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probgen.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, write_json_atomic
from probgen.inference.ancestral import _randomness
from probgen.inference.train import fit
from probgen.models.base import load_method
from probgen.models.ddpm import DDPM
from probgen.models.distilled import Distilled, ddim_on_grid, step_grid

__all__ = [
    "DistillResult",
    "grid_ddim_sample",
    "halving_schedule",
    "load_teacher",
    "progressive_distill",
]


def halving_schedule(start_steps: int, to_steps: int) -> list[int]:
    """The students' step counts when halving ``start_steps`` down to ``to_steps``: ``[S/2, ..., to]``.

    Raises:
        ValueError: ``to_steps < 1``, or ``start_steps / to_steps`` is not a power of two >= 2.
    """
    for name, value in (("to_steps", to_steps), ("start_steps", start_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} >= 1 (an int), but found {value!r}.")
    ratio, rest = divmod(start_steps, to_steps)
    if rest or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(
            f"Expected start_steps / to_steps to be a power of two >= 2 (each stage halves the steps), "
            f"but found {start_steps} / {to_steps}."
        )
    out, k = [], start_steps
    while k > to_steps:
        k //= 2
        out.append(k)
    return out


@torch.no_grad()
def grid_ddim_sample(
    method: nn.Module,
    num: int,
    *,
    steps: int | None = None,
    final: str = "mode",
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Deterministic DDIM (arXiv:2010.02502, eta = 0) on the distillation grid, for a DDPM or a student.

    Args:
        method: a :class:`~probgen.models.DDPM` (any ``steps`` in ``1..T``) or a
            :class:`~probgen.models.distilled.Distilled` (``steps`` None or its own K).
        num: B, the number of samples.
        steps: K (default: the student's K; 256 for a DDPM).
        final: ``"mode"`` (levels: the bin holding :math:`\hat x`) or ``"sample"`` (a decoder draw).
        x_T: prior states ``(B, D)``; default drawn from :math:`\mathcal N(0, I)` with ``generator``.
        generator: source of randomness; default the global RNG.

    Returns:
        Samples ``(B, D)`` (integer levels for the discretized decoder).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"Expected num >= 1 (an int), but found {num!r}.")
    if isinstance(method, Distilled):
        if steps is not None and steps != method.steps:
            raise ValueError(
                f"Expected steps = {method.steps} (the student's own) or None, but found {steps!r}."
            )
        steps, decoder = method.steps, method
    elif isinstance(method, DDPM):
        steps = 256 if steps is None else steps
        decoder = None
    else:
        raise ValueError(f"Expected a DDPM or a Distilled student, but found {type(method).__name__}.")
    step_grid(method.T, steps)
    like = method.ddpm._anchor if decoder is not None else method._anchor
    if x_T is not None and tuple(x_T.shape) != (num, method.data_dim):
        raise ValueError(f"Expected x_T of shape ({num}, {method.data_dim}), but found {tuple(x_T.shape)}.")
    with _randomness(generator, like):
        z = torch.randn(num, method.data_dim, device=like.device, dtype=like.dtype) if x_T is None else x_T
        x0_hat = ddim_on_grid(method, z.to(like.device, like.dtype), steps)
        if decoder is not None:
            return decoder.decode(x0_hat, final)
        if final == "sample":
            return method.decoder_dist(x0_hat, method.tables(like).sigma[0]).sample()
        if final != "mode":
            raise ValueError(f"Expected final in ('mode', 'sample'), but found {final!r}.")
    if method.decoder == "discretized":
        return ((x0_hat + 1) * (method.num_levels / 2)).floor().clamp(0, method.num_levels - 1)
    return x0_hat


def distilled_ddim(method, num: int, *, generator, steps: int | None = None, final: str = "mode") -> Tensor:
    """``--sampler ddim`` (also ``ancestral``) of a distilled student: its K deterministic steps."""
    return grid_ddim_sample(method, num, steps=steps, final=final, generator=generator)


def load_teacher(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a teacher run: a DDPM, or a Distilled stage; anything else is one clear error.

    Raises:
        CheckpointError: no run, or the run holds another method (a VAE, a score-SDE model, ...).
    """
    method, meta = load_method(run_dir, tag)
    if not isinstance(method, (DDPM, Distilled)):
        sde = getattr(method, "config", {}).get("sde")
        extra = f" with the {sde!r} SDE" if sde else ""
        raise CheckpointError(
            f"Expected a teacher run of method 'ddpm' or 'distilled' (a discrete-time VP diffusion), "
            f"but found {meta['method']!r}{extra} in {run_dir}"
        )
    return method, meta


@dataclass
class DistillResult:
    """What :func:`progressive_distill` returns.

    Attributes:
        students: the step counts K of the stages, in order (e.g. ``[128, 64, ..., 4]``).
        methods: the trained student of each stage, keyed by K (EMA weights where kept).
        stage_dirs: the run directory of each stage, keyed by K (None without ``out``).
        seconds: training time of each stage, keyed by K (0 for a stage loaded from disk).
        history: the training losses of each stage, keyed by K.
    """

    students: list[int] = field(default_factory=list)
    methods: dict[int, Distilled] = field(default_factory=dict)
    stage_dirs: dict[int, Path | None] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    history: dict[int, list] = field(default_factory=dict)


def _finished_stage(stage_dir: Path, steps: int) -> bool:
    if not has_checkpoint(stage_dir, "last"):
        return False
    _, info = load_checkpoint(stage_dir, "last")
    return int(info["metadata"].get("step", 0)) >= steps


def progressive_distill(
    teacher: nn.Module,
    data: Tensor,
    *,
    start_steps: int | None = None,
    to_steps: int = 4,
    steps_per_stage: int | list[int] = 1000,
    batch_size: int = 256,
    lr: float = 3e-4,
    parameterization: str = "v",
    weighting: str = "truncated_snr",
    ema_decay: float | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    resume: bool = True,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> DistillResult:
    r"""Distil the DDIM sampler of ``teacher`` from ``start_steps`` down to ``to_steps`` (arXiv:2202.00512).

    Each stage halves the steps: a :class:`Distilled` student of K steps, initialized from its
    teacher (the DDPM, then the previous student), is fit to the teacher's two-step DDIM targets
    for ``steps_per_stage`` optimizer steps.

    Args:
        teacher: a trained :class:`DDPM`, or a :class:`Distilled` student (then ``start_steps`` is
            its K).
        data: training data ``(N, D)`` in the teacher's form (levels for the discretized decoder).
        start_steps: the teacher's DDIM steps (default 256 for a DDPM), ``<= T``.
        to_steps: the last student's steps, ``>= 1``; ``start_steps / to_steps`` a power of two.
        steps_per_stage: optimizer steps per stage (one number, or one per stage).
        batch_size, lr, ema_decay, seed, progress, device: as in :func:`fit`.
        parameterization: the students' ``"v"`` or ``"x0"``.
        weighting: ``"truncated_snr"`` or ``"snr_plus_one"``.
        out: run directory (``OUT/stage-K`` per stage and ``OUT/distill.json``); None: nothing saved.
        resume: load finished stages from ``out`` and continue a partial one.
        metadata: extra JSON metadata of every stage's checkpoints (e.g. the data set's name,
            ``form``, ``event_shape``, ``num_levels``, as ``probgen sample`` reads them).

    Returns:
        A :class:`DistillResult`.

    Raises:
        ValueError: bad steps, a teacher that is neither a DDPM nor a student, or data of
            another shape than the teacher's.
    """
    if not isinstance(teacher, (DDPM, Distilled)):
        name = getattr(teacher, "name", "") or type(teacher).__name__
        raise ValueError(
            f"Expected a teacher of method 'ddpm' or 'distilled' (a discrete-time VP diffusion), "
            f"but found {name!r}."
        )
    if isinstance(teacher, Distilled):
        if start_steps is not None and start_steps != teacher.steps:
            raise ValueError(
                f"Expected start_steps = {teacher.steps} (the teacher's own), but found {start_steps}."
            )
        start_steps = teacher.steps
    elif start_steps is None:
        start_steps = min(256, teacher.T)
    stages = halving_schedule(start_steps, to_steps)
    step_grid(teacher.T, start_steps)
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[-1] != teacher.data_dim:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"Expected data of shape (N, {teacher.data_dim}), the teacher's, but found {shape}.")
    budgets = [steps_per_stage] * len(stages) if isinstance(steps_per_stage, int) else list(steps_per_stage)
    if len(budgets) != len(stages):
        raise ValueError(f"Expected {len(stages)} budgets for the stages {stages}, but found {len(budgets)}.")
    out = Path(out) if out is not None else None
    device = torch.device(device) if device is not None else _device(teacher)
    teacher.to(device)
    result = DistillResult(students=stages)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    summary: dict[str, Any] = dict(metadata or {})
    summary.update(start_steps=start_steps, to_steps=to_steps, stages=[])
    for k, budget in zip(stages, budgets):
        stage_dir = out / f"stage-{k}" if out is not None else None
        start = time.perf_counter()
        if stage_dir is not None and resume and _finished_stage(stage_dir, budget):
            student, _ = load_method(stage_dir, "last", expected="distilled", device=_device(teacher))
            history = load_checkpoint(stage_dir, "last")[1]["metadata"].get("history", {})
        else:
            torch.manual_seed(seed)
            student = Distilled.from_teacher(
                teacher, k, parameterization=parameterization, weighting=weighting
            )
            student.attach_teacher(teacher)
            meta = dict(metadata or {})
            meta.update(method="distilled", config=student.config, teacher_steps=2 * k)
            fit_result = fit(
                student,
                data,
                steps=budget,
                batch_size=min(batch_size, data.shape[0]),
                lr=lr,
                ema_decay=ema_decay,
                seed=seed,
                device=device,
                run_dir=stage_dir,
                resume=resume and stage_dir is not None,
                metadata=meta,
                progress=progress,
            )
            student.attach_teacher(None)
            history = fit_result.history
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
        result.methods[k], result.stage_dirs[k] = student, stage_dir
        result.seconds[k], result.history[k] = time.perf_counter() - start, history
        summary["stages"].append({"steps": k, "dir": None if stage_dir is None else stage_dir.name})
        if out is not None:
            write_json_atomic(out / "distill.json", summary)
        teacher = student
    return result


def _device(method: nn.Module) -> torch.device:
    return next(iter(method.parameters())).device
