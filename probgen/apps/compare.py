r"""``compare``: fit every registered method on one data set with a stated budget, side by side.

Each method is taken from the registry (:func:`probgen.models.available`), so a new one is
compared without edits here. Per method :func:`compare` builds it with
``method_class(name).from_data(train)`` (initialization seeded), trains it with
``fit`` (over the method's own objective) on the train split (model selection on the val split),
draws samples with :func:`~probgen.inference.sampling.draw_samples` and reports on the test
split, on the footing of ``DESIGN.md``'s evaluation protocol:

* **NLL** from the estimator registered for the method
  (:func:`~probgen.apps.evaluate.log_likelihood`), with what it is (exact, a variational
  bound, an IWAE bound, a probability-flow ODE value): nats per example for continuous data,
  bits/dim of the discrete levels for level data (a density on dequantized data turned into a
  bound on the levels first);
* **sample quality**: sliced Wasserstein distance and MMD to the test split (plus mode coverage
  on mixtures) for vector data, the digits Fréchet distance for the digits, each next to its
  data-vs-data floor;
* **cost**: training seconds (validation included), sampling seconds, and network evaluations
  per sample (NFE, defined at :class:`NetworkCalls`).

Floor rows: the toy's entropy (the best NLL any model reaches); for level data the
independent per-pixel categorical (NLL and the Fréchet distance of its samples), the uniform
distribution, and the train-vs-test Fréchet distance.

Every method runs inside its own ``try``: a method that does not accept the data, or fails
while training, sampling or scoring, gives a *failed* row with ``"Type: message"`` and the
stage, and the others still run; a class with ``compare = False`` (or whose ``from_data``
needs more than the data, e.g. a teacher) gives a *skipped* row. ``out_dir`` receives
``compare.md``, ``compare.json`` and ``compare.png`` (:mod:`probgen.apps.compare_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probgen.apps.compare_budgets import BUDGETS, Budget, MethodSettings, settings_for
from probgen.apps.evaluate import log_likelihood, to_levels
from probgen.checkpoint import save_checkpoint
from probgen.data import TOYS, load_dataset, mixture_modes, toy_entropy
from probgen.inference.network_calls import NetworkCalls
from probgen.inference.sampling import draw_samples, samplers_for
from probgen.inference.train import fit, run_record
from probgen.metrics import (
    bits_per_dim,
    digits_frechet_distance,
    discrete_nll_from_density,
    independent_levels_nll,
    mmd,
    mode_coverage,
    sliced_wasserstein,
)
from probgen.models import Method, available, method_class
from probgen.objectives import seeded

__all__ = [
    "BUDGETS",
    "Budget",
    "CompareResult",
    "MethodSettings",
    "NetworkCalls",
    "add_arguments",
    "cli_main",
    "compare",
    "settings_for",
]

_MIXTURES = ("eight_gaussians", "grid25")
_DENSITY_SCALE = {"dequantized": 1.0, "centered": 2.0}  # Jacobian of the form's map from (v + u) / L


@dataclass
class CompareResult:
    """What :func:`compare` returns (and writes as ``compare.json``).

    Attributes:
        data: the data set name.
        kind: ``"vector"`` or ``"image"``.
        budget: the budget's name and sizes.
        seed: the seed.
        floors: the floor rows and data-vs-data values (see :func:`compare`).
        rows: one dict per method: ``method``, ``status`` (``"ok"``, ``"failed"``, ``"skipped"``),
            ``reason`` and ``stage`` (failed/skipped), ``settings``, ``nll``, ``samples``,
            ``seconds`` (``train``, ``sampling``, ``nll``, ``metrics``), ``nfe_per_sample``.
        samples: method name -> generated samples ``(n, D)`` (levels for level data), for the panel.
        paths: files written (``markdown``, ``json``, ``png``).
    """

    data: str
    kind: str
    budget: dict[str, Any]
    seed: int
    floors: dict[str, Any]
    rows: list[dict[str, Any]]
    samples: dict[str, Tensor] = field(default_factory=dict, repr=False)
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (without the sample tensors)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "samples"}

    @property
    def failed(self) -> list[str]:
        """Names of the methods whose row failed."""
        return [r["method"] for r in self.rows if r["status"] == "failed"]


class _Stage(Exception):
    """An error raised in a named stage of a row (``data``, ``build``, ``train``, ...)."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        message = " ".join(str(exc).split()).split(" Trace Shapes:")[0]  # Pyro appends its trace shapes
        super().__init__(f"{type(exc).__name__}: {message}")
        self.stage = stage


class _Skip(Exception):
    """A method that cannot run stand-alone (its row is *skipped*, with this reason)."""


def _run_stage(stage: str, fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a method's failure is its row's, never the comparison's
        raise _Stage(stage, exc) from exc


def _skip_reason(cls: type) -> str | None:
    """Why a method class cannot be compared stand-alone, or None."""
    if getattr(cls, "compare", True) is False:
        return getattr(cls, "compare_reason", None) or f"{cls.__name__}.compare is False"
    if getattr(cls.from_data, "__func__", None) is Method.from_data.__func__:
        return f"{cls.__name__} defines no from_data (it is not built from data alone, e.g. from a teacher)"
    try:
        params = list(inspect.signature(cls.from_data).parameters.values())[1:]  # after `dataset`
    except (TypeError, ValueError):
        return None
    needed = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if getattr(cls, "teacher_method", None):
        needed = [n for n in needed if n != "teacher"]  # compare trains the teacher and hands it over
    if needed:
        return f"from_data needs {', '.join(needed)} besides the data (not trainable stand-alone)"
    return None


def _check_steps(steps: Any, what: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected a positive budget (steps{what}), but found {steps!r}.")
    return steps


def _resolve_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"Expected a budget in {sorted(BUDGETS)} or a Budget, but found {budget!r}.")
    return BUDGETS[budget]


def _sample_metrics(generated: Tensor, ctx: dict[str, Any]) -> dict[str, Any]:
    """The protocol's sample metrics of ``generated`` ``(n, D)`` (in the method's form, levels mapped)."""
    if ctx["metric"] == "frechet_distance":
        return {"frechet_distance": digits_frechet_distance(generated, ctx["test_int"].x)}
    test = ctx["test"].x
    out: dict[str, Any] = {
        "sliced_wasserstein": sliced_wasserstein(generated, test),
        "mmd": mmd(generated, test),
    }
    if ctx["data"] in _MIXTURES:
        out["mode_coverage"] = mode_coverage(generated, *mixture_modes(ctx["data"]))
    return out


def _floors(ctx: dict[str, Any], budget: Budget, seed: int) -> dict[str, Any]:
    """Floor rows: entropy (toys), per-pixel categorical and uniform (level data), data vs data."""
    data, kind, n = ctx["data"], ctx["kind"], budget.num_generated[ctx["kind"]]
    floors: dict[str, Any] = {"metric": ctx["metric"], "num_generated": n}
    test_int, levels = ctx["test_int"], ctx["test_int"].num_levels
    if levels is None:
        floors["entropy_nats"] = toy_entropy(data) if kind == "vector" and data in ctx["toys"] else None
        val = load_dataset(data, "val").x[:n]
        reference = f"val split ({len(val)} points) vs {len(ctx['test'])} test points"
        floors["data_vs_data"] = {"reference": reference}
        floors["data_vs_data"].update(_sample_metrics(val, ctx))
        return floors
    train_int = load_dataset(data, "train", form="int").x
    dims = train_int.shape[1]
    nll = independent_levels_nll(train_int, test_int.x, levels)
    counts = torch.nn.functional.one_hot(train_int.long(), levels).sum(0).double() + 1.0  # add-one, (D, L)
    generator = torch.Generator().manual_seed(seed + 1)
    pixels = torch.multinomial(
        counts / counts.sum(-1, keepdim=True), n, replacement=True, generator=generator
    )
    baseline = pixels.T.float()  # (n, D) levels, each pixel drawn independently
    floors["independent_pixels"] = {
        "nll_bits_per_dim": float(bits_per_dim(nll, dims).mean()),
        "nll_nats": float(nll.mean()),
        "kind": "exact (independent per-pixel categoricals, add-one counts on the train split)",
        **_sample_metrics(baseline, ctx),
    }
    floors["uniform_bits_per_dim"] = math.log2(levels)
    floors["data_vs_data"] = {"reference": f"train split ({len(train_int)} images) vs test split"}
    floors["data_vs_data"].update(_sample_metrics(train_int, ctx))
    ctx["baseline_samples"] = baseline
    return floors


def _nll(
    method: nn.Module, form: str, ctx: dict[str, Any], budget: Budget, seed: int, device
) -> dict[str, Any]:
    n = budget.nll_examples[ctx["kind"]]
    test = load_dataset(ctx["data"], "test", form=form, n=n)
    x = test.x.to(device)
    out: dict[str, Any] = {"num_examples": len(test)}
    try:
        with seeded(seed, x):
            ll, kind = log_likelihood(method, x, num_samples=budget.likelihood_samples, seed=seed)
    except NotImplementedError as exc:
        return {**out, "nats": None, "bits_per_dim": None, "kind": None, "reason": " ".join(str(exc).split())}
    nll = -ll.detach().double().cpu()
    levels, dims = ctx["test_int"].num_levels, x.shape[1]
    if levels is not None and form in _DENSITY_SCALE:
        nll = discrete_nll_from_density(nll, dims, levels, scale=_DENSITY_SCALE[form])
        kind += f"; density on {form} data turned into a bound on the {levels}-level data"
    stderr = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else None
    out.update(nats=float(nll.mean()), nats_stderr=stderr, kind=kind)
    out["bits_per_dim"] = float(bits_per_dim(nll, dims).mean()) if levels is not None else None
    if not math.isfinite(out["nats"]):
        raise ValueError(f"Expected a finite NLL, but found {out['nats']}.")
    return out


def _run_method(
    name: str,
    settings: MethodSettings,
    ctx: dict[str, Any],
    budget: Budget,
    seed: int,
    device: torch.device,
    progress: bool,
    teachers: dict[str, Path] | None = None,
    keep_dir: Path | None = None,
) -> tuple[dict[str, Any], Tensor | None]:
    """One row: build, train, sample, score. Raises :class:`_Stage` on a failure.

    A student method (``teacher_method``) is built from the run directory of its teacher in ``teachers``;
    with ``keep_dir`` the trained method is saved there as a run (for the students after it).
    """
    row: dict[str, Any] = {"method": name, "status": "ok", "settings": _settings_json(settings)}
    cls = method_class(name)
    _run_stage("budget", _check_steps, settings.steps, f" of {name!r}")
    form = _run_stage("data", cls.data_form, ctx["data"])
    train = _run_stage("data", load_dataset, ctx["data"], "train", form=form)
    val = _run_stage("data", load_dataset, ctx["data"], "val", form=form)
    row["form"] = form
    config = dict(settings.config)
    teacher_name = getattr(cls, "teacher_method", None)
    if teacher_name:
        if teacher_name not in (teachers or {}):
            raise _Skip(f"its teacher {teacher_name!r} is not trained in this comparison (or failed)")
        config["teacher"] = str(teachers[teacher_name])
        row["teacher"] = teacher_name
    with torch.random.fork_rng(devices=[]):  # initialization is a function of the seed
        torch.manual_seed(seed)
        try:
            method = cls.from_data(train, **config)
        except NotImplementedError as exc:  # not buildable from data alone
            raise _Skip(f"from_data: {' '.join(str(exc).split()) or 'not implemented'}") from exc
        except Exception as exc:
            raise _Stage("build", exc) from exc
    if hasattr(method, "check_data"):
        _run_stage("data", method.check_data, train.x)
    start = time.perf_counter()
    fitted = _run_stage(
        "train",
        fit,
        method,
        train.x,
        val_data=val.x[: budget.num_val],
        steps=settings.steps,
        batch_size=min(settings.batch_size, len(train)),
        lr=settings.lr,
        seed=seed,
        val_every=max(settings.steps // budget.validations, 1),
        device=device,
        progress=progress,
        ema_decay=settings.ema_decay,
    )
    row["seconds"] = {"train": time.perf_counter() - start}
    row["trained_steps"], row["best_step"] = int(fitted.step), fitted.best_step
    method.eval()
    if keep_dir is not None:
        tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
        meta = {**run_record(method), "data": ctx["data"], "form": form, "step": int(fitted.step)}
        save_checkpoint(keep_dir, "last", tensors, meta)

    n = budget.num_generated[ctx["kind"]]
    if settings.sampler not in samplers_for(cls):
        raise _Stage(
            "sample",
            ValueError(f"Expected a sampler in {samplers_for(cls)}, but found {settings.sampler!r}."),
        )
    with NetworkCalls(method) as calls:
        start = time.perf_counter()
        generated = _run_stage(
            "sample",
            draw_samples,
            method,
            n,
            sampler=settings.sampler,
            steps=settings.sampler_steps,
            seed=seed + 1,
        )
        row["seconds"]["sampling"] = time.perf_counter() - start
    row["nfe_per_sample"] = calls.per_sample(n)
    row["sampler"] = (
        settings.sampler if settings.sampler_steps is None else f"{settings.sampler}-{settings.sampler_steps}"
    )
    generated = generated.detach().to("cpu", torch.float32).reshape(n, -1)
    bad = int((~torch.isfinite(generated)).any(1).sum())
    if bad:
        raise _Stage("sample", ValueError(f"Expected finite samples, but found {bad} of {n} non-finite."))
    if ctx["test_int"].num_levels is not None:
        generated = to_levels(generated, form, ctx["test_int"].num_levels)

    start = time.perf_counter()
    row["nll"] = _run_stage("nll", _nll, method, form, ctx, budget, seed, device)
    row["seconds"]["nll"] = time.perf_counter() - start
    start = time.perf_counter()
    row["samples"] = _run_stage("metrics", _sample_metrics, generated, ctx)
    row["seconds"]["metrics"] = time.perf_counter() - start
    return row, generated


def _guarded_row(
    name: str, settings: MethodSettings, *args: Any, **kwargs: Any
) -> tuple[dict[str, Any], Tensor | None]:
    """:func:`_run_method`, with a skipped or failed row in place of any error of the method."""
    not_ok = {"method": name, "status": "skipped", "stage": "build"}
    reason = _skip_reason(method_class(name))
    if reason is not None:
        return {**not_ok, "reason": reason}, None
    try:
        return _run_method(name, settings, *args, **kwargs)
    except _Skip as exc:
        return {**not_ok, "reason": str(exc)}, None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a method's failure is its row's; the others still run
        if isinstance(exc, _Stage):
            stage, reason = exc.stage, str(exc)
        else:
            stage, reason = "setup", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        not_ok.update(status="failed", stage=stage, reason=reason, settings=_settings_json(settings))
        return not_ok, None


def _settings_json(settings: MethodSettings) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(settings).items()}


def compare(
    data: str,
    *,
    methods: Sequence[str] | None = None,
    budget: str | Budget = "default",
    steps: int | Mapping[str, int] | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    r"""Fit every method (or ``methods``) on ``data`` with one budget and report them side by side.

    Args:
        data: a toy name, ``"digits"`` or a local file path (:func:`probgen.data.load_dataset`).
        methods: registry names; default every registered method (:func:`probgen.models.available`).
        budget: ``"default"`` (about 15 minutes for eight_gaussians, checkerboard and digits
            together on 2 CPU cores), ``"quick"`` (seconds; for tests) or a :class:`Budget`.
        steps: training steps overriding the budget's: one positive int for every method, or
            ``{name: steps}`` per method. A global value below 1 is a ``ValueError``; a
            per-method value below 1 fails that method's row only.
        out_dir: where ``compare.md``, ``compare.json`` and ``compare.png`` go (None: nothing written).
        seed: seeds each method's initialization and training (``seed``), its sampler (``seed + 1``)
            and the likelihood estimators; the global RNG stream is left as it was.
        device: where methods are trained and sampled (the budget is stated for ``"cpu"``).
        progress: show the trainers' progress bars.
        log: called with one line per finished method (status and seconds), e.g. ``print``.

    Returns:
        A :class:`CompareResult`. Each row's ``nll`` holds ``nats`` (per example), ``bits_per_dim``
        (level data), ``kind`` (what the number is), or ``reason`` when no estimator is
        registered; ``samples`` the metrics (``sliced_wasserstein``, ``mmd``, ``mode_coverage`` on
        mixtures, or ``frechet_distance`` on the digits); ``seconds`` the timings;
        ``nfe_per_sample`` the network evaluations per sample (:class:`NetworkCalls`).

    Raises:
        ValueError: an unknown budget or method name, or a global ``steps`` below 1.
        probgen.data.DataError: ``data`` cannot be loaded.
    """
    plan = _resolve_budget(budget)
    if steps is not None and not isinstance(steps, Mapping):
        _check_steps(steps, "")
    names = available() if methods is None else list(methods)
    unknown = [m for m in names if m not in available()]
    if unknown or not names:
        raise ValueError(f"Expected method names in {available()}, but found {unknown or names!r}.")
    test_int = load_dataset(data, "test", form="int")
    kind = "image" if len(test_int.event_shape) == 3 else "vector"
    ctx: dict[str, Any] = {
        "data": data,
        "kind": kind,
        "test_int": test_int,
        "toys": (*TOYS, "grid25"),
        "metric": "frechet_distance" if data == "digits" else "sliced_wasserstein",
    }
    ctx["test"] = (
        test_int if test_int.num_levels is not None else load_dataset(data, "test", n=plan.num_reference)
    )
    device = torch.device(device)
    floors = _floors(ctx, plan, seed)

    rows, samples = [], {}
    if "baseline_samples" in ctx:
        samples["independent pixels"] = ctx["baseline_samples"]
    # A student is trained after its teacher, from the teacher's run in this comparison.
    wanted = {getattr(method_class(n), "teacher_method", None) for n in names} - {None}
    order = list(names)  # the rows keep it; the training order puts teachers first
    names = sorted(names, key=lambda n: n not in wanted)
    teachers: dict[str, Path] = {}
    scratch = tempfile.TemporaryDirectory(prefix="probgen-compare-teachers-")
    for name in names:
        settings = settings_for(plan, name, kind)
        if isinstance(steps, Mapping) and name in steps:
            settings = dataclasses.replace(settings, steps=steps[name])
        elif isinstance(steps, int):
            settings = dataclasses.replace(settings, steps=steps)
        start = time.perf_counter()
        keep = Path(scratch.name) / name if name in wanted else None
        row, generated = _guarded_row(
            name, settings, ctx, plan, seed, device, progress, teachers=teachers, keep_dir=keep
        )
        if keep is not None and row["status"] == "ok":
            teachers[name] = keep
        row["wall_seconds"] = time.perf_counter() - start
        rows.append(row)
        if generated is not None:
            samples[name] = generated
        if log is not None:
            what = (
                row["status"]
                if row["status"] == "ok"
                else f"{row['status']} ({row['stage']}): {row['reason']}"
            )
            log(f"compare {data}: {name}: {what} [{row['wall_seconds']:.1f} s]")

    scratch.cleanup()
    rows.sort(key=lambda row: order.index(row["method"]))
    samples = {k: samples[k] for k in sorted(samples, key=lambda k: order.index(k) if k in order else -1)}
    result = CompareResult(
        data=data,
        kind=kind,
        seed=seed,
        floors=floors,
        rows=rows,
        samples=samples,
        budget={
            "name": plan.name,
            "num_generated": plan.num_generated[kind],
            "nll_examples": plan.nll_examples[kind],
            "likelihood_samples": plan.likelihood_samples,
            "num_reference": len(ctx["test"]),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
    )
    if out_dir is not None:
        from probgen.apps.compare_report import write_report

        result.paths = write_report(result, out_dir)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``probgen compare`` to ``parser`` (the handler is :func:`cli_main`)."""
    parser.add_argument("--data", required=True, metavar="DATA", help="a toy name, 'digits', or a data file")
    parser.add_argument(
        "--methods", default=None, metavar="A,B", help="comma-separated methods (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny budget of the test suite (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="training steps for every method")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--device", default="cpu", help="device (default cpu, where the budget is stated)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where compare.md/.json/.png go")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bars")


def cli_main(args: argparse.Namespace) -> int:
    """``probgen compare``: run :func:`compare` from parsed arguments, print the table.

    Returns:
        0 when at least one method has an ``ok`` row, else 1 (the files are written either way).
    """
    from probgen.apps.compare_report import markdown_table

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    result = compare(
        args.data,
        methods=methods,
        budget="quick" if args.quick else "default",
        steps=args.steps,
        out_dir=args.out,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(markdown_table(result), end="")
    print(f"wrote {', '.join(v for k, v in result.paths.items() if not k.endswith('error'))}")
    return 0 if any(row["status"] == "ok" for row in result.rows) else 1
