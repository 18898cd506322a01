"""Train a DDPM on the 8x8 digits; report the test variational bound in bits/dim and the Fréchet distance.

The DDPM (Ho et al. 2020, arXiv:2006.11239) is a Pyro Markov chain over the 17 grey levels: the
reverse chain (a small UNet predicting the noise) is the model, the fixed forward process the
guide, and the last step a discretized-Gaussian decoder onto the levels (the paper's L_0).
``fit`` trains the programs with the L_simple weighting (``poutine.scale``) and keeps an
exponential moving average of the weights, which validation, the ``best`` checkpoint, sampling
and the bound use. The reverse variances are beta-tilde, which makes the variational bound
tighter than beta for the same network (the KL of the variances vanishes; see the module
docstring of ``probgen.models.ddpm``). The linear schedule starts at beta_1 = 3e-3 rather than
Ho et al.'s 1e-4: the noise of the first step (std 0.055) is then about half a grey level's bin
(2/17 wide in [-1, 1]), so the discretized decoder, which integrates over each level's bin,
resolves the level, rather than the chain's first steps, whose KL terms ask the small network to
snap the states onto the grid of levels and are learned slowly (with 1e-4, steps 2..50 made up
2.5 of the 3.1 bits/dim of the bound after 2,000 steps; with 3e-3 the bound was 2.1).
The test NLL is the full T-term variational bound (``ddpm_nll``): an upper bound on the NLL of
the 17-level data, quoted next to the uniform (4.09) and independent-pixel (2.42) floors.
Samples for the Fréchet distance come from DDIM (``--fd-sampler ancestral`` for the T-step
chain: about T/100 times slower).

    python examples/ddpm_digits.py                    # about 10 minutes on 2 CPU cores
    python examples/ddpm_digits.py --steps 20 --nll-examples 4 --fd-samples 64 --out /tmp/d  # smoke test

Writes ``OUT/samples.png`` (ancestral samples), ``OUT/loss.png``, ``OUT/report.json`` and the
run's checkpoints (``probgen sample OUT ...`` and ``probgen evaluate OUT`` work on them).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import DIGITS_LEVELS, DIGITS_SHAPE, load_dataset
from probgen.inference import ancestral_sample, ddim_sample, ddpm_nll, fit
from probgen.metrics import bits_per_dim, digits_frechet_distance, independent_levels_nll
from probgen.models import DDPM
from probgen.plotting import save_image_grid, save_loss_curves
from probgen.schedules import linear_betas


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--T", type=int, default=1000, help="diffusion steps")
    parser.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    parser.add_argument("--beta-start", type=float, default=3e-3, help="first beta of the linear schedule")
    parser.add_argument("--weighting", choices=("simple", "elbo"), default="simple")
    parser.add_argument("--variance", choices=("beta", "beta_tilde"), default="beta_tilde")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--nll-examples", type=int, default=297, help="test images in the bound (297: all)")
    parser.add_argument("--fd-samples", type=int, default=1000)
    parser.add_argument("--fd-sampler", choices=("ddim", "ancestral"), default="ddim")
    parser.add_argument("--ddim-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/ddpm_digits"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.glob("*.json")):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")
    train, val, test = (load_dataset("digits", split) for split in ("train", "val", "test"))
    torch.manual_seed(args.seed)
    ddpm = DDPM.from_data(
        train,
        T=args.T,
        schedule=args.schedule,
        betas=linear_betas(args.T, start=args.beta_start).tolist() if args.schedule == "linear" else None,
        weighting=args.weighting,
        variance=args.variance,
        base_channels=args.base_channels,
    )
    metadata = {
        "data": "digits",
        "form": "int",
        "event_shape": list(DIGITS_SHAPE),
        "num_levels": DIGITS_LEVELS,
    }
    start = time.perf_counter()
    result = fit(
        ddpm,
        train.x,
        val_data=val.x,  # the one-step bound estimate with common random numbers, on the EMA weights
        val_every=max(args.steps // 5, 1),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        grad_clip=1.0,
        ema_decay=args.ema_decay,
        seed=args.seed,
        run_dir=args.out,
        metadata=metadata,
        progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    x_test = test.x[: args.nll_examples]
    nll = ddpm_nll(ddpm, x_test, seed=args.seed)
    test_bpd = float(bits_per_dim(nll, x_test.shape[1]).mean())
    nll_seconds = time.perf_counter() - start
    floor = float(bits_per_dim(independent_levels_nll(train.x, test.x, DIGITS_LEVELS), 64).mean())
    uniform = math.log2(DIGITS_LEVELS)

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    grid = ancestral_sample(ddpm, 64, generator=gen)
    if args.fd_sampler == "ancestral":
        samples = ancestral_sample(ddpm, args.fd_samples, generator=gen)
        sampler = f"ancestral, {ddpm.T} steps"
    else:
        samples = ddim_sample(ddpm, args.fd_samples, steps=min(args.ddim_steps, ddpm.T), generator=gen)
        sampler = f"DDIM, {min(args.ddim_steps, ddpm.T)} steps, eta=0"
    sample_seconds = time.perf_counter() - start
    fd = digits_frechet_distance(samples, test.x)
    fd_floor = digits_frechet_distance(train.x, test.x)

    save_image_grid(
        grid,
        args.out / "samples.png",
        image_shape=DIGITS_SHAPE,
        value_range=(0, DIGITS_LEVELS - 1),
        title=f"DDPM samples (ancestral, {ddpm.T} steps)",
    )
    save_loss_curves(result.history, args.out / "loss.png", title="DDPM on digits: loss (nats)")
    report = {
        "test_nll_bits_per_dim": test_bpd,
        "bound": f"variational bound, all {ddpm.T} terms, {x_test.shape[0]} test images",
        "independent_pixel_floor": floor,
        "uniform_floor": uniform,
        "train_steps": result.step,
        "best_step": result.best_step,
        "best_val_loss": result.best_val,
        "frechet_distance": fd,
        "frechet_distance_sampler": sampler,
        "frechet_distance_data_floor": fd_floor,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "train_seconds": train_seconds,
        "nll_seconds": nll_seconds,
        "sample_seconds": sample_seconds,
    }
    write_json_atomic(args.out / "report.json", report)
    print(f"trained {result.step} steps in {train_seconds:.0f} s (EMA weights of step {result.best_step})")
    print(
        f"test NLL: {test_bpd:.4f} bits/dim ({report['bound']}, {nll_seconds:.0f} s); "
        f"floors: independent pixels {floor:.2f}, uniform {uniform:.2f}"
    )
    print(
        f"Fréchet distance ({args.fd_samples} samples, {sampler}, vs test): {fd:.2f}; "
        f"data-vs-data floor (train vs test) {fd_floor:.2f}"
    )
    print(f"wrote {args.out}/samples.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
