"""The DDPM and few-step benchmarks run end to end on tiny budgets (the README quotes their figures)."""

from __future__ import annotations

import json

import pytest

from probgen.cli import main as cli

from .test_score_benchmarks import _load, threads  # noqa: F401  (the fixture)


def _ddpm_run(tmp_path, data: str, T: int = 20):
    run = tmp_path / f"ddpm-{data}"
    argv = ["train", "ddpm", "--data", data, "--out", str(run), "--steps", "2", "--val-every", "2"]
    assert cli([*argv, "--set", f"T={T}", "--no-progress", "--device", "cpu"]) == 0
    return run


def test_ddpm_steps_pools_digits_seeds_and_reports_the_paired_ratios(tmp_path, threads):  # noqa: F811
    run = _ddpm_run(tmp_path, "digits")
    out = tmp_path / "o"
    argv = ["--no-toy", "--digits-run", str(run), "--digits-samples", "12", "--digits-seeds", "3"]
    report = _load("ddpm_steps").main([*argv, "--ddim-steps", "5", "50", "--threads", "1", "--out", str(out)])
    digits = report["digits"]
    assert set(report) == {"digits"} and digits["samples"] == 36 and digits["seeds"] == 3
    anc, *ddim = digits["rows"]
    assert anc["sampler"] == "ancestral" and anc["steps"] == 20 and len(anc["per_seed"]) == 3
    assert [r["steps"] for r in ddim] == [5, 5]  # 50 > T is skipped, for both variants
    for r in digits["rows"]:
        assert r["stderr"] >= 0 and r["distance"] > 0
    assert digits["ddim50_over_ancestral"] == {}
    saved = json.loads((out / "ddpm_steps.json").read_text())
    assert saved["digits"]["rows"][0]["per_seed"] == pytest.approx(anc["per_seed"])
    assert "pooled over 3 seeds" in (out / "ddpm_steps.md").read_text()


def test_ddpm_steps_ratio_of_ddim50_per_seed(tmp_path, threads):  # noqa: F811
    run = _ddpm_run(tmp_path, "digits", T=50)
    argv = ["--no-toy", "--digits-run", str(run), "--digits-samples", "10", "--digits-seeds", "2"]
    report = _load("ddpm_steps").main([*argv, "--ddim-steps", "50", "--threads", "1", "--out", str(tmp_path)])
    digits = report["digits"]
    anc = digits["rows"][0]
    for label, ratio in digits["ddim50_over_ancestral"].items():
        row = next(r for r in digits["rows"] if r["sampler"] == label)
        assert ratio == pytest.approx(row["distance"] / anc["distance"])
        per_seed = digits["ddim50_over_ancestral_per_seed"][label]
        assert per_seed == pytest.approx([a / b for a, b in zip(row["per_seed"], anc["per_seed"])])


def test_few_step_marks_missing_runs_not_available(tmp_path, threads):  # noqa: F811
    run = _ddpm_run(tmp_path, "eight_gaussians")
    out = tmp_path / "o"
    argv = ["--toy-run", str(run), "--toy-distill-run", str(tmp_path / "none"), "--toy-samples", "50"]
    report = _load("few_step").main(
        [*argv, "--ddim-steps", "5", "--ode-steps", "4", "--threads", "1", "--out", str(out)]
    )
    rows = report["eight_gaussians"]["rows"]
    samplers = {r["sampler"]: r for r in rows}
    assert samplers["ancestral"]["steps"] == 20 and samplers["PF-ODE (Euler)"]["steps"] == 4
    for name in ("consistency distillation", "consistency training", "progressive distillation"):
        assert samplers[name]["distance"] is None and samplers[name]["note"].startswith("not available")
    assert (out / "few_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ddpm_overhead_times_training_and_sampling(tmp_path, threads):  # noqa: F811
    argv = ["--rounds", "1", "--steps", "1", "--sample-rounds", "1", "--sample-T", "3", "--sample-batch", "4"]
    report = _load("ddpm_overhead").main([*argv, "--threads", "1", "--json", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text()).keys() == report.keys()
    assert len(report) == 3  # two training weightings and ancestral sampling
    for case in report.values():
        assert set(case["ms_median"]) == {"hand", "pyro"} and case["ratio_median"]["hand"] == 1.0
        assert all(v > 0 for v in case["ms_median"].values())


def test_ddpm_steps_repeats_the_toy_over_seeds(tmp_path, threads):  # noqa: F811
    run = _ddpm_run(tmp_path, "eight_gaussians")
    argv = ["--toy-run", str(run), "--toy-samples", "30", "--toy-seeds", "2", "--ddim-steps", "5"]
    report = _load("ddpm_steps").main([*argv, "--threads", "1", "--out", str(tmp_path / "o")])
    toy = report["eight_gaussians"]
    assert toy["seeds"] == 2 and toy["samples"] == 60
    assert all(len(r["per_seed"]) == 2 for r in toy["rows"])
