import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from probgen.data import load_dataset
from probgen.elbo import AnalyticKL_ELBO
from probgen.inference import ddpm_bits_per_dim, ddpm_nll, fit
from probgen.models import DDPM, build
from probgen.nets import MLP, UNet
from tests.common import assert_every_parameter_learns

MU = torch.tensor([1.0, -0.5])
CHOL = torch.tensor([[0.8, 0.0], [0.5, 0.4]])
COV = CHOL @ CHOL.T
BETAS4 = [0.05, 0.15, 0.3, 0.5]


class GaussianOracle(nn.Module):
    r"""The exact noise (or x0) predictor for data :math:`\mathcal N(\mu, \Sigma)`.

    :math:`x_t \sim \mathcal N(\sqrt{\bar\alpha} \mu, \bar\alpha \Sigma + (1 - \bar\alpha) I)`, so
    :math:`\hat\epsilon(x_t) = -\sqrt{1 - \bar\alpha}\, \nabla \log p(x_t)
    = \sqrt{1 - \bar\alpha}\, (\bar\alpha \Sigma + (1 - \bar\alpha) I)^{-1} (x_t - \sqrt{\bar\alpha} \mu)`
    and :math:`\hat x_0 = (x_t - \sqrt{1 - \bar\alpha}\, \hat\epsilon) / \sqrt{\bar\alpha}`.
    Follows DDPM's net contract: ``net(x, s)`` with ``s = t - 1``.
    """

    def __init__(self, mu, cov, alpha_bars, parameterization="eps"):
        super().__init__()
        self.register_buffer("mu", mu.float())
        self.register_buffer("cov", cov.float())
        self.register_buffer("alpha_bars", alpha_bars.float())
        self.parameterization = parameterization

    def forward(self, x, s):
        a = self.alpha_bars[torch.as_tensor(s).round().long()]
        a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))  # (B, 1) or a scalar as (1, 1)
        eye = torch.eye(x.shape[-1])
        cov_t = a.unsqueeze(-1) * self.cov + (1 - a.unsqueeze(-1)) * eye
        eps = (1 - a).sqrt() * torch.linalg.solve(cov_t, (x - a.sqrt() * self.mu).unsqueeze(-1)).squeeze(-1)
        return eps if self.parameterization == "eps" else (x - (1 - a).sqrt() * eps) / a.sqrt()


def oracle_ddpm(**kwargs):
    ddpm = DDPM(2, **kwargs)
    ddpm.net = GaussianOracle(MU, COV, ddpm.schedule.alpha_bars, ddpm.parameterization)
    return ddpm


def reverse_affine(ddpm, t):
    r"""The oracle's reverse mean :math:`\mu_\theta(x) = A x + b` at step t, in float64."""
    s = ddpm.schedule
    mu, cov, eye = MU.double(), COV.double(), torch.eye(2, dtype=torch.float64)
    a = s.alpha_bars[t - 1]
    m = (1 - a).sqrt() * torch.linalg.inv(a * cov + (1 - a) * eye)  # eps_hat = m (x - sqrt(a) mu)
    c = s.betas[t - 1] / (1 - a).sqrt()
    A = (eye - c * m) / s.alphas[t - 1].sqrt()
    b = c * m @ (a.sqrt() * mu) / s.alphas[t - 1].sqrt()
    return A, b


def perturbed_ddpm(seed=0, **kwargs):
    """A small DDPM whose (zero-initialized) MLP is perturbed so it predicts something nontrivial."""
    torch.manual_seed(seed)
    ddpm = DDPM(2, hidden=(16, 16), embed_dim=8, **kwargs)
    with torch.no_grad():
        for p in ddpm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ddpm


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) @ CHOL.T + MU


def _losses(elbo, model, guide, x, reps):
    with torch.no_grad(), pyro.validation_enabled(False):
        vals = [elbo.loss(model, guide, x) / x.shape[0] for _ in range(reps)]
    vals = torch.tensor(vals, dtype=torch.float64)
    return float(vals.mean()), float(vals.std()) / math.sqrt(reps)


# ----------------------------------------------------------------------------- the ELBO proof

CASES = [
    dict(parameterization="eps", variance="beta", decoder="gaussian"),
    dict(parameterization="x0", variance="beta_tilde", decoder="gaussian"),
    dict(parameterization="eps", variance="beta_tilde", decoder="discretized", num_levels=5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_one_step_estimator_averages_to_the_full_chain_elbo(case):
    ddpm = perturbed_ddpm(T=4, betas=BETAS4, **case)
    if case["decoder"] == "discretized":
        x = torch.randint(0, 5, (256, 2), generator=torch.Generator().manual_seed(1)).float()
    else:
        x = gaussian_data(256)
    torch.manual_seed(2)
    one_step = _losses(AnalyticKL_ELBO(), ddpm.model, ddpm.guide, x, 400)
    chain = _losses(Trace_ELBO(), ddpm.chain_model, ddpm.chain_guide, x, 400)
    # Independent estimates of the same number: within 4 standard errors of the difference of means.
    tol = 4 * math.hypot(one_step[1], chain[1])
    assert abs(one_step[0] - chain[0]) < tol, (one_step, chain)
    # L_simple reweights the terms: it is not the ELBO, and this comparison can tell.
    simple = perturbed_ddpm(T=4, betas=BETAS4, weighting="simple", **case)
    simple_value = _losses(AnalyticKL_ELBO(), simple.model, simple.guide, x, 400)
    assert abs(simple_value[0] - chain[0]) > 4 * math.hypot(simple_value[1], chain[1])


def test_simple_weighting_turns_the_kl_into_the_noise_squared_error():
    # sigma_t^2 = beta-tilde_t makes the constant c_t vanish: w_t KL = ||eps - eps_theta||^2 exactly (t > 1).
    ddpm = perturbed_ddpm(T=4, betas=BETAS4, weighting="simple", variance="beta_tilde")
    x = gaussian_data(64)
    t = torch.tensor([2, 3, 4, 2] * 16)
    data = {"t": t}
    guide_trace = poutine.trace(poutine.condition(ddpm.guide, data=data)).get_trace(x)
    model = poutine.replay(poutine.condition(ddpm.model, data=data), trace=guide_trace)
    model_trace = poutine.trace(model).get_trace(x)
    q, p = guide_trace.nodes["x_prev"], model_trace.nodes["x_prev"]
    weighted = q["scale"] * kl_divergence(q["fn"], p["fn"])
    x_t = guide_trace.nodes["x_t"]["value"]
    s = ddpm.schedule
    eps = (x_t - s.sqrt_alpha_bars[t - 1, None].float() * x) / s.sqrt_one_minus_alpha_bars[
        t - 1, None
    ].float()
    eps_hat = ddpm.predict(x_t, t)[0]
    torch.testing.assert_close(weighted, ((eps - eps_hat) ** 2).sum(-1), rtol=2e-4, atol=1e-4)


# ----------------------------------------------------------------------------- variational-bound NLL


def test_ddpm_nll_equals_the_analytic_bound_with_the_exact_predictor():
    ddpm = oracle_ddpm(T=4, betas=BETAS4)
    s, T, D = ddpm.schedule, 4, 2
    x0 = gaussian_data(6, seed=3).double()
    var = s.betas  # variance "beta"
    # Analytic E_{x_t}[L_{t-1}] per example: x_t = sqrt(a) x0 + sqrt(1 - a) eps, everything affine in eps.
    expected = 0.5 * (
        (s.alpha_bars[-1] * x0**2).sum(-1) + D * (1 - s.alpha_bars[-1] - 1 - (1 - s.alpha_bars[-1]).log())
    )
    for t in range(1, T + 1):
        A, b = reverse_affine(ddpm, t)
        a = s.alpha_bars[t - 1]
        if t == 1:  # L_0 = -log N(x0; A x_1 + b, sigma_1^2)
            diff_mean = x0 - (a.sqrt() * x0 @ A.T + b)
            diff_noise = -(1 - a).sqrt() * A
            const = 0.5 * D * math.log(2 * math.pi * float(var[0]))
        else:  # KL(N(mu-tilde, beta-tilde) || N(A x_t + b, sigma^2))
            c1, c2 = s.posterior_mean_coef1[t - 1], s.posterior_mean_coef2[t - 1]
            M = c2 * torch.eye(2, dtype=torch.float64) - A
            diff_mean = c1 * x0 + a.sqrt() * x0 @ M.T - b
            diff_noise = (1 - a).sqrt() * M
            ratio = s.posterior_variance[t - 1] / var[t - 1]
            const = 0.5 * D * (ratio - 1 - ratio.log())
        sq = (diff_mean**2).sum(-1) + (diff_noise**2).sum()
        expected = expected + const + sq / (2 * var[t - 1])
    reps = 2000
    nll = ddpm_nll(ddpm, x0.float().repeat(reps, 1), seed=0).double().reshape(reps, 6)
    se = nll.std(0) / math.sqrt(reps)
    # Each example's mean over reps within 4 standard errors of its exact expected bound.
    assert ((nll.mean(0) - expected).abs() < 4 * se + 1e-6).all(), (nll.mean(0), expected, se)


def test_ddpm_nll_is_the_negative_chain_elbo():
    ddpm = perturbed_ddpm(T=4, betas=BETAS4, variance="beta_tilde")
    x = gaussian_data(256)
    reps = 40
    nll = torch.stack([ddpm_nll(ddpm, x, seed=k).double().mean() for k in range(reps)])
    torch.manual_seed(5)
    chain = _losses(TraceMeanField_ELBO(), ddpm.chain_model, ddpm.chain_guide, x, 200)
    tol = 4 * math.hypot(float(nll.std()) / math.sqrt(reps), chain[1])
    assert abs(float(nll.mean()) - chain[0]) < tol, (float(nll.mean()), chain)


def test_ddpm_nll_shapes_batching_and_digits():
    ddpm = perturbed_ddpm(T=6, schedule="cosine")
    x = gaussian_data(10)
    for batch_size in (7, 1000):  # chunks of examples, one step at a time / all steps at once
        nll = ddpm_nll(ddpm, x, batch_size=batch_size, seed=3)
        assert nll.shape == (10,) and torch.isfinite(nll).all() and bool((nll > 0).all())
    torch.testing.assert_close(ddpm_nll(ddpm, x, seed=3), ddpm_nll(ddpm, x, seed=3))
    digits = load_dataset("digits", split="test", form="int")
    net = DDPM.from_data(digits, T=20, base_channels=8, embed_dim=16)
    nll = ddpm_nll(net, digits.x[:8], batch_size=64)
    bpd = ddpm_bits_per_dim(net, digits.x[:8], batch_size=64)
    assert nll.shape == (8,) and torch.isfinite(nll).all() and 0 < bpd < 100


# ----------------------------------------------------------------------------- programs and protocol


def test_training_programs_have_few_vectorized_sites():
    ddpm = perturbed_ddpm(T=10)
    x = gaussian_data(5)
    guide_trace = poutine.trace(ddpm.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(ddpm.model, trace=guide_trace)).get_trace(x)
    sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert sites == ["t", "x_T", "x_t", "x_prev", "x"]
    assert model_trace.nodes["t"]["value"].shape == (5,)
    for name in ("x_T", "x_t", "x_prev"):
        assert model_trace.nodes[name]["fn"].batch_shape == (5,)
        assert model_trace.nodes[name]["fn"].event_shape == (2,)
    t = model_trace.nodes["t"]["value"]
    assert torch.equal(model_trace.nodes["x"]["mask"], t == 1)
    assert torch.equal(guide_trace.nodes["x_prev"]["mask"], t > 1)
    assert model_trace.nodes["x"]["scale"] == 10.0
    # Identical auxiliary sites contribute exactly nothing.
    for name in ("t", "x_t"):
        assert (
            float(kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]).abs().sum())
            == 0
        )


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_loss_finite_and_gradients_reach_every_parameter(param):
    ddpm = perturbed_ddpm(T=50, parameterization=param, variance="beta_tilde")
    with pyro.validation_enabled(True):
        loss = ddpm.elbo().differentiable_loss(ddpm.model, ddpm.guide, gaussian_data(32))
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_learns(ddpm)


def test_sampling_through_the_model_and_predictive():
    ddpm = perturbed_ddpm(T=5, decoder="discretized", num_levels=7)
    samples = ddpm.sample(9)
    assert samples.shape == (9, 2)
    assert samples.min() >= 0 and samples.max() <= 6 and bool((samples == samples.round()).all())
    pred = Predictive(ddpm.model, num_samples=3, return_sites=["x", "x_5", "x_1"])(None, batch_size=4)
    assert pred["x"].shape == (3, 4, 2) and pred["x_5"].shape == (3, 4, 2)
    trace = poutine.trace(ddpm.model).get_trace(None, batch_size=2)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"] == [
        "x_5",
        "x_4",
        "x_3",
        "x_2",
        "x_1",
        "x",
    ]


def test_from_data_config_round_trip_and_nets():
    digits = load_dataset("digits", split="val", form="int")
    ddpm = DDPM.from_data(digits, T=10, base_channels=8, embed_dim=16)
    assert isinstance(ddpm.net, UNet) and ddpm.decoder == "discretized" and ddpm.num_levels == 17
    assert DDPM.data_form("digits") == "int" and DDPM.data_form("moons") == "int"
    moons = load_dataset("moons", split="val", form="int")
    toy = DDPM.from_data(moons, T=10, hidden=(8,), embed_dim=8)
    assert isinstance(toy.net, MLP) and toy.decoder == "gaussian"
    rebuilt = build("ddpm", **ddpm.config)
    assert set(rebuilt.state_dict()) == set(ddpm.state_dict())  # schedule tables are not saved
    rebuilt.load_state_dict(ddpm.state_dict())
    import json

    assert json.loads(json.dumps(ddpm.config)) == ddpm.config


def test_bad_input_gives_one_clear_error_each():
    with pytest.raises(ValueError, match=r"Expected betas in \(0, 1\), but found"):
        DDPM(2, T=3, betas=[0.1, 1.2, 0.3])
    with pytest.raises(ValueError, match=r"Expected T >= 1"):
        DDPM(2, T=0)
    with pytest.raises(ValueError, match=r"Expected 4 betas"):
        DDPM(2, T=4, betas=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"Expected schedule in"):
        DDPM(2, schedule="quadratic")
    with pytest.raises(ValueError, match=r"Expected an event_shape with 64 elements"):
        DDPM(64, event_shape=(1, 8, 7))
    ddpm = DDPM(64, event_shape=(1, 8, 8), T=5, decoder="discretized", base_channels=8, embed_dim=16)
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 64\)"):
        ddpm.check_data(torch.zeros(4, 63))
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 64\)"):
        ddpm.elbo().loss(ddpm.model, ddpm.guide, torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"Expected integer levels in \[0, 16\]"):
        ddpm.check_data(torch.full((2, 64), 17.0))
    with pytest.raises(ValueError, match=r"not all integers"):
        ddpm.check_data(torch.full((2, 64), 0.5))


def test_fit_smoke_on_digits_and_moons():
    digits = load_dataset("digits", split="train", form="int")
    moons = load_dataset("moons", split="train", form="int")
    for data, kwargs in (
        (digits, dict(T=100, base_channels=8, embed_dim=16)),
        (moons, dict(T=100, hidden=(32, 32), embed_dim=16)),
    ):
        torch.manual_seed(0)
        ddpm = DDPM.from_data(data, **kwargs)
        result = fit(ddpm, data.x[:256], steps=4, batch_size=32, log_every=1, progress=False, seed=0)
        losses = [v for _, v in result.history["train"]]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
        ddpm.train()
        ddpm.zero_grad()
        ddpm.elbo().differentiable_loss(ddpm.model, ddpm.guide, data.x[:64]).backward()
        assert_every_parameter_learns(ddpm)


def test_inspect_elbo_parts_equal_the_training_estimator():
    import pyro

    from probgen.inference import inspect_trace
    from probgen.models import DDPM

    torch.manual_seed(0)
    ddpm = DDPM(2, T=6, schedule="cosine", hidden=(16,), embed_dim=16)
    x = torch.randn(32, 2)
    report = inspect_trace(ddpm, x, seed=4)
    torch.manual_seed(4)
    with pyro.validation_enabled(False):
        loss = ddpm.elbo().loss(ddpm.model, ddpm.guide, x)
    assert abs(report.elbo_parts["ELBO (analytic KL)"] + loss / 32) < 1e-4 * max(1.0, abs(loss / 32))


def test_a_checkpoint_of_another_method_is_one_clear_error(tmp_path):
    from probgen.checkpoint import CheckpointError, save_checkpoint
    from probgen.models import VAE, load_method

    vae = VAE(4, likelihood="gaussian", hidden=(8,), latent_dim=2)
    save_checkpoint(
        tmp_path,
        "best",
        {f"model.{k}": v for k, v in vae.state_dict().items()},
        {"method": "vae", "config": vae.config},
    )
    with pytest.raises(CheckpointError, match="Expected a checkpoint of method 'ddpm', but found 'vae'"):
        load_method(tmp_path, expected="ddpm")
    method, _ = load_method(tmp_path, expected="vae")
    assert isinstance(method, VAE)
