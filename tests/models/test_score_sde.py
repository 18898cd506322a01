"""ScoreSDE: the weighted continuous-time DSM program, importance-sampled time, the sampling chain."""

import json
import math

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import integrate
from torch import nn

from probgen.data import load_dataset
from probgen.elbo import AnalyticKL_ELBO
from probgen.inference import fit
from probgen.models.base import build, load_method
from probgen.models.ncsn import max_pairwise_distance
from probgen.models.score_sde import ScoreSDE, TimeProposal, weight_over_var
from probgen.nets import MLP, UNet
from probgen.sdes import VESDE, VPSDE, SubVPSDE
from tests.common import (
    RecordingNet,
    assert_close,
    assert_every_parameter_learns,
    assert_mean_and_covariance,
    mc_tolerance,
)

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
CHOL = torch.tensor([[0.8, 0.0], [0.5, 0.4]], dtype=torch.float64)
COV = CHOL @ CHOL.T
LOG_2PI = math.log(2 * math.pi)
CASES = [
    dict(sde="vp"),
    dict(sde="subvp", weighting="likelihood"),
    dict(sde="ve", sigma_max=5.0, weighting="likelihood", importance_sampling=False),
    dict(sde="ve", sigma_max=5.0, weighting="sigma2", importance_sampling=True),
]


def gaussian_data(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) @ CHOL.T + MU).to(dtype)


def perturbed(seed=0, **kwargs):
    """A small model whose (zero-initialized) network is perturbed so its score is nontrivial."""
    torch.manual_seed(seed)
    opts = dict(hidden=(16, 16), embed_dim=8, sample_steps=20)
    opts.update(kwargs)
    method = ScoreSDE(opts.pop("data_dim", 2), **opts)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return method


def exact_score(sde, x, t):
    """The score of p_t = N(m mu, m^2 Sigma + s^2 I) for data N(mu, Sigma), ``(B, D)``."""
    m, s = sde.marginal_params(t)
    cov = COV.to(x.dtype)
    a, b, d = (m**2 * cov[i, j] + s**2 * (i == j) for i, j in ((0, 0), (0, 1), (1, 1)))
    r = x - m[:, None] * MU.to(x.dtype)
    return -torch.stack([d * r[:, 0] - b * r[:, 1], a * r[:, 1] - b * r[:, 0]], -1) / (a * d - b * b)[:, None]


def test_training_program_sites_and_shapes():
    method = perturbed(sde="subvp", weighting="likelihood")
    x = gaussian_data(8)
    guide = poutine.trace(method.guide).get_trace(x)
    model = poutine.trace(poutine.replay(method.model, trace=guide)).get_trace(x)
    model.compute_log_prob()
    assert [n for n, s in model.nodes.items() if s["type"] == "sample"] == ["data", "t", "x_t", "eps"]
    assert [n for n, s in guide.nodes.items() if s["type"] == "sample"] == ["data", "t", "x_t"]
    t = model.nodes["t"]["value"]
    assert t.shape == (8,) and bool(((t >= method.t_min) & (t <= 1.0)).all())
    assert isinstance(model.nodes["t"]["fn"], TimeProposal) and model.nodes["eps"]["is_observed"]
    for name in ("t", "x_t", "eps"):
        assert model.nodes[name]["log_prob"].shape == (8,), name
    assert model.nodes["eps"]["scale"].shape == (8,)  # one importance weight per example
    mean, std = method.sde_object.marginal_params(t)
    for trace in (model, guide):  # x_t has the same law in both programs: N(m x0, s^2 I)
        assert_close(trace.nodes["x_t"]["fn"].base_dist.scale[:, 0], std)
        assert_close(trace.nodes["x_t"]["fn"].base_dist.loc, mean[:, None] * x)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c['sde']}-{c['weighting'] if 'weighting' in c else 'sigma2'}"
)
def test_loss_is_the_weighted_dsm_objective_exactly(case):
    method = perturbed(**case)
    sde, x = method.sde_object, gaussian_data(32)
    torch.manual_seed(3)
    loss = AnalyticKL_ELBO().differentiable_loss(method.model, method.guide, x)
    torch.manual_seed(3)
    pyro_loss = Trace_ELBO().differentiable_loss(method.model, method.guide, x)  # log p - log q of latents: 0
    torch.manual_seed(3)
    guide = poutine.trace(method.guide).get_trace(x)
    t, x_t = guide.nodes["t"]["value"], guide.nodes["x_t"]["value"]
    m, s = sde.marginal_params(t)
    eps = (x_t - m[:, None] * x) / s[:, None]
    dsm = 0.5 * (method.score(x_t, t) + eps / s[:, None]).pow(2).sum(-1)  # per example
    lam = sde.diffusion(t) ** 2 if case.get("weighting") == "likelihood" else s**2
    if method.importance_sampling:
        q = guide.nodes["t"]["fn"].log_prob(t).exp()
    else:
        q = torch.full_like(t, 1 / (1.0 - method.t_min))
    # The lambda-weighted DSM over the time density, plus the Gaussian's constant under the same weight.
    expected = (lam / q * dsm).sum() + (lam / (s**2 * q)).sum() * LOG_2PI
    assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert_close(pyro_loss, expected, rtol=1e-4, atol=1e-4)
    assert len(set(t.tolist())) == 32


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradients_reach_every_parameter(kind):
    if kind == "mlp":
        method, x = perturbed(sde="ve", sigma_max=5.0), gaussian_data(16)
    else:
        torch.manual_seed(0)
        method = ScoreSDE(64, event_shape=(1, 8, 8), base_channels=8, embed_dim=16, weighting="likelihood")
        x = torch.rand(4, 64) * 2 - 1
        nn.init.normal_(method.net.conv_out.weight, std=0.1)  # the zero output conv blocks the rest
    assert isinstance(method.net, MLP if kind == "mlp" else UNet)
    AnalyticKL_ELBO().differentiable_loss(method.model, method.guide, x).backward()
    assert_every_parameter_learns(method)


def test_score_predicts_the_noise_from_a_unit_scale_input():
    recorder = RecordingNet()
    calls = recorder.calls
    method = ScoreSDE(2, sde="vp", sigma_data=0.5, net=recorder)
    x, t = torch.randn(3, 2), torch.tensor([1e-3, 0.5, 1.0])
    m, s = VPSDE().marginal_params(t)
    assert_close(method.score(x, t), -1 / s[:, None].expand(3, 2))
    h, c = calls[-1]
    assert_close(h, x / (m[:, None] ** 2 * 0.25 + s[:, None] ** 2).sqrt())
    assert_close(c, [1.0, 500.0, 1000.0])
    assert method.score(x, 0.5).shape == (3, 2)
    with pytest.raises(ValueError, match=r"Expected t of shape \(3,\)"):
        method.score(x, torch.ones(2))


def test_time_proposal_is_a_normalized_density_proportional_to_the_weight():
    sde = VPSDE()
    prop = TimeProposal.proportional_to(
        lambda t: weight_over_var(sde, "likelihood", t), 1e-5, 1.0, dtype=torch.float64
    )
    torch.manual_seed(0)
    t = prop.sample((50000,))
    assert bool(((t >= 1e-5) & (t <= 1.0)).all())
    # The density integrates to one (exactly: piecewise constant) ...
    assert_close((prop.log_prob(prop.edges[:-1]).exp() * prop.edges.diff()).sum(), 1.0, atol=1e-12)
    # ... and is within the grid's variation of g^2/s^2 / Z (Z in closed form for VP: log(e^B - 1)).
    b = sde.int_beta(torch.tensor([1e-5, 1.0], dtype=torch.float64))
    z = float(torch.log(torch.expm1(b[1])) - torch.log(torch.expm1(b[0])))
    ratio = weight_over_var(sde, "likelihood", t) / z / prop.log_prob(t).exp()
    assert float(ratio.min()) > 0.99 and float(ratio.max()) < 1.01
    # Draws follow the proposal: the fraction below the median cell edge (binomial error, z = 4).
    k = int(torch.searchsorted(prop._cdf, torch.tensor(0.5, dtype=torch.float64)))
    frac = float((t < prop.edges[k]).double().mean())
    assert abs(frac - float(prop._cdf[k])) < 4 * math.sqrt(0.25 / 50000)
    kl = torch.distributions.kl_divergence(prop, prop)
    assert float(kl) == 0.0


def exact_objective(sde, weighting, t_min):
    r"""\int_{t_min}^T lambda/s^2 E[-log N(eps; -s score*, I)] dt for the exact Gaussian score (quadrature).

    With data N(mu, Sigma) and p_t = N(m mu, C_t), C_t = m^2 Sigma + s^2 I, P = C_t^{-1}:
    s score* + eps = -s m P (x0 - mu) + (I - s^2 P) eps, whose mean square is
    s^2 m^2 tr(P Sigma P) + tr((I - s^2 P)^2).
    """
    cov = COV.numpy()

    def integrand(u):  # t = exp(u): the 1/t singularity of g^2/s^2 becomes flat
        t = torch.tensor([math.exp(u)], dtype=torch.float64)
        m, s = (float(v) for v in sde.marginal_params(t))
        w = float(weight_over_var(sde, weighting, t))
        P = np.linalg.inv(m**2 * cov + s**2 * np.eye(2))
        A = np.eye(2) - s**2 * P
        msq = s**2 * m**2 * np.trace(P @ cov @ P) + np.trace(A @ A)
        return w * (0.5 * msq + LOG_2PI) * math.exp(u)

    value, err = integrate.quad(integrand, math.log(t_min), 0.0, limit=200, epsabs=1e-10, epsrel=1e-10)
    assert err < 1e-6
    return value


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_importance_sampled_objective_is_unbiased(kind):
    # Both the uniform and the importance-sampled time give unbiased estimates of the same integral;
    # with the exact score of Gaussian data it is a 1-D quadrature. N draws per estimator; tolerance
    # z = 4 times the Monte Carlo standard error estimated from the per-example losses.
    extra = dict(sigma_max=5.0) if kind == "ve" else {}
    n = 20000
    stds = {}
    for importance in (True, False):
        method = ScoreSDE(
            2, sde=kind, weighting="likelihood", importance_sampling=importance, **extra
        ).double()
        sde = method.sde_object
        method.score = lambda x, t, sde=sde: exact_score(sde, x, t)
        x = gaussian_data(n, seed=1, dtype=torch.float64)
        torch.manual_seed(2)
        guide = poutine.trace(method.guide).get_trace(x)
        model = poutine.trace(poutine.replay(method.model, trace=guide)).get_trace(x)
        site = model.nodes["eps"]
        per_example = -site["fn"].log_prob(site["value"]) * site["scale"]
        target = exact_objective(sde, "likelihood", method.t_min)
        mean, std = float(per_example.mean()), float(per_example.std())
        stds[importance] = std
        assert abs(mean - target) < mc_tolerance(std, n), (importance, mean, target, std)
    assert stds[True] < 0.2 * stds[False]  # the point of importance sampling


def exact_chain_moments(method):
    """Mean and covariance of the Euler-Maruyama chain with the exact Gaussian score (linear recursion)."""
    sde, steps = method.sde_object, method.sample_steps
    ts = torch.linspace(sde.T, sde.eps, steps + 1, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    mean, C = torch.zeros(2, dtype=torch.float64), sde.prior_std**2 * eye
    for i in range(steps):
        dt = float(ts[i] - ts[i + 1])
        a, g2 = sde.drift_coef(ts[i]), sde.diffusion(ts[i]) ** 2
        m, s = sde.marginal_params(ts[i])
        P = torch.linalg.inv(m**2 * COV + s**2 * eye)
        A = eye - (a * eye + g2 * P) * dt  # x - [a x + g^2 P (x - m mu)] dt
        mean, C = A @ mean + g2 * dt * P @ (m * MU), A @ C @ A.T
        if i < steps - 1:
            C = C + g2 * dt * eye
    return mean, C


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_sampling_chain_has_the_exact_moments_of_its_linear_recursion(kind):
    # Exact score: every step is linear-Gaussian, so the output's moments follow a recursion.
    # MC error over N = 20000 chains: per-entry std of x_j and of centred products, z = 4.
    extra = dict(sigma_max=5.0) if kind == "ve" else {}
    method = ScoreSDE(2, sde=kind, sample_steps=30, **extra)
    sde = method.sde_object
    method.score = lambda x, t: exact_score(sde, x.double(), t.double()).float()
    torch.manual_seed(0)
    x = method.sample(20000).double()
    mean, C = exact_chain_moments(method)
    assert_mean_and_covariance(x, mean, C)
    trace = poutine.trace(method.model).get_trace(None, batch_size=3)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names[:3] == ["data", "x_T", "x_1"] and names[-2:] == ["x_29", "x"] and len(names) == 32


def test_from_data_config_round_trip_and_sdes():
    moons = load_dataset("moons", split="val")
    for kind, cls in (("vp", VPSDE), ("subvp", SubVPSDE), ("ve", VESDE)):
        method = ScoreSDE.from_data(moons, sde=kind, hidden=(16,), embed_dim=8)
        assert isinstance(method.sde_object, cls) and method.config["sde"] == kind
        assert method.config["sigma_data"] == float(moons.x.std())
        if kind == "ve":
            assert method.config["sigma_max"] == max_pairwise_distance(moons.x)
            assert method.sde_object.sigma_max == method.config["sigma_max"]
        assert json.loads(json.dumps(method.config)) == method.config
        rebuilt = build("score-sde", **method.config)
        assert set(rebuilt.state_dict()) == set(method.state_dict())
        rebuilt.load_state_dict(method.state_dict())
        x, t = moons.x[:5], torch.linspace(0.1, 1.0, 5)
        assert_close(rebuilt.score(x, t), method.score(x, t))
    assert ScoreSDE.data_form("digits") == "centered" and ScoreSDE.data_form("moons") == "int"
    digits = load_dataset("digits", split="val", form="centered")
    big = ScoreSDE.from_data(digits, base_channels=8, embed_dim=16)
    assert isinstance(big.net, UNet) and big.event_shape == (1, 8, 8)
    assert ScoreSDE(2, weighting="likelihood").importance_sampling
    assert not ScoreSDE(2, weighting="likelihood", importance_sampling=False).importance_sampling
    assert ScoreSDE(2, sde="ve", eps=1e-4).sde_object.eps == 1e-4


def test_fit_save_and_load(tmp_path):
    moons = load_dataset("moons", split="val")
    method = ScoreSDE.from_data(moons, sde="subvp", hidden=(16,), embed_dim=8, sample_steps=5)
    result = fit(
        method,
        moons.x,
        val_data=moons.x[:256],
        steps=20,
        val_every=10,
        batch_size=64,
        run_dir=tmp_path,
        progress=False,
    )
    assert result.best_step is not None and math.isfinite(result.best_val)
    loaded, _ = load_method(tmp_path, expected="score-sde")
    x, t = moons.x[:10], torch.linspace(1e-3, 1.0, 10)
    assert_close(loaded.score(x, t), method.score(x, t))
    assert loaded.sde_object.__class__ is SubVPSDE and loaded.config == method.config
    torch.manual_seed(0)
    assert loaded.sample(7).shape == (7, 2)


def test_bad_input_gives_one_clear_error_each():
    with pytest.raises(ValueError, match=r"Expected data_dim >= 1"):
        ScoreSDE(0)
    with pytest.raises(ValueError, match=r"Expected sde in"):
        ScoreSDE(2, sde="vpx")
    with pytest.raises(ValueError, match=r"Expected weighting in"):
        ScoreSDE(2, weighting="uniform")
    with pytest.raises(ValueError, match=r"Expected an event_shape with 64 elements"):
        ScoreSDE(64, event_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"Expected 0 < t_min < T"):
        ScoreSDE(2, t_min=0.0)
    method = ScoreSDE(2, hidden=(4,), embed_dim=4)
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 2\)"):
        method.model(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Expected finite data"):
        method.check_data(torch.full((2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"Expected observations x for the guide"):
        method.guide(None)
    with pytest.raises(ValueError, match=r"Expected num >= 1"):
        method.sample(0)


def test_built_by_composition_of_an_sde_object_and_a_net_spec():
    from probgen.nets import NetSpec
    from probgen.sdes import VESDE, SDESpec, SubVPSDE

    method = ScoreSDE(2, sde=VESDE(sigma_min=0.02, sigma_max=4.0), hidden=(8,), embed_dim=4)
    assert isinstance(method.sde_object, VESDE) and method.sde_object.sigma_max == 4.0
    assert method.net_spec == NetSpec(hidden=(8,), embed_dim=4)
    # The config is flat, as in earlier run directories, and rebuilds the same model.
    config = method.config
    assert (config["sde"], config["sigma_max"], config["hidden"]) == ("ve", 4.0, [8])
    again = ScoreSDE(**config)
    assert again.config == config and again.sde_spec == method.sde_spec
    assert SDESpec.from_options(SubVPSDE(beta_max=10.0), {})[0].config()["beta_max"] == 10.0
    with pytest.raises(ValueError, match=r"Expected no \['sigma_max'\] beside an SDE object"):
        ScoreSDE(2, sde=VESDE(), sigma_max=3.0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['hiden'\]; the network takes"):
        ScoreSDE(2, hiden=(8,))
