"""The score-SDE examples run end to end with a tiny budget and write their pictures."""

import math

import pytest

from tests.common import is_png, load_script


def test_score_sde_toy2d_tiny(tmp_path):
    from probgen.models import load_method

    out = tmp_path / "toy"
    argv = [
        "--steps",
        "6",
        "--num-samples",
        "64",
        "--nll-points",
        "16",
        "--sample-steps",
        "10",
        "--sdes",
        "vp,ve",
    ]
    report = load_script("score_sde_toy2d").main(argv + ["--out", str(out), "--no-progress"])
    for name in ("sdes.png", "loss.png"):
        assert is_png(out / name), name
    assert set(report["sdes"]) == {"vp", "ve"} and math.isclose(report["entropy"], 2.8316, abs_tol=1e-3)
    for entry in report["sdes"].values():
        assert all(v >= 0 for v in entry["sliced_wasserstein"].values())
        assert math.isfinite(entry["ode_nll_nats"]) and entry["ode_nll_points"] == 16
    method, _ = load_method(out / "ve", expected="score-sde")
    assert method.config["sde"] == "ve"
    with pytest.raises(SystemExit, match="already holds a run"):
        load_script("score_sde_toy2d").main(
            ["--steps", "2", "--sdes", "vp", "--out", str(out), "--no-progress"]
        )


def test_score_sde_digits_tiny(tmp_path):
    out = tmp_path / "digits"
    argv = ["--steps", "4", "--grid", "8", "--sample-steps", "5", "--fd-samples", "0", "--nll-examples", "3"]
    argv += ["--inpaint-examples", "2", "--completions", "1", "--particles", "2", "--inpaint-steps", "5"]
    report = load_script("score_sde_digits").main(
        argv + ["--base-channels", "8", "--out", str(out), "--no-progress"]
    )
    for name in ("samples.png", "inpainting.png", "loss.png"):
        assert is_png(out / name), name
    assert report["nll_examples"] == 3 and math.isfinite(report["test_bits_per_dim"])
    assert report["frechet_distance"] is None
    assert all(math.isfinite(v) for v in report["inpainting"]["rmse_levels_unknown_half"].values())
