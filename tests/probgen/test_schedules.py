import math

import pytest
import torch

from probgen.schedules import (
    DiffusionSchedule,
    append_dims,
    at_step,
    check_betas,
    cosine_betas,
    linear_betas,
)


def test_linear_endpoints_shape_and_dtype():
    betas = linear_betas()
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert float(betas[0]) == pytest.approx(1e-4, abs=1e-15)
    assert float(betas[-1]) == pytest.approx(0.02, abs=1e-15)
    assert bool((betas.diff() > 0).all())
    assert linear_betas(1, 0.3, 0.3).tolist() == pytest.approx([0.3])


def test_cosine_alpha_bars_follow_the_squared_cosine():
    T, s = 1000, 0.008
    sched = DiffusionSchedule.from_betas(cosine_betas(T, s=s))
    t = torch.arange(1, T + 1, dtype=torch.float64)

    def f(u):
        return torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = f(t) / f(torch.zeros((), dtype=torch.float64))
    # Only the last steps are clipped at max_beta = 0.999; before them the product telescopes.
    unclipped = int((sched.betas < 0.999).sum())
    assert unclipped > 990
    torch.testing.assert_close(
        sched.alpha_bars[: unclipped - 1], expected[: unclipped - 1], rtol=1e-10, atol=1e-14
    )
    assert float(sched.betas.max()) <= 0.999
    assert cosine_betas(4).shape == (4,)


def test_derived_quantities():
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    s = DiffusionSchedule.from_betas(betas)
    abar = torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], dtype=torch.float64)
    torch.testing.assert_close(s.alpha_bars, abar)
    torch.testing.assert_close(s.alpha_bars_prev, torch.tensor([1.0, 0.9, 0.72], dtype=torch.float64))
    assert float(s.posterior_variance[0]) == 0.0
    # beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
    assert float(s.posterior_variance[2]) == pytest.approx((1 - 0.72) / (1 - 0.504) * 0.3, rel=1e-12)
    # mu-tilde at t = 1 is x0 itself; and mu-tilde(x_t, x0(eps)) is the eps form of the reverse mean.
    assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0) and float(s.posterior_mean_coef2[0]) == 0.0
    x0, eps = 0.7, -1.3
    for i in range(3):
        x_t = float(s.sqrt_alpha_bars[i]) * x0 + float(s.sqrt_one_minus_alpha_bars[i]) * eps
        mu = float(s.posterior_mean_coef1[i]) * x0 + float(s.posterior_mean_coef2[i]) * x_t
        eps_form = (x_t - float(betas[i]) / float(s.sqrt_one_minus_alpha_bars[i]) * eps) / math.sqrt(
            float(s.alphas[i])
        )
        assert mu == pytest.approx(eps_form, rel=1e-12)
    assert s.T == 3
    assert s.to(dtype=torch.float32).betas.dtype == torch.float32


@pytest.mark.parametrize(
    "betas",
    [[0.1, 0.0], [0.1, 1.0], [-0.1, 0.5], [0.2, float("nan")], [1.5]],
)
def test_betas_outside_the_open_unit_interval_are_rejected(betas):
    with pytest.raises(ValueError, match=r"Expected betas in \(0, 1\), but found"):
        check_betas(torch.tensor(betas, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Expected betas in \(0, 1\)"):
        DiffusionSchedule.from_betas(torch.tensor(betas))


def test_bad_step_counts_and_shapes_are_rejected():
    for make in (linear_betas, cosine_betas):
        with pytest.raises(ValueError, match="Expected T >= 1"):
            make(0)
        with pytest.raises(ValueError, match="Expected T >= 1"):
            make(2.5)
    with pytest.raises(ValueError, match="T >= 1"):
        check_betas(torch.zeros(0))
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        check_betas(torch.full((2, 2), 0.1))
    with pytest.raises(ValueError, match=r"Expected betas in \(0, 1\)"):
        linear_betas(10, start=0.0, end=0.02)


def test_append_dims_and_at_step():
    v = torch.arange(3.0)
    assert append_dims(v, 4).shape == (3, 1, 1, 1)
    assert append_dims(torch.tensor(2.0), 2).shape == (1, 1)
    with pytest.raises(ValueError, match="at most 1 dims"):
        append_dims(torch.zeros(2, 2), 1)
    table = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    x = torch.zeros(2, 5)
    got = at_step(table, torch.tensor([3, 1]), x)
    assert got.shape == (2, 1) and got.dtype == torch.float32 and got.flatten().tolist() == [30.0, 10.0]
    assert float(at_step(table, 2, x)) == 20.0
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match=r"Expected a step t in \[1, 3\]"):
            at_step(table, bad, x)
