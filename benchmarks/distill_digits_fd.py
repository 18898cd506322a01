"""Progressive distillation of the digits DDPM to 4 steps, and its Fréchet distance next to its teacher's.

Salimans & Ho 2022 (arXiv:2202.00512). Distils the teacher's DDIM-256 stage by stage
(:func:`probgen.inference.distill.progressive_distill`; finished stages are loaded from ``--out``),
then draws ``--samples`` digits from the same prior noise with the teacher's DDIM-256, the first and
the last student, and reports each Fréchet distance (digits classifier features, against the test
split) and the ratio last student / teacher (the issue's target: at most 1.25x).

    python examples/ddpm_digits.py                       # the teacher, out/ddpm_digits
    python benchmarks/distill_digits_fd.py --teacher out/ddpm_digits --out out/distill_digits_long

Writes ``OUT/fd.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from probgen.data import load_dataset
from probgen.inference.distill import grid_ddim_sample, progressive_distill
from probgen.metrics import digits_frechet_distance
from probgen.models import load_method


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("out/ddpm_digits"))
    parser.add_argument("--out", type=Path, default=Path("out/distill_digits_long"))
    parser.add_argument(
        "--steps-per-stage",
        type=int,
        nargs="+",
        default=[1000, 250, 250, 250, 250, 250],
        help="training steps of every stage (one number) or of each stage, first first",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    teacher, _ = load_method(args.teacher, "best")
    meta = {"data": "digits", "form": "int", "event_shape": [1, 8, 8], "num_levels": 17}
    start = time.perf_counter()
    result = progressive_distill(
        teacher,
        train.x,
        start_steps=256,
        to_steps=4,
        steps_per_stage=args.steps_per_stage[0] if len(args.steps_per_stage) == 1 else args.steps_per_stage,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        metadata={**meta, "teacher_run": str(args.teacher)},
    )
    seconds = time.perf_counter() - start
    n = args.samples
    x_T = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    rows = {"floor: train vs test": digits_frechet_distance(train.x[:n], test.x)}
    samples = grid_ddim_sample(teacher, n, steps=256, x_T=x_T)
    rows["teacher DDIM 256"] = digits_frechet_distance(samples, test.x)
    for k in (128, 4):
        student = result.methods[k]
        rows[f"distilled {k}"] = digits_frechet_distance(grid_ddim_sample(student, n, x_T=x_T), test.x)
    report = {
        "frechet_distance": rows,
        "ratio_4_over_teacher": rows["distilled 4"] / rows["teacher DDIM 256"],
        "samples": n,
        "steps_per_stage": args.steps_per_stage,
        "distill_seconds": seconds,
        "stages": result.students,
        "stage_seconds": result.seconds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fd.json").write_text(json.dumps(report, indent=1))
    for name, value in rows.items():
        print(f"{name:<24} FD {value:.3f}")
    print(f"4 steps / teacher DDIM-256: {report['ratio_4_over_teacher']:.2f}x (target <= 1.25x)")
    return report


if __name__ == "__main__":
    main()
