"""score-sde samplers and likelihood, inpainting by replacement and SMC, the distribution wrapper."""

import math

import pyro
import pytest
import torch
from pyro import poutine

import probgen.inference.conditioning  # noqa: F401  (imports the registrations too)
from probgen.apps.evaluate import log_likelihood
from probgen.inference.conditioning import ScoreSDEDistribution, inpaint
from probgen.inference.sampling import draw_samples, samplers_for
from probgen.inference.score_sde_sampling import ode_likelihood, sample_score_sde
from probgen.models.score_sde import ScoreSDE
from probgen.sdes import VESDE, VPSDE
from tests.common import assert_close, mc_tolerance

RHO, Y = 0.8, 1.5
COV = torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64)  # zero-mean data N(0, COV)
EYE = torch.eye(2, dtype=torch.float64)


def marginal_cov(sde, t):
    m, s = sde.marginal_params(torch.as_tensor(t, dtype=torch.float64))
    return m**2 * COV + s**2 * EYE


def exact_score(sde):
    """The score of p_t = N(0, m^2 COV + s^2 I) (closed-form 2x2 inverse), for any dtype."""

    def score(x, t):
        m, s = sde.marginal_params(t.to(x.dtype))
        a, b, d = (m**2 * COV[i, j].item() + s**2 * (i == j) for i, j in ((0, 0), (0, 1), (1, 1)))
        inv = torch.stack([d * x[:, 0] - b * x[:, 1], a * x[:, 1] - b * x[:, 0]], -1)
        return -inv / (a * d - b * b)[:, None]

    return score


def gaussian_log_prob(x, cov):
    return torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(x)


def exact_method(**kwargs):
    method = ScoreSDE(2, hidden=(8,), embed_dim=4, **kwargs).double()
    method.score = exact_score(method.sde_object)
    return method


def test_samplers_are_declared_and_reproducible():
    assert set(samplers_for(ScoreSDE)) == {"ancestral", "em", "pc", "ode"}
    torch.manual_seed(0)
    method = ScoreSDE(2, hidden=(8,), embed_dim=4, sample_steps=3)
    torch.nn.init.normal_(method.net.out.weight)  # a zero score would make the corrector's step infinite
    cases = [("em", 4, {}), ("pc", 40, {"snr": 0.1, "corrector_steps": 2}), ("ode", None, {"rtol": 1e-3})]
    cases += [("ode", 5, {"solver": "rk4"}), ("ancestral", None, {})]
    for name, steps, options in cases:
        a = draw_samples(method, 6, sampler=name, steps=steps, seed=1, options=options)
        b = draw_samples(method, 6, sampler=name, steps=steps, seed=1, options=options)
        assert a.shape == (6, 2) and torch.equal(a, b) and bool(torch.isfinite(a).all()), name
    with pytest.raises(
        ValueError,
        match=r"Expected knobs of the 'em' sampler \(steps, solver, eps, denoise\), but found unknown .*snr",
    ):
        draw_samples(method, 2, sampler="em", options={"snr": 0.1})
    with pytest.raises(ValueError, match=r"Expected no steps for the adaptive ODE solver"):
        draw_samples(method, 2, sampler="ode", steps=10)
    with pytest.raises(
        ValueError, match=r"Expected knobs of the 'pc' sampler \(steps, predictor, .*\['eta'\]"
    ):
        draw_samples(method, 2, sampler="pc", eta=0.5)
    with pytest.raises(ValueError, match=r"Expected sampler in"):
        sample_score_sde(method.sde_object, method.score, 2, 2, sampler="ddim")


@pytest.mark.parametrize("name", ["em", "ode"])
def test_registered_samplers_follow_the_exact_score(name):
    # With the exact score the samples follow N(0, COV) up to the discretization and the tiny p_eps noise;
    # MC error of N = 2000 samples: per-entry std, z = 4.
    method = exact_method(sde="vp")
    options = {"rtol": 1e-4, "atol": 1e-4} if name == "ode" else {}
    x = draw_samples(method, 2000, sampler=name, steps=100 if name == "em" else None, seed=0, options=options)
    n = x.shape[0]
    assert bool((x.mean(0).abs() < 4 * (COV.diagonal() / n).sqrt()).all()), x.mean(0)
    for j, k in ((0, 0), (0, 1), (1, 1)):
        prod = x[:, j] * x[:, k]
        assert abs(float(prod.mean()) - float(COV[j, k])) < mc_tolerance(float(prod.std()), n), (j, k)


def test_registered_likelihood_is_the_ode_log_density():
    method = exact_method(sde="vp")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ll, desc = log_likelihood(method, x, num_samples=1, seed=0)
    assert (
        ll.shape == (6,) and "probability-flow ODE" in desc and "NFE" in desc and "exact divergence" in desc
    )
    # Up to the solver's tolerance and the prior's mismatch with p_T (|m_T| = e^-5 here: < 1e-3 nats).
    assert_close(ll, gaussian_log_prob(x, marginal_cov(method.sde_object, method.sde_object.eps)), atol=1e-3)
    big = torch.randn(3, 20, dtype=torch.float64)
    _, _, desc = ode_likelihood(VPSDE(), lambda x, t: -x, big, rtol=1e-3, atol=1e-3)
    assert "Hutchinson" in desc  # D > 16


def replacement_moments(sde, steps):
    """Exact mean and variance of inpaint(particles=1)'s u for the Gaussian: a linear recursion in (u, k)."""
    ts = torch.linspace(sde.T, sde.eps, steps + 1, dtype=torch.float64)
    dt = (sde.T - sde.eps) / steps
    m_T, s_T = sde.marginal_params(ts[0])
    mean, C = (
        torch.tensor([0.0, float(m_T) * Y], dtype=torch.float64),
        torch.diag(torch.tensor([sde.prior_std**2, float(s_T) ** 2], dtype=torch.float64)),
    )
    for i in range(steps):
        a, g2 = sde.drift_coef(ts[i]), sde.diffusion(ts[i]) ** 2  # Euler-Maruyama of the reverse SDE
        A = EYE - (a * EYE + g2 * torch.linalg.inv(marginal_cov(sde, ts[i]))) * dt
        (m_s, m_t), (sd_s, sd_t) = sde.marginal_params(ts[i : i + 2].flip(0))
        r = m_t / m_s
        v = sd_t**2 - r**2 * sd_s**2
        var = 1 / (1 / sd_s**2 + r**2 / v)
        M = torch.stack([A[0], torch.tensor([0.0, float(var * r / v)], dtype=torch.float64)])
        shift = torch.tensor([0.0, float(var * m_s / sd_s**2) * Y], dtype=torch.float64)
        mean, C = M @ mean + shift, M @ C @ M.T + torch.diag(torch.stack([g2 * dt, var]))
    m, s = sde.marginal_params(ts[-1])
    row = ((EYE - s**2 * torch.linalg.inv(marginal_cov(sde, ts[-1]))) / m)[0]
    return float(row @ mean), float(row @ C @ row)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=5.0)], ids=["vp", "ve"])
def test_replacement_inpainting_has_the_moments_of_its_recursion_and_is_biased(sde):
    # Known coordinate k = Y; the unknown u given k has the exact law N(RHO Y, 1 - RHO^2) = N(1.2, 0.36).
    # particles=1 is linear-Gaussian: MC (N = 10000, z = 4) against its exact recursion; and that
    # recursion is far from the exact conditional: the replacement method's bias (module docstring).
    n, steps = 10000, 50
    y = torch.tensor([[0.0, Y]], dtype=torch.float64).expand(n, 2)
    mask = torch.tensor([False, True])
    out = inpaint(sde, exact_score(sde), y, mask, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 1], y[:, 1])
    u = out[:, 0]
    mean, var = replacement_moments(sde, steps)
    assert abs(float(u.mean()) - mean) < mc_tolerance(math.sqrt(var), n)
    assert abs(float(u.var()) - var) < 4 * var * math.sqrt(2 / (n - 1))
    assert abs(mean - RHO * Y) > 0.3 and var > 1.2 * (1 - RHO**2)


def test_smc_inpainting_recovers_the_exact_conditional():
    # 32 particles per row, N = 1500 independent rows, VP with 50 steps. MC standard errors of the
    # mean sqrt(0.36 / N) and of the variance 0.36 sqrt(2 / N); z = 4. (particles=1 gives mean 0.75;
    # with 8000 rows these settings gave mean 1.180 +- 0.007 and variance 0.378: the SMC and
    # discretization biases are a third of the tolerance.)
    n, sde = 1500, VPSDE()
    y = torch.tensor([[0.0, Y]], dtype=torch.float64).expand(n, 2)
    mask = torch.tensor([False, True])
    g = torch.Generator().manual_seed(1)
    out = inpaint(sde, exact_score(sde), y, mask, steps=50, particles=32, generator=g)
    u, var = out[:, 0], 1 - RHO**2
    assert abs(float(u.mean()) - RHO * Y) < mc_tolerance(math.sqrt(var), n), float(u.mean())
    assert abs(float(u.var()) - var) < 4 * var * math.sqrt(2 / (n - 1)), float(u.var())


def test_inpainting_validates_its_inputs():
    sde, y = VPSDE(), torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"Expected a bool mask of shape \(2,\) or \(3, 2\)"):
        inpaint(sde, exact_score(sde), y, torch.ones(2))
    with pytest.raises(ValueError, match=r"Expected particles >= 1"):
        inpaint(sde, exact_score(sde), y, torch.tensor([True, False]), particles=0)
    out = inpaint(sde, exact_score(sde), y, torch.tensor([[True, False]] * 3), steps=3, particles=2)
    assert out.shape == (3, 2) and bool((out[:, 0] == 0).all())


def test_distribution_is_a_pyro_site_with_the_ode_log_density():
    sde = VPSDE()
    prior_T = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=torch.float64), marginal_cov(sde, 1.0)
    )
    # The exact p_T as the prior, tight tolerances: what is left is the solver's error (< 1e-5 nats).
    d = ScoreSDEDistribution(
        (sde, exact_score(sde), 2),
        sampler="ode",
        likelihood_options={"prior_log_prob": prior_T.log_prob, "rtol": 1e-7, "atol": 1e-7},
    )
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def program(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", d, obs=x)

    with pyro.validation_enabled(True):
        trace = poutine.trace(program).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["is_observed"] and site["fn"].batch_shape == (5,) and site["fn"].event_shape == (2,)
    assert_close(site["log_prob"], gaussian_log_prob(x, marginal_cov(sde, sde.eps)), atol=1e-5)
    torch.manual_seed(0)
    draws = d.sample((3, 4))
    assert draws.shape == (3, 4, 2) and draws.dtype == torch.get_default_dtype()
    expanded = d.expand((7,))
    assert expanded.batch_shape == (7,) and expanded.log_prob(x[:1]).shape == (7,)


def test_distribution_wraps_a_trained_method_and_samples_in_a_program():
    torch.manual_seed(0)
    method = ScoreSDE(2, hidden=(8,), embed_dim=4)

    def program():
        with pyro.plate("data", 3):
            return pyro.sample("x", ScoreSDEDistribution(method, sampler="em", steps=5))

    trace = poutine.trace(program).get_trace()
    assert trace.nodes["x"]["value"].shape == (3, 2)
    trace.compute_log_prob()  # the ODE likelihood of its own draws
    assert trace.nodes["x"]["log_prob"].shape == (3,) and bool(
        torch.isfinite(trace.nodes["x"]["log_prob"]).all()
    )
    with pytest.raises(ValueError, match=r"Expected sampler in"):
        ScoreSDEDistribution(method, sampler="ddim")
    with pytest.raises(ValueError, match=r"Expected a tuple \(sde, score_fn, D\)"):
        ScoreSDEDistribution((VPSDE(), exact_score(VPSDE())))
