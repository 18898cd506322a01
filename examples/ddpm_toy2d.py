"""Train a DDPM on a 2-D toy and compare ancestral sampling with DDIM.

The DDPM (Ho et al. 2020, arXiv:2006.11239) is a Pyro Markov chain: the reverse chain is the
model, the fixed forward process the guide, and ``fit`` maximizes the ELBO Pyro derives from
them (or its L_simple reweighting through ``poutine.scale``). Samples come from running the
reverse-chain program with nothing observed (ancestral, 1000 steps) and from DDIM
(Song, Meng & Ermon 2021, arXiv:2010.02502) with far fewer steps.

    python examples/ddpm_toy2d.py                      # moons, about a minute on 2 CPU cores
    python examples/ddpm_toy2d.py --data swiss_roll
    python examples/ddpm_toy2d.py --steps 20 --num-samples 200 --out /tmp/ddpm   # smoke test

Writes ``OUT/samples.png`` (ancestral and DDIM samples against the data),
``OUT/trajectories.png`` (a few reverse-chain paths) and ``OUT/loss.png``; prints the sliced
Wasserstein distance of each sampler to held-out data next to the data-vs-data floor.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from probgen.checkpoint import write_json_atomic
from probgen.data import TOYS, load_dataset
from probgen.inference import fit
from probgen.inference.ancestral import ancestral_sample, ddim_sample
from probgen.metrics import sliced_wasserstein
from probgen.models import DDPM
from probgen.plotting import save_loss_curves, save_scatter_panel, save_trajectories


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=TOYS, default="moons")
    parser.add_argument("--steps", type=int, default=6000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weighting", choices=("simple", "elbo"), default="simple")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/ddpm_toy2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train, val, test = (load_dataset(args.data, s) for s in ("train", "val", "test"))
    torch.manual_seed(args.seed)
    ddpm = DDPM.from_data(train, weighting=args.weighting)
    start = time.perf_counter()
    result = fit(
        ddpm,
        train.x,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
        run_dir=args.out,
        metadata={
            "data": args.data,
            "form": "int",
            "event_shape": [2],
            "num_levels": None,
        },
    )
    train_seconds = time.perf_counter() - start

    n = args.num_samples
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    ancestral, trajectory = ancestral_sample(ddpm, n, generator=gen, return_trajectory=True)
    ancestral_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ddim = ddim_sample(ddpm, n, steps=args.ddim_steps, generator=gen)
    ddim_seconds = time.perf_counter() - start

    reference = test.x[:n]
    report = {
        "data": args.data,
        "train_seconds": train_seconds,
        "sliced_wasserstein": {
            f"ancestral ({ddpm.T} steps)": sliced_wasserstein(ancestral, reference),
            f"DDIM ({args.ddim_steps} steps, eta=0)": sliced_wasserstein(ddim, reference),
            "floor: val vs test data": sliced_wasserstein(val.x[:n], reference),
        },
        "sampling_seconds": {"ancestral": ancestral_seconds, "ddim": ddim_seconds},
    }
    save_scatter_panel(
        {
            "data (test)": reference,
            f"ancestral, {ddpm.T} steps": ancestral,
            f"DDIM, {args.ddim_steps} steps": ddim,
        },
        args.out / "samples.png",
        title=f"DDPM on {args.data}",
    )
    stride = max(trajectory.shape[0] // 50, 1)
    every = set(range(0, trajectory.shape[0], stride)) | {trajectory.shape[0] - 1}
    thinned = trajectory[sorted(every)]
    save_trajectories(
        thinned,
        args.out / "trajectories.png",
        data=reference,
        num_paths=12,
        title="reverse-chain paths, x_T to x_0 (every 20th step)",
    )
    save_loss_curves(result.history, args.out / "loss.png", title=f"DDPM ({args.weighting} weighting)")
    write_json_atomic(args.out / "report.json", report)
    print(f"trained {result.step} steps in {train_seconds:.0f} s")
    for name, value in report["sliced_wasserstein"].items():
        print(f"sliced Wasserstein-2, {name:<28} {value:.4f}")
    print(f"sampling {n} points: ancestral {ancestral_seconds:.1f} s, DDIM {ddim_seconds:.1f} s")
    print(f"wrote {args.out}/samples.png, trajectories.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
