import math

import pytest
import torch
import torchsde
from torch import nn

from probgen.inference.langevin import (
    annealed_langevin,
    check_sigmas,
    langevin_corrector,
    langevin_sde_sample,
)
from probgen.inference.sampling import draw_samples, samplers_for
from tests.common import mc_tolerance

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gaussian_score(mean: float, var: float):
    """Score of N(mean, var I), ignoring t."""
    return lambda x, t: -(x - mean) / var


def mixture_score(mus: torch.Tensor, weights: torch.Tensor, var: float = 1.0):
    r"""Exact score of :math:`\sum_k w_k \mathcal N(\mu_k, (v + \sigma^2) I)`, the mixture perturbed by sigma.

    ``mus`` ``(K, D)``; returns ``score(x, sigma)`` with ``x`` ``(B, D)`` and ``sigma`` ``(B,)``:
    :math:`-\sum_k r_k(x) (x - \mu_k) / (v + \sigma^2)`, with responsibilities
    :math:`r_k = \mathrm{softmax}_k(\log w_k - \lVert x - \mu_k \rVert^2 / (2 (v + \sigma^2)))`
    (the components share the variance, so their normalizers cancel).
    """
    log_w = weights.log()

    def score(x, sigma):
        v = (var + sigma**2)[:, None]  # (B, 1)
        diff = x[:, None, :] - mus.to(x)  # (B, K, D)
        r = torch.softmax(log_w.to(x) - 0.5 * diff.pow(2).sum(-1) / v, dim=1)  # (B, K)
        return -(r[:, :, None] * diff).sum(1) / v

    return score


def nearest_component_weights(x: torch.Tensor, mus: torch.Tensor) -> torch.Tensor:
    """Fraction of the samples ``(B, D)`` nearest each centre ``(K, D)``."""
    return torch.bincount(torch.cdist(x, mus.to(x)).argmin(1), minlength=len(mus)).double() / len(x)


# ---------------------------------------------------------------- ULA through torchsde


def test_langevin_sde_sample_is_the_ula_recursion_with_the_same_brownian_increments():
    h, n = 0.1, 25
    times = [0.0]
    for _ in range(n):
        times.append(times[-1] + h)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=times[-1], size=(6, 3), dtype=torch.float64, entropy=11)
    score = gaussian_score(1.0, 2.0)
    x, path = langevin_sde_sample(score, x0, step_size=h, num_steps=n, bm=bm, return_path=True)
    assert path.shape == (n + 1, 6, 3)
    y = x0
    for k in range(n):
        y = y + h * score(y, None) + math.sqrt(2) * bm(times[k], times[k + 1])
        torch.testing.assert_close(path[k + 1], y, rtol=0, atol=1e-12)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h, temperature", [(0.8, 1.0), (0.2, 1.0), (0.2, 2.0)])
def test_ula_has_the_exact_stationary_law_of_its_step_size(h, temperature):
    # Target N(1, s^2) with s^2 = 4. ULA x' = x - h (x - 1) / s^2 + sqrt(2 T h) z is a Gaussian AR(1)
    # chain with stationary mean 1 and variance T s^2 / (1 - h / (2 s^2)) (its O(h) bias).
    # Starting from N(1, s^2), 100 steps shrink the start's variance error by (1 - h / s^2)^200
    # <= 0.95^200 < 4e-5. 400 x 50 independent chains: n = 20,000 draws; standard errors
    # sqrt(v / n) for the mean and v sqrt(2 / n) for the variance; z = 4.
    s2, n = 4.0, 20_000
    v = temperature * s2 / (1 - h / (2 * s2))
    gen = torch.Generator().manual_seed(0)
    x0 = 1 + math.sqrt(s2) * torch.randn(400, 50, generator=gen, dtype=torch.float64)
    x = langevin_sde_sample(
        gaussian_score(1.0, s2),
        x0,
        step_size=h,
        num_steps=100,
        temperature=temperature,
        generator=gen,
    )
    assert abs(float(x.mean()) - 1.0) < mc_tolerance(math.sqrt(v), n)
    assert abs(float(x.var()) - v) < mc_tolerance(v * math.sqrt(2), n)


def test_ula_bias_shrinks_with_the_step_size():
    # The variances at h = 0.8 and h = 0.05 (target N(0, 4)) are 4.444 and 4.025: their difference
    # 0.419 is 7 standard errors of the difference (sqrt(se1^2 + se2^2) = 0.061 at n = 20,000 each),
    # so it is resolved, and it matches the closed form within z = 4 of them. The chains start from
    # N(0, s^2); 200 steps shrink the start's error by (1 - h / s^2)^400 < 7e-3 (on 0.025 at h = 0.05).
    s2, n = 4.0, 20_000
    gen = torch.Generator().manual_seed(1)
    var = {}
    for h in (0.8, 0.05):
        x0 = math.sqrt(s2) * torch.randn(400, 50, generator=gen)
        x = langevin_sde_sample(gaussian_score(0.0, s2), x0, step_size=h, num_steps=200, generator=gen)
        var[h] = float(x.double().var())
    exact = {h: s2 / (1 - h / (2 * s2)) for h in var}
    se = math.sqrt(sum((v * math.sqrt(2 / n)) ** 2 for v in exact.values()))
    assert abs((var[0.8] - var[0.05]) - (exact[0.8] - exact[0.05])) < 4 * se
    assert abs(var[0.05] - s2) < abs(var[0.8] - s2)


def test_langevin_sde_sample_is_reproducible_from_the_generator_and_runs_srk():
    x0 = torch.zeros(8, 2)
    kw = dict(step_size=0.1, num_steps=10)
    a = langevin_sde_sample(gaussian_score(0.0, 1.0), x0, generator=torch.Generator().manual_seed(3), **kw)
    b = langevin_sde_sample(gaussian_score(0.0, 1.0), x0, generator=torch.Generator().manual_seed(3), **kw)
    c = langevin_sde_sample(gaussian_score(0.0, 1.0), x0, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    d = langevin_sde_sample(gaussian_score(0.0, 1.0), x0, method="srk", generator=torch.Generator(), **kw)
    assert d.shape == (8, 2) and bool(torch.isfinite(d).all())


# ---------------------------------------------------------------- annealed Langevin

MUS = torch.tensor([[-4.0], [4.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.2, 0.8], dtype=torch.float64)
SIGMAS = torch.logspace(math.log10(20.0), 0.0, 20, dtype=torch.float64)  # 20 ... 1, as in arXiv:1907.05600


def test_annealed_langevin_recovers_mixture_weights_where_plain_langevin_does_not():
    # 0.2 N(-4, 1) + 0.8 N(4, 1), starts uniform on [-8, 8]. Weight of the small component from
    # n = 2000 samples: standard error sqrt(0.2 * 0.8 / n) = 0.0089, z = 4: tolerance 0.036.
    # Annealed Langevin is not exact: the weights freeze as the modes separate, which leaves a bias
    # that shrinks with the steps. Measured with sigmas geometric from 20 to 1: L = 10, eps = 0.1:
    # +0.018 at M = 100, +0.009 at M = 300, +0.0007 at M = 1000 (n = 20,000, se 0.003); the schedule
    # here (L = 20, M = 100, eps = 0.5) measured +0.003 (n = 40,000, se 0.002): a third of a standard
    # error of this test.
    n = 2000
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 16 - 8
    x = annealed_langevin(
        mixture_score(MUS, WEIGHTS), x0, SIGMAS, step_size=0.5, steps_per_level=100, generator=gen
    )
    w = nearest_component_weights(x, MUS)
    assert abs(float(w[0]) - 0.2) < mc_tolerance(math.sqrt(0.2 * 0.8), n)
    # Plain Langevin on the clean score keeps each sample in the basin it started in: about half.
    data_score = mixture_score(MUS, WEIGHTS)
    y = langevin_sde_sample(
        lambda x, t: data_score(x, torch.zeros_like(t)), x0, step_size=0.05, num_steps=1000, generator=gen
    )
    assert float(nearest_component_weights(y, MUS)[0]) > 0.4


@pytest.mark.slow
def test_annealed_langevin_weights_with_many_steps_per_level():
    # Song & Ermon's schedule (L = 10 levels from 20 to 1, eps = 0.1) with M = 1000 steps per level,
    # where the freezing bias is below 0.001; n = 20,000: standard error 0.0028, z = 4: 0.011.
    n = 20_000
    gen = torch.Generator().manual_seed(5)
    sigmas = torch.logspace(math.log10(20.0), 0.0, 10, dtype=torch.float64)
    x0 = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 16 - 8
    x = annealed_langevin(
        mixture_score(MUS, WEIGHTS), x0, sigmas, step_size=0.1, steps_per_level=1000, generator=gen
    )
    w = nearest_component_weights(x, MUS)
    assert abs(float(w[0]) - 0.2) < mc_tolerance(math.sqrt(0.2 * 0.8), n)


def perturbed_standard_normal_score(x, sigma):
    """Score of N(0, I) perturbed by N(0, sigma^2 I): -x / (1 + sigma^2)."""
    return -x / (1 + sigma[:, None] ** 2)


def test_annealed_langevin_on_a_gaussian_has_ulas_variance_at_the_last_level_and_denoises_it():
    # Data N(0, 1); the last level sigma_L = 0.25 has perturbed variance V = 1.0625 and Langevin step
    # h = eps / 2 = 0.2, whose ULA variance is V / (1 - h / (2 V)) = 1.1729 (not V: the check sees
    # the factor 1/2 of Algorithm 1). The final denoising x + sigma_L^2 s(x) = x / V scales it by
    # 1 / V^2, to 1.0390. 50 steps at the last level contract by (1 - h / V)^100 < 1e-9.
    # 5000 x 8 independent chains: n = 40,000; variance standard error v sqrt(2 / n) = 0.0083; z = 4.
    sigmas = torch.tensor([1.0, 0.5, 0.25])
    V, h, n = 1.0625, 0.2, 40_000
    v_ula = V / (1 - h / (2 * V))
    tol = mc_tolerance(v_ula * math.sqrt(2), n)
    x0 = torch.randn(5000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(step_size=2 * h, steps_per_level=50)
    noisy, path = annealed_langevin(
        perturbed_standard_normal_score,
        x0,
        sigmas,
        denoise=False,
        return_path=True,
        generator=torch.Generator().manual_seed(1),
        **kw,
    )
    assert path.shape == (4, 5000, 8)
    torch.testing.assert_close(path[0], x0)
    torch.testing.assert_close(path[-1], noisy)
    assert abs(float(noisy.var()) - v_ula) < tol
    assert abs(float(noisy.var()) - V) > tol
    denoised = annealed_langevin(
        perturbed_standard_normal_score, x0, sigmas, generator=torch.Generator().manual_seed(1), **kw
    )
    torch.testing.assert_close(denoised, noisy / V)
    assert abs(float(denoised.var()) - v_ula / V**2) < mc_tolerance(v_ula / V**2 * math.sqrt(2), n)


def test_annealed_langevin_calls_back_with_the_step_schedule_and_passes_sigma_per_example():
    sigmas = torch.tensor([4.0, 2.0, 1.0])
    seen = []

    def score(x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        return -x / (1 + sigma[:, None] ** 2)

    annealed_langevin(
        score,
        torch.zeros(5, 2),
        sigmas,
        step_size=0.01,
        steps_per_level=3,
        callback=lambda info: seen.append((info["level"], info["step"], info["sigma"], info["step_size"])),
    )
    assert [(lv, st) for lv, st, _, _ in seen] == [(i, m) for i in range(3) for m in range(3)]
    # alpha_i = eps sigma_i^2 / sigma_L^2: 0.16, 0.04, 0.01
    for lv, _, sigma, alpha in seen:
        assert sigma == float(sigmas[lv])
        assert math.isclose(alpha, 0.01 * float(sigmas[lv]) ** 2, rel_tol=1e-12)


# ---------------------------------------------------------------- Langevin corrector


@pytest.mark.parametrize("alpha, per_example", [(1.0, True), (0.9, True), (1.0, False)])
def test_langevin_corrector_step_keeps_a_standard_normal_up_to_its_known_bias(alpha, per_example):
    # The marginal N(0, I_D) (a VP SDE started from N(0, I)) has score -x at every t. One step
    # x' = (1 - eps) x + sqrt(2 eps) z with eps = c |z|^2 / |x|^2, c = 2 alpha r^2, has mean 0 and
    # E x_i'^2 = 1 - 2c + c^2 (D+2)/(D-2) + 2c (D+2)/(D-2) (with E[1/|x|^2] = 1/(D-2),
    # E[x_i^2/|x|^2] = 1/D, E[|z|^2 z_i^2] = D+2): 1.0094 for D = 64, r = 0.16, alpha = 1. With the
    # batch-mean norms eps is c up to O(1/B), giving (1 - c)^2 + 2c = 1 + c^2 = 1.0026.
    # A wrong noise scale (sqrt(eps) z) would give about 1 - c = 0.95.
    # 4000 x 64 draws, n = 256,000 (the dims of an example are uncorrelated: E x_i' x_j' = 0);
    # standard errors 1 / sqrt(n) for the mean, sqrt(2 / n) = 0.0028 for the variance; z = 4.
    r, B, D = 0.16, 4000, 64
    n, c = B * D, 2 * alpha * r**2
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64)

    def score(x, tt):
        assert tt.shape == (B,) and torch.equal(tt, t)
        return -x

    y = langevin_corrector(
        score, x, t, snr=r, alpha=alpha, per_example=per_example, generator=torch.Generator().manual_seed(1)
    )
    if per_example:
        v = 1 - 2 * c + (c**2 + 2 * c) * (D + 2) / (D - 2)
    else:
        v = 1 + c**2
    assert abs(float(y.mean())) < mc_tolerance(1.0, n)
    assert abs(float(y.var()) - v) < mc_tolerance(math.sqrt(2), n)
    assert abs(float((y[:, 0] * y[:, 1]).mean())) < mc_tolerance(1.0, B)


@pytest.mark.parametrize("snr, alpha", [(0.16, 1.0), (0.05, 0.8)])
def test_snr_is_the_ratio_of_the_score_move_to_the_noise_move(snr, alpha):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = gaussian_score(0.5, 3.0)
    y = langevin_corrector(score, x, 0.3, snr=snr, alpha=alpha, generator=torch.Generator().manual_seed(2))
    z = torch.randn(16, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = score(x, None)
    eps = 2 * alpha * (snr * z.norm(dim=1, keepdim=True) / s.norm(dim=1, keepdim=True)) ** 2
    torch.testing.assert_close(y, x + eps * s + (2 * eps).sqrt() * z)
    ratio = (eps * s).norm(dim=1) / ((2 * eps).sqrt() * z).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full((16,), snr * math.sqrt(alpha), dtype=torch.float64))
    torch.testing.assert_close(langevin_corrector(score, x, 0.3, snr=snr, n_steps=0), x)


# ---------------------------------------------------------------- the NCSN sampler registration


class FakeNCSN(nn.Module):
    """The interface the NCSN method gives the sampler, with the exact score of a 1-D mixture."""

    name = "ncsn"
    event_dim = 1
    samplers = {"annealed-langevin": "annealed-langevin"}  # declared by the class, as NCSN does

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sigmas", SIGMAS.float())
        self.sampling_defaults = dict(step_size=0.1, steps_per_level=5, denoise=False)
        self._score = mixture_score(MUS, WEIGHTS)

    def score(self, x, sigma):
        return self._score(x, sigma)

    def init_sample(self, num, generator=None):
        return torch.rand(num, 1, generator=generator) * 16 - 8


@pytest.mark.parametrize("steps, expected_steps", [(None, 5), (20, 20)])
def test_annealed_langevin_is_declared_by_ncsn(steps, expected_steps):
    from probgen.models import NCSN

    method = FakeNCSN()
    assert "annealed-langevin" in samplers_for(NCSN) and samplers_for(method) == ["annealed-langevin"]
    x = draw_samples(method, 500, sampler="annealed-langevin", steps=steps, seed=0)
    assert x.shape == (500, 1) and bool(torch.isfinite(x).all())
    gen = torch.Generator().manual_seed(0)
    expected = annealed_langevin(
        method.score,
        method.init_sample(500, gen),
        method.sigmas,
        step_size=0.1,
        steps_per_level=expected_steps,
        denoise=False,
        generator=gen,
    )
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_the_ncsn_sampler_takes_step_size_and_denoise_options():
    method = FakeNCSN()
    options = {"step_size": 0.2, "denoise": True}
    x = draw_samples(method, 50, sampler="annealed-langevin", seed=0, options=options)
    gen = torch.Generator().manual_seed(0)
    expected = annealed_langevin(
        method.score,
        method.init_sample(50, gen),
        method.sigmas,
        step_size=0.2,
        steps_per_level=5,
        generator=gen,
    )
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"Expected knobs of the .annealed-langevin. sampler \(steps, step_size, denoise\)"
    ):
        draw_samples(method, 50, sampler="annealed-langevin", options={"snr": 0.1})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([1.0, 2.0], "strictly descending"),
        ([1.0, 1.0], "strictly descending"),
        ([[2.0, 1.0]], "shape"),
        ([], "shape"),
        ([1.0, 0.0], "sigmas > 0"),
        ([1.0, -0.5], "sigmas > 0"),
        ([float("inf"), 1.0], "finite"),
    ],
)
def test_bad_sigmas_raise(sigmas, match):
    with pytest.raises(ValueError, match=f"Expected .*{match}.*but found"):
        check_sigmas(torch.tensor(sigmas))
    with pytest.raises(ValueError, match="Expected"):
        annealed_langevin(gaussian_score(0.0, 1.0), torch.zeros(2, 1), torch.tensor(sigmas))


def test_bad_arguments_raise():
    score, x = gaussian_score(0.0, 1.0), torch.zeros(4, 2)
    cases = [
        lambda: annealed_langevin(score, x, [2.0, 1.0], steps_per_level=0),
        lambda: annealed_langevin(score, x, [2.0, 1.0], step_size=-1.0),
        lambda: annealed_langevin(score, torch.zeros(4, 2, dtype=torch.long), [2.0, 1.0]),
        lambda: langevin_sde_sample(score, x, step_size=0.1, num_steps=0),
        lambda: langevin_sde_sample(score, x, step_size=0.0, num_steps=5),
        lambda: langevin_sde_sample(score, x, step_size=0.1, num_steps=5, method="heun"),
        lambda: langevin_sde_sample(score, torch.zeros(4), step_size=0.1, num_steps=5),
        lambda: langevin_corrector(score, x, 0.5, snr=0.0),
        lambda: langevin_corrector(score, x, 0.5, snr=0.1, n_steps=-1),
        lambda: langevin_corrector(score, x, 0.5, snr=0.1, alpha=torch.zeros(4)),
        lambda: langevin_corrector(score, x, torch.zeros(3), snr=0.1),
    ]
    for case in cases:
        with pytest.raises(ValueError, match="Expected .* but found"):
            case()
