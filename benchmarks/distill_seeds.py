"""Progressive distillation against its teacher over several seeds of shared prior noise.

Salimans & Ho 2022 (arXiv:2202.00512). For each seed, the teacher's DDIM on the distillation grid
(``--teacher-steps``, default 256) and the last student (``stage-K`` of ``--run``) start from the same
prior draws; the distance to the test split (sliced W2 for the toys, the Fréchet distance of the protocol
for digits) of both is recorded, and the ratio student / teacher is reported as the ratio of means and as
the mean of the per-seed ratios with its standard error (the issue's target: at most 1.25x at 4 steps).

    python examples/distill_toy2d.py
    python benchmarks/distill_seeds.py --teacher out/distill_toy2d/teacher --run out/distill_toy2d/distill

Writes ``OUT/distill_seeds.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from probgen.checkpoint import read_json, write_json_atomic
from probgen.data import load_dataset
from probgen.inference.distill import grid_ddim_sample
from probgen.metrics import digits_frechet_distance, mean_and_stderr, sliced_wasserstein
from probgen.models import load_method


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("out/distill_toy2d/teacher"))
    parser.add_argument("--run", type=Path, default=Path("out/distill_toy2d/distill"), help="holds stage-K/")
    parser.add_argument("--steps", type=int, default=4, help="K of the student (default 4)")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/distill_seeds"))
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.samples < 2:
        raise SystemExit(f"Expected --seeds >= 1 and --samples >= 2, but found {args.seeds}, {args.samples}.")
    torch.set_num_threads(args.threads)
    teacher, meta = load_method(args.teacher, expected="ddpm")
    student, _ = load_method(args.run / f"stage-{args.steps}", "last", expected="distilled")
    start_steps = int(read_json(args.run / "distill.json")["start_steps"])
    data = meta["data"]
    test = load_dataset(data, "test").x
    if data == "digits":
        metric, distance = "Fréchet distance", lambda x: digits_frechet_distance(x, test)
    else:
        reference = test[: args.samples]
        metric, distance = "sliced Wasserstein-2", lambda x: sliced_wasserstein(x, reference)
    rows: dict[str, list[float]] = {"teacher": [], "student": []}
    for seed in range(args.seeds):
        x_T = torch.randn(args.samples, teacher.data_dim, generator=torch.Generator().manual_seed(seed))
        rows["teacher"].append(distance(grid_ddim_sample(teacher, args.samples, steps=start_steps, x_T=x_T)))
        rows["student"].append(distance(grid_ddim_sample(student, args.samples, x_T=x_T)))
        print(f"seed {seed}: teacher {rows['teacher'][-1]:.4f}, {args.steps} steps {rows['student'][-1]:.4f}")
    (t, t_se), (s, s_se) = mean_and_stderr(rows["teacher"]), mean_and_stderr(rows["student"])
    ratio, ratio_se = mean_and_stderr([b / a for a, b in zip(rows["teacher"], rows["student"])])
    report = {
        "data": data, "metric": metric, "samples": args.samples, "seeds": args.seeds,
        "teacher_steps": start_steps, "student_steps": args.steps, "per_seed": rows,
        "teacher": [t, t_se], "student": [s, s_se], "ratio_of_means": s / t,
        "per_seed_ratio": [ratio, ratio_se],
    }  # fmt: skip
    print(
        f"{data}, {metric} of {args.samples} samples over {args.seeds} seeds: teacher DDIM-{start_steps} "
        f"{t:.4f} ± {t_se:.4f}, student {args.steps} steps {s:.4f} ± {s_se:.4f}; ratio of means {s / t:.3f}, "
        f"per seed {ratio:.3f} ± {ratio_se:.3f} (target <= 1.25)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "distill_seeds.json", report)
    return report


if __name__ == "__main__":
    main()
