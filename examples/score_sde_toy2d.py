"""Train VP, sub-VP and VE score SDEs on a 2-D toy; compare reverse-SDE and probability-flow samples and NLL.

Score-based diffusion (Song et al. 2021, arXiv:2011.13456): each forward SDE perturbs the data
continuously, a time-conditioned MLP learns the scores of the perturbed marginals by continuous-time
denoising score matching, written as an observed Gaussian site in a Pyro program
(``probgen.models.score_sde``) that ``fit`` maximizes. Each model is then sampled two ways from the
same prior draws: Euler-Maruyama on the reverse-time SDE (``--sample-steps`` steps) and the
probability-flow ODE (adaptive dopri5), whose instantaneous change of variables also gives the exact
log-likelihood of held-out points (exact divergence in 2-D).

    python examples/score_sde_toy2d.py                     # eight Gaussians, about 2 minutes on 2 CPU cores
    python examples/score_sde_toy2d.py --data checkerboard --weighting likelihood
    python examples/score_sde_toy2d.py --steps 20 --num-samples 200 --nll-points 50 --out /tmp/s  # smoke

Writes ``OUT/sdes.png`` (for each SDE: reverse-SDE samples over the data, and probability-flow ODE
trajectories from the prior to the data), ``OUT/loss.png``, ``OUT/report.json`` and one run
directory per SDE (``OUT/vp``, ...; ``probgen sample OUT/vp --sampler pc`` and ``probgen evaluate``
work on them); prints the sliced Wasserstein distance of each sampler to held-out data next to the
data-vs-data floor, and the ODE negative log-likelihood next to the entropy of the data (its floor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from probgen.checkpoint import write_json_atomic
from probgen.data import TOYS, load_dataset, toy_entropy
from probgen.inference import fit
from probgen.inference.ode import ode_sample
from probgen.inference.score_sde_sampling import ode_likelihood
from probgen.inference.sde import reverse_sde_sample
from probgen.metrics import sliced_wasserstein
from probgen.models.score_sde import SDES, WEIGHTINGS, ScoreSDE
from probgen.plotting import save_loss_curves

NAMES = {"vp": "VP", "subvp": "sub-VP", "ve": "VE"}


def save_comparison(results: dict, data: torch.Tensor, path: Path, title: str) -> None:
    """Row 1: reverse-SDE samples over the data; row 2: probability-flow ODE paths (prior to data)."""
    cols = len(results)
    fig = Figure(figsize=(4.2 * cols, 8.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ref = data[:3000].numpy()
    for j, (kind, res) in enumerate(results.items()):
        top, bottom = fig.add_subplot(2, cols, j + 1), fig.add_subplot(2, cols, cols + j + 1)
        for ax in (top, bottom):
            ax.scatter(ref[:, 0], ref[:, 1], s=1.5, c="0.7", lw=0, zorder=1)
            ax.set_aspect("equal")
        em = res["em"][:3000].numpy()
        top.scatter(em[:, 0], em[:, 1], s=1.5, c="tab:blue", alpha=0.6, lw=0, zorder=2)
        top.set_xlim(-4.5, 4.5), top.set_ylim(-4.5, 4.5)
        top.set_title(f"{NAMES[kind]}: reverse SDE, {res['em_steps']} EM steps", fontsize=10)
        path_xy = res["path"].numpy()  # (N + 1, P, 2), from t = T to eps
        frac = np.linspace(0.0, 1.0, path_xy.shape[0] - 1)
        for p in range(path_xy.shape[1]):
            segs = np.stack([path_xy[:-1, p], path_xy[1:, p]], axis=1)
            lines = LineCollection(segs, cmap="viridis", linewidths=0.9, zorder=3)
            lines.set_array(frac)
            bottom.add_collection(lines)
        bottom.scatter(path_xy[0, :, 0], path_xy[0, :, 1], s=10, facecolors="none", edgecolors="k", lw=0.6)
        bottom.scatter(path_xy[-1, :, 0], path_xy[-1, :, 1], s=8, c="tab:red", zorder=4)
        lim = min(max(4.5, float(np.abs(path_xy[0]).max()) * 1.05), 9.0)  # VE's prior is wide: clip
        bottom.set_xlim(-lim, lim), bottom.set_ylim(-lim, lim)
        bottom.set_title(f"{NAMES[kind]}: PF-ODE paths (rings: prior draws, red: ends)", fontsize=10)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=TOYS, default="eight_gaussians")
    parser.add_argument("--sdes", default="vp,subvp,ve", help="comma-separated subset of vp,subvp,ve")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sigma2")
    parser.add_argument("--steps", type=int, default=4000, help="training steps per SDE")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--sample-steps", type=int, default=500, help="Euler-Maruyama steps")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--nll-points", type=int, default=1000, help="test points in the ODE NLL")
    parser.add_argument("--num-paths", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/score_sde_toy2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.sdes.split(",") if k.strip()]
    if not kinds or any(k not in SDES for k in kinds):
        parser.error(f"--sdes must name some of {SDES}, but found {args.sdes!r}")
    if any((args.out / k).exists() and any((args.out / k).glob("*.json")) for k in kinds):
        raise SystemExit(f"{args.out} already holds a run: choose another --out")

    train, val, test = (load_dataset(args.data, s) for s in ("train", "val", "test"))
    n = args.num_samples
    reference, floor = test.x[:n], sliced_wasserstein(val.x[:n], test.x[:n])
    entropy = toy_entropy(args.data)
    results, histories, report = {}, {}, {"data": args.data, "weighting": args.weighting, "sdes": {}}
    for kind in kinds:
        torch.manual_seed(args.seed)
        model = ScoreSDE.from_data(train, sde=kind, weighting=args.weighting)
        start = time.perf_counter()
        fit_result = fit(
            model,
            train.x,
            val_data=val.x[:2000],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            ema_decay=args.ema_decay,
            val_every=max(1, args.steps // 5),
            progress=not args.no_progress,
            run_dir=args.out / kind,
            metadata={"data": args.data, "form": "int"} | {"event_shape": [2], "num_levels": None},
        )
        train_seconds = time.perf_counter() - start
        sde, g = model.sde_object, torch.Generator().manual_seed(args.seed + 1)
        x_T = sde.prior_sample((n, 2), generator=g)
        start = time.perf_counter()
        em = reverse_sde_sample(sde, model.score, x_T, steps=args.sample_steps, generator=g)
        em_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ode, ode_nfe = ode_sample(sde, model.score, x_T, denoise=True, return_nfe=True)
        ode_seconds = time.perf_counter() - start
        _, path = ode_sample(sde, model.score, x_T[: args.num_paths], steps=60, return_path=True)
        start = time.perf_counter()
        ll, nll_nfe, nll_kind = ode_likelihood(sde, model.score, test.x[: args.nll_points], seed=args.seed)
        nll_seconds = time.perf_counter() - start
        results[kind] = {"em": em, "path": path, "em_steps": args.sample_steps}
        histories[NAMES[kind]] = fit_result.history["train"]
        report["sdes"][kind] = {
            "train_steps": fit_result.step,
            "train_seconds": train_seconds,
            "sliced_wasserstein": {
                f"reverse SDE, {args.sample_steps} EM steps": sliced_wasserstein(em, reference),
                f"probability-flow ODE (dopri5, {ode_nfe} NFE)": sliced_wasserstein(ode, reference),
            },
            "sample_seconds": {"em": em_seconds, "ode": ode_seconds},
            "ode_nll_nats": float(-ll.mean()),
            "ode_nll_points": int(ll.numel()),
            "ode_nll_nfe": nll_nfe,
            "ode_nll_seconds": nll_seconds,
            "ode_nll_kind": nll_kind,
        }
    report.update(sliced_wasserstein_floor=floor, entropy=entropy, num_samples=n)
    title = f"score SDEs on {args.data} ({args.weighting} weighting, {args.steps} steps each)"
    save_comparison(results, test.x, args.out / "sdes.png", title)
    save_loss_curves(histories, args.out / "loss.png", title="continuous-time DSM loss (nats per example)")
    write_json_atomic(args.out / "report.json", report)
    print(f"sliced Wasserstein-2 to {n} test points; data-vs-data floor {floor:.4f}")
    for kind, r in report["sdes"].items():
        for name, value in r["sliced_wasserstein"].items():
            print(f"  {NAMES[kind]:<7} {name:<40} {value:.4f}")
    ent = "n/a" if entropy is None else f"{entropy:.4f}"
    print(f"ODE NLL (nats) on {args.nll_points} test points; entropy of the data (floor) {ent}")
    for kind, r in report["sdes"].items():
        print(
            f"  {NAMES[kind]:<7} {r['ode_nll_nats']:.4f}  ({r['ode_nll_nfe']} NFE, "
            f"{r['ode_nll_seconds']:.0f} s; trained {r['train_steps']} steps in {r['train_seconds']:.0f} s)"
        )
    print(f"wrote {args.out}/sdes.png, loss.png, report.json")
    return report


if __name__ == "__main__":
    main()
