"""Score matching programs: analytic oracles on Gaussian data with a linear score model.

For data :math:`\\mathcal N(\\mu, \\Sigma)` and :math:`s(x) = A x + b`, every quantity is a closed
form: the Fisher divergence :math:`F(A, b) = \\tfrac12 \\mathbb E \\lVert (A + P) x + b - P\\mu \\rVert^2`
with :math:`P = \\Sigma^{-1}`, Hyvärinen's constant :math:`C = \\tfrac12 \\operatorname{tr} P`, the
expected gradients of every objective, and the optimum :math:`A = -P`, :math:`b = P\\mu` (for DSM
the same with :math:`\\Sigma + \\sigma^2 I`).
"""

import json
import math

import pytest
import torch
from pyro import poutine
from torch import nn

from probgen.data import load_dataset
from probgen.elbo import AnalyticKL_ELBO
from probgen.inference import elbo_per_example, fit
from probgen.models.base import build, load_method
from probgen.models.score_matching import (
    OBJECTIVES,
    ScoreMatching,
    hyvarinen_term,
    langevin_chain,
    sliced_term,
)
from tests.common import assert_close, mc_tolerance

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
CHOL = torch.tensor([[0.8, 0.0], [0.5, 0.4]], dtype=torch.float64)
COV = CHOL @ CHOL.T
SIGMA = 0.5  # the DSM noise level in these tests
LOG_2PI = math.log(2 * math.pi)


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) @ CHOL.T + MU).float()


def linear_method(objective, A, b, **kwargs):
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(A))
        net.bias.copy_(torch.as_tensor(b))
    return ScoreMatching(2, objective=objective, sigma=SIGMA, net=net, **kwargs)


def target_cov(objective):
    """Covariance of the density whose score the objective targets (perturbed for DSM)."""
    return COV + SIGMA**2 * torch.eye(2, dtype=torch.float64) if objective == "dsm" else COV


def fisher(A, b, cov):
    r"""Exact :math:`\tfrac12 \mathbb E_{\mathcal N(\mu, cov)} \lVert A x + b - \nabla \log p(x) \rVert^2`."""
    P = torch.linalg.inv(cov)
    M, c = A + P, b - P @ MU
    return 0.5 * (torch.trace(M @ cov @ M.T) + (M @ MU + c).pow(2).sum())


def per_example(method, x, seed):
    """The per-example objective from a trace: -log_prob of "fisher", or of "eps" minus its normalizer."""
    torch.manual_seed(seed)
    guide = poutine.trace(method.guide).get_trace(x)
    trace = poutine.trace(poutine.replay(method.model, trace=guide)).get_trace(x)
    trace.compute_log_prob()
    if method.score_objective == "dsm":
        return -trace.nodes["eps"]["log_prob"].detach().double() - 0.5 * x.shape[1] * LOG_2PI
    return -trace.nodes["fisher"]["log_prob"].detach().double()


THETA1 = (torch.tensor([[-1.0, 0.3], [0.2, -2.0]]), torch.tensor([0.5, -0.1]))
THETA2 = (torch.tensor([[0.4, -0.6], [0.1, 0.7]]), torch.tensor([-0.3, 0.8]))


def test_hyvarinen_term_is_trace_plus_half_squared_norm_exactly():
    A, b = THETA1
    sm = linear_method("implicit", A, b)
    x = gaussian_data(64)
    expected = torch.trace(A) + 0.5 * (x @ A.T + b).pow(2).sum(-1)
    assert_close(hyvarinen_term(sm.score, x), expected, atol=1e-5)
    # The term keeps its graph under no_grad (validation runs there).
    with torch.no_grad():
        assert hyvarinen_term(sm.score, x).requires_grad


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_is_the_fisher_divergence_up_to_a_constant(objective):
    # E[objective(theta)] = F(theta) + C: compared at two settings and as the difference (common
    # random numbers). MC error: std of the per-example values over N = 20000, z = 4.
    x = gaussian_data(20000, seed=1)
    cov = target_cov(objective)
    P = torch.linalg.inv(cov)
    l1 = per_example(linear_method(objective, *THETA1), x, seed=2)
    l2 = per_example(linear_method(objective, *THETA2), x, seed=2)
    f1, f2 = (fisher(A.double(), b.double(), cov) for A, b in (THETA1, THETA2))
    if objective == "dsm":
        # Vincent 2011: sigma^2 [F_sigma + D / (2 sigma^2) - tr(P_sigma) / 2] (the observed site's weight).
        const = 1.0 - 0.5 * SIGMA**2 * torch.trace(P)
        f1, f2 = SIGMA**2 * f1, SIGMA**2 * f2
    else:
        const = -0.5 * torch.trace(P)  # Hyvarinen: minus half the expected squared true score
    n = x.shape[0]
    d = l1 - l2
    assert abs(float(d.mean() - (f1 - f2))) < mc_tolerance(float(d.std()), n)
    assert abs(float(l1.mean() - (f1 + const))) < mc_tolerance(float(l1.std()), n)


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduced", [False, True])
def test_sliced_terms_are_unbiased_for_the_implicit_term(projection, variance_reduced):
    # Per point: mean over M = 20000 single projections vs the exact term; MC error from the
    # projections' std per point, z = 4.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 2))
    x = gaussian_data(6, seed=3)
    exact = hyvarinen_term(net, x).detach()
    m = 20000
    v = torch.randn(6 * m, 1, 2)
    v = v.sign() if projection == "rademacher" else v
    values = sliced_term(net, x.repeat_interleave(m, 0), v, variance_reduced=variance_reduced).detach()
    values = values.reshape(6, m)
    for i in range(6):
        tol = mc_tolerance(float(values[i].std()), m)
        assert abs(float(values[i].mean() - exact[i])) < tol, (i, float(values[i].mean()), float(exact[i]))
    # Averaging M projections inside one call is the same estimator.
    v2 = v.reshape(6, m, 2)[:, :50]
    averaged = sliced_term(net, x, v2, variance_reduced=variance_reduced)
    assert_close(averaged, values[:, :50].mean(1), atol=1e-4)


def test_dsm_observed_site_is_the_weighted_dsm_loss_exactly():
    torch.manual_seed(0)
    sm = ScoreMatching(2, objective="dsm", sigma=SIGMA, hidden=(16,))
    x = gaussian_data(32)
    guide = poutine.trace(sm.guide).get_trace(x)
    trace = poutine.trace(poutine.replay(sm.model, trace=guide)).get_trace(x)
    trace.compute_log_prob()
    x_tilde = trace.nodes["x_tilde"]["value"]
    assert torch.equal(x_tilde, guide.nodes["x_tilde"]["value"]) and trace.nodes["eps"]["is_observed"]
    s = sm.score(x_tilde)
    expected = -0.5 * SIGMA**2 * (s + (x_tilde - x) / SIGMA**2).pow(2).sum(-1) - LOG_2PI
    assert_close(trace.nodes["eps"]["log_prob"], expected, atol=1e-5)
    # And the ELBO of the pair is exactly that, summed: the x_tilde KL is 0.
    torch.manual_seed(5)
    loss = AnalyticKL_ELBO().differentiable_loss(sm.model, sm.guide, x)
    torch.manual_seed(5)
    x_tilde = poutine.trace(sm.guide).get_trace(x).nodes["x_tilde"]["value"]
    s = sm.score(x_tilde)
    expected = (0.5 * SIGMA**2 * (s + (x_tilde - x) / SIGMA**2).pow(2).sum(-1) + LOG_2PI).sum()
    assert_close(loss, expected, atol=1e-4)


def expected_gradient(objective, A, b):
    """Closed-form expected gradient of the per-example objective in (A, b) under N(mu, Sigma)."""
    A, b = A.double(), b.double()
    eye = torch.eye(2, dtype=torch.float64)
    if objective == "dsm":
        s2 = COV + SIGMA**2 * eye + torch.outer(MU, MU)  # E[x~ x~^T]; E[(x~ - x) x~^T] = sigma^2 I
        return SIGMA**2 * (A @ s2 + torch.outer(b, MU) + eye), SIGMA**2 * (A @ MU + b)
    s2 = COV + torch.outer(MU, MU)
    return eye + A @ s2 + torch.outer(b, MU), A @ MU + b


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_expected_gradient_vanishes_at_the_true_score_and_matches_elsewhere(objective):
    # Gradients of the Pyro loss on K = 64 groups of 128 points; their mean is compared with the
    # closed form, with MC error std(groups) / sqrt(K), z = 4.5 (t with 63 dof: p ~ 3e-5 per entry).
    P = torch.linalg.inv(target_cov(objective)).float()
    optimum = (-P, P @ MU.float())
    x = gaussian_data(64 * 128, seed=4)
    for A, b in (optimum, THETA1):
        method = linear_method(objective, A, b)
        torch.manual_seed(6)
        grads = []
        for chunk in x.split(128):
            method.zero_grad()
            (AnalyticKL_ELBO().differentiable_loss(method.model, method.guide, chunk) / 128).backward()
            grads.append(torch.cat([method.net.weight.grad.flatten(), method.net.bias.grad]).double())
        grads = torch.stack(grads)
        gA, gb = expected_gradient(objective, A, b)
        expected = torch.cat([gA.flatten(), gb])
        tol = 4.5 * grads.std(0) / math.sqrt(grads.shape[0])
        assert bool(((grads.mean(0) - expected).abs() < tol).all()), (grads.mean(0), expected, tol)
    assert expected.abs().max() > 10 * tol.max()  # the second setting is far from the optimum


def test_validation_loss_works_under_no_grad():
    sm = ScoreMatching(2, objective="implicit", hidden=(8,))
    value = elbo_per_example(sm, gaussian_data(50))
    assert math.isfinite(value)


def test_langevin_chain_sites_and_sampling():
    sm = ScoreMatching(2, objective="dsm", hidden=(8,), num_steps=3, init_low=-1.0, init_high=2.0)
    trace = poutine.trace(sm.model).get_trace(None, batch_size=5)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names == ["data", "x_init", "x_1_1", "x_1_2", "x_1_3", "x"]
    assert trace.nodes["x"]["value"].shape == (5, 2)
    x0 = trace.nodes["x_init"]["value"]
    assert bool(((x0 >= -1) & (x0 <= 2)).all())
    assert sm.sample(7).shape == (7, 2)
    # One step of the chain with an affine score is the Gaussian x + a/2 s(x) + sqrt(a) z.
    score = lambda x, sigma: -x  # noqa: E731
    x = torch.zeros(4000, 2) + 1.0
    out = (
        poutine.trace(langevin_chain)
        .get_trace(score, x, torch.tensor([1.0]), torch.tensor([0.5]), 1)
        .nodes["x_1_1"]["value"]
    )
    assert abs(float(out.mean()) - 0.75) < mc_tolerance(math.sqrt(0.5), out.numel())
    assert abs(float(out.var()) - 0.5) < mc_tolerance(0.5 * math.sqrt(2), out.numel())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradients_reach_every_parameter(objective):
    torch.manual_seed(0)
    sm = ScoreMatching(2, objective=objective, hidden=(8, 8), num_projections=2)
    AnalyticKL_ELBO().differentiable_loss(sm.model, sm.guide, gaussian_data(16)).backward()
    for name, p in sm.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_from_data_config_round_trip_fit_and_load(tmp_path):
    moons = load_dataset("moons", split="val")
    sm = ScoreMatching.from_data(moons, objective="sliced", hidden=(16,), num_steps=5)
    assert sm.config["init_low"] == float(moons.x.min()) and sm.config["init_high"] == float(moons.x.max())
    assert json.loads(json.dumps(sm.config)) == sm.config
    assert ScoreMatching.data_form("digits") == "dequantized" and ScoreMatching.data_form("moons") == "int"
    result = fit(
        sm,
        moons.x,
        steps=30,
        batch_size=64,
        run_dir=tmp_path,
        progress=False,
    )
    assert result.step == 30
    loaded, meta = load_method(tmp_path, expected="score-matching")
    rebuilt = build("score-matching", **sm.config)
    assert set(rebuilt.state_dict()) == set(sm.state_dict())
    x = moons.x[:10]
    assert_close(loaded.score(x), sm.score(x))
    with pytest.raises(ValueError, match=r"Expected objective in"):
        ScoreMatching(2, objective="exact")
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 2\)"):
        sm.check_data(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Expected finite data"):
        sm.check_data(torch.full((3, 2), float("nan")))
