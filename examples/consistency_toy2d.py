"""Consistency distillation and consistency training on a 2-D toy, against the 1000-step teacher.

Consistency models (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469): a network
f(x_t, t) maps any point of a probability-flow ODE path to its end, so one evaluation samples. This
script trains (or loads, ``--teacher RUN``) a VE ``score-sde`` teacher, distils it (CD: the target is
one Heun step of the teacher's PF-ODE), trains a second model without a teacher (CT: the same noise
at two adjacent times; its schedule N(k) ends at ``--ct-s1`` = 20 here, as the paper's 150 is tuned for
800k steps, not 3000), and samples both in 1, 2 and 4 steps (the fixed noise-level schedule of
``Consistency.sample_sigmas``). The reference is the teacher's 1000-step sampler: Euler-Maruyama on
the reverse SDE (the issue's target) and, for the record, 1000 Heun steps of the PF-ODE (what CD
distils); both end with the Tweedie denoising step.

    python examples/consistency_toy2d.py                        # eight Gaussians, about 5 min on 2 CPU cores
    python examples/consistency_toy2d.py --teacher runs/sde-ve  # distil an existing VE score-sde run
    python examples/consistency_toy2d.py --teacher-steps 5 --steps 5 --ct-steps 5 --sample-steps 5 \\
        --num-samples 64 --out /tmp/c                           # smoke

Writes ``OUT/samples.png`` (teacher, CD and CT samples side by side per step count), ``OUT/loss.png``,
``OUT/report.json`` and run directories ``OUT/teacher``, ``OUT/cd``, ``OUT/ct`` (``probgen sample OUT/cd
--sampler consistency --steps 2`` works on them); prints sliced Wasserstein-2 distances to held-out
data next to the data-vs-data floor, mode coverage, and the ratio of each to the teacher's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import TOYS, load_dataset, mixture_modes
from probgen.inference import fit
from probgen.inference.consistency import sample_consistency
from probgen.inference.score_sde_sampling import sample_score_sde
from probgen.metrics import mode_coverage, sliced_wasserstein
from probgen.models import load_method
from probgen.models.consistency import Consistency
from probgen.models.score_sde import ScoreSDE
from probgen.plotting import save_loss_curves, save_scatter_panel

STEP_COUNTS = (1, 2, 4)
TARGETS = {1: 1.5, 2: 1.25}  # CD's sliced Wasserstein over the teacher's 1000-step EM one (the issue)


def _metrics(x: torch.Tensor, reference: torch.Tensor, data: str) -> dict:
    out = {"sliced_wasserstein": sliced_wasserstein(x, reference)}
    if data in ("eight_gaussians", "grid25"):
        centres, std = mixture_modes(data)
        out["modes_captured"] = mode_coverage(x, centres, std)["modes_captured"]
    return out


def _teacher(args, train, val) -> tuple[ScoreSDE, str, float | None]:
    if args.teacher is not None:
        teacher, _ = load_method(args.teacher, expected="score-sde")
        return teacher, str(args.teacher), None
    torch.manual_seed(args.seed)
    teacher = ScoreSDE.from_data(train, sde="ve")
    run_dir = args.out / "teacher"
    start = time.perf_counter()
    fit(
        teacher, train.x, val_data=val.x[:2000], steps=args.teacher_steps, batch_size=args.batch_size,
        lr=args.teacher_lr, seed=args.seed, ema_decay=0.999, val_every=max(1, args.teacher_steps // 5),
        progress=not args.no_progress, run_dir=run_dir,
        metadata={"data": args.data, "form": "int",
                  "event_shape": [2], "num_levels": None},
    )  # fmt: skip
    return teacher, str(run_dir), time.perf_counter() - start


def _consistency(args, train, val, teacher: ScoreSDE, teacher_dir: str, kind: str, steps: int):
    torch.manual_seed(args.seed)
    if kind == "cd":
        cm = Consistency.from_data(train, teacher=teacher_dir, num_scales=args.num_scales)
    else:  # CT on the teacher's SDE, so that both models follow the same ODE
        keys = ("sde", "sigma_min", "sigma_max", "T")
        opts = {k: teacher.config[k] for k in keys} | {"eps": teacher.sde_object.eps, "s1": args.ct_s1}
        cm = Consistency.from_data(train, **opts)
    start = time.perf_counter()
    result = fit(
        cm, train.x, val_data=val.x[:2000], steps=steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, val_every=max(1, steps // 10), progress=not args.no_progress, run_dir=args.out / kind,
        metadata={"data": args.data, "form": "int", "event_shape": [2], "num_levels": None},
    )  # fmt: skip
    return cm, result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--teacher", type=Path, default=None, help="a VE score-sde run to distil")
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=3000, help="consistency distillation steps")
    parser.add_argument("--ct-steps", type=int, default=3000, help="consistency training steps (0: skip CT)")
    parser.add_argument("--num-scales", type=int, default=18, help="N of distillation")
    parser.add_argument(
        "--ct-s1",
        type=int,
        default=20,
        help="CT's final N s1 (the paper's 150 suits 800k steps)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=1000, help="steps of the teacher's samplers")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/consistency_toy2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if any((args.out / k).is_dir() and any((args.out / k).glob("*.json")) for k in ("teacher", "cd", "ct")):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")

    train, val, test = (load_dataset(args.data, s) for s in ("train", "val", "test"))
    n = args.num_samples
    reference, floor = test.x[:n], sliced_wasserstein(val.x[:n], test.x[:n])
    teacher, teacher_dir, teacher_seconds = _teacher(args, train, val)
    report: dict = {"data": args.data, "num_samples": n, "sliced_wasserstein_floor": floor, "teacher": {}}
    panels: dict[str, torch.Tensor] = {}
    for sampler, opts in (("em", {}), ("ode", {"solver": "heun2"})):
        g = torch.Generator().manual_seed(args.seed + 1)
        start = time.perf_counter()
        x = sample_score_sde(
            teacher.sde_object,
            teacher.score,
            n,
            2,
            sampler=sampler,
            steps=args.sample_steps,
            generator=g,
            **opts,
        )
        name = "reverse SDE, Euler-Maruyama" if sampler == "em" else "PF-ODE, Heun"
        report["teacher"][sampler] = _metrics(x, reference, args.data) | {
            "what": f"{name}, {args.sample_steps} steps",
            "seconds": time.perf_counter() - start,
        }
        panels[f"teacher: {sampler.upper()} {args.sample_steps} steps"] = x
    report["teacher"]["train_seconds"] = teacher_seconds
    histories = {}
    for kind, steps in (("cd", args.steps), ("ct", args.ct_steps)):
        if steps < 1:
            continue
        cm, result, seconds = _consistency(args, train, val, teacher, teacher_dir, kind, steps)
        histories[kind.upper()] = result.history["train"]
        entry = {"train_steps": result.step, "train_seconds": seconds, "best_step": result.best_step}
        for k in STEP_COUNTS:
            start = time.perf_counter()
            x = sample_consistency(cm, n, steps=k, generator=torch.Generator().manual_seed(args.seed + 1))
            entry[f"{k}_step"] = _metrics(x, reference, args.data) | {"seconds": time.perf_counter() - start}
            entry[f"{k}_step"]["ratio_to_teacher_em"] = (
                entry[f"{k}_step"]["sliced_wasserstein"] / report["teacher"]["em"]["sliced_wasserstein"]
            )
            panels[f"{kind.upper()}: {k} step{'s' if k > 1 else ''}"] = x
        report[kind] = entry
    if "cd" in report:
        report["targets"] = {
            f"cd_{k}_step_within_{r}x": report["cd"][f"{k}_step"]["ratio_to_teacher_em"] <= r
            for k, r in TARGETS.items()
        }
    ncols = 1 + len(STEP_COUNTS)
    order = [p for p in panels if p.startswith("teacher")]
    rows = [[order[0]] + [p for p in panels if p.startswith("CD")]]
    rows.append([order[1]] + [p for p in panels if p.startswith("CT")])
    ordered = {p: panels[p] for row in rows for p in row}
    title = f"consistency models on {args.data}: teacher (1000 steps) vs CD / CT in 1, 2, 4 steps"
    save_scatter_panel(ordered, args.out / "samples.png", ncols=ncols, title=title, lim=5.0)
    if histories:
        save_loss_curves(
            histories, args.out / "loss.png", title="consistency objective (squared L2)", logy=True
        )
    write_json_atomic(args.out / "report.json", report)

    print(f"sliced Wasserstein-2 to {n} test points; data-vs-data floor {floor:.4f}")
    for sampler in ("em", "ode"):
        r = report["teacher"][sampler]
        print(
            f"  teacher {r['what']:<40} {r['sliced_wasserstein']:.4f}  modes {r.get('modes_captured', 'n/a')}"
        )
    for kind in ("cd", "ct"):
        if kind not in report:
            continue
        for k in STEP_COUNTS:
            r = report[kind][f"{k}_step"]
            print(
                f"  {kind.upper()} {k} step(s){'':<32} {r['sliced_wasserstein']:.4f}  modes "
                f"{r.get('modes_captured', 'n/a')}  ({r['ratio_to_teacher_em']:.2f}x the teacher's EM)"
            )
        print(
            f"  ({kind.upper()}: {report[kind]['train_steps']} steps "
            f"in {report[kind]['train_seconds']:.0f} s)"
        )
    if "targets" in report:
        print("targets:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in report["targets"].items()))
    print(f"wrote {args.out}/samples.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
