"""examples/langevin_bayes.py runs end to end with a tiny budget and writes its pictures and report."""

import importlib.util
import json
from pathlib import Path

from tests.common import is_png

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langevin_bayes.py"


def test_langevin_bayes_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("langevin_bayes", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "langevin_bayes"
    argv = ["--samples", "20", "--warmup", "10", "--nuts-samples", "20", "--nuts-warmup", "10"]
    argv += ["--features", "3"]
    report = module.main(argv + ["--out", str(out), "--no-progress"])
    for name in ("posterior.png", "traces.png"):
        assert is_png(out / name), name
    assert json.loads((out / "report.json").read_text())["samplers"].keys() == {"SGLD", "MALA", "HMC", "NUTS"}
    for entry in report["samplers"].values():
        assert entry["draws"] == 20 and len(entry["posterior_mean"]) == 4
        assert entry["seconds_per_effective_sample"] > 0 and 0 <= entry["held_out_accuracy"] <= 1
