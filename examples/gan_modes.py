"""Mode collapse made visible: a GAN on eight Gaussians and on a 5x5 grid of Gaussians.

The GAN (Goodfellow et al. 2014, arXiv:1406.2661) is a pair of Pyro programs: the generator
program z ~ N(0, I), x = G(z) (a deterministic site) and a discriminator likelihood over a
Bernoulli "real" label. ``fit`` over ``GAN.objective()`` alternates the two players, each maximizing the
log-probability of the label site in traces of those programs (the non-saturating generator
objective), with the R1 penalty of Mescheder et al. 2018 (arXiv:1801.04406) as a
``pyro.factor`` and an exponential moving average of the weights. Because the mixtures' centres
and std are known, mode collapse can be counted: a sample is *high quality* within 3 std of its
nearest centre, and a mode is *captured* with at least a quarter of its share of the samples
(``probgen.metrics.mode_coverage``).

    python examples/gan_modes.py                       # both toys, a few minutes on 2 CPU cores
    python examples/gan_modes.py --data eight_gaussians
    python examples/gan_modes.py --steps 20 --num-samples 200 --out /tmp/gan   # smoke test

Writes ``OUT/samples.png`` (data and GAN samples side by side, centres marked), ``OUT/loss.png``
(both players' losses, their equilibrium values and the validation score), ``OUT/report.json``
and a run directory ``OUT/DATA`` per toy that ``probgen sample`` / ``probgen evaluate`` read.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from probgen.checkpoint import list_checkpoints, write_json_atomic
from probgen.data import load_dataset, mixture_modes
from probgen.inference import fit
from probgen.metrics import mode_coverage, sliced_wasserstein
from probgen.models.gan import GAN

TOYS = ("eight_gaussians", "grid25")
DEFAULT_STEPS = {"eight_gaussians": 3000, "grid25": 8000}


def train_one(name: str, args: argparse.Namespace) -> tuple[dict, dict, torch.Tensor]:
    """Train a GAN on one toy; return its report, its history and ``num_samples`` samples."""
    train, val, test = (load_dataset(name, s) for s in ("train", "val", "test"))
    torch.manual_seed(args.seed)
    gan = GAN.from_data(train, r1_gamma=args.r1_gamma)
    steps = args.steps or DEFAULT_STEPS[name]
    start = time.perf_counter()
    result = fit(
        gan,
        train.x,
        val_data=val.x,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        val_every=max(steps // 20, 50),
        seed=args.seed,
        run_dir=args.out / name,
        metadata={"data": name, "form": "int", "event_shape": [2]},
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    n = args.num_samples
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        samples = gan.sample(n)
    centres, std = mixture_modes(name)
    coverage = mode_coverage(samples, centres, std)
    floor = mode_coverage(test.x[:n], centres, std)
    report = {
        "steps": result.step,
        "best_step": result.best_step,
        "train_seconds": seconds,
        "modes_captured": coverage["modes_captured"],
        "num_modes": coverage["num_modes"],
        "high_quality_fraction": coverage["high_quality_fraction"],
        "max_weight_error": coverage["max_weight_error"],
        "test_data": {k: floor[k] for k in ("modes_captured", "high_quality_fraction")},
        "sliced_wasserstein": sliced_wasserstein(samples, test.x[:n]),
        "sliced_wasserstein_floor": sliced_wasserstein(val.x[:n], test.x[:n]),
    }
    return report, result.history, samples


def save_samples_figure(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """One row per toy: test data | GAN samples, with the mixture centres and 3-std circles."""
    fig = Figure(figsize=(8.0, 4.0 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for row, (name, (data, samples)) in zip(axes, panels.items()):
        centres, std = mixture_modes(name)
        for ax, (label, points, colour) in zip(
            row, ((f"{name}: test data", data, "0.45"), (f"{name}: GAN samples", samples, "tab:blue"))
        ):
            ax.scatter(points[:, 0], points[:, 1], s=1.0, c=colour, alpha=0.5, lw=0)
            ax.scatter(centres[:, 0], centres[:, 1], marker="x", s=30, c="tab:red", lw=1.2, label="centres")
            for centre in centres.tolist():
                ax.add_patch(Circle(centre, 3 * std, fill=False, ec="tab:red", lw=0.6, alpha=0.6))
            ax.set_xlim(-5, 5)
            ax.set_ylim(-5, 5)
            ax.set_aspect("equal")
            ax.set_title(label, fontsize=10)
        row[0].legend(loc="upper right", fontsize=8)
    fig.savefig(path)


def save_loss_figure(histories: dict[str, dict], path: Path) -> None:
    """Per toy: both players' losses (nats per example) with their equilibrium values, and the
    validation sliced Wasserstein distance on a second axis."""
    fig = Figure(figsize=(6.0 * len(histories), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(histories), squeeze=False)[0]
    for ax, (name, history) in zip(axes, histories.items()):
        # At the equilibrium D = 1/2 everywhere: the discriminator's loss is 2 ln 2, the generator's ln 2.
        for key, colour, equilibrium in (("discriminator", "tab:blue", 2), ("generator", "tab:orange", 1)):
            steps, values = zip(*history[key])
            ax.plot(steps, values, c=colour, lw=1.0, label=f"{key} loss")
            ax.axhline(equilibrium * math.log(2), c=colour, ls="--", lw=0.8, label=f"{key} at D = 1/2")
        ax.set_xlabel("step")
        ax.set_ylabel("nats per example")
        ax.set_title(name)
        ax.legend(loc="upper right", fontsize=8)
        if history["val"]:
            twin = ax.twinx()
            twin.plot(*zip(*history["val"]), c="tab:green", marker="o", ms=3, lw=1.0)
            twin.set_ylabel("validation sliced Wasserstein-2", color="tab:green")
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=TOYS, nargs="+", default=list(TOYS))
    parser.add_argument("--steps", type=int, default=None, help="steps per toy (default 3000 / 8000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r1-gamma", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/gan_modes"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if any(list_checkpoints(args.out / name) for name in args.data):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")

    report, histories, panels = {}, {}, {}
    for name in args.data:
        report[name], histories[name], samples = train_one(name, args)
        panels[name] = (load_dataset(name, "test").x[: args.num_samples], samples)
        r = report[name]
        print(
            f"{name}: {r['modes_captured']}/{r['num_modes']} modes captured, "
            f"{100 * r['high_quality_fraction']:.1f}% high-quality samples (within 3 std of a centre; "
            f"test data {100 * r['test_data']['high_quality_fraction']:.1f}%), sliced Wasserstein-2 "
            f"{r['sliced_wasserstein']:.4f} (floor {r['sliced_wasserstein_floor']:.4f}); "
            f"{r['steps']} steps in {r['train_seconds']:.0f} s, the parameters of step {r['best_step']} "
            "(best validation sliced Wasserstein)"
        )
    save_samples_figure(panels, args.out / "samples.png")
    save_loss_figure(histories, args.out / "loss.png")
    write_json_atomic(args.out / "report.json", report)
    print(f"wrote {args.out}/samples.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    # Nets this small gain nothing from intra-op threads, and two threads contending with other work
    # on a 2-core machine ran ten times slower than one in our measurements.
    torch.set_num_threads(1)
    main()
