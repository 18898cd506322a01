"""benchmarks/consistency_seeds.py repeats every sampler over seeds and compares it with the teacher."""

from __future__ import annotations

import json

import pytest

from tests.common import load_script as _example

from .test_score_benchmarks import _load, threads  # noqa: F401  (the fixture)


def test_consistency_seeds_reports_means_errors_and_paired_ratios(tmp_path, threads):  # noqa: F811
    runs = tmp_path / "runs"
    argv = ["--teacher-steps", "5", "--steps", "4", "--ct-steps", "4", "--sample-steps", "5"]
    _example("consistency_toy2d").main([*argv, "--num-samples", "32", "--out", str(runs), "--no-progress"])
    out = tmp_path / "o"
    argv = ["--runs", str(runs), "--seeds", "3", "--samples", "40", "--teacher-steps", "5", "--threads", "1"]
    report = _load("consistency_seeds").main([*argv, "--out", str(out)])
    rows = report["rows"]
    assert list(rows)[0] == "teacher EM-5" and len(rows) == 7  # the teacher, CD and CT at 1, 2, 4 steps
    teacher = rows["teacher EM-5"]
    for r in rows.values():
        assert len(r["per_seed"]) == 3 and r["stderr"] >= 0 and 0 <= r["modes_min"] <= 8
        assert r["mean"] == pytest.approx(sum(r["per_seed"]) / 3)
        assert r["ratio_of_means"] == pytest.approx(r["mean"] / teacher["mean"])
    assert teacher["per_seed_ratio"] == pytest.approx(1.0) and teacher["per_seed_ratio_stderr"] == 0
    assert json.loads((out / "consistency_seeds.json").read_text())["seeds"] == 3


def test_distill_seeds_pairs_teacher_and_student_on_shared_noise(tmp_path, threads):  # noqa: F811
    from tests.common import load_script as _distill_example

    out = tmp_path / "distill"
    argv = ["--teacher-steps", "20", "--steps-per-stage", "4", "--start-steps", "8", "--num-samples", "64"]
    _distill_example("distill_toy2d").main(
        [*argv, "--ancestral-samples", "16", "--out", str(out), "--no-progress"]
    )
    argv = [
        "--teacher",
        str(out / "teacher"),
        "--run",
        str(out / "distill"),
        "--steps",
        "2",
        "--samples",
        "40",
    ]
    report = _load("distill_seeds").main(
        [*argv, "--seeds", "3", "--threads", "1", "--out", str(tmp_path / "o")]
    )
    assert (
        report["teacher_steps"] == 8 and report["student_steps"] == 2 and report["data"] == "eight_gaussians"
    )
    teacher, student = report["per_seed"]["teacher"], report["per_seed"]["student"]
    assert len(teacher) == len(student) == 3
    assert report["ratio_of_means"] == pytest.approx(sum(student) / sum(teacher))
    per_seed = [s / t for t, s in zip(teacher, student)]
    assert report["per_seed_ratio"][0] == pytest.approx(sum(per_seed) / 3)
