"""Cost of the score methods as probabilistic programs and of torchsde, against hand-written PyTorch.

(a) One denoising-score-matching training step (batch 128, Adam), same network:

* ``pyro``: what :func:`probgen.inference.fit` does: the method's ELBO (``AnalyticKL_ELBO``) over its
  model/guide programs (NCSN: sites ``level``, ``x_tilde``, observed ``eps``; score SDE: ``t``,
  ``x_t``, observed ``eps``), then one Adam step;
* ``hand``: the usual loss with the same network and draws: NCSN's
  :math:`\\tfrac12\\lVert\\sigma s_\\theta(x + \\sigma\\epsilon, \\sigma) + \\epsilon\\rVert^2` (Song & Ermon
  2019, arXiv:1907.05600) and the score SDE's :math:`\\tfrac12\\lVert s_t s_\\theta(x_t, t) + z\\rVert^2`
  (Song et al. 2021, arXiv:2011.13456, eq. 7), then the same Adam step.

(b) Reverse-SDE sampling with N Euler-Maruyama steps, same network and steps (no final denoising):

* ``sdeint``: :func:`probgen.inference.reverse_sde_sample` (``torchsde.sdeint`` on
  :class:`~probgen.sdes.ReverseSDE`) with its default Brownian motion;
* ``sdeint+interval``: the same with ``torchsde.BrownianInterval`` (torchsde's default object);
* ``hand``: :math:`x \\leftarrow x + [g^2 s_\\theta - f]\\,h + g\\sqrt h\\, z` in a plain loop.

Variants are interleaved over rounds; medians and the fastest rounds are reported with the ratio
to ``hand`` (the issues' targets: at most 1.10x).

    python benchmarks/score_overhead.py [--rounds 7 --steps 20 --sample-steps 1000 --json out.json]
"""

from __future__ import annotations

import argparse
import json

import pyro
import torch
import torchsde
from timing import run_cases, train_steps  # benchmarks/timing.py (scripts run with benchmarks/ on sys.path)

from probgen.data import load_dataset
from probgen.inference import reverse_sde_sample
from probgen.models import NCSN, ScoreSDE
from probgen.sdes import append_dims


def ncsn_hand_loss(m: NCSN, x: torch.Tensor) -> torch.Tensor:
    level = torch.randint(0, m.num_levels, (x.shape[0],))
    sigma = m.sigmas[level]
    eps = torch.randn_like(x)
    s = m.score(x + sigma[:, None] * eps, sigma)
    return 0.5 * (sigma[:, None] * s + eps).square().sum(-1).mean()


def score_sde_hand_loss(m: ScoreSDE, x: torch.Tensor) -> torch.Tensor:
    t = m.config["t_min"] + (m.sde_object.T - m.config["t_min"]) * torch.rand(x.shape[0])
    mean, std = (append_dims(v, 2) for v in m.sde_object.marginal_params(t))
    z = torch.randn_like(x)
    s = m.score(mean * x + std * z, t)
    return 0.5 * (std * s + z).square().sum(-1).mean()


@torch.no_grad()
def hand_reverse_sde(sde, score_fn, x: torch.Tensor, steps: int) -> torch.Tensor:
    h = (sde.T - sde.eps) / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), sde.T - i * h, dtype=x.dtype)
        drift, g = sde.sde(x, t)
        g = append_dims(g, 2)
        x = x + (g.square() * score_fn(x, t) - drift) * h + g * (h**0.5) * torch.randn_like(x)
    return x


def sampling(method: ScoreSDE, num: int, steps: int) -> dict:
    sde, score = method.sde_object, method.score
    x = sde.prior_sample((num, method.data_dim), generator=torch.Generator().manual_seed(0))
    h = (sde.T - sde.eps) / steps

    def interval():
        bm = torchsde.BrownianInterval(t0=0.0, t1=steps * h, size=tuple(x.shape), dtype=x.dtype, dt=h)
        return reverse_sde_sample(sde, score, x, steps=steps, denoise=False, bm=bm)

    return {
        "hand": lambda: hand_reverse_sde(sde, score, x, steps),
        "sdeint": lambda: reverse_sde_sample(sde, score, x, steps=steps, denoise=False),
        "sdeint+interval": interval,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round and variant")
    parser.add_argument("--sample-rounds", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=1000)
    parser.add_argument("--sample-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    digits = load_dataset("digits", "train")
    toy = load_dataset("eight_gaussians", "train")
    versions = f"torch {torch.__version__}, pyro {pyro.__version__}, torchsde {torchsde.__version__}"
    print(f"{versions}, {args.threads} threads")
    cases = {}
    for name, data in (("digits UNet", digits), ("2-D MLP", toy)):
        x = data.x[:128]
        ncsn = NCSN.from_data(data)
        sde_model = ScoreSDE.from_data(data)
        cases[f"NCSN DSM train step, {name}, B=128"] = (
            train_steps(ncsn, ncsn_hand_loss, x),
            args.rounds,
            args.steps,
            5,
        )
        cases[f"score-SDE DSM train step, {name}, B=128"] = (
            train_steps(sde_model, score_sde_hand_loss, x),
            args.rounds,
            args.steps,
            5,
        )
    for name, data in (("digits UNet", digits), ("2-D MLP", toy)):
        method = ScoreSDE.from_data(data).eval()
        b, n = args.sample_batch, args.sample_steps
        fns = sampling(method, b, n)
        cases[f"reverse SDE, {n} EM steps, {name}, B={b}"] = (fns, args.sample_rounds, 1, 1)
    with pyro.validation_enabled(False):
        report = run_cases(cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
