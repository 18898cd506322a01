"""Cost of writing the objective as a Pyro program, measured against hand-written PyTorch.

One run times training steps of

* ``pyro``: what :func:`probgen.inference.fit` does — ``elbo.differentiable_loss(model, guide, x)``
  for the method's ELBO (``AnalyticKL_ELBO``), then one native ``torch.optim.Adam`` step;
* ``hand``: a hand-written loss doing the same arithmetic with the same networks,
  distributions, batch and optimizer (encode, reparameterized sample, decoder log-likelihood,
  analytic KL), then the same Adam step;
* ``pyro.optim``: Pyro's ``SVI`` with ``pyro.optim.Adam`` (one optimizer per parameter)
  on the same programs,

interleaved over several rounds, and prints per-step medians and the ratios to ``hand``.
All variants run with distribution validation off, as ``fit`` does after its first step
(``torch.distributions`` validates by default; a hand-written loop pays for that too
unless it turns it off), and ``pyro_validated`` shows the step with validation on.
Cases: the digits VAE (the configuration of ``examples/vae_digits.py``), the same with
512-wide hidden layers (more arithmetic per step, the same Pyro work), and a small 2-D
Gaussian VAE where Pyro's per-step overhead shows most. Pyro's cost is a fixed amount of
Python per step (about 0.4 ms here: three sample statements, two plates, a trace and a
replay), so its ratio falls as the arithmetic per step grows.

    python benchmarks/svi_overhead.py [--rounds 7 --steps 50 --json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from timing import measure  # benchmarks/timing.py (scripts run with benchmarks/ on sys.path)
from torch.distributions import Normal, kl_divergence

from probgen.data import load_dataset
from probgen.models import VAE


def hand_loss(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO per example, written by hand (same nets and likelihood as the program)."""
    loc, scale = vae.encode(x)
    z = loc + scale * torch.randn_like(loc)
    log_lik = vae.likelihood_dist(z).log_prob(x)
    kl = kl_divergence(Normal(loc, scale), Normal(torch.zeros_like(loc), 1.0)).sum(-1)
    return -(log_lik - kl).sum() / x.shape[0]


def make_steps(vae: VAE, x: torch.Tensor, lr: float) -> dict:
    """One closure per variant, each with its own copy of the same initial parameters."""
    steps = {}
    m_pyro = copy.deepcopy(vae)
    elbo_objective = m_pyro.objective()  # what fit drives: the negative ELBO per example

    def objective(batch: torch.Tensor) -> torch.Tensor:
        return next(elbo_objective.losses(lambda k: batch, 0, 1))[1]

    opt_pyro = torch.optim.Adam(m_pyro.parameters(), lr=lr)

    def pyro_step():
        opt_pyro.zero_grad(set_to_none=True)
        objective(x).backward()
        opt_pyro.step()

    m_hand = copy.deepcopy(vae)
    opt_hand = torch.optim.Adam(m_hand.parameters(), lr=lr)

    def hand_step():
        opt_hand.zero_grad(set_to_none=True)
        hand_loss(m_hand, x).backward()
        opt_hand.step()

    m_svi = copy.deepcopy(vae)

    def svi_model(x):
        pyro.module("vae", m_svi)  # puts every parameter in the param store for pyro.optim
        m_svi.model(x)

    def svi_guide(x):
        pyro.module("vae", m_svi)
        m_svi.guide(x)

    svi = SVI(svi_model, svi_guide, pyro.optim.Adam({"lr": lr}), m_svi.elbo())

    def svi_step():
        svi.step(x)

    def pyro_validated_step():
        with pyro.validation_enabled(True):
            pyro_step()

    steps["hand"], steps["pyro"], steps["pyro.optim"] = hand_step, pyro_step, svi_step
    steps["pyro_validated"] = pyro_validated_step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    digits = load_dataset("digits", "train")
    toy = load_dataset("eight_gaussians", "train", n=2048)
    cases = {
        "digits VAE (64-256-256-16, logistic, B=128)": (VAE.from_data(digits), digits.x[:128]),
        "digits VAE, wider (64-512-512-16, B=128)": (
            VAE.from_data(digits, hidden=(512, 512)),
            digits.x[:128],
        ),
        "2-D VAE (2-128-128-2, gaussian, B=128)": (VAE.from_data(toy), toy.x[:128]),
    }
    report = {}
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps, median ms/step"
    )
    for name, (vae, x) in cases.items():
        pyro.clear_param_store()
        with pyro.validation_enabled(False):
            ms, fastest = measure(make_steps(vae, x, 1e-3), args.rounds, args.steps)
        ratios = {k: v / ms["hand"] for k, v in ms.items()}
        fastest_ratios = {k: v / fastest["hand"] for k, v in fastest.items()}
        report[name] = {
            "ms_per_step_median": ms,
            "ratio_to_hand_median": ratios,
            "ms_per_step_min": fastest,
            "ratio_to_hand_min": fastest_ratios,
        }
        print(f"\n{name}                    median           fastest round")
        for k in ms:
            median_part = f"{ms[k]:8.3f} ms  x{ratios[k]:.3f}"
            print(f"  {k:<15} {median_part}    {fastest[k]:8.3f} ms  x{fastest_ratios[k]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
