import math

import pyro
import pytest
import torch
from pyro.distributions.kl import kl_divergence

from probgen.distributions import DiscretizedGaussian, UniformSteps, q_marginal, q_posterior, q_step
from probgen.schedules import DiffusionSchedule
from tests.common import mc_tolerance

BETAS = torch.tensor([0.05, 0.15, 0.3, 0.1, 0.45], dtype=torch.float64)


@pytest.fixture
def sched():
    return DiffusionSchedule.from_betas(BETAS)


def test_marginal_is_the_composition_of_forward_steps_exactly(sched):
    # Composing N(sqrt(alpha_t) x, beta_t) steps: mean prod sqrt(alpha) x0,
    # variance v_t = alpha_t v_{t-1} + beta_t.
    x0 = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros(())
    for t in range(1, 6):
        step = q_step(sched, mean, t)
        mean = step.mean
        var = sched.alphas[t - 1] * var + sched.betas[t - 1]
        m = q_marginal(sched, x0, t)
        torch.testing.assert_close(m.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.variance, var.expand_as(mean), rtol=1e-12, atol=1e-12)
    assert m.batch_shape == (1,) and m.event_shape == (2,)


def test_marginal_matches_simulated_forward_chain(sched):
    # Moments of 100k simulated chains, within 4 Monte Carlo standard errors.
    torch.manual_seed(0)
    n = 100_000
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    x = x0
    for t in range(1, 6):
        x = q_step(sched, x, t).sample()
    target = q_marginal(sched, x0[:1], 5)
    mu, sd = float(target.mean), float(target.stddev)
    assert abs(float(x.mean()) - mu) < mc_tolerance(sd, n)
    # The sample variance has standard error about sd^2 sqrt(2 / n).
    assert abs(float(x.var()) - sd**2) < mc_tolerance(sd**2 * math.sqrt(2), n)


def test_posterior_is_bayes_rule(sched):
    # log q(x_{t-1}|x0) + log q(x_t|x_{t-1}) - log q(x_t|x0) = log q(x_{t-1}|x_t, x0), for any x_{t-1}.
    x0 = torch.tensor([[0.4], [-1.1]], dtype=torch.float64)
    x_t = torch.tensor([[0.9], [0.3]], dtype=torch.float64)
    grid = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(-1, 1, 1).expand(-1, 2, 1)
    for t in range(2, 6):
        joint = q_marginal(sched, x0, t - 1).log_prob(grid) + q_step(sched, grid, t).log_prob(x_t)
        bayes = joint - q_marginal(sched, x0, t).log_prob(x_t)
        post = q_posterior(sched, x0, x_t, t)
        torch.testing.assert_close(post.log_prob(grid), bayes, rtol=1e-10, atol=1e-10)
        # The same by hand: precision 1/(1 - abar_{t-1}) + alpha_t / beta_t.
        abar_prev, alpha, beta = sched.alpha_bars[t - 2], sched.alphas[t - 1], sched.betas[t - 1]
        var = 1 / (1 / (1 - abar_prev) + alpha / beta)
        mean = var * (abar_prev.sqrt() * x0 / (1 - abar_prev) + alpha.sqrt() * x_t / beta)
        torch.testing.assert_close(post.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(post.variance, var.expand_as(mean), rtol=1e-12, atol=1e-12)


def test_per_example_steps_and_validation(sched):
    x0 = torch.randn(3, 4)
    t = torch.tensor([1, 3, 5])
    d = q_marginal(sched, x0, t)
    assert d.batch_shape == (3,) and d.event_shape == (4,)
    torch.testing.assert_close(d.mean[1], float(sched.sqrt_alpha_bars[2]) * x0[1])
    # At t = 1 the posterior is a point mass at x0; min_variance makes it a proper distribution.
    p = q_posterior(sched, x0, x0 + 1, t, min_variance=1e-12)
    torch.testing.assert_close(p.mean[0], x0[0])
    assert bool((p.stddev > 0).all())
    with pytest.raises(ValueError, match=r"Expected a step t in \[1, 5\], but found 0"):
        q_marginal(sched, x0, 0)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match=r"Expected steps t in \[1, 5\]"):
        q_marginal(sched, x0, torch.tensor([1, 6, 2]))


def _normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("loc, scale", [(0.0, 0.3), (0.45, 0.01), (-0.97, 0.2), (2.5, 0.5), (0.1, 30.0)])
def test_discretized_gaussian_matches_cdf_differences_and_sums_to_one(loc, scale):
    L = 17
    d = DiscretizedGaussian(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), L
    )
    probs = d.log_prob(torch.arange(L, dtype=torch.float64)).exp()
    expected = []
    for v in range(L):
        c = (2 * v + 1) / L - 1
        hi = 1.0 if v == L - 1 else _normal_cdf((c + 1 / L - loc) / scale)
        lo = 0.0 if v == 0 else _normal_cdf((c - 1 / L - loc) / scale)
        expected.append(hi - lo)
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-8)
    assert abs(float(probs.sum()) - 1.0) < 1e-12


def test_discretized_gaussian_tails_are_finite_and_differentiable():
    loc = torch.tensor([0.0, 0.0, 0.0, 0.99], requires_grad=True)
    d = DiscretizedGaussian(loc, torch.tensor(0.01), 17)
    lp = d.log_prob(torch.tensor([8.0, 15.0, 0.0, 16.0]))
    assert torch.isfinite(lp).all()
    lp_ = lp.detach()
    assert float(lp_[0]) > -1e-6 and float(lp_[1]) < -1000 and float(lp_[3]) > -1e-6
    lp.sum().backward()
    assert torch.isfinite(loc.grad).all()


def test_discretized_gaussian_sampling_frequencies():
    torch.manual_seed(0)
    d = DiscretizedGaussian(torch.tensor(0.3), torch.tensor(0.4), 9)
    n = 200_000
    counts = torch.bincount(d.sample((n,)).long(), minlength=9).double() / n
    probs = d.log_prob(torch.arange(9.0)).exp().double()
    # Each frequency within 4 binomial standard errors of its probability.
    tol = torch.tensor([mc_tolerance(math.sqrt(p * (1 - p)), n) for p in probs.tolist()]) + 1e-9
    assert ((counts - probs).abs() <= tol).all()


def test_discretized_gaussian_expand_mode_and_validation():
    d = DiscretizedGaussian(torch.tensor([-1.0, 0.0, 0.5]), torch.tensor(0.1), 17)
    assert d.mode.tolist() == [0.0, 8.0, 12.0]
    e = d.expand((4, 3))
    assert e.batch_shape == (4, 3) and e.log_prob(torch.zeros(4, 3)).shape == (4, 3)
    with pytest.raises(ValueError, match="num_levels >= 2"):
        DiscretizedGaussian(0.0, 1.0, 1)
    v = DiscretizedGaussian(torch.tensor(0.0), torch.tensor(1.0), 17, validate_args=True)
    for bad in (17.0, -1.0, 2.5):
        with pytest.raises(ValueError):
            v.log_prob(torch.tensor(bad))


def test_uniform_steps():
    torch.manual_seed(0)
    d = UniformSteps(4).expand([50_000])
    t = d.rsample()
    assert t.dtype == torch.int64 and int(t.min()) == 1 and int(t.max()) == 4
    freq = torch.bincount(t, minlength=5)[1:].double() / 50_000
    assert ((freq - 0.25).abs() < mc_tolerance(math.sqrt(0.25 * 0.75), 50_000)).all()
    assert torch.allclose(UniformSteps(4).log_prob(t[:3]), torch.full((3,), -math.log(4)))
    assert kl_divergence(UniformSteps(4).expand([3]), UniformSteps(4).expand([3])).tolist() == [0.0] * 3
    assert float(kl_divergence(UniformSteps(2), UniformSteps(4))) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="num_steps >= 1"):
        UniformSteps(0)
    with pytest.raises(ValueError):
        UniformSteps(4, validate_args=True).log_prob(torch.tensor(5))
