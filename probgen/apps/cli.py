r"""The ``probgen`` command: train, sample, evaluate and inspect generative methods.

::

    probgen list
    probgen train vae --data digits --out runs/vae-digits --steps 3000
    probgen sample runs/vae-digits --num 64 --out runs/vae-digits/samples.png
    probgen evaluate runs/vae-digits
    probgen inspect runs/vae-digits

This module is the top of the dependency stack: the only core module that
imports :mod:`probgen.models` and :mod:`probgen.inference`. Bad input (an
unknown method or data set, a bad number, a missing or corrupt run directory)
ends with one line ``probgen: error: ...`` on stderr and exit status 2; a
failed training run exits with 1 and keeps its checkpoints; Ctrl-C during
training saves ``last`` and exits with 130.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probgen.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    has_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_json,
    write_json_atomic,
)
from probgen.data import TOYS, DataError, load_dataset, toy_entropy

__all__ = ["main", "build_parser"]

_PROG = "probgen"
_DEFAULTS = {
    "steps": 3000,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
    "val_every": 50,
    "patience": 20,
    "ema_decay": None,
}


class UsageError(ValueError):
    """Bad command-line input; reported as one line and exit status 2."""


# Reported as one line with exit status 2 (NotImplementedError: e.g. inspecting a GAN's guide).
_USER_ERRORS = (UsageError, DataError, CheckpointError, ValueError, OSError, NotImplementedError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised instead of printed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------- argument types


def _number(kind: type, what: str, ok) -> Any:
    """An argparse type: ``text`` parsed by ``kind`` and accepted when ``ok(value)``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, but found {text!r}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_nonnegative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive finite number", lambda v: math.isfinite(v) and v > 0)
_decay = _number(float, "a number strictly between 0 and 1", lambda v: 0 < v < 1)


def _setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. latent_dim=8), but found {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string such as likelihood=gaussian
    return key, value


def _device(name: str | None) -> torch.device | None:
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"expected a device such as cpu or cuda:0, but found {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but CUDA is not available here")
    return device


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``probgen`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=_PROG,
        description="Generative models written as Pyro probabilistic programs: train, sample, "
        "evaluate and inspect them.",
        epilog="examples:\n"
        "  probgen list\n"
        "  probgen train vae --data digits --out runs/vae --steps 3000\n"
        "  probgen sample runs/vae --num 64 --out runs/vae/samples.png\n"
        "  probgen evaluate runs/vae\n"
        "  probgen inspect runs/vae\n\n"
        "Run 'probgen COMMAND --help' for the options of a command.",
        formatter_class=fmt,
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so that the methods it registers (probgen.models.register) are "
        "found; repeatable. Installed packages can declare methods in the entry-point group "
        "'probgen.methods' instead",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fit a method to a data set, with checkpoints and early stopping",
        description="Fit METHOD to the train split of DATA by stochastic variational inference "
        "(adversarially for gan), "
        "selecting the best parameters on the val split. RUN_DIR receives the checkpoints "
        "'best' and 'last' (safetensors + JSON) and loss.png. An existing run is never "
        "overwritten: continue it with --resume. Ctrl-C saves 'last' and exits with status 130.",
        epilog="example:\n  probgen train vae --data digits --out runs/vae --steps 3000 "
        "--set latent_dim=8 --set hidden=[128,128]",
        formatter_class=fmt,
    )
    p.add_argument("method", metavar="METHOD", help="a method name (see 'probgen list')")
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="a toy name, 'digits', or a path to a .npz/.npy/IDX file",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory for checkpoints and plots")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"total optimizer steps (default {_DEFAULTS['steps']})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"minibatch size (default {_DEFAULTS['batch_size']}, or the saved run's with --resume)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"Adam learning rate (default {_DEFAULTS['lr']:g}, or the saved run's with --resume)",
    )
    p.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=None,
        help="seed of the initialization, Pyro's sampling and the minibatch order "
        f"(default {_DEFAULTS['seed']}, or the saved run's with --resume)",
    )
    p.add_argument(
        "--val-every",
        type=_positive_int,
        default=None,
        help=f"validate (and checkpoint) every K steps (default {_DEFAULTS['val_every']})",
    )
    p.add_argument(
        "--patience",
        type=_nonnegative_int,
        default=None,
        help=f"stop after P validations without improvement; 0 never stops early "
        f"(default {_DEFAULTS['patience']})",
    )
    p.add_argument(
        "--ema-decay",
        type=_decay,
        default=None,
        help="keep an exponential moving average of the weights with this decay in (0, 1), e.g. 0.999; "
        "checkpoints, sampling and evaluation then use the average (default: none, or the saved run's)",
    )
    p.add_argument(
        "--sde",
        choices=("vp", "subvp", "ve"),
        default=None,
        help="the forward SDE of score-sde (default vp); the same as --set sde=NAME",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in RUN_DIR to --steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a constructor argument of the method; VALUE is read as JSON, else as a "
        "string (e.g. --set latent_dim=8 --set hidden=[128,128] --set likelihood=gaussian)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run and plot them",
        description="Draw N samples from the method saved in RUN_DIR and write them as an image grid "
        "(images) or a scatter over the test data (2-D data).",
        formatter_class=fmt,
    )
    _add_run_arguments(p)
    p.add_argument("--num", type=_positive_int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the plot")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--npz", metavar="FILE.npz", default=None, help="also save the raw samples")
    _add_sampler_arguments(p)
    p.add_argument("--device", default="cpu", help="device to sample on (default cpu)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "evaluate",
        help="report test NLL and sample quality next to their floors",
        description="Evaluate the method saved in RUN_DIR on the test split of its data: negative "
        "log-likelihood (nats per example; bits/dim for level data; next to the entropy for toys) "
        "and sample quality (Fréchet distance for digits; sliced Wasserstein, MMD and mode "
        "coverage for toys), each next to its data-vs-data floor. Prints a table and writes JSON.",
        formatter_class=fmt,
    )
    _add_run_arguments(p)
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1000,
        help="importance samples K per example for the likelihood bound (default 1000)",
    )
    p.add_argument(
        "--num-generated",
        type=_positive_int,
        default=5000,
        help="samples drawn for the sample-quality metrics (default 5000)",
    )
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="evaluation seed (default 0)")
    _add_sampler_arguments(p)
    p.add_argument(
        "--json", metavar="FILE", default=None, help="JSON output (default RUN_DIR/evaluation.json)"
    )
    p.add_argument("--device", default="cpu", help="device to evaluate on (default cpu)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "inspect",
        help="print the trace table of the model and guide on test examples",
        description="Run the guide and the model of the method saved in RUN_DIR on B test examples "
        "and print every site (distribution, shapes, log-prob) and the parts of the ELBO.",
        formatter_class=fmt,
    )
    _add_run_arguments(p)
    p.add_argument("--batch", type=_positive_int, default=8, help="number of test examples (default 8)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the guide's samples (default 0)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the table as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "distill",
        help="progressive distillation of a DDPM's DDIM sampler into fewer steps",
        description="Distil the deterministic DDIM sampler of the DDPM in TEACHER_RUN (or of a distilled "
        "stage) into students of half as many steps, stage by stage down to --to-steps (Salimans & Ho "
        "2022). Each stage is a run OUT/stage-K ('probgen sample OUT/stage-K' works); finished stages "
        "are loaded and a partial one is resumed.",
        formatter_class=fmt,
    )
    p.add_argument("teacher_run", metavar="TEACHER_RUN", help="a ddpm run (or a distilled stage)")
    p.add_argument("--tag", default=None, help="teacher checkpoint: best or last (default best, else last)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory of the stages")
    p.add_argument(
        "--start-steps",
        type=_positive_int,
        default=None,
        help="the teacher's DDIM steps (default 256; a distilled teacher's own K)",
    )
    p.add_argument("--to-steps", type=_positive_int, default=4, help="the last student's steps (default 4)")
    p.add_argument(
        "--steps-per-stage",
        type=_steps_list,
        default=1000,
        metavar="N[,N...]",
        help="training steps per stage: one number, or one per stage, first stage first (default 1000)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=3e-4)
    p.add_argument("--parameterization", choices=("v", "x0"), default="v")
    p.add_argument("--ema-decay", type=_decay, default=None)
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--data", default=None, help="data set (default: the teacher's)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "compare",
        help="fit every method on one data set with one budget: table, JSON and sample panel",
        description="Fit every registered method (or --methods) on DATA with a stated budget and report, on "
        "the test split: NLL (nats for 2-D data, bits/dim for level data; exact or which bound), sample "
        "quality next to its data-vs-data floor, mode coverage on mixtures, training and sampling seconds "
        "and NFE per sample. Writes OUT/compare.md, OUT/compare.json and OUT/compare.png. A method that "
        "fails gives a failed row with the reason; the other rows are still written.",
        epilog="examples:\n  probgen compare --data eight_gaussians --quick --out runs/compare\n"
        "  probgen compare --data digits --methods vae,flow --out runs/compare-digits",
        formatter_class=fmt,
    )
    p.add_argument(
        "--data", required=True, metavar="DATA", help="a toy name, 'digits', or a .npz/.npy/IDX file"
    )
    p.add_argument(
        "--methods", default=None, metavar="A,B", help="comma-separated method names (default: all)"
    )
    p.add_argument(
        "--quick", action="store_true", help="the tiny budget of the test suite (its numbers mean nothing)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps for every method (default: the budget's)"
    )
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="cpu", help="device (default cpu, where the budget is stated)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where compare.md, compare.json and compare.png go"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "list",
        help="list the methods and data sets",
        description="List the registered methods and the data sets that --data accepts.",
    )
    p.set_defaults(func=_cmd_list)
    return parser


# ----------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(message: BaseException | str) -> None:
    print(f"{_PROG}: error: {_one_line(message)}", file=sys.stderr)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'probgen train'")
    p.add_argument("--tag", default=None, help="checkpoint to load: best or last (default best, else last)")


def _add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sampler",
        default="ancestral",
        help="sampler: ancestral (any method), ddim (ddpm), annealed-langevin (ncsn), em/pc/ode (score-sde), "
        "consistency (consistency), ddim (distilled: its K steps); default ancestral",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="number of sampler steps, for samplers that take one (ddim: default 50)",
    )
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help="DDIM stochasticity in [0, 1] (default 0; DDIM-like samplers only)",
    )
    p.add_argument(
        "--option",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further option of the sampler, VALUE read as JSON else as a string "
        "(e.g. ddim: --option spacing=quadratic --option final=sample)",
    )


def _sample(method, num: int, seed: int, args: argparse.Namespace) -> torch.Tensor:
    from probgen.inference.sampling import draw_samples

    with torch.no_grad():
        x = draw_samples(
            method,
            num,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            seed=seed,
            options=dict(args.option),
        )
    return x.detach().to("cpu", torch.float32)


def _source_levels(data: str, form: str, train) -> int | None:
    """Number of integer levels of the source data (also when the method sees it dequantized)."""
    if train.num_levels is not None or form == "int":
        return train.num_levels
    return load_dataset(data, "train", form="int", n=1).num_levels


def _saved_step(run_dir: Path) -> int | None:
    try:
        return int(load_checkpoint(run_dir, "last")[1]["metadata"]["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _data_name(meta: dict[str, Any], run_dir: str) -> str:
    data = meta.get("data")
    if not isinstance(data, str):
        raise CheckpointError(f"the checkpoint in {run_dir} does not name its data set (metadata 'data')")
    return data


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


# ----------------------------------------------------------------------------- commands


def _steps_list(text: str) -> int | list[int]:
    """``--steps-per-stage``: ``N`` or ``N1,N2,...``, each a positive int."""
    values = [_positive_int(part) for part in text.split(",")]
    return values[0] if len(values) == 1 else values


def _cmd_compare(args: argparse.Namespace) -> int:
    from probgen.apps.compare import cli_main

    return cli_main(args)


def _cmd_distill(args: argparse.Namespace) -> int:
    """``probgen distill TEACHER_RUN --out DIR --to-steps K ...``: progressive distillation by stages."""
    from probgen.inference.distill import load_teacher, progressive_distill

    teacher, meta = load_teacher(args.teacher_run, args.tag)
    data_name = args.data or meta.get("data")
    if not data_name:
        raise ValueError(f"Expected --data (the teacher's metadata names none in {args.teacher_run}).")
    form = meta.get("form", "int")
    train = load_dataset(data_name, "train", form=form)
    keep = {k: meta[k] for k in ("data", "form", "event_shape", "num_levels") if k in meta}
    keep.update(data=data_name, teacher_run=str(args.teacher_run))
    result = progressive_distill(
        teacher,
        train.x,
        start_steps=args.start_steps,
        to_steps=args.to_steps,
        steps_per_stage=args.steps_per_stage,
        batch_size=args.batch_size,
        lr=args.lr,
        parameterization=args.parameterization,
        ema_decay=args.ema_decay,
        seed=args.seed,
        out=args.out,
        metadata=keep,
        progress=not args.no_progress,
        device=args.device,
    )
    for k in result.students:
        print(f"stage {k:>4} steps: {result.seconds[k]:.0f} s -> {result.stage_dirs[k]}")
    last = result.students[-1]
    print(f"next: probgen sample {result.stage_dirs[last]} --num 64 --out {args.out}/samples-{last}.png")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from probgen import inference
    from probgen.models import available, load_method, method_class
    from probgen.models.base import check_config_sizes, check_parameter_count
    from probgen.plotting import save_loss_curves

    if args.method not in available():
        raise UsageError(
            f"unknown method {args.method!r}; available: {', '.join(available())} "
            "(a method of your own module: probgen --import MODULE train ...)"
        )
    device = _device(args.device)
    run_dir = Path(args.out)
    overrides = dict(args.set)
    if args.sde is not None:
        if args.method != "score-sde":
            raise UsageError(f"--sde applies to score-sde only, but the method is {args.method!r}")
        if overrides.setdefault("sde", args.sde) != args.sde:
            raise UsageError(f"--sde {args.sde} contradicts --set sde={overrides['sde']}")
    saved_tags = list_checkpoints(run_dir)
    saved: dict[str, Any] = {}
    if args.resume and not run_dir.is_dir():
        raise CheckpointError(f"nothing to resume: no run directory {run_dir}")
    if args.resume and not has_checkpoint(run_dir, "last"):
        # A run killed before its first 'last' (or during it) left nothing to continue: start it.
        print(
            f"{_PROG}: note: no checkpoint 'last' in {run_dir} to resume; starting the run afresh",
            file=sys.stderr,
        )
        args.resume, saved_tags = False, []
    if args.resume:
        info = read_json(run_dir / "last.json")
        meta = info.get("metadata") if isinstance(info, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("method") != args.method or meta.get("data") != args.data:
            raise UsageError(
                f"{run_dir} holds a run of {meta.get('method')!r} on {meta.get('data')!r}, but the "
                f"command asks for {args.method!r} on {args.data!r}; resume with the same METHOD and --data"
            )
        method, meta = load_method(run_dir, "last")
        if overrides:
            raise UsageError("--set cannot change a resumed run: its method is rebuilt from the saved config")
        form = meta.get("form", "int")
        saved = {**meta.get("settings", {}), **meta.get("fit", {})}
        step = int(meta.get("step", 0))
    else:
        if saved_tags:
            raise UsageError(
                f"{run_dir} already holds a saved run (checkpoints: {', '.join(saved_tags)}); "
                "pass --resume to continue it, or choose another --out (a saved run is never overwritten)"
            )
        form = method_class(args.method).data_form(args.data)
        step = 0
    settings = {}
    for key in _DEFAULTS:
        value = getattr(args, key)
        if value is None:
            value = saved.get(key, _DEFAULTS[key])
        elif key in saved and key != "steps" and saved[key] != value:
            flag = f"--{key.replace('_', '-')}"
            if key in ("batch_size", "seed", "ema_decay"):
                raise UsageError(
                    f"{flag} {value} differs from the saved run's {saved[key]}, and a resumed run cannot "
                    f"change it (it would not continue the same run); start a new run with --out to change it"
                )
            print(
                f"{_PROG}: note: {flag} {value} replaces the saved run's {saved[key]} from step {step} on "
                "(recorded in the checkpoint)",
                file=sys.stderr,
            )
        settings[key] = value
    if args.resume and settings["steps"] <= step:
        raise UsageError(
            f"the run in {run_dir} is already at step {step}; pass --steps larger than {step} to continue it"
        )

    train = load_dataset(args.data, "train", form=form)
    val = load_dataset(args.data, "val", form=form)
    if not args.resume:
        check_config_sizes(overrides)
        cls = method_class(args.method)
        try:
            check_parameter_count(lambda: cls.from_data(train, **overrides))
            with torch.random.fork_rng(devices=[]):  # initialization is a function of --seed
                torch.manual_seed(settings["seed"])
                method = cls.from_data(train, **overrides)
        except TypeError as exc:  # an unknown keyword from --set
            raise UsageError(f"invalid --set for {args.method!r}: {exc}") from exc
    metadata = {
        "method": args.method,
        "config": method.config,
        "data": args.data,
        "form": form,
        "event_shape": list(train.event_shape),
        "num_levels": _source_levels(args.data, form, train),
        "settings": {k: settings[k] for k in ("val_every", "patience")},
    }
    start = time.perf_counter()
    try:
        result = inference.fit(
            method,
            train.x,
            val_data=val.x,
            steps=settings["steps"],
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            seed=settings["seed"],
            val_every=settings["val_every"],
            patience=settings["patience"] or None,
            device=device,
            run_dir=run_dir,
            resume=args.resume,
            metadata=metadata,
            progress=not args.no_progress,
            ema_decay=settings["ema_decay"],
        )
    except KeyboardInterrupt:
        at = _saved_step(run_dir)
        if at is None:
            print(f"interrupted before a checkpoint was saved in {run_dir}", file=sys.stderr)
        else:
            print(
                f"interrupted: checkpoint saved at step {at} in {run_dir}; resume with --resume",
                file=sys.stderr,
            )
        return 130
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and reports
        return 0
    loss_png = save_loss_curves(
        {name: points for name, points in result.history.items() if points},
        run_dir / "loss.png",
        title=f"{args.method} on {args.data}: training curves",
    )
    print(f"trained {args.method} on {args.data} (form {form}) to step {result.step} in {seconds:.1f} s")
    if result.stopped_early:
        print(f"stopped early: no improvement in {settings['patience']} validations")
    if result.best_step is not None:
        what = getattr(result, "val_metric", "nats per example")
        print(f"best validation loss {result.best_val:.4f} ({what}) at step {result.best_step}")
    print(f"checkpoints: {', '.join(str(run_dir / f'{t}.json') for t in list_checkpoints(run_dir))}")
    print(f"loss curves: {loss_png}")
    print(
        f"next: probgen sample {run_dir} --num 64 --out {run_dir / 'samples.png'}; probgen evaluate {run_dir}"
    )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from probgen.apps.evaluate import to_levels
    from probgen.models import load_method
    from probgen.plotting import save_image_grid, save_scatter_2d

    method, meta = load_method(args.run_dir, args.tag, device=_device(args.device))
    x = _sample(method, args.num, args.seed, args)
    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:
        _fail(
            f"sampling failed: {bad} of {args.num} samples are not finite (the sampler diverged); "
            "try another --sampler or more --steps"
        )
        return 1
    form, levels = meta.get("form", "int"), meta.get("num_levels")
    event_shape = tuple(meta.get("event_shape") or (x.shape[1],))
    if math.prod(event_shape) != x.shape[1]:
        raise CheckpointError(
            f"the metadata of {args.run_dir} gives event_shape {event_shape}, but the samples have "
            f"{x.shape[1]} dimensions"
        )
    level_x = to_levels(x, form, levels) if levels is not None else None
    if args.npz:
        arrays = {"samples": x.reshape(args.num, *event_shape).numpy()}
        if level_x is not None:
            arrays["levels"] = level_x.reshape(args.num, *event_shape).numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(args.npz, buffer.getvalue())
        print(f"wrote {args.num} raw samples to {args.npz}")
    title = f"{meta['method']} on {meta.get('data')}: {args.num} samples ({meta['tag']})"
    if len(event_shape) == 3:
        if level_x is not None:
            x, value_range = level_x, (0.0, float(levels - 1))
        else:
            lo, hi = float(x.min()), float(x.max())
            value_range = (lo, hi if hi > lo else lo + 1.0)
        path = save_image_grid(x, args.out, image_shape=event_shape, value_range=value_range, title=title)
    elif event_shape == (2,):
        data = _data_name(meta, args.run_dir)
        reference = load_dataset(data, "test", form=form).x
        lim = 4.5 if data in TOYS else 1.1 * float(reference.abs().max())
        path = save_scatter_2d(x, args.out, data=reference, title=title, lim=lim)
    else:
        raise UsageError(
            f"cannot plot samples of event shape {event_shape} (images (C, H, W) or 2-D points only); "
            "use --npz to save them"
        )
    print(f"wrote {args.num} samples to {path}")
    return 0


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    nll, samples = report["nll"], report["samples"]
    rows = []
    if nll["nats"] is None:
        rows.append(("NLL", "n/a", nll.get("reason") or ""))
    else:
        entropy = nll.get("entropy_floor")
        floor = f"entropy {_fmt(entropy)} (best possible)" if "entropy_floor" in nll else ""
        if "entropy_floor" in nll and entropy is None:
            floor = "entropy unknown for this toy"
        rows.append(("NLL, nats per example", _fmt(nll["nats"]), floor))
        if nll["bits_per_dim"] is not None:
            refs = nll.get("references_bits_per_dim", {})
            ref = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in refs.items())
            rows.append(("NLL, bits/dim", _fmt(nll["bits_per_dim"]), ref))
    names = {
        "frechet_distance": "Fréchet distance (digits features)",
        "sliced_wasserstein": "sliced Wasserstein-2",
        "mmd": "MMD^2 (RBF)",
    }
    for key, label in names.items():
        if key in samples:
            rows.append((label, _fmt(samples[key]["value"]), f"{_fmt(samples[key]['floor'])} (data vs data)"))
    if "mode_coverage" in samples:
        value, floor = samples["mode_coverage"]["value"], samples["mode_coverage"]["floor"]
        rows.append(
            (
                "modes captured",
                f"{value['modes_captured']}/{value['num_modes']}",
                f"{floor['modes_captured']}/{floor['num_modes']} (test data)",
            )
        )
        rows.append(
            (
                "high-quality fraction",
                _fmt(value["high_quality_fraction"]),
                f"{_fmt(floor['high_quality_fraction'])} (test data)",
            )
        )
    return rows


def _table(rows: Sequence[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"{header[0].ljust(widths[0])}  {header[1].rjust(widths[1])}  {header[2]}"]
    lines.append("-" * (sum(widths) + 4))
    lines += [f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from probgen.apps.evaluate import evaluate
    from probgen.models import load_method

    method, meta = load_method(args.run_dir, args.tag, device=_device(args.device))
    report = evaluate(
        method,
        _data_name(meta, args.run_dir),
        form=meta.get("form", "int"),
        num_samples=args.num_samples,
        num_generated=args.num_generated,
        seed=args.seed,
        sampler=args.sampler,
        sampler_steps=args.steps,
        eta=args.eta,
        sampler_options=dict(args.option),
    )
    report["checkpoint"] = {"run_dir": str(args.run_dir), "tag": meta["tag"], "step": meta.get("step")}
    path = Path(args.json) if args.json else Path(args.run_dir) / "evaluation.json"
    write_json_atomic(path, report)
    print(
        f"{report['method']} on {report['data']} (form {report['form']}, checkpoint {meta['tag']} at step "
        f"{meta.get('step')}): {report['num_test']} test examples, "
        f"{report['samples']['num_generated']} samples ({args.sampler} sampler"
        + (f", {args.steps} steps)" if args.steps else ")")
    )
    print(_table(_metric_rows(report), ("metric", "value", "floor / reference")))
    if report["nll"]["kind"]:
        print(f"NLL estimator: {report['nll']['kind']}")
    print(
        f"sample metrics against the {report['samples']['reference']}; floors: {report['samples']['floor']}"
    )
    print(f"wrote {path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from probgen.inference import inspect_trace
    from probgen.models import load_method

    method, meta = load_method(args.run_dir, args.tag)
    test = load_dataset(_data_name(meta, args.run_dir), "test", form=meta.get("form", "int"))
    if args.batch > len(test):
        raise UsageError(f"expected --batch <= {len(test)} (the test split), but found {args.batch}")
    report = inspect_trace(method, test.x[: args.batch], seed=args.seed)
    print(report)
    if args.json:
        print(f"wrote {write_json_atomic(args.json, report.to_dict())}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from probgen.inference.sampling import samplers_for
    from probgen.models import available, method_class

    print("methods:")
    for name in available():
        doc = (method_class(name).__doc__ or "").strip().splitlines()
        summary = re.sub(r":math:`([^`]*)`", r"\1", doc[0]) if doc else ""  # plain text, not reST
        print(f"  {name:16s} {summary} (samplers: {', '.join(samplers_for(method_class(name)))})")
    print("data sets (--data):")
    print(f"  {'digits':16s} sklearn's 8x8 digits, 17 grey levels; split 1350 train / 150 val / 297 test")
    for name in (*TOYS, "grid25"):
        entropy = toy_entropy(name)
        known = f"; entropy {entropy:.4f} nats" if entropy is not None else ""
        print(f"  {name:16s} 2-D toy, 20000 train / 5000 val / 5000 test points{known}")
    print(f"  {'PATH':16s} a local .npz/.npy/IDX file of examples (N, ...); split 80/10/10")
    return 0


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the ``probgen`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.imports:
            from probgen.models.base import import_methods

            import_methods(args.imports)
        return args.func(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from probgen.inference import TrainingError

        if isinstance(exc, TrainingError):
            _fail(f"training failed: {exc}")
            return 1
        if isinstance(
            exc, (UsageError, DataError, CheckpointError, ValueError, OSError, NotImplementedError)
        ):
            _fail(exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
