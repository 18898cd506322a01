"""Every example runs end to end with a tiny budget and writes its pictures."""

import pytest

from tests.common import is_png, load_script


def test_vae_digits_tiny(tmp_path):
    out = tmp_path / "vae"
    report = load_script("vae_digits").main(
        ["--steps", "60", "--iwae-samples", "4", "--out", str(out), "--no-progress"]
    )
    for name in ("samples.png", "reconstructions.png", "loss.png"):
        assert is_png(out / name), name
    assert (out / "report.json").is_file()
    assert 0 < report["test_nll_bits_per_dim"] < 6
    with pytest.raises(SystemExit, match="already holds a run"):
        load_script("vae_digits").main(["--steps", "2", "--out", str(out), "--no-progress"])


def test_ddpm_toy2d_tiny(tmp_path):
    out = tmp_path / "ddpm"
    report = load_script("ddpm_toy2d").main(
        ["--steps", "20", "--num-samples", "64", "--ddim-steps", "5", "--out", str(out), "--no-progress"]
    )
    for name in ("samples.png", "trajectories.png", "loss.png"):
        assert is_png(out / name), name
    assert all(v >= 0 for v in report["sliced_wasserstein"].values())


def test_ddpm_digits_tiny(tmp_path):
    from probgen.checkpoint import load_checkpoint
    from probgen.models import load_method

    out = tmp_path / "ddpm_digits"
    argv = ["--steps", "10", "--T", "20", "--nll-examples", "4", "--fd-samples", "32", "--ddim-steps", "5"]
    report = load_script("ddpm_digits").main(argv + ["--out", str(out), "--no-progress"])
    for name in ("samples.png", "loss.png"):
        assert is_png(out / name), name
    assert (out / "report.json").is_file()
    assert report["test_nll_bits_per_dim"] > 0 and report["frechet_distance"] >= 0
    # The run loads as a method (what `probgen sample/evaluate` do): the best checkpoint holds the
    # EMA weights, and last holds them beside the raw ones.
    method, meta = load_method(out)
    assert meta["tag"] == "best" and method.T == 20
    tensors, _ = load_checkpoint(out, "last")
    assert any(k.startswith("ema.") for k in tensors)
    with pytest.raises(SystemExit, match="already holds a run"):
        load_script("ddpm_digits").main(["--steps", "2", "--out", str(out), "--no-progress"])
