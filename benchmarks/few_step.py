"""Sample quality per number of steps: ancestral, DDIM, PF-ODE, consistency models, progressive distillation.

One table, one JSON and one curve for a 2-D toy (default ``eight_gaussians``, sliced Wasserstein of
``--toy-samples`` samples to the test points) and, where the runs are given, the digits (Fréchet
distance in the protocol's classifier features, ``--digits-samples`` samples against the test
split). Every distance is quoted next to its data-vs-data floor; the curve plots distance / floor
against the number of network evaluations (log axes). Nothing is trained here: the runs are loaded.

* ancestral: the DDPM's T-step reverse chain; DDIM (eta = 0, evenly spaced, ``--ddim-steps``); both
  measured by ``benchmarks/ddpm_steps.py``'s ``sweep``.
* PF-ODE: the DDPM's noise prediction read as the score of the VP SDE whose discretization the
  DDPM is (:class:`probgen.sdes.VPSDE` with :math:`\\beta_{\\min,\\max} = T \\beta_{1,T}`; step ``i``
  sits at time :math:`(i - 1)/(T - 1)`), :math:`s(x, t) = -\\hat\\epsilon / \\sigma(t)`, integrated by
  Euler with K even steps (K evaluations), then the bin of the result for level data.
* consistency distillation / training (``--*-cd-run`` / ``--*-ct-run``, runs of
  ``probgen.inference.consistency``): its ``consistency`` sampler with 1, 2, 4 steps; a row
  "not available" where the module or the run is missing.
* progressive distillation (``--*-distill-run``, a run of ``probgen distill`` or
  ``examples/distill_toy2d.py``'s ``OUT/distill``): every stage ``stage-K`` with its K steps, and its
  teacher's DDIM on the same grid at the starting step count.

    python benchmarks/few_step.py --toy-run out/distill_toy2d/teacher \\
        --toy-distill-run out/distill_toy2d/distill --digits-run out/ddpm_digits \\
        --digits-distill-run out/distill_digits --out out/few_step     # ~15 min on 2 CPU cores

Writes ``OUT/few_step.md``, ``OUT/few_step.json`` and ``OUT/few_step.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ddpm_steps import sweep  # benchmarks/ddpm_steps.py (scripts run with benchmarks/ on sys.path)

from probgen.apps.evaluate import to_levels
from probgen.checkpoint import read_json, write_json_atomic
from probgen.data import TOYS, load_dataset
from probgen.inference.distill import grid_ddim_sample
from probgen.inference.ode import ode_sample
from probgen.inference.sampling import draw_samples
from probgen.metrics import digits_frechet_distance, sliced_wasserstein
from probgen.models import DDPM, load_method
from probgen.plotting import save_line_plot
from probgen.sdes import VPSDE

DDIM_STEPS = (10, 20, 50, 100)
ODE_STEPS = (10, 20, 50, 100)
CONSISTENCY_STEPS = (1, 2, 4)


@torch.no_grad()
def pf_ode_sample(ddpm: DDPM, num: int, steps: int, seed: int) -> torch.Tensor:
    """Euler on the VP probability-flow ODE with the DDPM's noise prediction as the score."""
    betas, T = ddpm.schedule.betas, ddpm.T
    sde = VPSDE(beta_min=float(betas[0]) * T, beta_max=float(betas[-1]) * T, eps=1.0 / (T - 1))
    if (betas - torch.linspace(float(betas[0]), float(betas[-1]), T, dtype=betas.dtype)).abs().max() > 1e-9:
        raise ValueError("Expected a DDPM with a linear schedule for the VP PF-ODE, but found another.")

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        out = ddpm.net(x.reshape(x.shape[0], *ddpm.event_shape), t * (T - 1)).reshape(x.shape)
        return -out / sde.marginal_params(t)[1][:, None]

    x = torch.randn(num, ddpm.data_dim, generator=torch.Generator().manual_seed(seed))
    x = ode_sample(sde, score_fn, x, method="euler", steps=steps)
    if ddpm.decoder == "discretized":
        return ((x + 1) * (ddpm.num_levels / 2)).floor().clamp(0, ddpm.num_levels - 1)
    return x


def _timed(rows: list[dict], sampler: str, steps: int, distance, fn: Callable[[], torch.Tensor]) -> None:
    start = time.perf_counter()
    x = fn()
    seconds = time.perf_counter() - start
    rows.append(dict(sampler=sampler, steps=steps, distance=distance(x), seconds=seconds))


def _consistency_rows(rows, label: str, run: Path | None, num: int, distance, seed: int) -> None:
    try:
        import probgen.inference.consistency  # noqa: F401  (registers the "consistency" sampler)
    except ImportError as exc:
        rows.append(dict(sampler=label, steps=None, distance=None, note=f"not available ({exc})"))
        return
    if run is None or not Path(run).is_dir():
        rows.append(dict(sampler=label, steps=None, distance=None, note="not available (no run given)"))
        return
    method, meta = load_method(run)
    form, levels = meta.get("form", "int"), meta.get("num_levels")
    for k in CONSISTENCY_STEPS:

        def draw(k=k):
            x = draw_samples(method, num, sampler="consistency", steps=k, seed=seed).float()
            return to_levels(x, form, levels) if levels is not None and form != "int" else x

        _timed(rows, label, k, distance, draw)


def _distill_rows(rows, teacher: DDPM, run: Path | None, num: int, distance, seed: int) -> None:
    if run is None or not (Path(run) / "distill.json").is_file():
        rows.append(
            dict(sampler="progressive distillation", steps=None, distance=None, note="not available (no run)")
        )
        return
    info = read_json(Path(run) / "distill.json")
    x_T = torch.randn(num, teacher.data_dim, generator=torch.Generator().manual_seed(seed))
    start_steps = int(info["start_steps"])
    _timed(rows, "teacher DDIM (distillation grid)", start_steps, distance,
           lambda: grid_ddim_sample(teacher, num, steps=start_steps, x_T=x_T))  # fmt: skip
    for stage in info["stages"]:
        student, _ = load_method(Path(run) / stage["dir"], "last", expected="distilled")
        _timed(rows, "progressive distillation", stage["steps"], distance,
               lambda s=student: grid_ddim_sample(s, num, x_T=x_T))  # fmt: skip


def measure(teacher: DDPM, num: int, distance, args, cd_run, ct_run, distill_run) -> list[dict]:
    rows = sweep(teacher, num, distance, args.ddim_steps, [(0.0, "linear")], args.seed)
    for k in args.ode_steps:
        _timed(rows, "PF-ODE (Euler)", k, distance, lambda k=k: pf_ode_sample(teacher, num, k, args.seed))
    _consistency_rows(rows, "consistency distillation", cd_run, num, distance, args.seed)
    _consistency_rows(rows, "consistency training", ct_run, num, distance, args.seed)
    _distill_rows(rows, teacher, distill_run, num, distance, args.seed)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--toy-run", type=Path, default=Path("out/distill_toy2d/teacher"))
    parser.add_argument("--toy-distill-run", type=Path, default=Path("out/distill_toy2d/distill"))
    parser.add_argument("--toy-cd-run", type=Path, default=None)
    parser.add_argument("--toy-ct-run", type=Path, default=None)
    parser.add_argument("--toy-samples", type=int, default=5000)
    parser.add_argument("--digits-run", type=Path, default=None, help="e.g. out/ddpm_digits")
    parser.add_argument("--digits-distill-run", type=Path, default=None, help="e.g. out/distill_digits")
    parser.add_argument("--digits-cd-run", type=Path, default=None)
    parser.add_argument("--digits-ct-run", type=Path, default=None)
    parser.add_argument("--digits-samples", type=int, default=500)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=list(DDIM_STEPS))
    parser.add_argument("--ode-steps", type=int, nargs="+", default=list(ODE_STEPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/few_step"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    report: dict = {}
    teacher, meta = load_method(args.toy_run, expected="ddpm")
    toy = meta.get("data", args.toy)
    test, val = load_dataset(toy, "test"), load_dataset(toy, "val")
    n = min(args.toy_samples, test.x.shape[0])
    ref = test.x[:n]
    report[toy] = dict(
        metric="sliced Wasserstein-2",
        floor=sliced_wasserstein(val.x[:n], ref),
        rows=measure(teacher, n, lambda x: sliced_wasserstein(x.float(), ref), args,
                     args.toy_cd_run, args.toy_ct_run, args.toy_distill_run),
    )  # fmt: skip
    if args.digits_run is not None:
        digits, _ = load_method(args.digits_run, expected="ddpm")
        test_d, train_d = load_dataset("digits", "test"), load_dataset("digits", "train")
        m = args.digits_samples
        report["digits"] = dict(
            metric="Fréchet distance (digits classifier features)",
            floor=digits_frechet_distance(train_d.x[:m], test_d.x),
            rows=measure(digits, m, lambda x: digits_frechet_distance(x, test_d.x), args,
                         args.digits_cd_run, args.digits_ct_run, args.digits_distill_run),
        )  # fmt: skip

    lines, series = [], {}
    for name, res in report.items():
        rows, floor = res["rows"], res["floor"]
        teacher_rows = [r for r in rows if r["sampler"] == "teacher DDIM (distillation grid)"]
        pd4 = [r for r in rows if r["sampler"] == "progressive distillation" and r["steps"] == 4]
        if teacher_rows and pd4:
            res["distilled4_over_teacher"] = pd4[0]["distance"] / teacher_rows[0]["distance"]
        lines += [
            f"### {name}: {res['metric']} (floor, data vs data: {floor:.4f})",
            "",
            "| sampler | steps | distance | / floor | seconds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            if r["distance"] is None:
                lines.append(f"| {r['sampler']} | - | {r['note']} | - | - |")
                continue
            lines.append(
                f"| {r['sampler']} | {r['steps']} | {r['distance']:.4f} | {r['distance'] / floor:.2f} | "
                f"{r['seconds']:.1f} |"
            )
            key = f"{name}: {r['sampler']}"
            xs, ys = series.setdefault(key, ([], []))
            xs.append(r["steps"])
            ys.append(r["distance"] / floor)
        if "distilled4_over_teacher" in res:
            lines.append("")
            lines.append(
                f"progressive distillation, 4 steps / its teacher's DDIM-{teacher_rows[0]['steps']}: "
                f"**{res['distilled4_over_teacher']:.2f}x** (target <= 1.25x)"
            )
        lines.append("")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "few_step.md").write_text(table + "\n")
    write_json_atomic(args.out / "few_step.json", report)
    series = {k: (list(v[0]), list(v[1])) for k, v in series.items()}
    for key, (xs, ys) in series.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        series[key] = ([xs[i] for i in order], [ys[i] for i in order])
    save_line_plot(
        series,
        args.out / "few_step.png",
        xlabel="sampling steps (network evaluations)",
        ylabel="distance / data-vs-data floor",
        title="sample quality per step count",
        logx=True,
        logy=True,
    )
    print(f"wrote {args.out}/few_step.md, few_step.json, few_step.png")
    return report


if __name__ == "__main__":
    main()
