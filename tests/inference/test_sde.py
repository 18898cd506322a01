"""Reverse-time SDE and predictor-corrector sampling against Gaussian data, whose every score is exact.

Data N(mu, Sigma); p_t = N(m_t mu, m_t^2 Sigma + s_t^2 I) (tests/inference/gaussian_oracle.py). The
chains start at exact draws of p_T, so in continuous time they end at exact draws of p_eps and, after
Tweedie's denoising step, of a Gaussian whose moments are known in closed form
(``GaussianOracle.denoised_moments``): the expected moments account for stopping at eps exactly.
Moment checks use z = 4 Monte Carlo standard errors (``assert_moments``): with n = 4000 that is
0.063 sqrt(C_ii) for a mean and about 0.09 C_ii for a variance. Discretization biases, measured by the
same calls with n = 200,000 and 1000 steps (MC error 0.003), are below 0.004 in every mean and covariance
entry for the reverse SDE and below 0.018 for PC sampling (the Langevin corrector inflates variances by
about 1.5%), i.e. at most a fifth of the tolerance.
"""

import pytest
import torch

from probgen.inference.sde import (
    euler_maruyama_predictor,
    pc_sample,
    reverse_diffusion_predictor,
    reverse_sde_sample,
    tweedie_denoise,
)
from probgen.sdes import VESDE, VPSDE, LangevinSDE, SubVPSDE
from tests.inference.gaussian_oracle import COV, MU, SDES, GaussianOracle, assert_moments

N = 4000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=sorted(SDES))
def oracle(request):
    return GaussianOracle(SDES[request.param](), MU, COV)


def start(o: GaussianOracle, seed: int = 0, n: int = N) -> torch.Tensor:
    return o.sample(o.sde.T, n, torch.Generator().manual_seed(seed))


def test_tweedie_denoise_is_the_posterior_mean():
    # For x_t = m x0 + s z with x0 ~ N(mu, Sigma), E[x0 | x_t] = mu + m Sigma A^-1 (x_t - m mu).
    o = GaussianOracle(VPSDE(), MU, COV)
    x = o.sample(0.3, 5, torch.Generator().manual_seed(0))
    (m,), _ = o.sde.marginal_params(torch.tensor([0.3], dtype=torch.float64))
    expected = o.mu + m * (x - m * o.mu) @ torch.linalg.solve(o.cov_t(0.3), o.cov).T
    torch.testing.assert_close(tweedie_denoise(o.sde, o.score, x, 0.3), expected)


def test_reverse_sde_sample_matches_the_denoised_moments(oracle):
    x, nfe = reverse_sde_sample(
        oracle.sde, oracle.score, start(oracle), steps=1000, generator=torch.Generator().manual_seed(1),
        return_nfe=True,
    )  # fmt: skip
    assert nfe == 1001  # one per Euler step (torchsde's shape check reuses the first), the denoising step
    assert_moments(x, *oracle.denoised_moments(oracle.sde.eps))


def test_reverse_sde_without_denoising_ends_at_p_eps():
    # eps = 0.3 makes p_eps (mean m mu, m = 0.63) and the denoised law (mean mu) far apart.
    o = GaussianOracle(VPSDE(), torch.tensor([2.0, -1.0]), COV)
    gen = torch.Generator().manual_seed(1)
    x_eps = reverse_sde_sample(o.sde, o.score, start(o), steps=700, eps=0.3, denoise=False, generator=gen)
    assert_moments(x_eps, o.mean(0.3), o.cov_t(0.3))
    x_0 = reverse_sde_sample(o.sde, o.score, start(o), steps=700, eps=0.3, generator=gen)
    assert_moments(x_0, *o.denoised_moments(0.3))


def test_reverse_sde_from_the_prior():
    # For VP, p_T is N(0, I) up to m_T = 0.0066, and the reverse flow shrinks that mismatch by another
    # exp(-5): starting at the prior gives the same moments.
    o = GaussianOracle(VPSDE(), MU, COV)
    gen = torch.Generator().manual_seed(2)
    x = reverse_sde_sample(
        o.sde, o.score, o.sde.prior_sample((N, 2), generator=gen, dtype=torch.float64), generator=gen
    )
    assert_moments(x, *o.denoised_moments(o.sde.eps))


@pytest.mark.parametrize("method", ["euler", "milstein", "srk"])
def test_reverse_sde_runs_under_every_diagonal_ito_solver(method):
    o = GaussianOracle(VESDE(), MU, COV)
    x, path, nfe = reverse_sde_sample(
        o.sde, o.score, start(o, n=64), steps=20, method=method, generator=torch.Generator().manual_seed(0),
        return_path=True, return_nfe=True,
    )  # fmt: skip
    assert x.shape == (64, 2) and path.shape == (21, 64, 2) and bool(torch.isfinite(x).all())
    assert nfe == 21 if method != "srk" else nfe > 21  # 20 steps and the denoising step
    if method == "milstein":  # the diffusion does not depend on x: Milstein is Euler-Maruyama
        euler = reverse_sde_sample(
            o.sde, o.score, start(o, n=64), steps=20, generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(x, euler)


def test_reverse_sde_sample_is_reproducible_from_the_generator():
    o = GaussianOracle(VPSDE(), MU, COV)
    a = reverse_sde_sample(
        o.sde, o.score, start(o, n=8), steps=10, generator=torch.Generator().manual_seed(5)
    )
    b = reverse_sde_sample(
        o.sde, o.score, start(o, n=8), steps=10, generator=torch.Generator().manual_seed(5)
    )
    c = reverse_sde_sample(
        o.sde, o.score, start(o, n=8), steps=10, generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_pc_sample_matches_the_denoised_moments(oracle):
    x, nfe = pc_sample(
        oracle.sde, oracle.score, start(oracle), steps=1000, generator=torch.Generator().manual_seed(1),
        return_nfe=True,
    )  # fmt: skip
    assert nfe == 1000 * (1 + 1) + 1
    assert_moments(x, *oracle.denoised_moments(oracle.sde.eps))


def test_pc_sample_with_the_euler_maruyama_predictor_and_two_corrector_steps():
    o = GaussianOracle(SubVPSDE(), MU, COV)
    x, nfe = pc_sample(
        o.sde, o.score, start(o), steps=500, predictor="euler_maruyama", corrector_steps=2, snr=0.1,
        generator=torch.Generator().manual_seed(1), return_nfe=True,
    )  # fmt: skip
    assert nfe == 500 * 3 + 1
    assert_moments(x, *o.denoised_moments(o.sde.eps))


def test_pc_sample_takes_predictor_and_corrector_functions():
    o = GaussianOracle(VPSDE(), MU, COV)
    calls = {"p": [], "c": []}

    def predictor(sde, score_fn, x, t, dt, *, generator):
        calls["p"].append((t, dt))
        return euler_maruyama_predictor(sde, score_fn, x, t, dt, generator=generator)

    def corrector(score_fn, x, t, *, alpha, generator):
        calls["c"].append((t, alpha))
        return x

    x0 = start(o, n=16)
    x, nfe = pc_sample(
        o.sde, o.score, x0, steps=10, predictor=predictor, corrector=corrector, corrector_steps=3,
        eps=0.1, denoise=False, generator=torch.Generator().manual_seed(0), return_nfe=True,
    )  # fmt: skip
    assert nfe == 10 and len(calls["p"]) == 10 and len(calls["c"]) == 30
    assert [t for t, _ in calls["p"]] == pytest.approx(torch.linspace(1.0, 0.1, 11)[:-1].tolist())
    assert calls["p"][0][1] == pytest.approx(0.09)
    t_last, alpha = calls["c"][-1]
    assert t_last == pytest.approx(0.1)
    torch.testing.assert_close(alpha, 1 - o.sde.beta(torch.full((16,), 0.1, dtype=torch.float64)) * 0.09)
    # predictor only: the same as the named Euler-Maruyama predictor, draw for draw
    y = pc_sample(
        o.sde, o.score, x0, steps=10, predictor="euler_maruyama", corrector=None, eps=0.1, denoise=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(x, y)


def test_reverse_diffusion_predictor_is_ddpm_ancestral_step_for_vp():
    o = GaussianOracle(VPSDE(), MU, COV)
    x = start(o, n=6)
    t, dt = 0.5, 0.01
    beta = o.sde.beta(torch.tensor(t, dtype=torch.float64)) * dt
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = o.score(x, torch.full((6,), t, dtype=torch.float64))
    expected = (2 - (1 - beta).sqrt()) * x + beta * s + beta.sqrt() * z
    got = reverse_diffusion_predictor(o.sde, o.score, x, t, dt, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)


def test_validation():
    o = GaussianOracle(VPSDE(), MU, COV)
    x = start(o, n=4)
    with pytest.raises(ValueError, match="Expected sde to be a DiffusionSDE"):
        reverse_sde_sample(LangevinSDE(o.score), o.score, x)
    with pytest.raises(ValueError, match="Expected x of shape"):
        reverse_sde_sample(o.sde, o.score, x[:, :, None])
    with pytest.raises(ValueError, match="Expected eps in"):
        reverse_sde_sample(o.sde, o.score, x, eps=1.0)
    with pytest.raises(ValueError, match="Expected steps >= 1"):
        reverse_sde_sample(o.sde, o.score, x, steps=0)
    with pytest.raises(ValueError, match="Expected method in"):
        reverse_sde_sample(o.sde, o.score, x, method="heun")
    with pytest.raises(ValueError, match="Expected predictor in"):
        pc_sample(o.sde, o.score, x, predictor="ancestral")
    with pytest.raises(ValueError, match="Expected corrector"):
        pc_sample(o.sde, o.score, x, corrector="ald")
    with pytest.raises(ValueError, match="Expected snr > 0"):
        pc_sample(o.sde, o.score, x, snr=0.0)
    with pytest.raises(ValueError, match="Expected steps large enough"):
        pc_sample(o.sde, o.score, x, steps=10)  # beta(T) dt = 2: no DDPM step
