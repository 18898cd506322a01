import math

import pytest
import torch
import torchsde

from probgen.schedules import linear_betas
from probgen.sdes import (
    VESDE,
    VPSDE,
    LangevinSDE,
    ProbabilityFlowODE,
    ReverseSDE,
    SubVPSDE,
    batch_times,
    flat_score,
)


def test_langevin_sde_is_a_diagonal_ito_sde_with_the_score_as_drift():
    seen = {}

    def score(x, t):
        seen["t"] = t
        return -2.0 * x

    sde = LangevinSDE(score, temperature=0.5)
    assert isinstance(sde, torchsde.SDEIto) and sde.noise_type == "diagonal" and sde.sde_type == "ito"
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sde.f(torch.tensor(0.25), y), -2.0 * y)
    assert seen["t"].shape == (5,) and bool((seen["t"] == 0.25).all())
    torch.testing.assert_close(sde.g(0.25, y), torch.full_like(y, math.sqrt(2 * 0.5)))


def test_euler_maruyama_through_sdeint_is_one_ula_step():
    sde = LangevinSDE(lambda x, t: -x)
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=0.1, size=(4, 2), dtype=torch.float64, entropy=7)
    ts = torch.tensor([0.0, 0.1], dtype=torch.float64)
    ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.1)
    torch.testing.assert_close(ys[-1], y0 - 0.1 * y0 + math.sqrt(2) * bm(0.0, 0.1))


def test_validation():
    with pytest.raises(ValueError, match="Expected temperature > 0"):
        LangevinSDE(lambda x, t: -x, temperature=0.0)
    with pytest.raises(ValueError, match="Expected a callable"):
        LangevinSDE(3.0)
    with pytest.raises(ValueError, match="Expected a time of shape"):
        batch_times(torch.zeros(3), torch.zeros(4, 2))
    assert batch_times(0.5, torch.zeros(4, 2)).shape == (4,)


# ---------------------------------------------------------------- VP, sub-VP, VE


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


@pytest.fixture(params=sorted(SDES))
def sde(request):
    return SDES[request.param]()


def test_diffusion_sdes_are_diagonal_ito_sdes_with_the_right_shapes(sde):
    assert isinstance(sde, torchsde.SDEIto) and sde.noise_type == "diagonal" and sde.sde_type == "ito"
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert sde.f(0.5, y).shape == (5, 3) and sde.g(torch.tensor(0.5), y).shape == (5, 3)
    t = torch.rand(5, generator=torch.Generator().manual_seed(1))
    drift, diffusion = sde.sde(y, t)
    assert drift.shape == (5, 3) and diffusion.shape == (5,)
    torch.testing.assert_close(sde.g(0.5, y), sde.diffusion(torch.full((5,), 0.5))[:, None].expand(5, 3))
    mean, std = sde.marginal_params(t)
    assert mean.shape == std.shape == (5,)
    mean0, std0 = sde.marginal_params(torch.zeros(2))
    assert bool((mean0 == 1).all()) and bool((std0 == 0).all())
    assert sde.eps == (1e-5 if isinstance(sde, VESDE) else 1e-3) and sde.T == 1.0


def test_marginal_is_the_gaussian_transition(sde):
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    q = sde.marginal(x0, t)
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    mean, std = sde.marginal_params(t)
    torch.testing.assert_close(q.mean, mean[:, None] * x0)
    torch.testing.assert_close(q.stddev, std[:, None].expand(4, 3))


def test_marginal_params_solve_the_moment_equations_of_the_sde(sde):
    # For dx = a(t) x dt + g(t) dW: m' = a m and (s^2)' = 2 a s^2 + g^2 (Sarkka & Solin 2019, eq. 6.2),
    # checked by autograd in float64 at times away from 0 (where VE's s^2 ~ t has a finite slope too).
    t = torch.tensor([1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    mean, std = sde.marginal_params(t)
    # VE's m = 1 does not depend on t at all
    dm = (
        torch.autograd.grad(mean.sum(), t, retain_graph=True)[0]
        if mean.requires_grad
        else torch.zeros_like(t)
    )
    (dv,) = torch.autograd.grad((std**2).sum(), t)
    a, g = sde.drift_coef(t.detach()), sde.diffusion(t.detach())
    torch.testing.assert_close(dm, a * mean.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv, 2 * a * std.detach() ** 2 + g**2, rtol=1e-10, atol=1e-12)


def test_marginals_match_a_long_sdeint_run_of_the_forward_sde(sde, one_thread):
    # n = 4000 paths from x0 = (1.5, -2), 1000 Euler-Maruyama steps, float64. Tolerances: z = 4 times the
    # MC standard error of a mean (s / sqrt(n)) and of a variance (s^2 sqrt(2 / (n - 1)), Gaussian),
    # i.e. 6.3% of s and 9% of s^2. Euler's bias is far smaller: for VP at T the stationary variance of
    # the scheme is 1 / (1 - beta dt / 4) = 1.005; for VE the left Riemann sum of g^2 underestimates the
    # variance by about (2 log(sigma_max / sigma_min)) dt / 2 = 0.85%.
    n, steps = 4000, 1000
    x0 = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2).contiguous()
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=1.0, size=(n, 2), dtype=torch.float64, entropy=3, dt=1.0 / steps
    )
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ys = torchsde.sdeint(sde, x0, ts, bm=bm, method="euler", dt=1.0 / steps)
    for k in (1, 2):
        mean, std = sde.marginal_params(ts[k : k + 1])
        tol_mean = 4 * std.item() / math.sqrt(n)
        tol_var = 4 * std.item() ** 2 * math.sqrt(2 / (n - 1))
        torch.testing.assert_close(ys[k].mean(0), mean * x0[0], rtol=0, atol=tol_mean)
        torch.testing.assert_close(ys[k].var(0), (std**2).expand(2), rtol=0, atol=tol_var)


def test_prior_sample_log_prob_and_distribution_agree(sde):
    gen = torch.Generator().manual_seed(0)
    z = sde.prior_sample((6, 3), generator=gen, dtype=torch.float64)
    assert z.shape == (6, 3)
    torch.testing.assert_close(z, sde.prior_sample((6, 3), generator=gen.manual_seed(0), dtype=torch.float64))
    torch.testing.assert_close(sde.prior_log_prob(z), sde.prior(3, dtype=torch.float64).log_prob(z))
    expected = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(z), expected)
    assert sde.prior_std == (50.0 if isinstance(sde, VESDE) else 1.0)


def test_vp_discretization_is_ddpm_with_linear_betas():
    # beta_i = beta(t_i) T / N at t_i = (i - 1) T / (N - 1) is linear_betas(N, beta_min / N, beta_max / N);
    # N = 1000 with the defaults gives DDPM's 1e-4 ... 0.02.
    sde, N = VPSDE(), 1000
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.arange(N, dtype=torch.float64) / (N - 1)
    f, G = sde.discretize(x, t, 1.0 / N)
    betas = linear_betas(N)
    torch.testing.assert_close(G**2, betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(f, ((1 - betas).sqrt() - 1)[:, None] * x)
    torch.testing.assert_close(sde.corrector_alpha(t, 1.0 / N, x), 1 - betas)


def test_ve_discretization_adds_up_to_the_marginal_variance():
    sde, N = VESDE(), 50
    x = torch.zeros(N, 2, dtype=torch.float64)
    t = torch.arange(1, N + 1, dtype=torch.float64) / N
    f, G = sde.discretize(x, t, 1.0 / N)
    assert bool((f == 0).all())
    _, std = sde.marginal_params(torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close((G**2).sum(), std[0] ** 2)
    torch.testing.assert_close(sde.corrector_alpha(t, 1.0 / N, x), torch.ones(N, dtype=torch.float64))


def test_subvp_discretization_is_euler_maruyama():
    sde = SubVPSDE()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f, G = sde.discretize(x, t, 0.01)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(f, drift * 0.01)
    torch.testing.assert_close(G, g * 0.1)


def test_subvp_has_the_seed_notes_diffusion_and_a_smaller_variance_than_vp():
    vp, sub = VPSDE(), SubVPSDE()
    t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
    b = vp.beta_min * t + (vp.beta_max - vp.beta_min) * t**2 / 2
    torch.testing.assert_close(sub.diffusion(t), (vp.beta(t) * (1 - torch.exp(-2 * b))).sqrt())
    assert bool((sub.marginal_params(t)[1] < vp.marginal_params(t)[1]).all())


def test_reverse_sde_drift_and_diffusion(sde):
    seen = []

    def score(x, t):
        seen.append(t)
        return -2.0 * x

    rev = ReverseSDE(sde, score)
    assert isinstance(rev, torchsde.SDEIto) and rev.noise_type == "diagonal" and rev.sde_type == "ito"
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64)
    t = torch.full((4,), 0.7, dtype=torch.float64)
    drift, g = sde.sde(y, t)
    torch.testing.assert_close(rev.f(s, y), -(drift - g[:, None] ** 2 * (-2.0 * y)))
    torch.testing.assert_close(seen[0], t)
    torch.testing.assert_close(rev.g(s, y), g[:, None].expand(4, 3))


def test_probability_flow_ode_drift_counts_its_evaluations(sde):
    ode = ProbabilityFlowODE(sde, lambda x, t: -x / 3)
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    drift, g = sde.sde(y, t)
    torch.testing.assert_close(
        ode(torch.tensor(0.4, dtype=torch.float64), y), drift + 0.5 * g[:, None] ** 2 * y / 3
    )
    ode(0.2, y)
    assert ode.nfe == 2


def test_flat_score_adapts_an_image_score():
    def image_score(x, t):
        assert x.shape == (3, 1, 2, 2) and t.shape == (3,)
        return -x * t[:, None, None, None]

    score = flat_score(image_score, (1, 2, 2))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(score(x, t), -x * t[:, None])
    with pytest.raises(ValueError, match="Expected x of shape"):
        score(torch.zeros(3, 5), t)
    with pytest.raises(ValueError, match="Expected a non-empty event_shape"):
        flat_score(image_score, (0, 2))


def test_diffusion_sde_validation():
    with pytest.raises(ValueError, match="Expected beta_max >= beta_min"):
        VPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="Expected beta_min > 0"):
        SubVPSDE(beta_min=0.0)
    with pytest.raises(ValueError, match="Expected sigma_max > sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="Expected eps < T"):
        VPSDE(T=1.0, eps=1.0)
    with pytest.raises(ValueError, match="Expected T > 0"):
        VESDE(T=-1.0)
    with pytest.raises(ValueError, match="Expected times in"):
        VPSDE().marginal(torch.zeros(2, 3), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="Expected x0 of shape"):
        VPSDE().marginal(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="Expected D >= 1"):
        VPSDE().prior(0)
    with pytest.raises(ValueError, match="Expected a DiffusionSDE"):
        ReverseSDE(LangevinSDE(lambda x, t: -x), lambda x, t: -x)
    with pytest.raises(ValueError, match="Expected a callable"):
        ProbabilityFlowODE(VPSDE(), None)
