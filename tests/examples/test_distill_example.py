"""examples/distill_toy2d.py runs end to end with a tiny budget and writes its pictures and stages."""

import importlib.util
from pathlib import Path

from probgen.models import load_method

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_toy2d_tiny(tmp_path):
    out = tmp_path / "distill"
    argv = ["--teacher-steps", "20", "--steps-per-stage", "4", "--start-steps", "8", "--num-samples", "128"]
    argv += ["--ancestral-samples", "16", "--out", str(out), "--no-progress"]
    report = _load("distill_toy2d").main(argv)
    for name in ("samples.png", "quality.png"):
        assert _is_png(out / name), name
    assert (out / "report.json").is_file()
    assert report["stages"] == [4, 2, 1]
    assert all(r["sliced_wasserstein"] >= 0 for r in report["rows"])
    method, meta = load_method(out / "distill" / "stage-1")
    assert method.steps == 1 and meta["data"] == "eight_gaussians"
