"""Progressive distillation (arXiv:2202.00512): the target, the grids, the stages, bad input.

The oracle is isotropic Gaussian data N(m, s^2 I): the DDPM's exact noise prediction is known in
closed form, every DDIM step is then an affine map z -> a z + b per coordinate, and the exact
student of a two-step teacher is computed here from the composed affine map, independently of
the library's target formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from torch import nn

from probgen.checkpoint import CheckpointError, has_checkpoint, read_json, save_checkpoint
from probgen.elbo import AnalyticKL_ELBO
from probgen.inference.distill import (
    grid_ddim_sample,
    halving_schedule,
    load_teacher,
    progressive_distill,
)
from probgen.inference.sampling import draw_samples
from probgen.models import DDPM, VAE, load_method
from probgen.models.distilled import Distilled, distillation_target, step_grid
from tests.common import assert_close

MEAN, STD, T = 0.7, 0.5, 100


def _abar(t: torch.Tensor, schedule) -> torch.Tensor:
    abar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alpha_bars])
    return abar[t.long()]


class ExactEps(nn.Module):
    """The exact noise prediction of a DDPM for N(MEAN, STD^2 I) data (input: step t - 1)."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        abar = _abar(torch.as_tensor(s).round() + 1, self.schedule).to(z.dtype).reshape(-1, 1)
        a, sig = abar.sqrt(), (1 - abar).sqrt()
        x0 = MEAN + a * STD**2 / (abar * STD**2 + sig**2) * (z - a * MEAN)
        return (z - a * x0) / sig


def _affine_ddim(t: int, s: int, schedule) -> tuple[float, float]:
    """DDIM's step t -> s with the exact denoiser, as z_s = a z_t + b (per coordinate)."""
    ab_t, ab_s = (float(_abar(torch.tensor(v), schedule)) for v in (t, s))
    at, st, as_, ss = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_s), math.sqrt(1 - ab_s)
    c = at * STD**2 / (ab_t * STD**2 + st**2)  # x0_hat = MEAN + c (z - at MEAN)
    # z_s = as x0 + ss (z - at x0) / st = (as - ss at / st) x0 + (ss / st) z
    k = as_ - ss * at / st
    return k * c + ss / st, k * (MEAN - c * at * MEAN)


class ExactStudentV(nn.Module):
    """The v-prediction whose single DDIM step equals two exact teacher steps on the 2K grid."""

    def __init__(self, schedule, steps: int) -> None:
        super().__init__()
        self.schedule, self.fine = schedule, step_grid(T, 2 * steps)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for row, t in enumerate((torch.as_tensor(s).round() + 1).long().reshape(-1).tolist()):
            j = self.fine.index(t)
            a1, b1 = _affine_ddim(t, self.fine[j - 1], self.schedule)
            a2, b2 = _affine_ddim(self.fine[j - 1], self.fine[j - 2], self.schedule)
            A, b = a2 * a1, a2 * b1 + b2
            ab_t, ab_e = (float(_abar(torch.tensor(v), self.schedule)) for v in (t, self.fine[j - 2]))
            at, st, ae, se = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_e), math.sqrt(1 - ab_e)
            # Solve ae x + se (z - at x) / st = A z + b for x, then v = (at z - x) / st.
            x = ((A - se / st) * z[row] + b) / (ae - se * at / st)
            out[row] = (at * z[row] - x) / st
        return out


class ZeroV(nn.Module):
    """A student predicting v = 0."""

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


def _gaussian_pair(steps: int) -> tuple[DDPM, Distilled]:
    torch.set_default_dtype(torch.float64)
    try:
        teacher = DDPM(data_dim=2, T=T, hidden=[8])
        teacher.net = ExactEps(teacher.schedule)
        student = Distilled(teacher.config, steps)
        student.ddpm.net = ExactStudentV(teacher.schedule, steps)
    finally:
        torch.set_default_dtype(torch.float32)
    return teacher.double(), student.double()


def test_target_identity():
    """One DDIM step with x_hat = target lands on the teacher's z_t'' (algebraic identity, to 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    z_end = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    abar = torch.rand(64, 2, generator=gen, dtype=torch.float64).sort(dim=1).values  # abar_t < abar_t''
    alpha, sigma = abar[:, :1].sqrt(), (1 - abar[:, :1]).sqrt()
    alpha_e, sigma_e = abar[:, 1:].sqrt(), (1 - abar[:, 1:]).sqrt()
    x = distillation_target(z_t, z_end, alpha, sigma, alpha_e, sigma_e)
    one_step = alpha_e * x + sigma_e * (z_t - alpha * x) / sigma
    assert_close(one_step, z_end, atol=1e-5, rtol=0)
    # At t'' = 0 (alpha = 1, sigma = 0) the target is the teacher's sample itself.
    assert_close(distillation_target(z_t, z_end, alpha, sigma, 1.0, 0.0), z_end, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_student_matches_two_teacher_steps(steps):
    """With the exact Gaussian teacher, the exact student's K steps equal the teacher's 2K steps."""
    teacher, student = _gaussian_pair(steps)
    z_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_teacher = grid_ddim_sample(teacher, 32, steps=2 * steps, x_T=z_T)
    x_student = grid_ddim_sample(student, 32, x_T=z_T)
    assert_close(x_student, x_teacher, atol=1e-5, rtol=0)


def test_distillation_program_targets_the_exact_student():
    """The observed target of the Pyro program is the exact student's x_hat, and the loss is
    w_t (|x~ - x_hat|^2 / 2 + D/2 log 2 pi) summed over the batch: least for the exact student."""
    teacher, student = _gaussian_pair(4)
    student.attach_teacher(teacher)
    x = MEAN + STD * torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(3)
    guide = poutine.trace(student.guide).get_trace(x)
    trace = poutine.trace(poutine.replay(student.model, trace=guide)).get_trace(x)
    site = trace.nodes["x_target"]
    assert_close(site["value"], site["fn"].base_dist.loc, atol=1e-5, rtol=0)
    t = step_grid(T, 8)
    times = torch.tensor(t)[2 * guide.nodes["t"]["value"]]
    assert_close(site["scale"], student.loss_weight(times), atol=1e-12)
    abar = _abar(times, teacher.schedule)
    assert_close(site["scale"], (abar / (1 - abar)).clamp(min=1), atol=1e-12)
    loss = AnalyticKL_ELBO().loss(student.model, poutine.replay(student.guide, trace=guide), x)
    assert_close(loss, float(site["scale"].sum()) * math.log(2 * math.pi), rtol=1e-9)
    # Any other student pays more.
    student.ddpm.net = ZeroV()  # x_hat = alpha_t z_t: a wrong student
    worse = AnalyticKL_ELBO().loss(student.model, poutine.replay(student.guide, trace=guide), x)
    assert worse > loss + 1.0


def test_step_grids_nest_and_halve():
    for T_, k in ((1000, 256), (1000, 500), (1000, 3), (37, 4)):
        fine, coarse = step_grid(T_, 2 * k), step_grid(T_, k)
        assert fine[::2] == coarse and coarse[0] == 0 and coarse[-1] == T_
        assert all(b > a for a, b in zip(fine, fine[1:]))
    assert halving_schedule(256, 4) == [128, 64, 32, 16, 8, 4]
    assert halving_schedule(12, 3) == [6, 3]
    assert halving_schedule(2, 1) == [1]
    with pytest.raises(ValueError, match="power of two"):
        halving_schedule(96, 5)
    with pytest.raises(ValueError, match="power of two"):
        halving_schedule(24, 4)  # 24 / 4 = 6: halving cannot reach 4
    with pytest.raises(ValueError, match="to_steps >= 1"):
        halving_schedule(8, 0)
    with pytest.raises(ValueError, match=r"steps in \[1, 1000\]"):
        step_grid(1000, 1024)


def _tiny_teacher() -> DDPM:
    torch.manual_seed(0)
    return DDPM(data_dim=2, T=32, hidden=[16])


def test_stages_checkpointed_loaded_and_resumed(tmp_path):
    teacher = _tiny_teacher()
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    meta = {"data": "eight_gaussians", "form": "int", "event_shape": [2], "num_levels": None}
    result = progressive_distill(
        teacher,
        data,
        start_steps=8,
        to_steps=2,
        steps_per_stage=3,
        batch_size=32,
        out=tmp_path,
        metadata=meta,
    )
    assert result.students == [4, 2]
    for k in (4, 2):
        assert has_checkpoint(tmp_path / f"stage-{k}", "last")
        method, info = load_method(tmp_path / f"stage-{k}", "last")
        assert isinstance(method, Distilled) and method.steps == k and info["step"] == 3
        assert info["teacher_steps"] == 2 * k and info["data"] == "eight_gaussians"
    assert [s["steps"] for s in read_json(tmp_path / "distill.json")["stages"]] == [4, 2]
    x = draw_samples(method, 5, sampler="ddim", steps=2, seed=0)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    assert torch.equal(x, draw_samples(method, 5, seed=0))  # "ancestral" is the same K-step sampler
    # A finished run is loaded, not trained again.
    again = progressive_distill(
        teacher, data, start_steps=8, to_steps=2, steps_per_stage=3, batch_size=32, out=tmp_path
    )
    for k in (4, 2):
        for a, b in zip(again.methods[k].parameters(), result.methods[k].parameters()):
            assert torch.equal(a, b)


def test_bad_input(tmp_path):
    teacher = _tiny_teacher()
    data = torch.randn(64, 2)
    with pytest.raises(ValueError, match="to_steps >= 1"):
        progressive_distill(teacher, data, start_steps=8, to_steps=0)
    with pytest.raises(ValueError, match="power of two"):
        progressive_distill(teacher, data, start_steps=8, to_steps=3)
    with pytest.raises(ValueError, match=r"steps in \[1, 32\]"):
        progressive_distill(teacher, data, start_steps=64, to_steps=4)
    with pytest.raises(
        ValueError, match=r"Expected data of shape \(N, 2\), the teacher's, but found \(64, 64\)"
    ):
        progressive_distill(teacher, torch.zeros(64, 64), start_steps=8, to_steps=4)
    vae = VAE(data_dim=4, hidden=[8], latent_dim=2)
    with pytest.raises(ValueError, match="Expected a teacher of method 'ddpm' or 'distilled'.*'vae'"):
        progressive_distill(vae, data, to_steps=4)
    save_checkpoint(
        tmp_path / "vae",
        "last",
        {f"model.{k}": v for k, v in vae.state_dict().items()},
        {"method": "vae", "config": vae.config},
    )
    with pytest.raises(CheckpointError, match="Expected a teacher run of method 'ddpm' or 'distilled'"):
        load_teacher(tmp_path / "vae")
    student = Distilled.from_teacher(teacher, 4)
    with pytest.raises(ValueError, match="2 \\* 4 = 8 steps for a 4-step student, but found 4"):
        Distilled.from_teacher(student, 4)
    with pytest.raises(ValueError, match="Expected a teacher attached"):
        student.model(data[:4])
    with pytest.raises(ValueError, match="Expected steps = 4"):
        grid_ddim_sample(student, 3, steps=2)


def test_cli_handler_distils_a_teacher_run(tmp_path, capsys):
    import argparse

    from probgen.apps.cli import _cmd_distill as cli_distill

    teacher = _tiny_teacher()
    meta = {"method": "ddpm", "config": teacher.config, "data": "eight_gaussians", "form": "int",
            "event_shape": [2], "num_levels": None}  # fmt: skip
    save_checkpoint(
        tmp_path / "teacher", "last", {f"model.{k}": v for k, v in teacher.state_dict().items()}, meta
    )
    args = argparse.Namespace(
        teacher_run=tmp_path / "teacher", tag=None, data=None, start_steps=4, to_steps=1, steps_per_stage=2,
        batch_size=16, lr=1e-3, parameterization="v", ema_decay=None, seed=0, out=tmp_path / "d",
        no_progress=True, device=None,
    )  # fmt: skip
    assert cli_distill(args) == 0
    method, info = load_method(tmp_path / "d" / "stage-1")
    assert method.steps == 1 and info["data"] == "eight_gaussians" and info["teacher_run"].endswith("teacher")
    assert "stage-1" in capsys.readouterr().out


def test_cli_steps_per_stage_takes_one_budget_or_one_per_stage():
    from probgen.cli import UsageError, build_parser

    def parse(value: str):
        return build_parser().parse_args(["distill", "run", "--out", "d", "--steps-per-stage", value])

    assert parse("7").steps_per_stage == 7
    assert parse("1000,250,250").steps_per_stage == [1000, 250, 250]
    with pytest.raises(UsageError, match="steps-per-stage"):
        parse("10,0")
