"""The flow example runs end to end with a tiny budget, writes its pictures and loadable runs."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tests.common import is_png

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flow_toy2d.py"


def _load():
    spec = importlib.util.spec_from_file_location("flow_toy2d", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flow_toy2d_tiny(tmp_path):
    from probgen.data import load_dataset
    from probgen.models import load_method

    out = tmp_path / "flow"
    argv = [
        "--data",
        "checkerboard",
        "--steps",
        "6",
        "--batch-size",
        "64",
        "--num-samples",
        "64",
        "--grid",
        "20",
    ]
    argv += ["--digits", "--digits-steps", "3", "--digits-copies", "2", "--out", str(out), "--no-progress"]
    report = _load().main(argv)
    for name in ("density.png", "samples.png", "digits_samples.png"):
        assert is_png(out / name), name
    assert (out / "report.json").is_file()
    toy = report["toys"]["checkerboard"]
    assert toy["entropy_nats"] == pytest.approx(math.log(32))
    assert toy["gap_nats"] == pytest.approx(toy["test_nll_nats"] - toy["entropy_nats"])
    assert 0 < report["digits"]["test_nll_bits_per_dim"] < 10
    # Each run directory rebuilds the trained flow, with the test NLL the report quotes.
    flow, meta = load_method(out / "checkerboard")
    assert meta["method"] == "flow" and meta["form"] == "int"
    with torch.no_grad():
        nll = float(-flow.log_prob(load_dataset("checkerboard", "test").x).mean())
    assert nll == pytest.approx(toy["test_nll_nats"], rel=1e-5)
    _, meta = load_method(out / "digits")
    assert meta["form"] == "dequantized" and meta["num_levels"] == 17
    with pytest.raises(SystemExit, match="already holds a run"):
        _load().main(["--steps", "2", "--out", str(out), "--no-progress"])
