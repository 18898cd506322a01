"""Train a score SDE on the 8x8 digits: samples, test bits/dim by the probability-flow ODE, inpainting.

Score-based diffusion (Song et al. 2021, arXiv:2011.13456) on the digits uniformly dequantized and
rescaled to [-1, 1] (``"centered"``): a small UNet predicts the noise of the forward SDE's
perturbation, trained by continuous-time denoising score matching written as an observed Gaussian
site in a Pyro program (``probgen.models.score_sde``), with an exponential moving average of the
weights.

* **Samples**: Euler-Maruyama on the reverse SDE, mapped back to the 17 grey levels; the Fréchet
  distance of ``--fd-samples`` of them to the test split in the project's digits-classifier features,
  next to the train-vs-test distance (its floor).
* **Bits/dim**: the probability-flow ODE log-likelihood (Hutchinson divergence, one Rademacher probe,
  dopri5) of the first ``--nll-examples`` test images (all 297 by default), turned into an upper bound on
  the NLL of the 17-level data by ``probgen.metrics.discrete_nll_from_density`` with scale 2 (the
  cells of the centered data are 2/17 wide: that is the Jacobian of the rescaling), quoted next to the
  uniform (4.09) and independent-pixel floors.
* **Inpainting**: the bottom half of test images is unknown; completions come from the replacement
  method of Song et al. (App. I.2) and from SMC with ``--particles`` particles
  (``probgen.inference.conditioning.inpaint``; the replacement method is biased for correlated
  pixels, the SMC sampler is consistent as the particles grow).

    python examples/score_sde_digits.py                    # about 8 minutes on 2 CPU cores
    python examples/score_sde_digits.py --steps 10 --nll-examples 4 --grid 16 --sample-steps 20 \\
        --inpaint-examples 2 --inpaint-steps 20 --base-channels 8 --out /tmp/sd     # smoke test

Writes ``OUT/samples.png``, ``OUT/inpainting.png`` (rows: masked input, replacement completions,
SMC completions, truth), ``OUT/loss.png``, ``OUT/report.json`` and the run's checkpoints
(``probgen sample OUT --sampler pc`` and ``probgen evaluate OUT`` work on them).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from probgen.apps.evaluate import to_levels
from probgen.checkpoint import write_json_atomic
from probgen.data import DIGITS_LEVELS, DIGITS_SHAPE, load_dataset
from probgen.inference import fit
from probgen.inference.conditioning import inpaint
from probgen.inference.score_sde_sampling import ode_likelihood, sample_score_sde
from probgen.metrics import (
    bits_per_dim,
    digits_frechet_distance,
    discrete_nll_from_density,
    independent_levels_nll,
)
from probgen.models.score_sde import SDES, WEIGHTINGS, ScoreSDE
from probgen.plotting import save_image_grid, save_loss_curves


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sde", choices=SDES, default="vp")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sigma2")
    parser.add_argument("--steps", type=int, default=6000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--base-channels", type=int, default=16, help="UNet width")
    parser.add_argument("--grid", type=int, default=64, help="samples in the grid")
    parser.add_argument("--sample-steps", type=int, default=500, help="Euler-Maruyama steps")
    parser.add_argument(
        "--fd-samples", type=int, default=500, help="samples for the Fréchet distance (0: none)"
    )
    parser.add_argument(
        "--nll-examples", type=int, default=297, help="test images in the bits/dim (297: all)"
    )
    parser.add_argument("--inpaint-examples", type=int, default=6)
    parser.add_argument("--completions", type=int, default=3, help="completions per image and method")
    parser.add_argument("--particles", type=int, default=8, help="SMC particles per completion")
    parser.add_argument("--inpaint-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/score_sde_digits"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.glob("*.json")):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")
    form = ScoreSDE.data_form("digits")
    train, val, test = (load_dataset("digits", split, form=form) for split in ("train", "val", "test"))
    train_levels, test_levels = (load_dataset("digits", s, form="int").x for s in ("train", "test"))
    torch.manual_seed(args.seed)
    model = ScoreSDE.from_data(
        train, sde=args.sde, weighting=args.weighting, base_channels=args.base_channels
    )
    start = time.perf_counter()
    result = fit(
        model,
        train.x,
        val_data=val.x,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ema_decay=args.ema_decay,
        val_every=max(1, args.steps // 10),
        progress=not args.no_progress,
        run_dir=args.out,
        metadata={
            "data": "digits",
            "form": form,
            "event_shape": list(DIGITS_SHAPE),
            "num_levels": DIGITS_LEVELS,
        },
    )
    train_seconds = time.perf_counter() - start
    sde, score, g = model.sde_object, model.score, torch.Generator().manual_seed(args.seed + 1)

    start = time.perf_counter()
    grid = sample_score_sde(sde, score, args.grid, 64, sampler="em", steps=args.sample_steps, generator=g)
    sample_seconds = time.perf_counter() - start
    save_image_grid(to_levels(grid, form, DIGITS_LEVELS), args.out / "samples.png", image_shape=DIGITS_SHAPE)
    fd = None
    if args.fd_samples:
        more = sample_score_sde(
            sde, score, args.fd_samples, 64, sampler="em", steps=args.sample_steps, generator=g
        )
        fd = digits_frechet_distance(to_levels(more, form, DIGITS_LEVELS), test_levels)

    start = time.perf_counter()
    x_nll = test.x[: args.nll_examples]
    ll, nfe, nll_kind = ode_likelihood(sde, score, x_nll, divergence="hutchinson", seed=args.seed)
    nll_levels = discrete_nll_from_density(-ll.double(), 64, DIGITS_LEVELS, scale=2.0)
    bpd = bits_per_dim(nll_levels, 64)
    nll_seconds = time.perf_counter() - start
    per_pixel = independent_levels_nll(train_levels, test_levels[: args.nll_examples], DIGITS_LEVELS)

    # Inpainting: the top half (rows 0-3) known, the bottom half unknown.
    k, c = args.inpaint_examples, args.completions
    mask = torch.zeros(DIGITS_SHAPE, dtype=torch.bool)
    mask[:, :4] = True
    mask = mask.reshape(64)
    y = test.x[:k].repeat_interleave(c, 0)
    start = time.perf_counter()
    steps = args.inpaint_steps
    replaced = inpaint(sde, score, y, mask, steps=steps, generator=g)
    smc = inpaint(sde, score, y, mask, steps=steps, particles=args.particles, generator=g)
    inpaint_seconds = time.perf_counter() - start
    truth = test_levels[:k]
    shown = truth.clone()
    shown[:, ~mask] = DIGITS_LEVELS // 2  # the unknown half as a grey block
    rows = []
    for i in range(k):
        done = [to_levels(z[i * c : (i + 1) * c], form, DIGITS_LEVELS) for z in (replaced, smc)]
        rows += [shown[i : i + 1], *done, truth[i : i + 1]]
    save_image_grid(
        torch.cat(rows),
        args.out / "inpainting.png",
        image_shape=DIGITS_SHAPE,
        nrow=2 * c + 2,
        title=f"masked | {c} replacement | {c} SMC ({args.particles} particles) | truth",
    )
    rmse = {
        name: float(
            ((to_levels(z, form, DIGITS_LEVELS) - truth.repeat_interleave(c, 0))[:, ~mask])
            .pow(2)
            .mean()
            .sqrt()
        )
        for name, z in (("replacement", replaced), ("smc", smc))
    }
    save_loss_curves(
        result.history, args.out / "loss.png", title=f"score SDE ({args.sde}) on digits: DSM loss"
    )

    report = {
        "sde": args.sde,
        "weighting": args.weighting,
        "train_steps": result.step,
        "train_seconds": train_seconds,
        "sample_seconds_grid": sample_seconds,
        "frechet_distance": fd,
        "frechet_distance_data_floor": digits_frechet_distance(train_levels, test_levels)
        if fd is not None
        else None,
        "test_bits_per_dim": float(bpd.mean()),
        "test_bits_per_dim_stderr": float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else None,
        "nll_examples": int(x_nll.shape[0]),
        "nll_kind": nll_kind + "; bound on the 17-level data via dequantization (scale 2)",
        "nll_nfe": nfe,
        "nll_seconds": nll_seconds,
        "floors_bits_per_dim": {
            "uniform": math.log2(DIGITS_LEVELS),
            "per_pixel_categorical": float(bits_per_dim(per_pixel, 64).mean()),
        },
        "inpainting": {"steps": steps, "particles": args.particles, "rmse_levels_unknown_half": rmse},
        "inpaint_seconds": inpaint_seconds,
    }
    write_json_atomic(args.out / "report.json", report)
    floors = report["floors_bits_per_dim"]
    print(f"trained {result.step} steps in {train_seconds:.0f} s")
    print(
        f"test bits/dim (ODE, {report['nll_examples']} test images, {nfe} NFE, {nll_seconds:.0f} s): "
        f"{report['test_bits_per_dim']:.3f}; floors: uniform {floors['uniform']:.2f}, "
        f"per-pixel categorical {floors['per_pixel_categorical']:.2f}"
    )
    if fd is not None:
        floor = report["frechet_distance_data_floor"]
        print(f"Fréchet distance ({args.fd_samples} samples): {fd:.2f} (train vs test {floor:.2f})")
    print(
        f"inpainting RMSE of the unknown half, grey levels: replacement {rmse['replacement']:.2f}, "
        f"SMC {rmse['smc']:.2f} ({inpaint_seconds:.0f} s)"
    )
    print(f"wrote {args.out}/samples.png, inpainting.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
