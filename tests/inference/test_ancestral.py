import math

import pytest
import torch
from pyro import poutine

from probgen.inference import ancestral_sample, ddim_sample, ddim_timesteps
from probgen.models import DDPM
from tests.models.test_ddpm import COV, MU, gaussian_data, oracle_ddpm, reverse_affine


def assert_moments(xs, mean, cov, z=4.0):
    r"""Sample mean and covariance of ``xs`` (``(n, 2)``) within ``z`` Monte Carlo standard errors.

    For Gaussian samples the mean's standard error is :math:`\sqrt{\Sigma_{ii} / n}` and the
    sample covariance's is :math:`\sqrt{(\Sigma_{ii} \Sigma_{jj} + \Sigma_{ij}^2) / n}`.
    """
    xs = xs.double()
    n = xs.shape[0]
    mean, cov = mean.double(), cov.double()
    d = torch.diagonal(cov)
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((xs.mean(0) - mean).abs() < z * se_mean).all(), (xs.mean(0), mean)
    assert ((torch.cov(xs.T) - cov).abs() < z * se_cov).all(), (torch.cov(xs.T), cov)


def chain_moments(ddpm):
    """Exact mean and covariance of the oracle's ancestral chain output (all steps affine-Gaussian)."""
    s, T = ddpm.schedule, ddpm.T
    var = (
        s.betas
        if ddpm.variance == "beta"
        else torch.cat([s.posterior_variance[1:2], s.posterior_variance[1:]])
    )
    m, c = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for t in range(T, 0, -1):
        A, b = reverse_affine(ddpm, t)
        m, c = A @ m + b, A @ c @ A.T + var[t - 1] * torch.eye(2, dtype=torch.float64)
    return m, c


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_ancestral_samples_match_gaussian_data_with_the_exact_predictor(param):
    ddpm = oracle_ddpm(T=1000, parameterization=param)
    # The chain's own error (sigma^2 = beta, T = 1000) is below 1e-3, a tenth of a standard error here.
    m, c = chain_moments(ddpm)
    assert float((m - MU.double()).abs().max()) < 1e-3 and float((c - COV.double()).abs().max()) < 1e-3
    xs = ancestral_sample(ddpm, 20_000, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (20_000, 2)
    assert_moments(xs, MU, COV)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variance="beta_tilde"),
        dict(schedule="cosine", parameterization="x0"),
        dict(T=100, schedule="cosine"),
    ],
)
def test_ancestral_moments_match_the_exactly_propagated_chain(kwargs):
    ddpm = oracle_ddpm(**kwargs)
    m, c = chain_moments(ddpm)
    xs = ancestral_sample(ddpm, 300_000, generator=torch.Generator().manual_seed(1))
    assert_moments(xs, m, c)


def test_ddim_without_noise_is_the_composed_deterministic_map():
    ddpm = oracle_ddpm(T=1000)
    s = ddpm.schedule
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ts = ddim_timesteps(1000, 10)
    assert ts[0] == 1000 and ts[-1] == 1 and len(ts) == 10
    # Each DDIM step is affine for the Gaussian oracle: compose them in float64.
    eye, mu, cov = torch.eye(2, dtype=torch.float64), MU.double(), COV.double()
    A, b = eye.clone(), torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(ts):
        a = s.alpha_bars[t - 1]
        a_prev = s.alpha_bars[ts[i + 1] - 1] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        m = (1 - a).sqrt() * torch.linalg.inv(a * cov + (1 - a) * eye)  # eps = m (x - sqrt(a) mu)
        step_A = a_prev.sqrt() * (eye - (1 - a).sqrt() * m) / a.sqrt() + (1 - a_prev).sqrt() * m
        step_b = -(a_prev.sqrt() * (-(1 - a).sqrt() * m) / a.sqrt() + (1 - a_prev).sqrt() * m) @ (
            a.sqrt() * mu
        )
        A, b = step_A @ A, step_A @ b + step_b
    expected = z.double() @ A.T + b
    out, traj = ddim_sample(ddpm, 64, steps=10, x_T=z, return_trajectory=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert traj.shape == (11, 64, 2) and torch.equal(traj[0], z) and torch.equal(traj[-1], out)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_every_step_matches_gaussian_data(eta):
    ddpm = oracle_ddpm(T=1000)
    xs = ddim_sample(ddpm, 20_000, steps=1000, eta=eta, generator=torch.Generator().manual_seed(2))
    assert_moments(xs, MU, COV)


def test_ddim_final_sample_draws_the_decoder_around_the_mode():
    # Same x_T, eta = 0: "sample" is the decoder N(mode, sigma_1^2 I) around the "mode" output, so
    # the differences are N(0, sigma_1^2): mean within 4 standard errors sigma_1 / sqrt(n), and
    # std within 4 standard errors sigma_1 / sqrt(2 n) of sigma_1 (n = 2 x 4000 coordinates).
    ddpm = oracle_ddpm(T=100)
    x_T = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
    mode = ddim_sample(ddpm, 4000, steps=10, x_T=x_T)
    draw = ddim_sample(
        ddpm, 4000, steps=10, x_T=x_T, final="sample", generator=torch.Generator().manual_seed(4)
    )
    diff, sigma1, n = (draw - mode).double().flatten(), float(ddpm.tables(x_T).sigma[0]), 8000
    assert abs(diff.mean()) < 4 * sigma1 / math.sqrt(n)
    assert abs(diff.std() - sigma1) < 4 * sigma1 / math.sqrt(2 * n)


def test_start_from_noised_data_and_trajectory():
    ddpm = oracle_ddpm(T=1000)
    x0 = gaussian_data(10_000, seed=4)
    out, traj = ancestral_sample(
        ddpm, 10_000, x0=x0, start_t=300, return_trajectory=True, generator=torch.Generator().manual_seed(3)
    )
    assert traj.shape == (301, 10_000, 2) and torch.equal(traj[-1], out)
    # x_300 ~ q(x_300 | x0) for data x0: mean sqrt(abar) mu, covariance abar Sigma + (1 - abar) I.
    a = float(ddpm.schedule.alpha_bars[299])
    assert_moments(traj[0], math.sqrt(a) * MU, a * COV + (1 - a) * torch.eye(2))
    assert_moments(out, MU, COV)
    # Starting one step up denoises each point, it does not resample the data.
    near = ancestral_sample(ddpm, 10_000, x0=x0, start_t=1, generator=torch.Generator().manual_seed(3))
    assert float((near - x0).abs().mean()) < 0.05


def test_sampling_goes_through_the_program_and_is_reproducible():
    ddpm = oracle_ddpm(T=20, schedule="cosine")
    with poutine.trace() as tracer:
        ancestral_sample(ddpm, 3)
    names = [n for n, s in tracer.trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert names == [f"x_{t}" for t in range(20, 0, -1)] + ["x"]
    # Conditioning the program's x_T site is starting the chain from x_T.
    z = torch.randn(3, 2)
    with poutine.condition(data={"x_20": z}):
        conditioned = ancestral_sample(ddpm, 3, generator=torch.Generator().manual_seed(7))
    started = ancestral_sample(ddpm, 3, x_T=z, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(conditioned, started)
    state = torch.get_rng_state()
    a = ancestral_sample(ddpm, 4, generator=torch.Generator().manual_seed(5))
    b = ancestral_sample(ddpm, 4, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(ddpm, 4, steps=5, eta=0.5, generator=torch.Generator().manual_seed(5))
    d = ddim_sample(ddpm, 4, steps=5, eta=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(c, d)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched


def test_digits_levels_and_trajectories():
    ddpm = DDPM(64, event_shape=(1, 8, 8), T=8, decoder="discretized", base_channels=8, embed_dim=16)
    out, traj = ancestral_sample(ddpm, 5, return_trajectory=True)
    assert out.shape == (5, 64) and traj.shape == (9, 5, 64)
    assert out.min() >= 0 and out.max() <= 16 and bool((out == out.round()).all())
    torch.testing.assert_close(traj[-1], (2 * out + 1) / 17 - 1)  # the levels' bin centres
    out = ddim_sample(ddpm, 5, steps=3)
    assert out.shape == (5, 64) and out.min() >= 0 and out.max() <= 16 and bool((out == out.round()).all())


def test_bad_input():
    ddpm = oracle_ddpm(T=10)
    with pytest.raises(ValueError, match="at most one of x_T and x0"):
        ancestral_sample(ddpm, 2, x_T=torch.zeros(2, 2), x0=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Expected x_T or x0"):
        ancestral_sample(ddpm, 2, start_t=3)
    with pytest.raises(ValueError, match=r"Expected start_t in \[1, 10\]"):
        ancestral_sample(ddpm, 2, x0=torch.zeros(2, 2), start_t=11)
    with pytest.raises(ValueError, match=r"Expected x0 of shape \(2, 2\)"):
        ancestral_sample(ddpm, 2, x0=torch.zeros(3, 2), start_t=3)
    with pytest.raises(ValueError, match="Expected num >= 1"):
        ancestral_sample(ddpm, 0)
    with pytest.raises(ValueError, match=r"Expected steps in \[1, 10\]"):
        ddim_sample(ddpm, 2, steps=11)
    with pytest.raises(ValueError, match=r"Expected eta in \[0, 1\]"):
        ddim_sample(ddpm, 2, steps=5, eta=1.5)
    with pytest.raises(ValueError, match=r"Expected x_T of shape \(2, 2\)"):
        ddim_sample(ddpm, 2, steps=5, x_T=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"Expected final in"):
        ddim_sample(ddpm, 2, steps=5, final="mean")
