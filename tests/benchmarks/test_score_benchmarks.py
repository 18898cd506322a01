"""The score benchmarks run end to end on tiny budgets (their figures are quoted in the README)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from probgen.cli import main as cli

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their neighbour timing.py
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_score_sde_nfe_counts_evaluations_and_writes_its_table(tmp_path, threads):
    run = tmp_path / "sde"
    argv = ["train", "score-sde", "--data", "moons", "--out", str(run), "--steps", "10", "--val-every", "10"]
    assert cli([*argv, "--no-progress", "--device", "cpu"]) == 0
    module = _load("score_sde_nfe")
    out = tmp_path / "o"
    results = module.main(["--runs", str(run), "--samples", "40", "--threads", "1", "--out", str(out)])
    rows = results[str(run)]["rows"]
    by_name = {(r["curve"], r["steps"]): r for r in rows}
    assert by_name[("EM", 10)]["nfe"] == 11  # 10 Euler-Maruyama steps and the denoising step
    assert by_name[("ODE, RK4", 5)]["nfe"] == 21  # 4 evaluations a step and the denoising step
    assert by_name[("PC (1 corrector)", 50)]["nfe"] == 101
    assert by_name[("PC (1 corrector)", 10)]["error"]  # VP's reverse-diffusion step needs N > beta_max
    assert (tmp_path / "o" / "score_sde_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "o" / "score_sde_nfe.json").read_text())[str(run)]["sde"] == "vp"


def test_score_overhead_times_every_case(threads, capsys):
    module = _load("score_overhead")
    argv = ["--rounds", "1", "--steps", "1", "--sample-rounds", "1", "--sample-steps", "2", "--threads", "1"]
    argv += ["--sample-batch", "4"]
    report = module.main(argv)
    assert len(report) == 6
    for case in report.values():
        assert case["ratio_median"]["hand"] == 1.0 and all(v > 0 for v in case["ms_median"].values())


def test_distill_digits_fd_distils_and_compares_with_its_teacher(tmp_path, threads):
    run = tmp_path / "ddpm"
    argv = ["train", "ddpm", "--data", "digits", "--out", str(run), "--steps", "2", "--val-every", "2"]
    assert cli([*argv, "--no-progress", "--device", "cpu"]) == 0
    module = _load("distill_digits_fd")
    out = tmp_path / "pd"
    argv = ["--teacher", str(run), "--out", str(out), "--steps-per-stage", "1", "--samples", "16"]
    report = module.main([*argv, "--batch-size", "8"])
    assert report["stages"] == [128, 64, 32, 16, 8, 4]
    rows = report["frechet_distance"]
    assert set(rows) == {"floor: train vs test", "teacher DDIM 256", "distilled 128", "distilled 4"}
    assert report["ratio_4_over_teacher"] == rows["distilled 4"] / rows["teacher DDIM 256"]
    assert json.loads((out / "fd.json").read_text())["samples"] == 16
