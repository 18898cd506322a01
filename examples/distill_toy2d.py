"""Progressive distillation of a DDPM's DDIM sampler on a 2-D toy: 256 steps down to 4, 2 and 1.

Salimans & Ho 2022 (arXiv:2202.00512): a student initialized from its teacher learns to take
in one deterministic DDIM step what the teacher takes in two; it then teaches the next student.
The teacher is a DDPM (Ho et al. 2020, arXiv:2006.11239) trained here (or loaded with
``--teacher-run``) and sampled by DDIM (eta = 0) on ``--start-steps`` steps; each stage is a
:class:`~probgen.models.distilled.Distilled` fit with ``fit`` to the Pyro program of Algorithm 2
and checkpointed in ``OUT/distill/stage-K``.

Every sampler starts from the same noise. For each stage the script reports the sliced
Wasserstein distance to held-out data (next to the data-vs-data floor) and the modes captured,
against the teacher's DDIM at the starting step count, plain DDIM of the teacher at the student's
step count, and ancestral sampling with all T = 1000 steps.

    python examples/distill_toy2d.py                         # 5-10 minutes on 2 CPU cores
    python examples/distill_toy2d.py --teacher-run out/distill_toy2d/teacher
    python examples/distill_toy2d.py --teacher-steps 20 --steps-per-stage 5 --start-steps 8 \\
        --num-samples 200 --ancestral-samples 50 --out /tmp/distill      # smoke test

Writes ``OUT/samples.png`` (samples per sampler), ``OUT/quality.png`` (distance against steps),
``OUT/report.json`` and the runs ``OUT/teacher`` and ``OUT/distill/stage-K``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import TOYS, load_dataset, mixture_modes
from probgen.inference import ancestral_sample, fit
from probgen.inference.distill import grid_ddim_sample, load_teacher, progressive_distill
from probgen.metrics import mode_coverage, sliced_wasserstein
from probgen.models import DDPM
from probgen.plotting import save_line_plot, save_scatter_panel


def _teacher(args, train) -> tuple[DDPM, dict]:
    if args.teacher_run is not None:
        teacher, meta = load_teacher(args.teacher_run)
        if meta.get("data") != args.data:
            raise SystemExit(f"--teacher-run holds a model of {meta.get('data')!r}, not of {args.data!r}")
        return teacher, {"run": str(args.teacher_run), "tag": meta["tag"], "train_seconds": 0.0}
    torch.manual_seed(args.seed)
    teacher = DDPM.from_data(train, weighting="simple")
    start = time.perf_counter()
    fit(
        teacher,
        train.x,
        steps=args.teacher_steps,
        batch_size=args.batch_size,
        lr=1e-3,
        ema_decay=0.999,
        seed=args.seed,
        progress=not args.no_progress,
        run_dir=args.out / "teacher",
        resume=True,
        metadata={"data": args.data, "form": "int",
                  "event_shape": [2], "num_levels": None},
    )  # fmt: skip
    info = {"run": str(args.out / "teacher"), "train_steps": args.teacher_steps}
    return teacher, info | {"train_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--teacher-run", type=Path, default=None, help="a trained DDPM run to distil")
    parser.add_argument("--teacher-steps", type=int, default=6000, help="training steps of the teacher")
    parser.add_argument("--start-steps", type=int, default=256, help="the teacher's DDIM steps")
    parser.add_argument("--to-steps", type=int, default=1)
    parser.add_argument("--steps-per-stage", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--ancestral-samples", type=int, default=2000, help="ancestral-1000 is slow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/distill_toy2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train, val, test = (load_dataset(args.data, s) for s in ("train", "val", "test"))
    teacher, teacher_info = _teacher(args, train)
    start = time.perf_counter()
    result = progressive_distill(
        teacher,
        train.x,
        start_steps=args.start_steps,
        to_steps=args.to_steps,
        steps_per_stage=args.steps_per_stage,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out=args.out / "distill",
        metadata={"data": args.data, "form": "int", "event_shape": [2], "num_levels": None},
        progress=not args.no_progress,
    )
    distill_seconds = time.perf_counter() - start

    n = min(args.num_samples, test.x.shape[0])
    reference = test.x[:n]
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    modes = mixture_modes(args.data) if args.data in ("eight_gaussians",) else None

    def measure(x: torch.Tensor, seconds: float, ref: torch.Tensor = reference) -> dict:
        row = {"sliced_wasserstein": sliced_wasserstein(x, ref), "seconds": seconds}
        if modes is not None:
            row["modes_captured"] = mode_coverage(x, *modes)["modes_captured"]
        return row

    def timed(fn, *fn_args, **kwargs):
        begin = time.perf_counter()
        return fn(*fn_args, **kwargs), time.perf_counter() - begin

    samples, rows = {}, []
    m = min(args.ancestral_samples, n)
    x, secs = timed(ancestral_sample, teacher, m, generator=torch.Generator().manual_seed(args.seed))
    samples[f"ancestral, {teacher.T} steps"] = x
    rows.append({"sampler": "ancestral", "steps": teacher.T, "samples": m} | measure(x, secs, test.x[:m]))
    x, secs = timed(grid_ddim_sample, teacher, n, steps=args.start_steps, x_T=x_T)
    samples[f"teacher DDIM, {args.start_steps} steps"] = x
    rows.append({"sampler": "teacher DDIM", "steps": args.start_steps, "samples": n} | measure(x, secs))
    for k in result.students:
        x, secs = timed(grid_ddim_sample, teacher, n, steps=k, x_T=x_T)
        rows.append({"sampler": "teacher DDIM", "steps": k, "samples": n} | measure(x, secs))
        if k <= 4:
            samples[f"teacher DDIM, {k} steps"] = x
        x, secs = timed(grid_ddim_sample, result.methods[k], n, x_T=x_T)
        rows.append({"sampler": "distilled", "steps": k, "samples": n} | measure(x, secs))
        if k <= 4:
            samples[f"distilled, {k} steps"] = x
    floor = sliced_wasserstein(val.x[:n], reference)
    teacher_sw = rows[1]["sliced_wasserstein"]
    by_steps = {r["steps"]: r["sliced_wasserstein"] for r in rows if r["sampler"] == "distilled"}
    report = {
        "data": args.data,
        "teacher": teacher_info,
        "start_steps": args.start_steps,
        "stages": result.students,
        "distill_seconds": distill_seconds,
        "floor_sliced_wasserstein": floor,
        "rows": rows,
        "distilled_over_teacher": {str(k): v / teacher_sw for k, v in by_steps.items()},
    }

    args.out.mkdir(parents=True, exist_ok=True)
    save_scatter_panel(
        {"data (test)": reference} | samples,
        args.out / "samples.png",
        title=f"progressive distillation, {args.data}",
    )
    series = {}
    for name in ("distilled", "teacher DDIM"):
        pts = sorted((r["steps"], r["sliced_wasserstein"]) for r in rows if r["sampler"] == name)
        series[name] = ([p[0] for p in pts], [p[1] for p in pts])
    series[f"ancestral ({teacher.T})"] = ([teacher.T], [rows[0]["sliced_wasserstein"]])
    series["data-vs-data floor"] = ([1, teacher.T], [floor, floor])
    save_line_plot(
        series,
        args.out / "quality.png",
        xlabel="sampling steps (network evaluations)",
        ylabel="sliced Wasserstein-2 to test data",
        title=f"{args.data}: quality per step count",
        logx=True,
        logy=True,
    )
    write_json_atomic(args.out / "report.json", report)
    print(f"teacher: {teacher_info}; distillation {distill_seconds:.0f} s; floor (val vs test) {floor:.4f}")
    print(f"{'sampler':<14} {'steps':>5} {'SW':>8} {'/teacher':>8} {'modes':>5} {'seconds':>7}")
    for r in rows:
        print(
            f"{r['sampler']:<14} {r['steps']:>5} {r['sliced_wasserstein']:>8.4f} "
            f"{r['sliced_wasserstein'] / teacher_sw:>8.2f} {r.get('modes_captured', '-'):>5} "
            f"{r['seconds']:>7.1f}"
        )
    print(f"wrote {args.out}/samples.png, quality.png, report.json")
    return report


if __name__ == "__main__":
    main()
