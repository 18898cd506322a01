"""examples/distill_toy2d.py runs end to end with a tiny budget and writes its pictures and stages."""

from probgen.models import load_method
from tests.common import is_png, load_script


def test_distill_toy2d_tiny(tmp_path):
    out = tmp_path / "distill"
    argv = ["--teacher-steps", "20", "--steps-per-stage", "4", "--start-steps", "8", "--num-samples", "128"]
    argv += ["--ancestral-samples", "16", "--out", str(out), "--no-progress"]
    report = load_script("distill_toy2d").main(argv)
    for name in ("samples.png", "quality.png"):
        assert is_png(out / name), name
    assert (out / "report.json").is_file()
    assert report["stages"] == [4, 2, 1]
    assert all(r["sliced_wasserstein"] >= 0 for r in report["rows"])
    method, meta = load_method(out / "distill" / "stage-1")
    assert method.steps == 1 and meta["data"] == "eight_gaussians"
