"""The consistency-model example runs end to end with a tiny budget and writes its pictures."""

import math

import pytest

from tests.common import is_png, load_script


def test_consistency_toy2d_tiny(tmp_path):
    from probgen.models import load_method

    out = tmp_path / "toy"
    argv = ["--teacher-steps", "5", "--steps", "4", "--ct-steps", "4", "--sample-steps", "5"]
    argv += ["--num-samples", "64", "--out", str(out), "--no-progress"]
    report = load_script("consistency_toy2d").main(argv)
    for name in ("samples.png", "loss.png"):
        assert is_png(out / name), name
    for kind in ("cd", "ct"):
        for k in (1, 2, 4):
            entry = report[kind][f"{k}_step"]
            assert math.isfinite(entry["sliced_wasserstein"]) and 0 <= entry["modes_captured"] <= 8
    assert set(report["targets"]) == {"cd_1_step_within_1.5x", "cd_2_step_within_1.25x"}
    method, meta = load_method(out / "cd", expected="consistency")
    assert method.config["teacher"] == str(out / "teacher") and meta["objective"]["mode"] == "distillation"
    with pytest.raises(SystemExit, match="already holds a run"):
        load_script("consistency_toy2d").main(["--steps", "2", "--out", str(out), "--no-progress"])
