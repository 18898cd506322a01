"""Discrete Langevin (DULA / DMALA): the proposal against brute force, moments against enumeration.

Vectorized tests run C independent chains through a batched ``potential_fn``; the standard error
of a time average is the spread of the C chain means over sqrt(C). Tolerances are Z = 4 standard
errors (55 comparisons on the Ising model: a false alarm has probability about 55 * 6e-5 = 0.3%).
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from probgen.inference.discrete_langevin import DMALA, DULA, dlp_proposal
from tests.common import run_chains

Z = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chain_mean_estimate(features):
    """features (C, T, ...) -> (estimate, standard error) from C independent chains."""
    chain_means = features.mean(1)
    return chain_means.mean(0), chain_means.std(0) / math.sqrt(features.shape[0])


def assert_within(estimate, se, exact, z=Z):
    excess = (estimate - exact).abs() - z * se
    assert (excess <= 1e-12).all(), f"max excess {excess.max()}: estimate {estimate} vs exact {exact}"


def random_ising(d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    couplings = torch.triu(0.3 * torch.randn(d, d, generator=g), 1)
    return couplings + couplings.T, 0.3 * torch.randn(d, generator=g)


def ising_exact(J, h):
    """Exact E[s] (D,) and E[s s^T] (D, D) by enumerating all 2^D spin states."""
    s = 2 * torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(h)))) - 1
    p = torch.softmax(0.5 * torch.einsum("ni,ij,nj->n", s, J, s) + s @ h, 0)
    return p @ s, torch.einsum("n,ni,nj->ij", p, s, s)


def test_dlp_proposal_factorizes_the_joint_softmax():
    # Zhang et al. 2022, Eq. (3): q(x'|x) ∝ exp(1/2 grad f(x) . (x' - x) - |x' - x|^2 / (2 alpha)) over
    # all joint states x' (binary "b" of size 3, one-hot "c" of 2 coordinates x 3 categories).
    g = torch.Generator().manual_seed(0)
    alpha = 0.7
    b, c = torch.tensor([1.0, 0.0, 1.0]), torch.eye(3)[[2, 0]]
    grad_b, grad_c = torch.randn(3, generator=g), torch.randn(2, 3, generator=g)  # grad of U = -f
    states = [
        (torch.tensor(bits), torch.eye(3)[list(cats)])
        for bits in itertools.product([0.0, 1.0], repeat=3)
        for cats in itertools.product(range(3), repeat=2)
    ]
    logits = torch.stack(
        [
            0.5 * (-(grad_b * (b2 - b)).sum() - (grad_c * (c2 - c)).sum())
            - (((b2 - b) ** 2).sum() + ((c2 - c) ** 2).sum()) / (2 * alpha)
            for b2, c2 in states
        ]
    )
    brute_force = torch.log_softmax(logits, 0)
    q_b, q_c = dlp_proposal(b, grad_b, alpha), dlp_proposal(c, grad_c, alpha, one_hot=True)
    factorized = torch.stack([q_b.log_prob(b2).sum() + q_c.log_prob(c2).sum() for b2, c2 in states])
    torch.testing.assert_close(factorized, brute_force, atol=1e-5, rtol=0)


def test_dmala_ising_matches_enumerated_marginals_and_correlations():
    J, h = random_ising()
    mean_exact, corr_exact = ising_exact(J, h)

    def potential(z):  # z["b"]: (C, D) in {0, 1}
        s = 2 * z["b"] - 1
        return -(0.5 * torch.einsum("ci,ij,cj->c", s, J, s) + s @ h)

    pyro.set_rng_seed(0)
    C = 1000
    kernel = DMALA(potential_fn=potential, step_size=0.5)
    b = run_chains(kernel, {"b": torch.bernoulli(torch.full((C, 10), 0.5))}, warmup=100, num_samples=300)["b"]
    s = 2 * b - 1
    mean, mean_se = chain_mean_estimate(s)  # se about 0.01
    assert_within(mean, mean_se, mean_exact)
    corr, corr_se = chain_mean_estimate(torch.einsum("cti,ctj->ctij", s, s))
    off_diagonal = ~torch.eye(10, dtype=torch.bool)
    assert_within(corr[off_diagonal], corr_se[off_diagonal], corr_exact[off_diagonal])
    assert 0.3 < kernel.diagnostics()["acceptance rate"] < 1  # the chains do move (0.68 at this step)


def test_dmala_potts_one_hot_sites_match_enumeration():
    # Three 3-state sites with pairwise couplings W[i, k, j, l] and fields; 27 states enumerated.
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 3, 3, 3, generator=g)
    W = 0.5 * (W + W.permute(2, 3, 0, 1))
    W[range(3), :, range(3), :] = 0.0
    fields = torch.randn(3, 3, generator=g)

    def log_f(x):  # x: (..., 3, 3) one-hot
        return 0.5 * torch.einsum("...ik,ikjl,...jl->...", x, W, x) + (x * fields).sum((-1, -2))

    states = torch.stack([torch.eye(3)[list(k)] for k in itertools.product(range(3), repeat=3)])
    marginals_exact = torch.einsum("n,nik->ik", torch.softmax(log_f(states), 0), states)
    pyro.set_rng_seed(1)
    C = 1000
    init = torch.eye(3)[torch.randint(3, (C, 3))]
    kernel = DMALA(potential_fn=lambda z: -log_f(z["x"]), step_size=1.0, one_hot_sites=["x"])
    x = run_chains(kernel, {"x": init}, warmup=100, num_samples=200)["x"]
    assert ((x == 0) | (x == 1)).all() and (x.sum(-1) == 1).all()
    marginals, se = chain_mean_estimate(x)
    assert_within(marginals, se, marginals_exact)


def test_dula_stationary_marginal_is_the_closed_form_and_bias_shrinks_with_step():
    # Independent bits, f = l . x: each bit is a two-state chain with flip probabilities
    # p01 = sigmoid(l/2 - 1/(2 alpha)) and p10 = sigmoid(-l/2 - 1/(2 alpha)), so DULA's marginal is
    # p01 / (p01 + p10); the target sigmoid(l) is reached as alpha -> 0.
    logits = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    errors = []
    for alpha in (2.0, 0.3):
        p01 = torch.sigmoid(0.5 * logits - 0.5 / alpha)
        p10 = torch.sigmoid(-0.5 * logits - 0.5 / alpha)
        pyro.set_rng_seed(2)
        C = 2000
        kernel = DULA(potential_fn=lambda z: -(z["b"] * logits).sum(-1), step_size=alpha)
        b = run_chains(kernel, {"b": torch.bernoulli(torch.full((C, 4), 0.5))}, 50, 200)["b"]
        marginal, se = chain_mean_estimate(b)  # se at most about 0.006
        assert_within(marginal, se, p01 / (p01 + p10))
        errors.append(((marginal - torch.sigmoid(logits)).abs().max(), se.max()))
    (big, big_se), (small, small_se) = errors
    assert big - small > Z * math.hypot(big_se, small_se), errors  # exact errors 0.13 and 0.04


def ising_model(J, h):
    b = pyro.sample("b", dist.Bernoulli(torch.full(h.shape, 0.5)).to_event(1))
    s = 2 * b - 1
    pyro.factor("ising", 0.5 * s @ J @ s + h @ s)


def potts_model(W, logits):
    x = pyro.sample("x", dist.OneHotCategorical(logits=logits).to_event(1))
    pyro.factor("pairs", 0.5 * torch.einsum("ik,ikjl,jl->", x, W, x))


def test_model_potential_and_gradient_are_the_papers_differentiable_extension():
    J, h = random_ising(d=5)
    kernel = DMALA(ising_model)
    kernel.setup(0, J, h)
    b = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    s = 2 * b - 1
    potential, grads = kernel._potential_and_grad({"b": b})
    torch.testing.assert_close(potential, -(0.5 * s @ J @ s + h @ s) + 5 * math.log(2))
    torch.testing.assert_close(grads["b"], -2 * (J @ s + h))
    # One-hot sites: the prior term is linear in the value, x . log p, so it enters the gradient.
    g = torch.Generator().manual_seed(3)
    W, logits = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, generator=g)
    W = 0.5 * (W + W.permute(2, 3, 0, 1))
    kernel = DMALA(potts_model)
    kernel.setup(0, W, logits)
    x = torch.eye(3)[[2, 0]]
    potential, grads = kernel._potential_and_grad({"x": x})
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(potential, -((x * log_p).sum() + 0.5 * torch.einsum("ik,ikjl,jl->", x, W, x)))
    torch.testing.assert_close(grads["x"], -(log_p + torch.einsum("ikjl,jl->ik", W, x)))


def test_dmala_on_a_pyro_ising_model_under_mcmc_matches_enumeration(capsys):
    J, h = random_ising(d=8, seed=4)
    mean_exact, _ = ising_exact(J, h)
    pyro.set_rng_seed(4)
    mcmc = MCMC(DMALA(ising_model, step_size=0.5), num_samples=1500, warmup_steps=100, disable_progbar=True)
    mcmc.run(J, h)
    s = 2 * mcmc.get_samples()["b"] - 1  # (T, D)
    se = s.std(0) / effective_sample_size(s[None]).sqrt()  # about 0.03
    assert_within(s.mean(0), se, mean_exact)
    assert 0 < mcmc.diagnostics()["acceptance rate"]["chain 0"] < 1
    mcmc.summary()
    assert "r_hat" in capsys.readouterr().out


def test_bad_models_and_arguments_raise():
    def categorical_model():
        pyro.sample("k", dist.Categorical(logits=torch.zeros(3)))

    def continuous_model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="Expected Bernoulli or OneHotCategorical latent sites"):
        DMALA(categorical_model).setup(0)
    with pytest.raises(ValueError, match="but found Normal"):
        DULA(continuous_model).setup(0)
    with pytest.raises(ValueError, match="Expected step_size to be a positive finite number"):
        DMALA(ising_model, step_size=-1.0)
    with pytest.raises(ValueError, match="Expected adapt_step_size=False for the unadjusted DULA"):
        DULA(ising_model, adapt_step_size=True)
    with pytest.raises(ValueError, match="Expected one_hot_sites to be a collection of names"):
        DMALA(potential_fn=lambda z: z["x"].sum(), one_hot_sites="x")
    kernel = DMALA(potential_fn=lambda z: z["x"].sum(), one_hot_sites=["y"])
    kernel.initial_params = {"x": torch.zeros(3)}
    with pytest.raises(ValueError, match="Expected one_hot_sites among"):
        kernel.setup(0)
