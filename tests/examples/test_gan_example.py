"""examples/gan_modes.py runs end to end with a tiny budget and writes its pictures and runs."""

import importlib.util
from pathlib import Path

import pytest

from probgen.models import load_method

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gan_modes.py"


def _main(argv):
    spec = importlib.util.spec_from_file_location("gan_modes", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_gan_modes_tiny(tmp_path):
    out = tmp_path / "gan"
    report = _main(["--steps", "6", "--num-samples", "200", "--out", str(out), "--no-progress"])
    for name in ("samples.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "report.json").is_file()
    assert set(report) == {"eight_gaussians", "grid25"}
    for name, expected_modes in (("eight_gaussians", 8), ("grid25", 25)):
        r = report[name]
        assert r["num_modes"] == expected_modes and 0 <= r["modes_captured"] <= expected_modes
        assert 0 <= r["high_quality_fraction"] <= 1 and r["test_data"]["modes_captured"] == expected_modes
        # Each toy's run directory loads as the method `probgen sample` / `evaluate` would use.
        gan, meta = load_method(out / name, expected="gan")
        assert meta["data"] == name and gan.sample(3).shape == (3, 2)
    with pytest.raises(SystemExit, match="already holds a run"):
        _main(["--steps", "2", "--out", str(out), "--no-progress"])
