"""Bayesian logistic regression sampled by SGLD, MALA, HMC and NUTS side by side.

The model is one Pyro program: coefficients ``w ~ N(0, s^2 I)``, intercept ``b ~ N(0, s^2)``,
labels ``y ~ Bernoulli(sigmoid(x w + b))`` inside ``pyro.plate("data", N, subsample_size=B)``.
NUTS (Hoffman & Gelman 2014, arXiv:1111.4246), HMC (Neal 2011, arXiv:1206.1901; 10 leapfrog steps,
step size adapted in warm-up) and MALA (Roberts & Tweedie 1996) run it on the
full data; SGLD (Welling & Teh 2011) runs the *same* program with a minibatch plate, which
scales the subsampled log-likelihood by N / B. All four are ``pyro.infer.MCMC`` kernels, so ESS
and R-hat come from Pyro's own diagnostics.

Data: scikit-learn's bundled breast-cancer set (569 tumours, 30 measurements, offline); the
features are the first ``--features`` principal components of the standardized measurements,
whitened (the raw measurements are nearly collinear: radius, perimeter and area), with a fixed
split of 455 for the posterior and 114 held out.

    python examples/langevin_bayes.py              # about a minute on 2 CPU cores
    python examples/langevin_bayes.py --samples 20 --warmup 10 --nuts-samples 20 --nuts-warmup 10

Writes ``OUT/posterior.png`` (two coefficients per sampler: scatter and marginal histograms,
NUTS in grey as the reference), ``OUT/traces.png`` and ``OUT/report.json``; prints a table of
seconds per effective sample (wall time of warm-up and sampling over the smallest ESS of any
coefficient) and each sampler's posterior means and spreads against NUTS's. SGLD's minibatch
noise inflates its spread and its decreasing step slows its mixing; its per-step cost does not
grow with N, which pays off on data sets far larger than this one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pyro.infer import HMC, MCMC, NUTS
from pyro.ops.stats import effective_sample_size
from sklearn.datasets import load_breast_cancer

from probgen.checkpoint import write_json_atomic
from probgen.inference.mcmc import MALA, SGLD


def load_data(num_features: int, num_train: int = 455) -> tuple[torch.Tensor, ...]:
    """Whitened principal components of the standardized measurements; fixed train/held-out split."""
    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = data.data[order], data.target[order].astype(np.float64)
    train = x[:num_train]
    mean, std = train.mean(0), train.std(0)
    z = (x - mean) / std
    _, s, vt = np.linalg.svd(z[:num_train], full_matrices=False)
    proj = vt[:num_features].T / (s[:num_features] / np.sqrt(num_train))
    feats = torch.tensor(z @ proj, dtype=torch.get_default_dtype())
    labels = torch.tensor(y, dtype=torch.get_default_dtype())
    return feats[:num_train], labels[:num_train], feats[num_train:], labels[num_train:]


def logistic_regression(x, y, prior_scale=1.0, subsample_size=None):
    """x: (N, D) features, y: (N,) labels in {0, 1}."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), prior_scale).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, prior_scale))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w + b), obs=y[idx])


def coefficients(samples: dict) -> torch.Tensor:
    """(T, D + 1): the coefficients then the intercept."""
    return torch.cat([samples["w"], samples["b"][:, None]], 1)


def run(name: str, kernel, samples: int, warmup: int, args: tuple, progress: bool) -> dict:
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=not progress)
    start = time.perf_counter()
    mcmc.run(*args)
    seconds = time.perf_counter() - start
    theta = coefficients(mcmc.get_samples())
    ess = effective_sample_size(theta[None].double())
    diag = {k: v["chain 0"] for k, v in mcmc.diagnostics().items() if isinstance(v, dict) and "chain 0" in v}
    return {
        "name": name,
        "theta": theta,
        "seconds": seconds,
        "min_ess": float(ess.min()),
        "diagnostics": diag,
    }


def held_out(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Posterior-predictive accuracy and mean log predictive density (nats) on held-out data."""
    probs = torch.sigmoid(x @ theta[:, :-1].T + theta[:, -1]).mean(1)
    log_pred = torch.where(y > 0, probs, 1 - probs).clamp_min(1e-12).log().mean()
    return float(((probs > 0.5).float() == y).float().mean()), float(log_pred)


def save_posterior(results: list[dict], dims: tuple[int, int], labels: list[str], path: Path) -> None:
    reference = results[-1]["theta"].numpy()
    fig = Figure(figsize=(4 * len(results), 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(results), squeeze=False)
    i, j = dims
    for col, res in enumerate(results):
        theta = res["theta"].numpy()
        ax = axes[0, col]
        if res is not results[-1]:
            ax.scatter(reference[:, i], reference[:, j], s=4, c="0.7", label="NUTS")
        ax.scatter(theta[:, i], theta[:, j], s=4, c="tab:blue", alpha=0.5, label=res["name"])
        ax.set(xlabel=labels[i], ylabel=labels[j], title=f"{res['name']}: min ESS {res['min_ess']:.0f}")
        ax.legend(loc="best", fontsize=8)
        for row, d in ((1, i), (2, j)):
            ax = axes[row, col]
            bins = np.linspace(
                *np.percentile(np.concatenate([reference[:, d], theta[:, d]]), [0.5, 99.5]), 40
            )
            if res is not results[-1]:
                ax.hist(reference[:, d], bins=bins, density=True, color="0.7", label="NUTS")
            ax.hist(
                theta[:, d], bins=bins, density=True, histtype="step", color="tab:blue", label=res["name"]
            )
            ax.set(xlabel=labels[d], yticks=[])
    fig.suptitle("Bayesian logistic regression (breast cancer): posterior of two coefficients")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def save_traces(results: list[dict], dim: int, label: str, path: Path) -> None:
    fig = Figure(figsize=(10, 2.2 * len(results)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, res in zip(axes, results):
        ax.plot(res["theta"][:, dim].numpy(), lw=0.6)
        ax.set(ylabel=label, title=f"{res['name']} ({res['theta'].shape[0]} draws after warm-up)")
    axes[-1].set_xlabel("draw")
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=5, help="principal components used (1 to 30)")
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=5000, help="draws kept per Langevin sampler")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up steps per Langevin sampler")
    parser.add_argument("--nuts-samples", type=int, default=1000, help="draws of NUTS and HMC")
    parser.add_argument("--nuts-warmup", type=int, default=500, help="warm-up of NUTS and HMC")
    parser.add_argument("--hmc-leapfrog", type=int, default=10, help="HMC leapfrog steps per draw")
    parser.add_argument("--batch-size", type=int, default=32, help="SGLD minibatch size B")
    parser.add_argument("--sgld-step", type=float, default=1e-2, help="SGLD initial step size epsilon_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/langevin_bayes"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.features <= 30:
        parser.error(f"Expected --features in 1..30, but found {args.features}.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # vectors of a few hundred numbers: extra threads only add overhead
    try:
        return _compare(args)
    finally:
        torch.set_num_threads(threads)


def _compare(args: argparse.Namespace) -> dict:
    x, y, x_test, y_test = load_data(args.features)
    model_args = (x, y, args.prior_scale)
    progress = not args.no_progress
    results = []
    pyro.set_rng_seed(args.seed)
    sgld = SGLD(logistic_regression, step_size=args.sgld_step, step_offset=1000.0, step_decay=0.55)
    results.append(run("SGLD", sgld, args.samples, args.warmup, (*model_args, args.batch_size), progress))
    pyro.set_rng_seed(args.seed)
    results.append(run("MALA", MALA(logistic_regression), args.samples, args.warmup, model_args, progress))
    pyro.set_rng_seed(args.seed)
    hmc = HMC(logistic_regression, num_steps=args.hmc_leapfrog)  # step size adapted during warm-up
    results.append(run("HMC", hmc, args.nuts_samples, args.nuts_warmup, model_args, progress))
    pyro.set_rng_seed(args.seed)
    results.append(
        run("NUTS", NUTS(logistic_regression), args.nuts_samples, args.nuts_warmup, model_args, progress)
    )

    labels = [f"w[{k}] (PC {k + 1})" for k in range(args.features)] + ["b (intercept)"]
    reference = results[-1]["theta"]
    ref_mean, ref_std = reference.mean(0), reference.std(0)
    report = {"features": args.features, "num_train": len(y), "num_held_out": len(y_test), "samplers": {}}
    columns = [  # (header, report key, format)
        ("draws", "draws", "d"),
        ("seconds", "seconds", ".1f"),
        ("min ESS", "min_ess", ".1f"),
        ("s / ESS", "seconds_per_effective_sample", ".3f"),
        ("max |mean - NUTS| / sd", "max_abs_mean_diff_vs_nuts_in_nuts_sd", ".2f"),
        ("max sd / NUTS sd", "max_sd_ratio_vs_nuts", ".2f"),
        ("held-out acc", "held_out_accuracy", ".3f"),
        ("log pred", "held_out_log_predictive", ".3f"),
    ]
    print(f"{'sampler':<7}" + " ".join(f"{header:>{len(header) + 2}}" for header, _, _ in columns))
    for res in results:
        theta = res["theta"]
        accuracy, log_pred = held_out(theta, x_test, y_test)
        entry = {
            "draws": theta.shape[0],
            "seconds": res["seconds"],
            "min_ess": res["min_ess"],
            "seconds_per_effective_sample": res["seconds"] / max(res["min_ess"], 1e-12),
            "posterior_mean": theta.mean(0).tolist(),
            "posterior_std": theta.std(0).tolist(),
            "max_abs_mean_diff_vs_nuts_in_nuts_sd": float(((theta.mean(0) - ref_mean).abs() / ref_std).max()),
            "max_sd_ratio_vs_nuts": float((theta.std(0) / ref_std).max()),
            "held_out_accuracy": accuracy,
            "held_out_log_predictive": log_pred,
            "diagnostics": res["diagnostics"],
        }
        report["samplers"][res["name"]] = entry
        print(f"{res['name']:<7}" + " ".join(f"{entry[key]:>{len(h) + 2}{fmt}}" for h, key, fmt in columns))

    dims = (0, 1) if args.features >= 2 else (0, args.features)
    save_posterior(results, dims, labels, args.out / "posterior.png")
    save_traces(results, dims[0], labels[dims[0]], args.out / "traces.png")
    write_json_atomic(args.out / "report.json", report)
    print(f"wrote {args.out}/posterior.png, traces.png, report.json")
    return report


if __name__ == "__main__":
    main()
