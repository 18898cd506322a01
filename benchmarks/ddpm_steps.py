"""DDPM sample quality per number of sampling steps: ancestral (T steps) against DDIM.

DDIM runs in two variants by default: deterministic (eta = 0, evenly spaced steps, the
paper's main sampler) and stochastic (eta = 1, quadratic spacing, i.e. steps concentrated
near the data); ``--variants`` chooses others (``ETA:SPACING``, e.g. ``0:quadratic``).

One trained model per data set, every sampler from the same starting noise seed:

* a 2-D toy (default ``eight_gaussians``): a DDPM trained here (or loaded with ``--toy-run DIR``),
  the sliced Wasserstein distance of 5,000 samples to 5,000 test points, next to the
  data-vs-data floor (validation vs test points);
* digits, when ``--digits-run DIR`` names a run of ``examples/ddpm_digits.py``: the Fréchet
  distance of the protocol between ``--digits-samples`` samples and the test split, next to the
  floor of as many training images against the test split.

The issue's target is DDIM at 50 steps within 1.2x of ancestral sampling's distance; the
ratio ``DDIM-50 / ancestral`` is printed per data set and variant.

    python benchmarks/ddpm_steps.py                                    # toy only, ~5 min on 2 CPU cores
    python benchmarks/ddpm_steps.py --digits-run out/ddpm_digits --out out/ddpm_steps

Writes ``OUT/ddpm_steps.md`` (Markdown table), ``OUT/ddpm_steps.json`` and ``OUT/ddpm_steps.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import TOYS, load_dataset
from probgen.inference import ancestral_sample, ddim_sample, fit
from probgen.metrics import digits_frechet_distance, mean_and_stderr, sliced_wasserstein
from probgen.models import DDPM, load_method
from probgen.plotting import save_line_plot

DDIM_STEPS = (10, 20, 50, 100)


def sweep(method: DDPM, num: int, distance, ddim_steps, variants, seed: int, seeds: int = 1) -> list[dict]:
    """Distance of ancestral and DDIM samples (same seeds for every sampler), with timings.

    With ``seeds = K > 1`` every sampler draws ``num`` samples under each of the seeds
    ``seed, ..., seed + K - 1``; ``distance`` is then that of the pooled ``K * num`` samples,
    ``per_seed`` lists the K distances of ``num`` samples each and ``stderr`` is their standard error.
    """
    seed_list = [seed + i for i in range(seeds)]

    def row(sampler: str, steps: int, draw) -> dict:
        start = time.perf_counter()
        chunks = [draw(torch.Generator().manual_seed(s)) for s in seed_list]
        out = dict(sampler=sampler, steps=steps, seconds=time.perf_counter() - start)
        out["distance"] = distance(torch.cat(chunks))
        if seeds > 1:
            per_seed = [distance(x) for x in chunks]
            mean, stderr = mean_and_stderr(per_seed)
            out.update(per_seed=per_seed, per_seed_mean=mean, stderr=stderr)
        return out

    rows = [row("ancestral", method.T, lambda g: ancestral_sample(method, num, generator=g))]
    for eta, spacing in variants:
        for s in ddim_steps:
            if s > method.T:
                continue
            rows.append(
                row(
                    _label(eta, spacing),
                    s,
                    lambda g, s=s, eta=eta, spacing=spacing: ddim_sample(
                        method, num, steps=s, eta=eta, spacing=spacing, generator=g
                    ),
                )
            )
    return rows


def _label(eta: float, spacing: str) -> str:
    return f"DDIM eta={eta:g} {spacing}"


def _variant(text: str) -> tuple[float, str]:
    eta, _, spacing = text.partition(":")
    if not 0 <= float(eta) <= 1 or spacing not in ("linear", "quadratic"):
        raise argparse.ArgumentTypeError(f"expected ETA:SPACING with ETA in [0, 1], but found {text!r}")
    return float(eta), spacing


def toy_model(args) -> tuple[DDPM, str, dict]:
    if args.toy_run is not None:
        method, meta = load_method(args.toy_run)
        return method, meta["data"], {"run": str(args.toy_run), "tag": meta["tag"]}
    train = load_dataset(args.toy, "train")
    torch.manual_seed(args.seed)
    method = DDPM.from_data(train, weighting=args.weighting, variance=args.variance)
    start = time.perf_counter()
    fit(
        method,
        train.x,
        steps=args.train_steps,
        batch_size=256,
        lr=1e-3,
        ema_decay=args.ema_decay,
        seed=args.seed,
        progress=not args.no_progress,
    )
    info = dict(
        train_steps=args.train_steps,
        weighting=args.weighting,
        variance=args.variance,
        ema_decay=args.ema_decay,
        train_seconds=time.perf_counter() - start,
    )
    return method, args.toy, info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--toy-run", type=Path, default=None, help="use this trained toy run instead")
    parser.add_argument("--train-steps", type=int, default=6000)
    parser.add_argument("--weighting", choices=("simple", "elbo"), default="simple")
    parser.add_argument("--variance", choices=("beta", "beta_tilde"), default="beta")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="0 for none")
    parser.add_argument("--toy-samples", type=int, default=5000)
    parser.add_argument("--toy-seeds", type=int, default=1, help="as --digits-seeds, for the toy")
    parser.add_argument("--digits-run", type=Path, default=None)
    parser.add_argument("--digits-samples", type=int, default=500, help="samples per seed")
    parser.add_argument(
        "--digits-seeds",
        type=int,
        default=1,
        help="repeat the digits samplers under K seeds: distances of the pooled K * samples, with the "
        "standard error of the per-seed ones (Fréchet distances of a few hundred samples vary by ~0.5)",
    )
    parser.add_argument("--no-toy", action="store_true", help="measure the digits only")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=list(DDIM_STEPS))
    parser.add_argument("--variants", type=_variant, nargs="+", default=[(0.0, "linear"), (1.0, "quadratic")])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/ddpm_steps"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.ema_decay = args.ema_decay or None
    torch.set_num_threads(args.threads)

    report: dict = {}
    if not args.no_toy:
        method, toy, info = toy_model(args)
        test, val = load_dataset(toy, "test"), load_dataset(toy, "val")
        n = min(args.toy_samples, test.x.shape[0])
        ref = test.x[:n]
        report[toy] = dict(
            metric="sliced Wasserstein-2",
            model=info,
            samples=n * args.toy_seeds,
            seeds=args.toy_seeds,
            floor=sliced_wasserstein(val.x[:n], ref),
            rows=sweep(
                method,
                n,
                lambda x: sliced_wasserstein(x, ref),
                args.ddim_steps,
                args.variants,
                args.seed,
                seeds=args.toy_seeds,
            ),
        )
    if args.digits_run is not None:
        if (args.digits_run / "last.json").is_file() or (args.digits_run / "best.json").is_file():
            digits, meta = load_method(args.digits_run)
            test_d, train_d = load_dataset("digits", "test"), load_dataset("digits", "train")
            m, k = args.digits_samples, args.digits_seeds
            report["digits"] = dict(
                metric="Fréchet distance (digits classifier features)",
                model={"run": str(args.digits_run), "tag": meta["tag"]},
                samples=m * k,
                seeds=k,
                # as many training images as pooled samples, at most the whole split (1350)
                floor=digits_frechet_distance(train_d.x[: m * k], test_d.x),
                rows=sweep(
                    digits,
                    m,
                    lambda x: digits_frechet_distance(x, test_d.x),
                    args.ddim_steps,
                    args.variants,
                    args.seed,
                    seeds=k,
                ),
            )
        else:
            print(f"skipping digits: no run in {args.digits_run}")

    lines, series = [], {}
    for name, res in report.items():
        rows = res["rows"]
        anc = rows[0]["distance"]
        res["ddim50_over_ancestral"] = {}
        seeds = res.get("seeds", 1)
        pooled = f", {res['samples']} samples pooled over {seeds} seeds" if seeds > 1 else ""
        lines += [
            f"### {name}: {res['metric']} (floor, data vs data: {res['floor']:.4f}{pooled})",
            "",
            "| sampler | steps | distance | per seed: mean ± s.e. | / ancestral | seconds |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            spread = f"{r['per_seed_mean']:.3f} ± {r['stderr']:.3f}" if "per_seed" in r else ""
            lines.append(
                f"| {r['sampler']} | {r['steps']} | {r['distance']:.4f} | {spread} | "
                f"{r['distance'] / anc:.2f} | {r['seconds']:.1f} |"
            )
        lines.append("")
        series[f"{name}: ancestral"] = ([rows[0]["steps"]], [anc / res["floor"]])
        for eta, spacing in args.variants:
            label = _label(eta, spacing)
            ddim = [r for r in rows if r["sampler"] == label]
            series[f"{name}: {label}"] = (
                [r["steps"] for r in ddim],
                [r["distance"] / res["floor"] for r in ddim],
            )
            row50 = next((r for r in ddim if r["steps"] == 50), None)
            if row50 is not None:
                ratio = row50["distance"] / anc
                res["ddim50_over_ancestral"][label] = ratio
                paired = ""
                if "per_seed" in row50:  # the ratio under each seed, as a check on the pooled one
                    per = [a / b for a, b in zip(row50["per_seed"], rows[0]["per_seed"])]
                    res.setdefault("ddim50_over_ancestral_per_seed", {})[label] = per
                    paired = "; per seed {:.2f} ± {:.2f} (s.e.)".format(*mean_and_stderr(per))
                lines.append(
                    f"{label}, 50 steps / ancestral-{rows[0]['steps']}: "
                    f"**{ratio:.2f}x** (target <= 1.2x){paired}  "
                )
        lines.append("")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddpm_steps.md").write_text(table + "\n")
    write_json_atomic(args.out / "ddpm_steps.json", report)
    save_line_plot(
        series,
        args.out / "ddpm_steps.png",
        xlabel="sampling steps (network evaluations)",
        ylabel="distance / data-vs-data floor",
        title="DDPM: sample quality per step count",
        logx=True,
        logy=True,
    )
    print(f"wrote {args.out}/ddpm_steps.md, ddpm_steps.json, ddpm_steps.png")
    return report


if __name__ == "__main__":
    main()
