"""Langevin MCMC kernels: moments against closed forms, SGLD against exact and NUTS posteriors, contract.

Vectorized tests run C independent chains through a batched ``potential_fn``; the standard error
of a time average is the spread of the C chain means over sqrt(C) (chain means are independent,
so this accounts for autocorrelation). Single-chain tests use Pyro's effective sample size.
Every tolerance is Z = 4 standard errors unless stated.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median
from pyro.ops.stats import effective_sample_size

from probgen.inference.mcmc import MALA, SGLD, ULA, KineticLangevin
from tests import common

Z = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


SIGMA = torch.tensor([[1.0, 0.8], [0.8, 2.0]])
PRECISION = torch.linalg.inv(SIGMA)
MU = torch.tensor([1.0, -1.0])


def gaussian_potential(z):
    """U for C chains of N(MU, SIGMA): z["x"] of shape (C, 2) -> (C,)."""
    x = z["x"] - MU
    return 0.5 * torch.einsum("ci,ij,cj->c", x, PRECISION, x)


def run_chains(kernel, init, warmup, num_samples):
    """The samples of site "x", shape (C, T, 2) (:func:`tests.common.run_chains`)."""
    return common.run_chains(kernel, {"x": init}, warmup, num_samples)["x"]


def chain_mean_estimate(features):
    """features (C, T, K) -> (estimate, standard error) of E[feature] from C independent chains."""
    chain_means = features.mean(1)
    return chain_means.mean(0), chain_means.std(0) / math.sqrt(features.shape[0])


def second_moments(samples):
    """(C, T, 2) -> (C, T, 3): centred second moments xx, xy, yy about the exact mean."""
    x = samples - MU
    return torch.stack([x[..., 0] ** 2, x[..., 0] * x[..., 1], x[..., 1] ** 2], -1)


def covariance_entries(cov):
    return torch.stack([cov[0, 0], cov[0, 1], cov[1, 1]])


def assert_within(estimate, se, exact, z=Z):
    excess = (estimate - exact).abs() - z * se
    assert (excess <= 0).all(), f"estimate {estimate} vs exact {exact}, {z} x se = {z * se}"


def test_mala_correlated_gaussian_moments_and_adaptation():
    pyro.set_rng_seed(0)
    C = 1000
    kernel = MALA(potential_fn=gaussian_potential, step_size=0.1)
    samples = run_chains(kernel, 3 * torch.randn(C, 2), warmup=300, num_samples=300)
    mean, mean_se = chain_mean_estimate(samples)  # se about 0.003
    assert_within(mean, mean_se, MU)
    cov, cov_se = chain_mean_estimate(second_moments(samples))  # se about 0.003 to 0.006
    assert_within(cov, cov_se, covariance_entries(SIGMA))
    # Dual averaging aims the frozen step at 0.574; its averaged iterate lands near, not on, it.
    assert abs(kernel.diagnostics()["acceptance rate"] - 0.574) < 0.05


def test_mala_twisted_gaussian_banana_moments():
    # Haario, Saksman & Tamminen 1999: x1 ~ N(0, s^2), x2 = y - b (x1^2 - s^2), y ~ N(0, 1).
    # E x2 = 0, Var x2 = 1 + 2 b^2 s^4, E[x1^2 x2] = -2 b s^4. s = 2, b = 0.25: 3 and -8.
    s, b = 2.0, 0.25

    def banana(z):
        x1, x2 = z["x"][..., 0], z["x"][..., 1]
        return x1**2 / (2 * s**2) + 0.5 * (x2 + b * (x1**2 - s**2)) ** 2

    pyro.set_rng_seed(1)
    C = 1000
    samples = run_chains(MALA(potential_fn=banana), torch.randn(C, 2), warmup=500, num_samples=800)
    x1, x2 = samples[..., 0], samples[..., 1]
    features = torch.stack([x1, x2, x1**2, x2**2, x1**2 * x2], -1)
    estimate, se = chain_mean_estimate(features)  # se about 0.015, 0.015, 0.05, 0.09, 0.4
    exact = torch.tensor([0.0, 0.0, s**2, 1 + 2 * b**2 * s**4, -2 * b * s**4])
    assert_within(estimate, se, exact)


def ula_exact_covariance(h):
    # x' = (I - h P) x + sqrt(2h) xi has stationary covariance 2h (I - (I - hP)^2)^-1 = (P - h P^2 / 2)^-1.
    return torch.linalg.inv(PRECISION - 0.5 * h * PRECISION @ PRECISION)


def test_ula_stationary_covariance_is_the_closed_form_and_bias_shrinks_with_h():
    biases = []
    for h in (0.4, 0.1):
        pyro.set_rng_seed(2)
        C = 2000
        samples = run_chains(
            ULA(potential_fn=gaussian_potential, step_size=h), 3 * torch.randn(C, 2), 300, 400
        )
        mean, mean_se = chain_mean_estimate(samples)
        assert_within(mean, mean_se, MU)  # ULA's mean is exact on a Gaussian
        cov, cov_se = chain_mean_estimate(second_moments(samples))  # se at most 0.014
        assert_within(cov, cov_se, covariance_entries(ula_exact_covariance(h)))
        biases.append(((cov - covariance_entries(SIGMA)).abs().max(), cov_se.max()))
    (big, big_se), (small, small_se) = biases
    assert big - small > Z * math.hypot(big_se, small_se), biases  # exact biases 0.29 and 0.05


def test_kinetic_langevin_gaussian_moments():
    # BAOAB leaves the position marginal of a Gaussian exact for any step (Leimkuhler & Matthews).
    pyro.set_rng_seed(3)
    C = 1000
    kernel = KineticLangevin(potential_fn=gaussian_potential, step_size=0.8, friction=1.0)
    samples = run_chains(kernel, 3 * torch.randn(C, 2), warmup=200, num_samples=400)
    mean, mean_se = chain_mean_estimate(samples)
    assert_within(mean, mean_se, MU)
    cov, cov_se = chain_mean_estimate(second_moments(samples))
    assert_within(cov, cov_se, covariance_entries(SIGMA))


def linear_regression_data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = x @ torch.tensor([1.5, -2.0]) + torch.randn(n, generator=g)
    return x, y


def linear_regression(x, y, subsample_size=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def test_sgld_minibatch_linear_regression_matches_exact_posterior_mean():
    # Prior N(0, I), unit noise: the posterior is N(S X^T y, S), S = (I + X^T X)^-1. SGLD's
    # minibatch noise inflates its spread but not its mean (the gradient is linear and unbiased).
    x, y = linear_regression_data()
    cov = torch.linalg.inv(torch.eye(2) + x.T @ x)
    exact_mean = cov @ x.T @ y
    pyro.set_rng_seed(4)
    kernel = SGLD(linear_regression, step_size=4e-3, step_offset=1000.0, step_decay=0.55)
    mcmc = MCMC(kernel, num_samples=1500, warmup_steps=200, disable_progbar=True)
    mcmc.run(x, y, 20)
    w = mcmc.get_samples()["w"]
    se = w.std(0) / effective_sample_size(w[None]).sqrt()  # about 0.003
    assert_within(w.mean(0), se, exact_mean)


def test_sgld_minibatch_potential_is_unbiased_for_the_full_one():
    x, y = linear_regression_data(n=50)
    pyro.set_rng_seed(5)
    sgld, mala = SGLD(linear_regression), MALA(linear_regression)
    sgld.setup(0, x, y, 5)
    mala.setup(0, x, y)
    z = {"w": torch.tensor([0.3, -0.7])}
    full = mala.potential_fn(z)
    estimates = torch.stack([sgld.potential_fn(z) for _ in range(2000)])
    # The plate scales a 5-of-50 subsample by 10; a wrong scale shifts the mean by about U itself.
    assert abs(estimates.mean() - full) < Z * estimates.std() / math.sqrt(2000)
    assert estimates.std() > 0  # a fresh subsample at every call


@pytest.mark.slow
def test_sgld_logistic_regression_posterior_mean_matches_nuts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -2.0, 0.5])), generator=g)

    def model(x, y, subsample_size=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

    pyro.set_rng_seed(6)
    nuts = MCMC(NUTS(model), num_samples=500, warmup_steps=300, disable_progbar=True)
    nuts.run(x, y)
    sgld = MCMC(SGLD(model, step_size=2e-2, step_offset=1000.0), 4000, warmup_steps=500, disable_progbar=True)
    sgld.run(x, y, 20)
    means, variances = [], []
    for mcmc in (nuts, sgld):
        w = mcmc.get_samples()["w"]
        means.append(w.mean(0))
        variances.append(w.var(0) / effective_sample_size(w[None]))
    # Combined se about 0.02; SGLD's O(step) bias on the mean is far smaller at this step size.
    assert_within(means[1], (variances[0] + variances[1]).sqrt(), means[0])


def scale_model(data):
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


# The unadjusted kernels start at the prior median: from init_to_uniform's corners (scale near
# e^-2) the first gradient is in the thousands and no fixed step is stable there.
KERNELS = {
    "ULA": lambda: ULA(scale_model, step_size=0.01, init_strategy=init_to_median),
    "MALA": lambda: MALA(scale_model),
    "SGLD": lambda: SGLD(scale_model, step_size=0.01, init_strategy=init_to_median),
    "KineticLangevin": lambda: KineticLangevin(scale_model, step_size=0.1, init_strategy=init_to_median),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_runs_under_pyro_mcmc_with_summary_and_constrained_site(name, capsys):
    pyro.set_rng_seed(7)
    data = 1.0 + 0.5 * torch.randn(30)
    mcmc = MCMC(KERNELS[name](), num_samples=60, warmup_steps=40, disable_progbar=True)
    mcmc.run(data)
    samples = mcmc.get_samples()
    assert samples["scale"].shape == (60,) and samples["loc"].shape == (60,)
    assert (samples["scale"] > 0).all()  # constrained site returned in its support
    diagnostics = mcmc.diagnostics()
    for site in ("scale", "loc"):
        assert torch.isfinite(diagnostics[site]["n_eff"]) and torch.isfinite(diagnostics[site]["r_hat"])
    assert diagnostics["step size"]["chain 0"] > 0
    mcmc.summary()
    assert "n_eff" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MALA(), "exactly one of `model` or `potential_fn`, but found neither"),
        (lambda: MALA(scale_model, gaussian_potential), "but found both"),
        (lambda: ULA(scale_model, step_size=0.0), "Expected step_size to be a positive finite number"),
        (lambda: MALA(scale_model, target_accept_prob=1.0), "Expected target_accept_prob in"),
        (lambda: KineticLangevin(scale_model, friction=-1.0), "Expected friction"),
        (lambda: SGLD(scale_model, step_decay=2.0), "Expected step_decay in"),
        (lambda: SGLD(scale_model, step_offset=0), "Expected step_offset"),
        (lambda: ULA(scale_model, adapt_step_size=True), "Expected adapt_step_size=False for the unadjusted"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_setup_raises():
    with pytest.raises(ValueError, match="Expected warmup_steps to be a non-negative int"):
        MALA(scale_model).setup(-1, torch.ones(3))
    with pytest.raises(ValueError, match="Expected initial_params"):
        MALA(potential_fn=gaussian_potential).setup(10)
    x, y = linear_regression_data(n=20)
    with pytest.raises(ValueError, match="Expected a model without subsampled plates"):
        MALA(linear_regression).setup(10, x, y, 5)

    def discrete(data):
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="Expected continuous latent sites for SGLD"):
        SGLD(discrete).setup(10, None)


def test_unadjusted_divergence_is_an_error_not_nans():
    kernel = ULA(potential_fn=gaussian_potential, step_size=5.0)  # unstable: h * lambda_max > 2
    with pytest.raises(RuntimeError, match="Expected a finite potential energy"):
        run_chains(kernel, torch.randn(4, 2), warmup=0, num_samples=2000)
