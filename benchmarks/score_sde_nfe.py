"""Sample quality against the number of score evaluations for the score-SDE samplers EM, PC and the ODE.

Song et al. 2021 (arXiv:2011.13456), Sec. 4: the reverse SDE by Euler-Maruyama (``em``, N steps, N + 1
evaluations with the final denoising step), predictor-corrector (``pc``: reverse-diffusion predictor
and one Langevin corrector step at snr 0.16, 2N + 1 evaluations) and the probability-flow ODE
(``ode``: fixed-step RK4 with 4N + 1 evaluations, and adaptive dopri5 at several tolerances, its
evaluations counted). Each trained run (default the three of ``examples/score_sde_toy2d.py``) draws
``--samples`` points from the same prior draws per sampler; the quality is the sliced
Wasserstein-2 distance to as many test points, next to the val-vs-test floor. Score evaluations are
counted by wrapping the score function, not inferred from the step count.

    python examples/score_sde_toy2d.py                  # trains out/score_sde_toy2d/{vp,subvp,ve}
    python benchmarks/score_sde_nfe.py --out out/score_sde_nfe

Writes ``OUT/score_sde_nfe.md``, ``OUT/score_sde_nfe.json`` and ``OUT/score_sde_nfe.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from probgen.data import load_dataset
from probgen.inference.score_sde_sampling import sample_score_sde
from probgen.inference.sde import CountingScore
from probgen.metrics import sliced_wasserstein
from probgen.models import load_method
from probgen.plotting import save_line_plot

EM_STEPS = (10, 20, 50, 100, 200, 500, 1000)
PC_STEPS = (10, 20, 50, 100, 200, 500)
RK4_STEPS = (2, 5, 10, 25, 50)
DOPRI_TOLS = (1e-2, 1e-3, 1e-5)


def variants() -> list[tuple[str, str, int | None, dict]]:
    """(curve, sampler, steps, options) for every point of every curve."""
    out = [("EM", "em", n, {}) for n in EM_STEPS]
    out += [("PC (1 corrector)", "pc", n, {"corrector_steps": 1}) for n in PC_STEPS]
    out += [("ODE, RK4", "ode", n, {"solver": "rk4"}) for n in RK4_STEPS]
    out += [
        ("ODE, dopri5", "ode", None, {"solver": "dopri5", "rtol": tol, "atol": tol}) for tol in DOPRI_TOLS
    ]
    return out


def measure(run: Path, num: int, seed: int) -> dict:
    method, meta = load_method(run, expected="score-sde")
    method.eval()
    data = meta["data"]
    test = load_dataset(data, "test").x[:num]
    floor = sliced_wasserstein(load_dataset(data, "val").x[:num], test)
    rows = []
    for curve, sampler, steps, options in variants():
        counted = CountingScore(method.score, check=False)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                x = sample_score_sde(
                    method.sde_object,
                    counted,
                    num,
                    method.data_dim,
                    sampler=sampler,
                    steps=steps,
                    generator=torch.Generator().manual_seed(seed),
                    **options,
                )
            sw, error = sliced_wasserstein(x, test), None
        except ValueError as exc:  # e.g. VP's reverse-diffusion step needs N > beta_max
            sw, error = None, str(exc)
        rows.append(
            {
                "curve": curve,
                "sampler": sampler,
                "steps": steps,
                "options": options,
                "nfe": counted.calls if error is None else None,
                "sliced_wasserstein": sw,
                "seconds": time.perf_counter() - start,
                "error": error,
            }
        )
    return {"data": data, "sde": method.config["sde"], "floor": floor, "rows": rows}


def markdown(results: dict[str, dict]) -> str:
    lines = []
    for name, res in results.items():
        lines += [
            f"### {res['sde']} ({name}) on {res['data']}: sliced W2 (floor {res['floor']:.4f})",
            "",
            "| sampler | steps / tol | NFE | distance | seconds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in res["rows"]:
            setting = r["steps"] if r["steps"] is not None else f"tol {r['options']['rtol']:g}"
            if r["error"]:
                lines.append(f"| {r['curve']} | {setting} | – | failed: {r['error'][:80]} | – |")
            else:
                lines.append(
                    f"| {r['curve']} | {setting} | {r['nfe']} | {r['sliced_wasserstein']:.4f} "
                    f"| {r['seconds']:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        default=[Path(f"out/score_sde_toy2d/{s}") for s in ("vp", "subvp", "ve")],
    )
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/score_sde_nfe"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {str(run): measure(run, args.samples, args.seed) for run in args.runs}
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (args.out / "score_sde_nfe.md").write_text(table)
    (args.out / "score_sde_nfe.json").write_text(json.dumps(results, indent=2))
    series = {}
    for res in results.values():
        for curve in dict.fromkeys(r["curve"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["curve"] == curve and r["error"] is None]
            pts = [(r["nfe"], r["sliced_wasserstein"] / res["floor"]) for r in rows]
            if pts:
                series[f"{res['sde']}: {curve}"] = ([p[0] for p in pts], [p[1] for p in pts])
    save_line_plot(
        series,
        args.out / "score_sde_nfe.png",
        xlabel="score evaluations per sample (NFE)",
        ylabel="sliced W2 / data-vs-data floor",
        title="score-SDE samplers: quality against NFE",
        logx=True,
        logy=True,
    )
    print(table)
    print(f"wrote {args.out}/score_sde_nfe.md, score_sde_nfe.json, score_sde_nfe.png")
    return results


if __name__ == "__main__":
    main()
