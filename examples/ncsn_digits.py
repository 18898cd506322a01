"""Train an NCSN on the 8x8 digits, sample by annealed Langevin dynamics, report the Fréchet distance.

NCSN (Song & Ermon 2019, arXiv:1907.05600) on the digits uniformly dequantized to [0, 1] (their
data scaling): the :math:`\\sigma^2`-weighted denoising score matching loss is the log-likelihood
of an observed Gaussian site in a Pyro program (``probgen.models.ncsn``), trained by ``fit`` with
an exponential moving average of the weights. Noise levels and sampler settings follow the
improved techniques (Song & Ermon 2020, arXiv:2006.09011): :math:`\\sigma_1` the largest distance
between two training images, :math:`\\sigma_L = 0.01`, the level ratio from their Technique 2 for
D = 64, ``--steps-per-level`` Langevin steps per level (they use 5 on CIFAR-10) and the step size
of their Proposition 3.

Samples are mapped back to the 17 grey levels (``floor(17 y)``) and compared with the test split
in the features of the project's digits classifier (``probgen.metrics.digits_frechet_distance``),
next to the same distance between the train and test splits (the floor).

    python examples/ncsn_digits.py                    # about ten minutes on 2 CPU cores
    python examples/ncsn_digits.py --steps 10 --fd-samples 32 --steps-per-level 1 --out /tmp/nd  # smoke

Writes ``OUT/samples.png``, ``OUT/annealing.png`` (a few chains at the end of each level),
``OUT/loss.png``, ``OUT/report.json`` and the run's checkpoints (``probgen sample OUT --sampler
annealed-langevin`` and ``probgen evaluate OUT`` work on them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import DIGITS_LEVELS, DIGITS_SHAPE, load_dataset
from probgen.inference import fit
from probgen.inference.langevin import annealed_langevin
from probgen.metrics import digits_frechet_distance
from probgen.models.ncsn import NCSN
from probgen.plotting import save_image_grid, save_loss_curves


def to_levels(y: torch.Tensor) -> torch.Tensor:
    """Dequantized values in [0, 1] back to the grey levels 0..16 (the inverse of ``(v + u) / 17``)."""
    return (y * DIGITS_LEVELS).floor().clamp(0, DIGITS_LEVELS - 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--base-channels", type=int, default=16, help="UNet width")
    parser.add_argument("--steps-per-level", type=int, default=20)
    parser.add_argument("--fd-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/ncsn_digits"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.glob("*.json")):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")
    form = NCSN.data_form("digits")
    train, val, test = (load_dataset("digits", split, form=form) for split in ("train", "val", "test"))
    test_levels = load_dataset("digits", "test", form="int").x
    train_levels = load_dataset("digits", "train", form="int").x
    torch.manual_seed(args.seed)
    ncsn = NCSN.from_data(train, steps_per_level=args.steps_per_level, base_channels=args.base_channels)
    metadata = {
        "data": "digits",
        "form": form,
        "event_shape": list(DIGITS_SHAPE),
        "num_levels": DIGITS_LEVELS,
    }
    start = time.perf_counter()
    result = fit(
        ncsn,
        train.x,
        val_data=val.x,  # the weighted DSM loss with common random numbers, on the EMA weights
        val_every=max(args.steps // 5, 1),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        seed=args.seed,
        run_dir=args.out,
        metadata=metadata,
        progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - start

    defaults = ncsn.sampling_defaults
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    starts = ncsn.init_sample(args.fd_samples, gen)
    samples, path = annealed_langevin(
        ncsn.score,
        starts,
        ncsn.sigmas,
        **defaults,
        return_path=True,
        generator=gen,
        progress=not args.no_progress,
    )
    sample_seconds = time.perf_counter() - start
    levels = to_levels(samples)
    fd = digits_frechet_distance(levels, test_levels)
    fd_floor = digits_frechet_distance(train_levels, test_levels)

    sampler = f"annealed Langevin, {ncsn.num_levels} levels x {defaults['steps_per_level']} steps, denoised"
    save_image_grid(
        levels[:64],
        args.out / "samples.png",
        image_shape=DIGITS_SHAPE,
        value_range=(0, DIGITS_LEVELS - 1),
        title=f"NCSN samples ({sampler})",
    )
    chains = 8
    shown = list(range(1, ncsn.num_levels + 1, max(1, ncsn.num_levels // 7)))
    if shown[-1] != ncsn.num_levels:
        shown.append(ncsn.num_levels)
    rows = torch.stack([path[0, :chains]] + [path[i, :chains] for i in shown] + [samples[:chains]], dim=1)
    save_image_grid(
        rows.reshape(-1, 64).clamp(0, 1),
        args.out / "annealing.png",
        image_shape=DIGITS_SHAPE,
        nrow=len(shown) + 2,
        value_range=(0.0, 1.0),
        title="start, end of levels " + ", ".join(map(str, shown)) + ", denoised",
    )
    save_loss_curves(result.history, args.out / "loss.png", title="NCSN on digits: weighted DSM loss (nats)")
    report = {
        "frechet_distance": fd,
        "frechet_distance_data_floor": fd_floor,
        "frechet_distance_samples": args.fd_samples,
        "sampler": sampler,
        "sigmas": [float(ncsn.sigmas[0]), float(ncsn.sigmas[-1])],
        "num_levels": ncsn.num_levels,
        "sampling": defaults,
        "train_steps": result.step,
        "best_step": result.best_step,
        "best_val_loss": result.best_val,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
    }
    write_json_atomic(args.out / "report.json", report)
    print(f"trained {result.step} steps in {train_seconds:.0f} s (EMA weights of step {result.best_step})")
    print(
        f"Fréchet distance ({args.fd_samples} samples, {sampler}, vs test): {fd:.2f}; "
        f"data-vs-data floor (train vs test) {fd_floor:.2f}; sampling took {sample_seconds:.0f} s"
    )
    print(f"wrote {args.out}/samples.png, annealing.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
