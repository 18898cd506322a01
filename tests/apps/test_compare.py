"""``compare``: one row per registered method, floor rows, failed and skipped rows, outputs written."""

from __future__ import annotations

import argparse
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from probgen.apps.compare import BUDGETS, NetworkCalls, add_arguments, cli_main, compare
from probgen.data import toy_entropy
from probgen.models import available, base
from probgen.models.base import Method, register


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


class _Gaussian(Method):
    """A unit-variance Gaussian with a learned mean: the smallest trainable method."""

    fail_after: int | None = None  # raise in the model after this many training calls

    def __init__(self, data_dim: int = 2) -> None:
        super().__init__()
        self.config = {"data_dim": data_dim}
        self.data_dim = data_dim
        self.loc = nn.Parameter(torch.zeros(data_dim))
        self.calls = 0

    @classmethod
    def from_data(cls, dataset, **kwargs):
        return cls(data_dim=dataset.x.shape[-1], **kwargs)

    @property
    def event_dim(self) -> int:
        return self.data_dim

    def model(self, x=None, batch_size=None):
        if self.training and self.fail_after is not None:
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("boom in the middle of training")
        with pyro.plate("data", self._batch_size(x, batch_size)):
            return pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    def guide(self, x=None, batch_size=None):
        pass


@pytest.fixture
def registered():
    """Register throwaway methods under unique names; remove them afterwards."""
    names = []

    def add(name: str, cls: type) -> str:
        register(name)(cls)
        names.append(name)
        return name

    yield add
    for name in names:
        base._REGISTRY.pop(name, None)


def test_a_student_whose_teacher_is_not_compared_is_skipped():
    result = compare("eight_gaussians", methods=["distilled", "vae"], budget="quick", progress=False)
    rows = {row["method"]: row for row in result.rows}
    assert [row["method"] for row in result.rows] == ["distilled", "vae"]
    assert rows["distilled"]["status"] == "skipped" and "its teacher 'ddpm'" in rows["distilled"]["reason"]


def test_quick_run_writes_every_method_and_the_floor(tmp_path):
    result = compare("eight_gaussians", budget="quick", out_dir=tmp_path, progress=False)
    names = available()
    assert [row["method"] for row in result.rows] == names
    # Every method runs; the few-step students are trained from their teachers in this comparison.
    core = {"ddpm", "flow", "gan", "ncsn", "score-matching", "score-sde", "vae", "consistency", "distilled"}
    assert {row["method"] for row in result.rows if row["status"] == "ok"} >= core
    assert all(row["status"] in ("ok", "skipped") for row in result.rows), [
        r.get("reason") for r in result.rows
    ]
    assert all(row["reason"] for row in result.rows if row["status"] == "skipped")
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (tmp_path / name).is_file(), name
    assert _is_png(tmp_path / "compare.png")
    table = (tmp_path / "compare.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert len(body) == len(names) + 1 and body[0].startswith("| *floor: data*")
    assert f"{toy_entropy('eight_gaussians'):.3f}" in body[0]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [row["method"] for row in saved["rows"]] == names
    rows = {row["method"]: row for row in result.rows}
    assert rows["consistency"]["teacher"] == "score-sde" and rows["distilled"]["teacher"] == "ddpm"
    assert rows["distilled"]["nfe_per_sample"] == 4  # its 4 steps, one network call each
    # NFE per sample is exact for fixed-step samplers: the quick DDPM has T = 20 reverse steps,
    # each one call of its net on the whole batch; a VAE decodes once; a GAN generates once.
    assert rows["ddpm"]["nfe_per_sample"] == 20
    assert rows["vae"]["nfe_per_sample"] == 1 and rows["gan"]["nfe_per_sample"] == 1
    for row in (row for row in result.rows if row["status"] == "ok"):
        assert row["seconds"]["train"] > 0 and row["seconds"]["sampling"] >= 0
        assert 0 <= row["samples"]["sliced_wasserstein"] and "mode_coverage" in row["samples"]
    # NLL where an estimator is registered, with what kind of number it is; None with a reason elsewhere.
    assert "bound" in rows["vae"]["nll"]["kind"] and "exact" in rows["flow"]["nll"]["kind"]
    assert (
        rows["gan"]["nll"]["nats"] is None and "no log-likelihood estimator" in rows["gan"]["nll"]["reason"]
    )
    for name in ("ddpm", "flow", "vae", "score-sde"):
        assert math.isfinite(rows[name]["nll"]["nats"])


def test_failing_and_mismatched_methods_give_failed_rows(tmp_path, registered):
    class Broken(_Gaussian):
        fail_after = 3

    class ImagesOnly(_Gaussian):
        def check_data(self, x):
            raise ValueError(f"Expected images (B, C*H*W) with H = W = 8, but found {tuple(x.shape)}.")

    broken = registered("compare-test-broken", Broken)
    images = registered("compare-test-images-only", ImagesOnly)
    fine = registered("compare-test-gaussian", _Gaussian)
    result = compare(
        "moons", methods=[broken, images, fine], budget="quick", out_dir=tmp_path, progress=False
    )
    rows = {row["method"]: row for row in result.rows}
    assert rows[broken]["status"] == "failed" and rows[broken]["stage"] == "train"
    assert rows[broken]["reason"] == "RuntimeError: boom in the middle of training"
    assert rows[images]["status"] == "failed" and rows[images]["stage"] == "data"
    assert rows[images]["reason"].startswith("ValueError: Expected images")
    assert rows[fine]["status"] == "ok" and result.failed == [broken, images]
    table = (tmp_path / "compare.md").read_text()
    assert "**failed** (train): RuntimeError: boom" in table and "**failed** (data)" in table
    assert _is_png(tmp_path / "compare.png")
    assert [r["status"] for r in json.loads((tmp_path / "compare.json").read_text())["rows"]] == [
        "failed",
        "failed",
        "ok",
    ]


def test_methods_that_need_a_teacher_or_opt_out_are_skipped(tmp_path, registered):
    class NeedsTeacher(_Gaussian):
        @classmethod
        def from_data(cls, dataset, *, teacher, **kwargs):
            return cls(data_dim=dataset.x.shape[-1])

    class OptsOut(_Gaussian):
        compare = False
        compare_reason = "distills a trained DDPM"

    class NoFromData(_Gaussian):
        from_data = Method.from_data  # the base's: raises NotImplementedError

    class NotFromData(_Gaussian):
        @classmethod
        def from_data(cls, dataset, **kwargs):
            raise NotImplementedError("built with from_teacher")

    teacher = registered("compare-test-teacher", NeedsTeacher)
    opt_out = registered("compare-test-opt-out", OptsOut)
    none = registered("compare-test-no-from-data", NoFromData)
    raises = registered("compare-test-not-from-data", NotFromData)
    methods = [teacher, opt_out, none, raises]
    result = compare("moons", methods=methods, budget="quick", out_dir=tmp_path, progress=False)
    rows = {row["method"]: row for row in result.rows}
    assert [row["status"] for row in result.rows] == ["skipped"] * 4
    assert "teacher" in rows[teacher]["reason"] and "defines no from_data" in rows[none]["reason"]
    assert rows[raises]["reason"] == "from_data: built with from_teacher"
    assert rows[opt_out] == {**rows[opt_out], "status": "skipped", "reason": "distills a trained DDPM"}
    assert (tmp_path / "compare.md").is_file()  # nothing ran, the table is still written


def test_a_zero_budget_is_refused_and_a_per_method_zero_fails_that_row(registered):
    with pytest.raises(ValueError, match="Expected a positive budget"):
        compare("moons", budget="quick", steps=0, progress=False)
    with pytest.raises(ValueError, match="Expected a budget in"):
        compare("moons", budget="huge", progress=False)
    with pytest.raises(ValueError, match="Expected method names"):
        compare("moons", methods=["no-such-method"], budget="quick", progress=False)
    a = registered("compare-test-a", _Gaussian)
    b = registered("compare-test-b", _Gaussian)
    result = compare("moons", methods=[a, b], budget="quick", steps={a: 0}, progress=False)
    assert [r["status"] for r in result.rows] == ["failed", "ok"]
    assert result.rows[0]["stage"] == "budget" and "Expected a positive budget" in result.rows[0]["reason"]
    assert result.rows[1]["trained_steps"] == BUDGETS["quick"].fallback["vector"].steps


def test_network_calls_count_outermost_rows_per_sample():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))  # nested calls: not counted again

    holder = nn.Module()
    holder.net = Inner()
    with NetworkCalls(holder) as calls:
        for batch in (3, 5, 5):  # a sampler that splits 13 samples into chunks
            holder.net(torch.zeros(batch, 2))
    assert calls.calls == 3 and calls.rows == 13 and calls.per_sample(13) == 1.0
    holder.net(torch.zeros(4, 2))  # hooks are gone after the block
    assert calls.rows == 13


def test_cli_entry_prints_the_table(tmp_path, capsys, registered):
    name = registered("compare-test-cli", _Gaussian)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "moons", "--methods", name, "--quick", "--out", str(tmp_path)])
    args.no_progress = True
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| *floor: data*" in out and f"| {name} |" in out and "compare.json" in out


@pytest.mark.slow
def test_quick_run_on_digits_has_the_level_floors(tmp_path):
    result = compare("digits", methods=["vae"], budget="quick", out_dir=tmp_path, progress=False)
    floors = result.floors
    # Uniform over 17 levels is log2(17) bits/dim exactly; the per-pixel categorical is the
    # protocol's 2.42 bits/dim (DESIGN.md), which any model of the digits should beat.
    assert floors["uniform_bits_per_dim"] == pytest.approx(math.log2(17))
    assert floors["independent_pixels"]["nll_bits_per_dim"] == pytest.approx(2.42, abs=0.005)
    assert floors["data_vs_data"]["frechet_distance"] < floors["independent_pixels"]["frechet_distance"]
    row = result.rows[0]
    assert row["status"] == "ok" and row["nll"]["bits_per_dim"] > 0
    assert row["samples"]["frechet_distance"] >= 0
    table = (tmp_path / "compare.md").read_text()
    assert "*floor: independent pixels*" in table and "*floor: uniform*" in table
    assert _is_png(tmp_path / "compare.png")


def test_benchmark_script_runs_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("benchmark_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--quick", "--data", "moons", "--methods", "vae,flow", "--threads", "1", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        report = module.main(argv + ["--no-progress"])
    finally:
        torch.set_num_threads(threads)  # main sets the thread count of the whole process
    assert report["moons"]["failed"] == [] and _is_png(tmp_path / "moons" / "compare.png")
    combined = (tmp_path / "compare.md").read_text()
    assert combined.startswith("Made by `python benchmarks/compare.py --quick") and "| vae |" in combined


def test_save_image_panel_writes_one_grid_per_name(tmp_path):
    from probgen.plotting import save_image_panel

    images = {"a": torch.zeros(10, 64), "b": torch.full((3, 1, 8, 8), 16.0)}
    assert _is_png(save_image_panel(images, tmp_path / "panel.png", nrow=3, title="t"))
    with pytest.raises(ValueError, match="Expected a non-empty mapping"):
        save_image_panel({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="Expected value_range"):
        save_image_panel(images, tmp_path / "bad.png", value_range=(1.0, 1.0))
