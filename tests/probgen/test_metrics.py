"""Tests for probgen.metrics against exact or analytic targets."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import scipy.stats
import torch

from probgen.metrics import (
    _train_digits_classifier,
    bits_per_dim,
    digits_classifier,
    digits_features,
    digits_frechet_distance,
    discrete_nll_from_density,
    frechet_distance,
    frechet_distance_from_moments,
    mmd,
    mode_coverage,
    sliced_wasserstein,
)
from tests.common import assert_close, mc_tolerance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# --- bits/dim and dequantization ---------------------------------------------------


def test_bits_per_dim_formula_and_shape():
    nll = torch.tensor([[64 * math.log(2.0), 0.0]])
    out = bits_per_dim(nll, 64)
    assert out.shape == nll.shape
    assert_close(out, [[1.0, 0.0]])
    assert_close(bits_per_dim(2 * math.log(2.0), 2), 1.0)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bits_per_dim_rejects_bad_num_dims(bad):
    with pytest.raises(ValueError, match="Expected num_dims"):
        bits_per_dim(torch.ones(3), bad)


def test_uniform_density_gives_uniform_discrete_nll():
    # Uniform on [0, 1)^D: -log p = 0; uniform on [-1, 1)^D with scale 2: -log p = D ln 2.
    # Both induce the uniform discrete model, whose NLL is exactly D ln L.
    d, levels = 64, 17
    zero = torch.zeros(5)
    assert_close(discrete_nll_from_density(zero, d, levels), torch.full((5,), d * math.log(levels)))
    nll_pm1 = torch.full((5,), d * math.log(2.0))
    assert_close(
        discrete_nll_from_density(nll_pm1, d, levels, scale=2.0), torch.full((5,), d * math.log(levels))
    )
    # The protocol's uniform floor: 4.09 bits/dim.
    assert_close(bits_per_dim(discrete_nll_from_density(zero, d, levels), d), torch.full((5,), math.log2(17)))


def test_cellwise_constant_density_is_tight():
    # A density constant on every cell, p_y = P(v) / (s/L)^D, recovers -log P(v) exactly.
    d, levels, scale = 3, 5, 2.0
    probs = torch.softmax(_randn(d, levels, seed=1), dim=-1)  # independent per-dim categorical
    v = torch.randint(levels, (10, d), generator=_gen(2))
    log_p_disc = probs.log().gather(1, v.T).T.sum(-1)  # (10,)
    nll_density = -(log_p_disc - d * math.log(scale / levels))
    assert_close(discrete_nll_from_density(nll_density, d, levels, scale=scale), -log_p_disc, atol=1e-10)


def test_discrete_nll_validation():
    with pytest.raises(ValueError, match="Expected num_levels"):
        discrete_nll_from_density(torch.zeros(2), 4, 1)
    with pytest.raises(ValueError, match="Expected scale"):
        discrete_nll_from_density(torch.zeros(2), 4, 17, scale=0.0)


# --- sliced Wasserstein --------------------------------------------------------------


def test_sliced_wasserstein_identical_samples_is_zero():
    x = _randn(300, 3)
    assert sliced_wasserstein(x, x) == 0.0
    # Each point repeated twice is the same empirical distribution (N != M path).
    assert sliced_wasserstein(x, x.repeat(2, 1)) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_matches_scipy_in_1d_unequal_sizes():
    # In 1-D every direction is +-1 and W_1 is sign invariant: SW_1 = W_1 exactly.
    x, y = _randn(37, 1, seed=3), 2 * _randn(23, 1, seed=4) + 1
    expected = scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, p=1, num_projections=4) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_shift_in_2d():
    # y = x + v exactly, so every 1-D W_2^2 is (v . theta)^2 and only the directions are random:
    # SW_2^2 / |v|^2 = mean of cos^2(phi), mean 1/2, std sqrt(1/8), phi uniform on the circle.
    v = torch.tensor([3.0, -1.5], dtype=torch.float64)
    x = _randn(500, 2, seed=5)
    num = 2048
    sw = sliced_wasserstein(x, x + v, num_projections=num, generator=_gen(6))
    tol = mc_tolerance(math.sqrt(1 / 8), num)  # 4 standard errors
    assert abs(sw**2 / v.square().sum().item() - 0.5) < tol


def test_sliced_wasserstein_independent_gaussians_shift():
    # Independent samples add an O(1/sqrt(N)) sampling bias on top of |v| / sqrt(2).
    v = torch.tensor([2.0, 2.0], dtype=torch.float64)
    sw = sliced_wasserstein(_randn(4000, 2, seed=7), _randn(3000, 2, seed=8) + v, num_projections=1024)
    assert sw == pytest.approx(v.norm().item() / math.sqrt(2), rel=0.05)


def test_sliced_wasserstein_deterministic_and_validates():
    x, y = _randn(100, 2, seed=1), _randn(80, 2, seed=2)
    assert sliced_wasserstein(x, y) == sliced_wasserstein(x, y)
    assert sliced_wasserstein(x, y, generator=_gen(3)) == sliced_wasserstein(x, y, generator=_gen(3))
    with pytest.raises(ValueError, match="same number of columns"):
        sliced_wasserstein(x, _randn(10, 3))
    with pytest.raises(ValueError, match=r"Expected x of shape \(N, D\)"):
        sliced_wasserstein(x[:, 0], y)


# --- MMD -----------------------------------------------------------------------------


def _mmd_brute(x, y, hs):
    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h**2)) for h in hs)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    ).item()


def test_mmd_matches_brute_force():
    x, y = _randn(40, 3, seed=1), _randn(30, 3, seed=2) + 0.5
    assert mmd(x, y, bandwidths=[0.7, 2.0]) == pytest.approx(_mmd_brute(x, y, [0.7, 2.0]), rel=1e-9)


def _gaussian_mmd2(shift: float, d: int, s: float, hs) -> float:
    # Population MMD^2 between N(0, s^2 I) and N(mu, s^2 I) with |mu| = shift, for sum_h RBF(h).
    return sum(
        2 * (h**2 / (h**2 + 2 * s**2)) ** (d / 2) * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2 * s**2))))
        for h in hs
    )


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_mmd_unbiased_against_analytic_gaussians(shift):
    # Mean of K independent estimates within 4 standard errors (from their spread) of the exact value.
    d, s, hs, n, reps = 2, 1.0, (0.5, 1.0, 2.0), 300, 12
    mu = torch.tensor([shift, 0.0], dtype=torch.float64)
    est = torch.tensor(
        [mmd(_randn(n, d, seed=2 * r), _randn(n, d, seed=2 * r + 1) + mu, bandwidths=hs) for r in range(reps)]
    )
    se = est.std().item() / math.sqrt(reps)
    assert abs(est.mean().item() - _gaussian_mmd2(shift, d, s, hs)) < 4 * se + 1e-12


def test_mmd_default_bandwidths_same_vs_shifted():
    x, y = _randn(1000, 2, seed=1), _randn(1000, 2, seed=2)
    same, shifted = mmd(x, y), mmd(x, y + 1.0)
    # Under the null the unbiased estimate has mean 0 and std of order 1/N (about 1e-3 here).
    assert abs(same) < 5e-3
    assert shifted > 0.1
    assert mmd(x, x[:500]) < 5e-3
    with pytest.raises(ValueError, match=r"N >= 2"):
        mmd(x[:1], y)


# --- Fréchet distance -----------------------------------------------------------------


def test_frechet_from_moments_diagonal_closed_form():
    a = torch.tensor([0.5, 1.0, 4.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    mu1, mu2 = _randn(4, seed=1), _randn(4, seed=2)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance_from_moments(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected.item(), rel=1e-10)
    # Rotating both covariances by the same orthogonal matrix keeps the distance.
    q, _ = torch.linalg.qr(_randn(4, 4, seed=3))
    got_rot = frechet_distance_from_moments(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got_rot == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_from_moments_matches_scipy_sqrtm():
    f = 5
    m1, m2 = _randn(f, 2 * f, seed=1), _randn(f, 2 * f, seed=2)
    c1, c2 = m1 @ m1.T / f, m2 @ m2.T / f
    mu1, mu2 = _randn(f, seed=3), _randn(f, seed=4)
    cross = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = (mu1 - mu2).square().sum().item() + (c1.trace() + c2.trace()).item() - 2 * cross.trace()
    assert frechet_distance_from_moments(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_from_moments(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def _with_exact_moments(z: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    # Whitens z to zero mean / identity unbiased covariance, then maps it to (mu, cov) exactly.
    z = z - z.mean(0)
    w = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(w, z.T, upper=False).T
    return z @ torch.linalg.cholesky(cov).T + mu


def test_frechet_distance_on_samples_with_exact_moments():
    a = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    mu1 = torch.zeros(3, dtype=torch.float64)
    mu2 = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    x = _with_exact_moments(_randn(200, 3, seed=1), mu1, torch.diag(a))
    y = _with_exact_moments(_randn(150, 3, seed=2), mu2, torch.diag(b))
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(x, y) == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="same number of columns"):
        frechet_distance(x, y[:, :2])
    with pytest.raises(ValueError, match="Expected mu1, mu2 of shape"):
        frechet_distance_from_moments(mu1, torch.diag(a), mu2, torch.eye(2))


# --- digits classifier -------------------------------------------------------------------


def test_digits_classifier_accuracy_cache_and_determinism():
    from probgen.data import load_digits

    clf = digits_classifier()
    assert clf is digits_classifier()
    assert not clf.training
    x, y = load_digits("test", form="int", return_labels=True)
    with torch.no_grad():
        acc = (clf(x).argmax(-1) == y).double().mean().item()
    assert acc > 0.9
    rng_before = torch.get_rng_state()
    fresh = _train_digits_classifier()
    assert torch.equal(torch.get_rng_state(), rng_before), "training touched the global RNG"
    for (name, p), q in zip(clf.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), f"retrained {name} differs"
    feats = digits_features(x[:7])
    assert feats.shape == (7, 64) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match=r"Expected x of shape \(B, 64\)"):
        digits_features(x[:, :10])


def test_digits_frechet_distance_separates_noise():
    from probgen.data import load_digits

    train, test = load_digits("train"), load_digits("test")
    noise = torch.randint(0, 17, test.shape, generator=_gen(0)).float()
    fd_data = digits_frechet_distance(test, train)
    fd_noise = digits_frechet_distance(noise, train)
    assert fd_data >= 0.0
    assert fd_data < 0.1 * fd_noise


# --- mode coverage ----------------------------------------------------------------------


def _ring(k: int = 8, radius: float = 4 / math.sqrt(2)) -> torch.Tensor:
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return radius * torch.stack([ang.cos(), ang.sin()], dim=1)


def _mixture(centres, weights, std, n, seed):
    g = _gen(seed)
    idx = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)
    return centres[idx] + std * torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64)


def test_mode_coverage_uniform_mixture():
    centres, std, n = _ring(), 0.5 / math.sqrt(2), 8000
    out = mode_coverage(_mixture(centres, [1.0] * 8, std, n, seed=1), centres, std)
    assert out["modes_captured"] == 8 and out["num_modes"] == 8
    # In 2-D, P(|z| <= 3 std) = 1 - exp(-9/2); binomial standard error.
    p_hq = 1 - math.exp(-4.5)
    assert abs(out["high_quality_fraction"] - p_hq) < mc_tolerance(math.sqrt(p_hq * (1 - p_hq)), n)
    assert sum(out["weights"]) == pytest.approx(1.0)
    assert out["max_weight_error"] < mc_tolerance(math.sqrt(1 / 8 * 7 / 8), n)


def test_mode_coverage_known_unequal_weights():
    centres, std, n = _ring(), 0.3, 6000
    w = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0], dtype=torch.float64)
    out = mode_coverage(_mixture(centres, w, std, n, seed=2), centres, std)
    assert out["modes_captured"] == 3
    assert_close(out["weights"], w, atol=mc_tolerance(0.5, n))
    assert out["max_weight_error"] == pytest.approx(0.5 - 1 / 8, abs=mc_tolerance(0.5, n))
    # A threshold of 40% of N keeps only the heavy mode.
    assert (
        mode_coverage(_mixture(centres, w, std, n, seed=2), centres, std, min_fraction=0.4)["modes_captured"]
        == 1
    )


def test_mode_coverage_collapsed_and_off_manifold():
    centres, std = _ring(), 0.2
    collapsed = centres[3] + 0.01 * _randn(500, 2, seed=3)
    out = mode_coverage(collapsed, centres, std)
    assert out["modes_captured"] == 1
    assert out["weights"][3] == 1.0
    assert out["max_weight_error"] == pytest.approx(7 / 8)
    far = 100.0 + _randn(50, 2, seed=4)
    out = mode_coverage(far, centres, std)
    assert out["modes_captured"] == 0 and out["high_quality_fraction"] == 0.0
    assert out["weights"] == [0.0] * 8
    with pytest.raises(ValueError, match="Expected min_fraction"):
        mode_coverage(far, centres, std, min_fraction=0.0)
    with pytest.raises(ValueError, match="Expected std"):
        mode_coverage(far, centres, -1.0)


def test_digits_classifier_does_not_depend_on_the_thread_count():
    saved = torch.get_num_threads()
    try:
        weights = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            weights[n] = _train_digits_classifier().state_dict()
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(saved)
    for name, p in weights[1].items():
        assert torch.equal(p, weights[2][name]), name


def test_mean_and_stderr():
    from probgen.metrics import mean_and_stderr

    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)  # sample variance 14/3, n = 4
    assert mean_and_stderr(torch.tensor([2.5]))[0] == 2.5 and math.isnan(mean_and_stderr([2.5])[1])
    with pytest.raises(ValueError, match="Expected at least one value"):
        mean_and_stderr([])
