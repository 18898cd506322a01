"""The score-matching and NCSN examples run end to end with a tiny budget and write their pictures."""

import math

import pytest

from tests.common import is_png, load_script


def test_score_matching_support_tiny(tmp_path):
    out = tmp_path / "support"
    argv = ["--steps", "5", "--grid", "6", "--num-samples", "20", "--langevin-steps", "3"]
    report = load_script("score_matching_support").main(argv + ["--out", str(out), "--no-progress"])
    for name in ("score_fields.png", "samples.png"):
        assert is_png(out / name), name
    assert (out / "report.json").is_file()
    methods = report["methods"]
    assert len(methods) == 5 and any(name.startswith("NCSN") for name in methods)
    for entry in methods.values():
        assert 0 <= entry["off_support_angle_deg"] <= 180
        assert 0 <= entry["samples_finite_fraction"] <= 1


def test_ncsn_toy2d_tiny(tmp_path):
    from probgen.models import load_method

    out = tmp_path / "toy"
    argv = ["--steps", "10", "--num-samples", "64", "--steps-per-level", "2", "--data", "eight_gaussians"]
    report = load_script("ncsn_toy2d").main(argv + ["--out", str(out), "--no-progress"])
    for name in ("samples.png", "annealing.png", "loss.png"):
        assert is_png(out / name), name
    assert all(v >= 0 for v in report["sliced_wasserstein"].values())
    method, _ = load_method(out, expected="ncsn")
    assert method.steps_per_level == 2


def test_ncsn_digits_tiny(tmp_path):
    out = tmp_path / "digits"
    argv = ["--steps", "4", "--fd-samples", "32", "--steps-per-level", "1", "--base-channels", "8"]
    report = load_script("ncsn_digits").main(argv + ["--out", str(out), "--no-progress"])
    for name in ("samples.png", "annealing.png", "loss.png"):
        assert is_png(out / name), name
    assert math.isfinite(report["frechet_distance"]) and report["frechet_distance_data_floor"] > 0
    with pytest.raises(SystemExit, match="already holds a run"):
        load_script("ncsn_digits").main(["--steps", "2", "--out", str(out), "--no-progress"])
