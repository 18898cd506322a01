"""Consistency models: the parameterization, the objectives on a Gaussian oracle, the sampling program."""

import math

import pytest
import torch
from pyro.infer import Predictive

from probgen.data import Dataset
from probgen.inference.consistency import (
    consistency_distillation_loss,
    consistency_training_loss,
    discretization_times,
    pf_ode_step,
    sample_consistency,
)
from probgen.inference.sampling import draw_samples
from probgen.models.consistency import Consistency, check_teacher, ct_schedule, karras_sigmas, time_of_sigma
from probgen.models.score_sde import ScoreSDE
from tests.common import assert_close

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = 0.5  # data N(MU, S^2 I)
SIGMA_MAX = 20.0


def _cm(**kw) -> Consistency:
    torch.manual_seed(0)
    opts = dict(sde="ve", sigma_min=0.01, sigma_max=SIGMA_MAX, sigma_data=S, hidden=(16, 16), embed_dim=8)
    return Consistency(2, **(opts | kw))


def _exact_f(cm: Consistency, slope: float = 1.0):
    r"""The PF-ODE's consistency function of N(MU, S^2) data under VE: affine in x_t (mu + k (x_t - mu))."""

    def f(x, t):
        _, s_t = cm.sde_object.marginal_params(t)
        k = math.sqrt(S**2 + cm.sigma_eps**2) / (S**2 + s_t.pow(2)).sqrt()
        return MU.to(x) + slope * k[:, None] * (x - MU.to(x))

    return f


def _exact_score(cm: Consistency):
    def score(x, t):
        _, s_t = cm.sde_object.marginal_params(t)
        return -(x - MU.to(x)) / (S**2 + s_t.pow(2))[:, None]

    return score


class _ExactCM(Consistency):
    def consistency_function(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return _exact_f(self)(x, t)


def test_boundary_condition_is_exact():
    for sde in ("ve", "vp", "subvp"):
        cm = _cm(sde=sde)
        torch.nn.init.normal_(cm.net.out.weight)  # a net far from zero: the skip alone cannot explain it
        x = torch.randn(64, 2) * 3
        assert torch.equal(cm.consistency_function(x, torch.full((64,), cm.eps)), x)
        # Away from eps the network matters.
        assert not torch.allclose(cm.consistency_function(x, torch.full((64,), 0.5)), x)


def test_schedules():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s[0] == 0.002 and s[-1] == 80.0 and bool((s[1:] > s[:-1]).all())
    assert ct_schedule(0, 100, 2, 150, 0.9) == (2, 0.9)
    assert ct_schedule(100, 100, 2, 150, 0.9)[0] == 151
    cm = _cm(sde="vp")
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    assert_close(time_of_sigma(cm.sde_object, cm.sigma(t)), t, atol=1e-10, rtol=0)
    times = discretization_times(cm.sde_object, 10, cm.eps)
    assert times[0] == cm.eps and times[-1] == cm.sde_object.T and bool((times[1:] > times[:-1]).all())


def test_pf_ode_step_follows_the_exact_gaussian_flow():
    cm = _cm()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, dtype=torch.float64, generator=g) * 3
    t_from = torch.rand(256, dtype=torch.float64, generator=g) * 0.5 + 0.3

    def error(method: str, h: float) -> float:
        t_to = t_from - h
        y = pf_ode_step(cm.sde_object, _exact_score(cm), x, t_from, t_to, method=method)
        # The exact map: mu + sqrt(S^2 + s_b^2) / sqrt(S^2 + s_a^2) (x - mu).
        (_, sa), (_, sb) = cm.sde_object.marginal_params(t_from), cm.sde_object.marginal_params(t_to)
        exact = MU + ((S**2 + sb**2) / (S**2 + sa**2)).sqrt()[:, None] * (x - MU)
        return float((y - exact).abs().max())

    # One step of a method of order p has local error O(h^(p+1)): halving h divides it by ~2^(p+1).
    for method, order in (("euler", 1), ("heun2", 2), ("rk4", 4)):
        ratio = error(method, 0.04) / error(method, 0.02)
        assert 0.7 * 2 ** (order + 1) < ratio < 1.4 * 2 ** (order + 1), (method, ratio)
    assert error("rk4", 0.02) < 1e-4


def test_cd_loss_vanishes_for_the_exact_consistency_function():
    cm = _cm()
    f, score = _exact_f(cm), _exact_score(cm)
    x0 = MU + S * torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    times = discretization_times(cm.sde_object, 200, cm.eps)
    losses = {}
    for slope in (1.0, 1.05):
        g = torch.Generator().manual_seed(1)  # common random numbers
        losses[slope] = float(
            consistency_distillation_loss(
                _exact_f(cm, slope), f, cm.sde_object, score, x0, times, generator=g
            )
        )
    # Exact f: only the Heun step's error remains (O(h^3) per step on a 200-point grid); a 5 % error in
    # the slope gives a loss of order (0.05 * |x_t - mu|)^2 ~ 1e-3 .. 1e-1, far above it.
    assert losses[1.0] < 1e-6, losses
    assert losses[1.05] > 1e3 * losses[1.0] and losses[1.05] > 1e-4, losses


def test_ct_loss_is_the_same_distance_on_shared_noise():
    cm = _cm()
    f = _exact_f(cm)
    x0 = MU + S * torch.randn(2048, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    times = discretization_times(cm.sde_object, 400, cm.eps)
    g = torch.Generator().manual_seed(3)
    ct = float(consistency_training_loss(f, f, cm.sde_object, x0, times, generator=g))
    ct_bad = float(
        consistency_training_loss(_exact_f(cm, 1.05), f, cm.sde_object, x0, times, generator=g.manual_seed(3))
    )
    # CT replaces the teacher's step by the same noise z: for the exact f the distance is
    # k(t_{n+1}) - k(t_n) times |x0 - mu + ...| squared, O(h^2) on a fine grid, and well below a biased f.
    assert 0 <= ct < 0.1 * ct_bad


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_with_the_exact_function_reproduces_the_moments(steps):
    cm = _ExactCM(2, sde="ve", sigma_min=0.01, sigma_max=SIGMA_MAX, sigma_data=S, hidden=(4,), embed_dim=4)
    cm.double()
    n = 40000
    x = sample_consistency(cm, n, steps=steps, generator=torch.Generator().manual_seed(0))
    # The analytic law: x_T ~ N(0, sigma_max^2) (the prior, not the exact p_T) pushed through the affine
    # f; each later step re-noises N(x, tau^2 - sigma_eps^2) and applies f again.
    mean, var = torch.zeros(2, dtype=torch.float64), SIGMA_MAX**2
    se = math.sqrt(S**2 + cm.sigma_eps**2)
    for k, tau in enumerate(cm.sample_sigmas(steps)):
        if k:
            var = var + tau**2 - cm.sigma_eps**2
        kk = se / math.sqrt(S**2 + tau**2)
        mean, var = MU + kk * (mean - MU), kk**2 * var
    # MC std error of the mean sqrt(var / n) ~ 2.5e-3, of the variance var * sqrt(2 / n) ~ 1.8e-3; z = 4.
    assert_close(x.mean(0), mean, atol=4 * math.sqrt(var / n), rtol=0)
    assert_close(
        x.var(0), torch.full((2,), var, dtype=torch.float64), atol=4 * var * math.sqrt(2 / n), rtol=0
    )


def test_predictive_sites_and_shapes():
    cm = _cm()
    samples = Predictive(cm.model, num_samples=2)(None, batch_size=5, steps=3)
    assert set(samples) == {"x_T", "x_hat_0", "x_1", "x_hat_1", "x_2", "x"}
    assert all(v.shape == (2, 5, 2) for v in samples.values())
    one = Predictive(cm.model, num_samples=1)(None, batch_size=4, steps=1)
    assert set(one) == {"x_T", "x"}
    assert cm.sample(7, steps=2).shape == (7, 2)
    # The registered sampler is seeded: the same seed gives the same draws.
    a = draw_samples(cm, 6, sampler="consistency", steps=2, seed=3)
    assert torch.equal(a, draw_samples(cm, 6, sampler="consistency", steps=2, seed=3))


def test_bad_input():
    cm = _cm()
    with pytest.raises(ValueError, match="Expected steps >= 1"):
        cm.sample(4, steps=0)
    with pytest.raises(ValueError, match="Expected steps >= 1"):
        draw_samples(cm, 4, sampler="consistency", steps=0)
    with pytest.raises(ValueError, match="Expected decreasing noise levels"):
        cm.sample(4, sigmas=[cm.sigma_max_ode, 1.0, 2.0])
    with pytest.raises(NotImplementedError, match="distance between two networks"):
        cm.model(torch.zeros(3, 2))
    with pytest.raises(NotImplementedError, match="no ELBO"):
        cm.elbo()
    with pytest.raises(ValueError, match="same SDE"):
        check_teacher(ScoreSDE(2, sde="vp"), cm.config)
    with pytest.raises(ValueError, match="same SDE"):
        check_teacher(ScoreSDE(2, sde="ve", sigma_max=SIGMA_MAX / 2), cm.config)
    with pytest.raises(ValueError, match="data shape"):
        check_teacher(ScoreSDE(3, sde="ve", sigma_max=SIGMA_MAX), cm.config)
    with pytest.raises(ValueError, match="method 'score-sde'"):
        check_teacher(cm, cm.config)


def test_from_data_takes_and_checks_the_teachers_sde(tmp_path):
    from probgen.inference import fit

    x = torch.randn(64, 2)
    teacher = ScoreSDE(2, sde="ve", sigma_max=7.0, hidden=(8,), embed_dim=8)
    meta = {"data": "toy"}
    fit(teacher, x, steps=1, batch_size=8, run_dir=tmp_path / "t", metadata=meta, progress=False)
    ds = Dataset(name="toy", x=x, y=None, kind="array", event_shape=(2,), num_levels=None)
    cm = Consistency.from_data(ds, teacher=str(tmp_path / "t"), hidden=(8,), embed_dim=8)
    assert cm.config["sigma_max"] == 7.0 and cm.config["teacher"] == str(tmp_path / "t")
    with pytest.raises(ValueError, match="match the teacher's SDE"):
        Consistency.from_data(ds, teacher=str(tmp_path / "t"), sigma_max=9.0)
    ds3 = Dataset(name="toy", x=torch.randn(8, 3), y=None, kind="array", event_shape=(3,), num_levels=None)
    with pytest.raises(ValueError, match="data shape"):
        Consistency.from_data(ds3, teacher=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="score-sde teacher"):
        Consistency.from_data(ds, teacher=str(tmp_path / "missing"))


@pytest.mark.parametrize("teacher, n", [(None, 21), ("runs/teacher", 18)])
def test_sample_sigmas_are_levels_the_network_was_trained_at(teacher, n):
    cm = Consistency(
        2, sde="ve", sigma_max=8.0, num_scales=18, s1=20, teacher=teacher, hidden=(4,), embed_dim=4
    )
    grid = cm.training_sigmas()
    assert cm.grid_size == n and grid.shape == (n,)
    assert_close(grid[[0, -1]], torch.tensor([cm.sigma_eps, cm.sigma_max_ode], dtype=torch.float64))
    for steps in range(1, n):
        taus = cm.sample_sigmas(steps)
        assert (
            len(taus) == steps and taus[0] == cm.sigma_max_ode and all(a > b for a, b in zip(taus, taus[1:]))
        )
        assert all(any(abs(t - g) < 1e-12 for g in grid.tolist()[1:]) for t in taus)
    # two steps go through the middle level of the grid (rounded down for N = 18: index 8.5 -> 8)
    assert cm.sample_sigmas(2)[1] == float(grid[{21: 10, 18: 8}[n]])
    with pytest.raises(ValueError, match=f"Expected steps <= {n - 1}"):
        cm.sample_sigmas(n)
