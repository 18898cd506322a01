"""Probability-flow ODE sampling, encoding and log-likelihoods against Gaussian data.

For data N(mu, Sigma) every p_t is Gaussian and the ODE's flow is the linear map
x_b = m_b mu + A_b^{1/2} A_a^{-1/2} (x_a - m_a mu) (tests/inference/gaussian_oracle.py), so samples,
latents and log-densities have closed forms. Computations in float64.
"""

import math

import pytest
import torch

from probgen.inference.ode import (
    LogDensityODE,
    ode_bits_per_dim,
    ode_encode,
    ode_log_likelihood,
    ode_sample,
)
from probgen.metrics import bits_per_dim, discrete_nll_from_density
from probgen.sdes import VESDE, VPSDE, ProbabilityFlowODE, SubVPSDE
from tests.inference.gaussian_oracle import COV, MU, SDES, GaussianOracle, assert_moments

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=sorted(SDES))
def oracle(request):
    return GaussianOracle(SDES[request.param](), MU, COV)


def draws(o: GaussianOracle, t: float, n: int, seed: int = 0) -> torch.Tensor:
    return o.sample(t, n, torch.Generator().manual_seed(seed))


def test_ode_sample_is_the_closed_form_flow(oracle):
    sde = oracle.sde
    x_T = draws(oracle, sde.T, 200)
    x, nfe = ode_sample(sde, oracle.score, x_T, rtol=1e-8, atol=1e-8, return_nfe=True)
    torch.testing.assert_close(x, oracle.transport(x_T, sde.T, sde.eps), rtol=0, atol=1e-6)
    assert 20 < nfe < 1000  # dopri5: 6 evaluations per step; measured 158 (VP) to 308 (VE)


def test_ode_samples_match_the_moments_of_p_eps(oracle):
    # n = 4000 draws of p_T pushed to eps; z = 4 Monte Carlo standard errors (assert_moments). The flow's
    # own error (< 2e-4 at rtol = atol = 1e-5, see the test above at tighter tolerances) is negligible.
    sde = oracle.sde
    x = ode_sample(sde, oracle.score, draws(oracle, sde.T, 4000, seed=1))
    assert_moments(x, oracle.mean(sde.eps), oracle.cov_t(sde.eps))
    x0 = ode_sample(sde, oracle.score, draws(oracle, sde.T, 4000, seed=1), denoise=True)
    assert_moments(x0, *oracle.denoised_moments(sde.eps))


def test_encoding_then_decoding_returns_the_input(oracle):
    sde = oracle.sde
    x0 = draws(oracle, sde.eps, 100, seed=2)
    z = ode_encode(sde, oracle.score, x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(z, oracle.transport(x0, sde.eps, sde.T), rtol=0, atol=1e-5 * sde.prior_std)
    torch.testing.assert_close(ode_sample(sde, oracle.score, z, rtol=1e-8, atol=1e-8), x0, rtol=0, atol=1e-6)


def test_ode_log_likelihood_is_the_exact_gaussian_log_density(oracle):
    # With log p_T as the prior the ODE's answer is log p_eps(x) itself; 1e-3 nats per dimension.
    sde = oracle.sde
    x0 = draws(oracle, sde.eps, 64, seed=3)
    ll, nfe = ode_log_likelihood(
        sde, oracle.score, x0, prior_log_prob=lambda z: oracle.log_prob(z, sde.T), return_nfe=True
    )
    assert ll.shape == (64,) and nfe > 0
    torch.testing.assert_close(ll, oracle.log_prob(x0, sde.eps), rtol=0, atol=2 * 1e-3)


def test_ode_log_likelihood_with_the_default_prior_is_the_pushforward_density(oracle):
    # The model is the prior pushed through the inverse flow: log pi(Phi(x)) + log |det dPhi/dx|, with
    # dPhi/dx = A_T^{1/2} A_eps^{-1/2}.
    sde = oracle.sde
    x0 = draws(oracle, sde.eps, 32, seed=4)
    expected = (
        sde.prior_log_prob(oracle.transport(x0, sde.eps, sde.T))
        + 0.5 * torch.logdet(oracle.cov_t(sde.T))
        - 0.5 * torch.logdet(oracle.cov_t(sde.eps))
    )
    torch.testing.assert_close(ode_log_likelihood(sde, oracle.score, x0), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_divergence_is_unbiased(noise):
    # At fixed (x, t) the field is linear, x -> a x + g^2 A^-1 (x - m mu) / 2, with symmetric Jacobian J;
    # v^T J v has mean tr J and variance 2 sum_{i != j} J_ij^2 (Rademacher) or 2 ||J||_F^2 (Gaussian).
    # K = 20000 draws; tolerance z = 4 standard errors of their mean, from that exact variance.
    o = GaussianOracle(VPSDE(), MU, COV)
    K, t = 20000, 0.05
    x = draws(o, t, 1).expand(K, 2).contiguous()
    v = torch.randn(K, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v.sign() if noise == "rademacher" else v
    ode = ProbabilityFlowODE(o.sde, o.score)
    state = (x, torch.zeros(K, dtype=torch.float64))
    _, exact = LogDensityODE(ode, "exact")(torch.tensor(t, dtype=torch.float64), state)
    _, hutch = LogDensityODE(ode, "hutchinson", v)(torch.tensor(t, dtype=torch.float64), state)
    (m,), (s,) = o.sde.marginal_params(torch.tensor([t], dtype=torch.float64))
    beta = o.sde.beta(torch.tensor(t, dtype=torch.float64))
    J = -0.5 * beta * torch.eye(2, dtype=torch.float64) + 0.5 * beta * torch.linalg.inv(o.cov_t(t))
    torch.testing.assert_close(exact, torch.trace(J).expand(K))
    var = 2 * (J**2).sum() - (2 * torch.diagonal(J) ** 2).sum() if noise == "rademacher" else 2 * (J**2).sum()
    assert abs(hutch.mean() - torch.trace(J)) <= 4 * math.sqrt(var / K)
    assert hutch.var().item() == pytest.approx(var.item(), rel=0.1)  # 10% = 7 SE of a variance at K = 20000


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_likelihood_is_unbiased(noise):
    # Each example's estimate is unbiased: the mean difference to the exact-divergence answer over
    # B = 256 examples is within z = 4 standard errors estimated from the differences themselves.
    o = GaussianOracle(SubVPSDE(), MU, COV)
    x0 = draws(o, o.sde.eps, 256, seed=5)
    exact = ode_log_likelihood(o.sde, o.score, x0)
    gen = torch.Generator().manual_seed(6)
    hutch = ode_log_likelihood(o.sde, o.score, x0, divergence="hutchinson", noise=noise, generator=gen)
    diff = hutch - exact
    assert diff.std() > 1e-3  # the estimator is not exact here (J is not diagonal)
    assert abs(diff.mean()) <= 4 * diff.std() / math.sqrt(len(diff))


@pytest.mark.parametrize(("method", "per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_methods_count_their_evaluations(method, per_step):
    o = GaussianOracle(VPSDE(), MU, COV)
    x_T = draws(o, 1.0, 50)
    x, path, nfe = ode_sample(o.sde, o.score, x_T, method=method, steps=40, return_path=True, return_nfe=True)
    assert nfe == 40 * per_step and path.shape == (41, 50, 2)
    torch.testing.assert_close(path[0], x_T)
    torch.testing.assert_close(path[-1], x)
    if method == "rk4":  # fourth order: 40 steps already give the flow to 1e-4
        torch.testing.assert_close(x, o.transport(x_T, 1.0, o.sde.eps), rtol=0, atol=1e-4)


def test_adaptive_path_and_denoise_count():
    o = GaussianOracle(VESDE(), MU, COV)
    x_T = draws(o, 1.0, 10)
    x, path, nfe = ode_sample(o.sde, o.score, x_T, steps=5, return_path=True, return_nfe=True)
    assert path.shape == (6, 10, 2)
    _, nfe_denoised = ode_sample(o.sde, o.score, x_T, denoise=True, return_nfe=True)
    assert nfe_denoised == nfe + 1
    z, zpath = ode_encode(o.sde, o.score, x, return_path=True)
    assert z.shape == (10, 2) and zpath.shape == (2, 10, 2)


def test_ode_bits_per_dim_is_the_dequantization_bound():
    o = GaussianOracle(VPSDE(), MU, COV)
    y = draws(o, o.sde.eps, 8, seed=7)
    ll = ode_log_likelihood(o.sde, o.score, y)
    expected = bits_per_dim(discrete_nll_from_density(-ll, 2, 17, scale=2.0), 2)
    torch.testing.assert_close(ode_bits_per_dim(o.sde, o.score, y, num_levels=17, scale=2.0), expected)


def test_validation():
    o = GaussianOracle(VPSDE(), MU, COV)
    x = draws(o, 1.0, 4)
    with pytest.raises(ValueError, match="Expected method in"):
        ode_sample(o.sde, o.score, x, method="leapfrog")
    with pytest.raises(ValueError, match="Expected steps for the fixed-step method"):
        ode_sample(o.sde, o.score, x, method="rk4")
    with pytest.raises(ValueError, match="Expected rtol > 0"):
        ode_sample(o.sde, o.score, x, rtol=0.0)
    with pytest.raises(ValueError, match="Expected eps in"):
        ode_encode(o.sde, o.score, x, eps=0.0)
    with pytest.raises(ValueError, match="Expected x of shape"):
        ode_log_likelihood(o.sde, o.score, x[0])
    with pytest.raises(ValueError, match="Expected divergence in"):
        ode_log_likelihood(o.sde, o.score, x, divergence="trace")
    with pytest.raises(ValueError, match="Expected noise in"):
        ode_log_likelihood(o.sde, o.score, x, divergence="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="Expected a noise tensor"):
        LogDensityODE(ProbabilityFlowODE(o.sde, o.score), "hutchinson")
