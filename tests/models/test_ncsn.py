"""NCSN: the sigma^2-weighted DSM program, the improved techniques' settings, the Langevin chain."""

import json
import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from probgen.data import load_dataset
from probgen.elbo import AnalyticKL_ELBO
from probgen.inference import fit
from probgen.models.base import build, load_method
from probgen.models.ncsn import (
    NCSN,
    geometric_sigmas,
    langevin_step_size,
    level_ratio,
    max_pairwise_distance,
)
from probgen.nets import MLP, UNet
from tests.common import RecordingNet, assert_close, assert_every_parameter_learns, assert_mean_and_covariance

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
CHOL = torch.tensor([[0.8, 0.0], [0.5, 0.4]], dtype=torch.float64)
COV = CHOL @ CHOL.T
LOG_2PI = math.log(2 * math.pi)


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) @ CHOL.T + MU).float()


def perturbed_ncsn(seed=0, **kwargs):
    """A small NCSN whose (zero-initialized) network is perturbed so its score is nontrivial."""
    torch.manual_seed(seed)
    opts = dict(sigma_max=3.0, sigma_min=0.1, num_levels=4, hidden=(16, 16), embed_dim=8)
    opts.update(kwargs)
    ncsn = NCSN(opts.pop("data_dim", 2), **opts)
    with torch.no_grad():
        for p in ncsn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ncsn


def test_geometric_sigmas_and_max_pairwise_distance():
    s = geometric_sigmas(5.0, 0.01, 11)
    assert s.shape == (11,) and bool((s[1:] < s[:-1]).all())
    assert_close(s[[0, -1]], [5.0, 0.01])
    assert_close(s[1:] / s[:-1], torch.full((10,), 500.0 ** (-1 / 10)))
    assert_close(geometric_sigmas(0.5, 0.5, 1), [0.5])
    with pytest.raises(ValueError, match="Expected 0 < sigma_min < sigma_max"):
        geometric_sigmas(0.1, 1.0, 3)
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    assert_close(max_pairwise_distance(square), 2 * math.sqrt(2))
    x = torch.randn(300, 3)
    assert_close(max_pairwise_distance(x), torch.cdist(x.double(), x.double()).max())


def test_level_ratio_solves_technique_2():
    def coverage(g, d):
        cdf = torch.distributions.Normal(0.0, 1.0).cdf
        a = math.sqrt(2 * d) * (g - 1)
        return float(cdf(torch.tensor(a + 3 * g, dtype=torch.float64)) - cdf(torch.tensor(a - 3 * g)))

    for d in (64, 256, 3072):
        g = level_ratio(d)
        assert 1 < g < 2 and abs(coverage(g, d) - 0.5) < 1e-6
    assert level_ratio(3072) < level_ratio(64)  # more dimensions, closer levels
    assert level_ratio(2) == 2.0 and level_ratio(2, max_ratio=3.0) == 3.0  # in 2-D every ratio covers


def test_langevin_step_size_is_proposition_3_in_this_step_convention():
    gamma, sigma_l, T = 1.5, 0.1, 10
    eps = langevin_step_size(gamma, sigma_l, T)

    def paper_ratio(eps):
        # Song & Ermon 2020, Prop. 3, is for x + a s + sqrt(2a) z: our a/2 s + sqrt(a) z is theirs at eps / 2.
        e = eps / 2 / sigma_l**2
        c = 2 * e / (1 - (1 - e) ** 2)
        return (1 - e) ** (2 * T) * (gamma**2 - c) + c

    assert paper_ratio(eps) < min(paper_ratio(0.9 * eps), paper_ratio(1.1 * eps))
    # The paper's settings (their eps is half ours): CIFAR-10, L = 232 from 50 to 0.01, T = 5:
    # eps = 6.2e-6; CelebA 64, L = 500 from 90 to 0.01, T = 5: eps = 3.3e-6 (printed to 2 digits).
    assert abs(langevin_step_size(5000 ** (1 / 231), 0.01, 5) / 2 - 6.2e-6) < 0.05e-6
    assert abs(langevin_step_size(9000 ** (1 / 499), 0.01, 5) / 2 - 3.3e-6) < 0.05e-6
    # A simulated level: start at variance (gamma sigma_i)^2, T steps on the score of N(0, sigma_i^2).
    # MC error of a variance from N draws: var * sqrt(2 / N), z = 4.
    sigma_i, n = 0.4, 200_000
    g = torch.Generator().manual_seed(0)
    alpha = eps * sigma_i**2 / sigma_l**2
    x = gamma * sigma_i * torch.randn(n, generator=g, dtype=torch.float64)
    for _ in range(T):
        z = torch.randn(n, generator=g, dtype=torch.float64)
        x = x - 0.5 * alpha * x / sigma_i**2 + math.sqrt(alpha) * z
    expected = paper_ratio(eps)
    assert abs(float(x.var()) / sigma_i**2 - expected) < 4 * expected * math.sqrt(2 / n)


def test_training_program_sites_and_shapes():
    ncsn = perturbed_ncsn()
    x = gaussian_data(8)
    guide = poutine.trace(ncsn.guide).get_trace(x)
    model = poutine.trace(poutine.replay(ncsn.model, trace=guide)).get_trace(x)
    model.compute_log_prob()
    sites = [n for n, s in model.nodes.items() if s["type"] == "sample"]
    assert sites == ["data", "level", "x_tilde", "eps"]
    assert [n for n, s in guide.nodes.items() if s["type"] == "sample"] == ["data", "level", "x_tilde"]
    level = model.nodes["level"]["value"]
    assert level.shape == (8,) and bool(((level >= 1) & (level <= 4)).all())
    assert model.nodes["x_tilde"]["value"].shape == (8, 2) and model.nodes["eps"]["is_observed"]
    for name in ("level", "x_tilde", "eps"):
        assert model.nodes[name]["log_prob"].shape == (8,), name
    sigma = ncsn.sigmas[level - 1]
    # x_tilde has the same law in both programs: N(x, sigma^2 I).
    assert_close(model.nodes["x_tilde"]["fn"].base_dist.scale[:, 0], sigma)
    assert_close(guide.nodes["x_tilde"]["fn"].base_dist.scale[:, 0], sigma)


def test_elbo_is_the_sigma_squared_weighted_dsm_loss_exactly():
    ncsn = perturbed_ncsn()
    x = gaussian_data(32)
    torch.manual_seed(3)
    loss = AnalyticKL_ELBO().differentiable_loss(ncsn.model, ncsn.guide, x)
    torch.manual_seed(3)
    pyro_loss = Trace_ELBO().differentiable_loss(ncsn.model, ncsn.guide, x)  # log p - log q of latents: 0
    torch.manual_seed(3)
    guide = poutine.trace(ncsn.guide).get_trace(x)
    level, x_tilde = guide.nodes["level"]["value"], guide.nodes["x_tilde"]["value"]
    sigma = ncsn.sigmas[level - 1]
    eps = (x_tilde - x) / sigma[:, None]
    dsm = 0.5 * (ncsn.score(x_tilde, sigma) + eps / sigma[:, None]).pow(2).sum(-1)  # per example
    expected = (sigma**2 * dsm).sum() + 32 * 2 / 2 * LOG_2PI
    assert_close(loss, expected, atol=1e-4)
    assert_close(pyro_loss, expected, atol=1e-4)
    assert len(set(level.tolist())) > 1  # several levels in one batch


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradients_reach_every_parameter(kind):
    if kind == "mlp":
        ncsn, x = perturbed_ncsn(), gaussian_data(16)
    else:
        torch.manual_seed(0)
        ncsn = NCSN(64, event_shape=(1, 8, 8), base_channels=8, embed_dim=16, num_levels=3)
        x = torch.rand(4, 64)
        # The zero-initialized output conv blocks every gradient but its own at the start.
        nn.init.normal_(ncsn.net.conv_out.weight, std=0.1)
    assert isinstance(ncsn.net, MLP if kind == "mlp" else UNet)
    AnalyticKL_ELBO().differentiable_loss(ncsn.model, ncsn.guide, x).backward()
    assert_every_parameter_learns(ncsn)


def test_score_is_the_network_over_sigma_with_scaled_input():
    recorder = RecordingNet()
    calls = recorder.calls
    ncsn = NCSN(2, sigma_max=4.0, sigma_min=0.25, num_levels=3, sigma_data=0.5, net=recorder)
    x = torch.randn(3, 2)
    sigma = torch.tensor([4.0, 1.0, 0.25])
    s = ncsn.score(x, sigma)
    assert_close(s, 1 / sigma[:, None].expand(3, 2))
    h, c = calls[-1]
    assert_close(h, x / (0.25 + sigma[:, None] ** 2).sqrt())
    assert_close(c, [0.0, 500.0, 1000.0], atol=1e-3)
    assert ncsn.score(x, 1.0).shape == (3, 2)  # a scalar level broadcasts
    with pytest.raises(ValueError, match=r"Expected sigma of shape \(3,\)"):
        ncsn.score(x, torch.ones(2))


def exact_chain_moments(ncsn):
    """Mean and covariance of the annealed chain with the exact Gaussian score (a linear recursion)."""
    lo, hi = (float(v) for v in ncsn.init_range)
    eye = torch.eye(2, dtype=torch.float64)
    m, C = torch.full((2,), (lo + hi) / 2, dtype=torch.float64), (hi - lo) ** 2 / 12 * eye
    for sigma, alpha in zip(ncsn.sigmas.double(), ncsn.step_sizes().double()):
        P = torch.linalg.inv(COV + sigma**2 * eye)
        K = eye - alpha / 2 * P
        for _ in range(ncsn.steps_per_level):
            m, C = K @ m + alpha / 2 * P @ MU, K @ C @ K.T + alpha * eye
    P = torch.linalg.inv(COV + ncsn.sigmas[-1].double() ** 2 * eye)
    K = eye - ncsn.sigmas[-1].double() ** 2 * P
    return K @ m + ncsn.sigmas[-1].double() ** 2 * P @ MU, K @ C @ K.T


def test_sampling_program_has_the_exact_moments_of_the_annealed_chain():
    # With the exact score of N(mu, Sigma + sigma^2 I) every step is linear-Gaussian, so the output's
    # mean and covariance follow a recursion. MC error: per-entry std of x_j and of the centred
    # products over N = 20000 chains, z = 4.
    levels = dict(sigma_max=2.0, sigma_min=0.25, num_levels=3)
    ncsn = NCSN(2, **levels, step_size=0.01, steps_per_level=20, init_low=-3.0, init_high=3.0)
    eye = torch.eye(2)

    def oracle(x, sigma):
        assert bool((sigma == sigma[0]).all())  # the chain moves every example at the same level
        P = torch.linalg.inv(COV.float() + sigma[0] ** 2 * eye)
        return -(x - MU.float()) @ P.T

    ncsn.score = oracle
    torch.manual_seed(0)
    x = ncsn.sample(20000).double()
    m, C = exact_chain_moments(ncsn)
    assert_mean_and_covariance(x, m, C)
    trace = poutine.trace(ncsn.model).get_trace(None, batch_size=3)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names[:3] == ["data", "x_init", "x_1_1"] and names[-2:] == ["x_3_20", "x"] and len(names) == 63


def test_from_data_uses_the_improved_techniques_and_kwargs_override():
    moons = load_dataset("moons", split="val")
    ncsn = NCSN.from_data(moons, hidden=(16,), embed_dim=8)
    c = ncsn.config
    assert c["sigma_max"] == max_pairwise_distance(moons.x) and c["sigma_min"] == 0.01
    assert c["num_levels"] == math.ceil(1 + math.log(c["sigma_max"] / 0.01) / math.log(level_ratio(2)))
    assert c["steps_per_level"] == round(1000 / c["num_levels"])
    gamma = (c["sigma_max"] / 0.01) ** (1 / (c["num_levels"] - 1))
    assert c["step_size"] == langevin_step_size(gamma, 0.01, c["steps_per_level"])
    assert (c["init_low"], c["init_high"]) == (float(moons.x.min()), float(moons.x.max()))
    defaults = dict(step_size=c["step_size"], steps_per_level=c["steps_per_level"], denoise=True)
    assert ncsn.sampling_defaults == defaults
    assert ncsn.event_dim == 2 and ncsn.sigmas.shape == (c["num_levels"],)
    other = NCSN.from_data(moons, num_levels=5, hidden=(16,), embed_dim=8)
    gamma5 = (c["sigma_max"] / 0.01) ** (1 / 4)
    assert other.config["step_size"] == langevin_step_size(gamma5, 0.01, 200)
    digits = load_dataset("digits", split="val", form=NCSN.data_form("digits"))
    assert NCSN.data_form("digits") == "dequantized" and NCSN.data_form("moons") == "int"
    big = NCSN.from_data(digits, base_channels=8, embed_dim=16)
    assert isinstance(big.net, UNet) and big.num_levels > ncsn.num_levels  # closer levels in 64-D
    for method in (ncsn, big):
        assert json.loads(json.dumps(method.config)) == method.config
        rebuilt = build("ncsn", **method.config)
        assert set(rebuilt.state_dict()) == set(method.state_dict())
        rebuilt.load_state_dict(method.state_dict())
        assert_close(rebuilt.sigmas, method.sigmas)


def test_fit_save_load_and_samplers(tmp_path):
    from probgen.inference.sampling import draw_samples, samplers_for

    moons = load_dataset("moons", split="val")
    ncsn = NCSN.from_data(moons, hidden=(16,), embed_dim=8, steps_per_level=2)
    result = fit(
        ncsn,
        moons.x,
        val_data=moons.x[:256],
        steps=20,
        val_every=10,
        batch_size=64,
        run_dir=tmp_path,
        progress=False,
    )
    assert result.best_step is not None and math.isfinite(result.best_val)
    loaded, meta = load_method(tmp_path, expected="ncsn")
    x, sigma = moons.x[:10], ncsn.sigmas[torch.arange(10) % ncsn.num_levels]
    assert_close(loaded.score(x, sigma), ncsn.score(x, sigma))
    assert "annealed-langevin" in samplers_for(loaded)
    a = draw_samples(loaded, 16, sampler="annealed-langevin", seed=1)
    b = draw_samples(loaded, 16, sampler="annealed-langevin", seed=1)
    assert a.shape == (16, 2) and torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert draw_samples(loaded, 16, sampler="ancestral", seed=1).shape == (16, 2)


def test_bad_input_gives_one_clear_error_each():
    with pytest.raises(ValueError, match=r"Expected data_dim >= 1"):
        NCSN(0)
    with pytest.raises(ValueError, match=r"Expected an event_shape with 64 elements"):
        NCSN(64, event_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"Expected init_high > init_low"):
        NCSN(2, init_low=1.0, init_high=0.0)
    ncsn = NCSN(2, hidden=(4,), embed_dim=4)
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 2\)"):
        ncsn.model(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Expected finite data"):
        ncsn.check_data(torch.full((2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"Expected observations x for the guide"):
        ncsn.guide(None)
    with pytest.raises(ValueError, match=r"Expected num >= 1"):
        ncsn.sample(0)
