"""Consistency models on a 2-D toy against their teacher, over several seeds (mean and standard error).

A sliced Wasserstein distance of 5000 samples moves by a few hundredths between seeds when a sampler
leaves a handful of far outliers, which is what one- and few-step consistency samplers do. This script
repeats every sampler under ``--seeds`` seeds and reports, per sampler, the mean distance with its
standard error, the worst mode coverage, and the ratio of means to the teacher's 1000-step
Euler-Maruyama sampler (the issue's reference), with the per-seed ratios' standard error.

    python examples/consistency_toy2d.py       # trains out/consistency_toy2d/{teacher,cd,ct}
    python benchmarks/consistency_seeds.py --runs out/consistency_toy2d --seeds 5

Writes ``OUT/consistency_seeds.json`` and ``OUT/consistency_seeds.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import load_dataset, mixture_modes
from probgen.inference.consistency import sample_consistency
from probgen.inference.score_sde_sampling import sample_score_sde
from probgen.metrics import mean_and_stderr, mode_coverage, sliced_wasserstein
from probgen.models import load_method

STEP_COUNTS = (1, 2, 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=Path, default=Path("out/consistency_toy2d"), help="holds teacher/, cd/, ct/"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/consistency_seeds"))
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.samples < 2:
        raise SystemExit(f"Expected --seeds >= 1 and --samples >= 2, but found {args.seeds}, {args.samples}.")
    torch.set_num_threads(args.threads)
    teacher, meta = load_method(args.runs / "teacher", expected="score-sde")
    data = meta["data"]
    reference = load_dataset(data, "test").x[: args.samples]
    modes = mixture_modes(data) if data in ("eight_gaussians", "grid25") else None

    def measure(x: torch.Tensor) -> dict:
        out = {"sliced_wasserstein": sliced_wasserstein(x, reference)}
        if modes is not None:
            out["modes_captured"] = mode_coverage(x, *modes)["modes_captured"]
        return out

    samplers: dict[str, callable] = {
        f"teacher EM-{args.teacher_steps}": lambda g: sample_score_sde(
            teacher.sde_object, teacher.score, args.samples, teacher.data_dim, sampler="em",
            steps=args.teacher_steps, generator=g,
        )
    }  # fmt: skip
    for kind in ("cd", "ct"):
        if (args.runs / kind).is_dir():
            cm, _ = load_method(args.runs / kind, expected="consistency")
            for k in STEP_COUNTS:
                samplers[f"{kind.upper()} {k} step{'s' if k > 1 else ''}"] = lambda g, cm=cm, k=k: (
                    sample_consistency(cm, args.samples, steps=k, generator=g)
                )
    rows: dict[str, dict] = {}
    for name, draw in samplers.items():
        start = time.perf_counter()
        per_seed = [measure(draw(torch.Generator().manual_seed(s))) for s in range(args.seeds)]
        sw = [r["sliced_wasserstein"] for r in per_seed]
        mean, se = mean_and_stderr(sw)
        rows[name] = {"per_seed": sw, "mean": mean, "stderr": se, "seconds": time.perf_counter() - start}
        if modes is not None:
            rows[name]["modes_min"] = min(r["modes_captured"] for r in per_seed)
        print(f"{name:<18} sliced W2 {mean:.4f} ± {se:.4f}", flush=True)
    ref_name = next(iter(rows))
    ref = rows[ref_name]
    lines = [
        f"### {data}: sliced W2 of {args.samples} samples, mean ± s.e. over {args.seeds} seeds",
        "",
        f"| sampler | sliced W2 | / {ref_name} (ratio of means) | per-seed ratio ± s.e. | fewest modes |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        ratios = [a / b for a, b in zip(r["per_seed"], ref["per_seed"])]
        r["ratio_of_means"] = r["mean"] / ref["mean"]
        r["per_seed_ratio"], r["per_seed_ratio_stderr"] = mean_and_stderr(ratios)
        lines.append(
            f"| {name} | {r['mean']:.4f} ± {r['stderr']:.4f} | {r['ratio_of_means']:.2f} | "
            f"{r['per_seed_ratio']:.2f} ± {r['per_seed_ratio_stderr']:.2f} | {r.get('modes_min', '-')} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "consistency_seeds.md").write_text(table + "\n")
    report = {"data": data, "samples": args.samples, "seeds": args.seeds, "rows": rows}
    write_json_atomic(args.out / "consistency_seeds.json", report)
    return report


if __name__ == "__main__":
    main()
