"""Fit normalizing flows by maximum likelihood on 2-D toys (and the digits); exact NLL next to the entropy.

A flow is a Pyro program that observes x under a ``TransformedDistribution`` of a standard
Normal through Pyro's transforms (``probgen.models.Flow``): rational-quadratic spline coupling
(Durkan et al. 2019, arXiv:1906.04545), affine coupling / RealNVP (Dinh et al. 2017,
arXiv:1605.08803) or MAF (Papamakarios et al. 2017, arXiv:1705.07057). Its guide is empty, so
``fit``'s ``Trace_ELBO`` is the exact negative log-likelihood and training is maximum likelihood;
the best validation NLL picks the weights. The test NLL is exact, quoted in nats next to the
toy's entropy (the best any model can reach: ln 32 = 3.466 for checkerboard, 2.832 for
eight_gaussians).

With ``--digits`` a flow is also fitted to the 8x8 digits, uniformly dequantized
``(v + u) / 17``; its density gives an upper bound on the NLL of the 17-level data,
``-log p(y) + 64 log 17`` (``probgen.metrics.discrete_nll_from_density``), quoted in bits/dim
next to the independent-pixel (2.42) and uniform (4.09) floors. The 1,350 training images are
dequantized ``--digits-copies`` times with fresh noise, so the flow cannot memorize one draw of it.

    python examples/flow_toy2d.py                 # checkerboard + eight_gaussians, minutes on 2 cores
    python examples/flow_toy2d.py --digits        # also the digits (a few more minutes)
    python examples/flow_toy2d.py --transform maf --data moons
    python examples/flow_toy2d.py --steps 20 --num-samples 200 --out /tmp/flow   # smoke test

Writes ``OUT/density.png`` (per toy: test data, the flow's density, its samples, as heat maps),
``OUT/samples.png`` (samples against the data), ``OUT/digits_samples.png`` with ``--digits``,
``OUT/report.json``, and one run directory per data set (``OUT/checkerboard``, ...) with
checkpoints that ``probgen sample`` / ``probgen evaluate`` read.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from probgen.apps.evaluate import to_levels
from probgen.checkpoint import write_json_atomic
from probgen.data import DIGITS_LEVELS, DIGITS_SHAPE, TOYS, load_dataset, toy_entropy
from probgen.inference import fit
from probgen.metrics import (
    bits_per_dim,
    discrete_nll_from_density,
    independent_levels_nll,
    sliced_wasserstein,
)
from probgen.models.flow import TRANSFORMS, Flow
from probgen.plotting import save_image_grid, save_scatter_panel

LIM = 4.5  # half-width of the plotted square


@torch.no_grad()
def _grid_density(flow: Flow, bins: int) -> np.ndarray:
    """The flow's density on a ``bins x bins`` grid of cell centres over [-LIM, LIM]^2 (rows: y)."""
    ticks = torch.linspace(-LIM, LIM, bins + 1)
    centres = (ticks[1:] + ticks[:-1]) / 2
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    log_p = torch.cat([flow.log_prob(chunk) for chunk in points.split(8192)])
    return log_p.exp().reshape(bins, bins).numpy()


def _histogram(x: torch.Tensor, bins: int) -> np.ndarray:
    """Normalized 2-D histogram of ``x`` (``(N, 2)``) over [-LIM, LIM]^2 (rows: y), a density."""
    h, _, _ = np.histogram2d(x[:, 1].numpy(), x[:, 0].numpy(), bins=bins, range=[[-LIM, LIM]] * 2)
    return h / (len(x) * (2 * LIM / bins) ** 2)


def _save_heat_maps(rows: dict[str, list[tuple[str, np.ndarray]]], path: Path) -> None:
    """One row of heat maps per data set, one shared colour scale per row."""
    ncols = max(len(r) for r in rows.values())
    fig = Figure(figsize=(3.0 * ncols, 3.0 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax_row, panels in zip(axes, rows.values()):
        vmax = max(float(np.quantile(image, 0.995)) for _, image in panels)
        for ax, (title, image) in zip(ax_row, panels):
            ax.imshow(image, origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _fit(flow: Flow, train_x, val_x, *, name: str, form: str, args, steps: int, batch_size: int, lr: float):
    metadata = {
        "data": name,
        "form": form,
        "event_shape": list(DIGITS_SHAPE) if name == "digits" else [2],
        "num_levels": DIGITS_LEVELS if name == "digits" else None,
    }
    start = time.perf_counter()
    result = fit(
        flow,
        train_x,
        val_data=val_x,  # exact NLL on the validation split: the empty guide makes the ELBO exact
        val_every=max(steps // 10, 1),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=args.seed,
        run_dir=args.out / name,
        metadata=metadata,
        progress=not args.no_progress,
    )
    return result, time.perf_counter() - start


def _toy(name: str, args) -> tuple[dict, list[tuple[str, np.ndarray]], dict[str, torch.Tensor]]:
    train, val, test = (load_dataset(name, split) for split in ("train", "val", "test"))
    torch.manual_seed(args.seed)
    flow = Flow.from_data(train, transform=args.transform)
    result, seconds = _fit(
        flow,
        train.x,
        val.x,
        name=name,
        form="int",
        args=args,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    with torch.no_grad():
        nll = float(-flow.log_prob(test.x).mean())
        torch.manual_seed(args.seed + 1)
        samples = flow.sample(args.num_samples)
    entropy = toy_entropy(name)
    n = args.num_samples
    report = {
        "test_nll_nats": nll,
        "entropy_nats": entropy,
        "gap_nats": None if entropy is None else nll - entropy,
        "sliced_wasserstein": sliced_wasserstein(samples, test.x[:n]),
        "sliced_wasserstein_floor": sliced_wasserstein(val.x[:n], test.x[:n]),
        "best_step": result.best_step,
        "train_seconds": seconds,
        "config": {k: v for k, v in flow.config.items() if k not in ("loc", "scale")},
    }
    bins = args.grid
    heat = [
        (f"{name}: test data", _histogram(test.x, bins)),
        (f"flow density (NLL {nll:.3f} nats)", _grid_density(flow, bins)),
        (f"flow samples ({n})", _histogram(samples, bins)),
    ]
    return report, heat, {f"{name}: data": test.x[:n], f"{name}: flow": samples}


def _digits(args) -> dict:
    val, test = (load_dataset("digits", split, form="dequantized") for split in ("val", "test"))
    copies = [load_dataset("digits", "train", form="dequantized", seed=s) for s in range(args.digits_copies)]
    train_x = torch.cat([c.x for c in copies])
    torch.manual_seed(args.seed)
    flow = Flow.from_data(copies[0], transform=args.transform)
    result, seconds = _fit(
        flow, train_x, val.x, name="digits", form="dequantized", args=args,
        steps=args.digits_steps, batch_size=128, lr=1e-3,
    )  # fmt: skip
    dims = train_x.shape[1]
    with torch.no_grad():
        density_nll = -flow.log_prob(test.x)
        bpd = float(bits_per_dim(discrete_nll_from_density(density_nll, dims, DIGITS_LEVELS), dims).mean())
        torch.manual_seed(args.seed + 1)
        images = to_levels(flow.sample(64), "dequantized", DIGITS_LEVELS)
    train_int, test_int = (load_dataset("digits", split) for split in ("train", "test"))
    floor = float(bits_per_dim(independent_levels_nll(train_int.x, test_int.x, DIGITS_LEVELS), dims).mean())
    save_image_grid(
        images,
        args.out / "digits_samples.png",
        image_shape=DIGITS_SHAPE,
        title=f"flow ({args.transform}) samples",
    )
    return {
        "test_nll_bits_per_dim": bpd,
        "independent_pixel_floor": floor,
        "uniform_floor": math.log2(DIGITS_LEVELS),
        "best_step": result.best_step,
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=TOYS, default=["checkerboard", "eight_gaussians"])
    parser.add_argument("--transform", choices=TRANSFORMS, default="spline_coupling")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per toy")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--grid", type=int, default=150, help="heat-map resolution")
    parser.add_argument("--digits", action="store_true", help="also fit the 8x8 digits")
    parser.add_argument("--digits-steps", type=int, default=800)
    parser.add_argument("--digits-copies", type=int, default=20, help="dequantizations of the train split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tensors are tiny)")
    parser.add_argument("--out", type=Path, default=Path("out/flow_toy2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.glob("*/*.json")):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")
    # The flows' tensors are small, so a second intra-op thread costs more than it brings (20x slower
    # per step on a busy 2-core machine); the caller's setting is restored on return.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    report: dict = {"transform": args.transform, "toys": {}}
    heat, scatter = {}, {}
    for name in args.data:
        report["toys"][name], heat[name], panels = _toy(name, args)
        scatter.update(panels)
    _save_heat_maps(heat, args.out / "density.png")
    save_scatter_panel(scatter, args.out / "samples.png", ncols=2, title=f"flow ({args.transform}) samples")
    if args.digits:
        report["digits"] = _digits(args)
    write_json_atomic(args.out / "report.json", report)

    for name, r in report["toys"].items():
        gap = "" if r["gap_nats"] is None else f", gap {r['gap_nats']:+.3f}"
        entropy = "unknown" if r["entropy_nats"] is None else f"{r['entropy_nats']:.3f}"
        print(
            f"{name:<16} test NLL {r['test_nll_nats']:.3f} nats, entropy {entropy}{gap} "
            f"(sliced W2 {r['sliced_wasserstein']:.4f}, floor {r['sliced_wasserstein_floor']:.4f}; "
            f"{r['train_seconds']:.0f} s)"
        )
    if args.digits:
        d = report["digits"]
        print(
            f"digits           test NLL {d['test_nll_bits_per_dim']:.3f} bits/dim (dequantization bound); "
            f"floors: independent pixels {d['independent_pixel_floor']:.2f}, "
            f"uniform {d['uniform_floor']:.2f} ({d['train_seconds']:.0f} s)"
        )
    print(
        f"wrote {args.out}/density.png, samples.png, report.json"
        + (", digits_samples.png" if args.digits else "")
    )
    return report


if __name__ == "__main__":
    main()
