r"""Evaluation metrics: bits/dim, sample-based distances, a digits Fréchet distance, mode coverage.

Everything here follows the evaluation protocol of ``DESIGN.md``: likelihoods
come in nats per example and are turned into bits/dim of the *discrete* data;
2-D toys are compared with the sliced Wasserstein distance and MMD; digits
with a Fréchet distance in the features of a small, deterministically trained
classifier; mixtures with mode coverage.

All sample-based metrics are deterministic: the only random one,
:func:`sliced_wasserstein`, draws its directions from a passed generator or
from a fixed-seed generator of its own, never from the global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "bits_per_dim",
    "digits_classifier",
    "digits_features",
    "digits_frechet_distance",
    "discrete_nll_from_density",
    "frechet_distance",
    "frechet_distance_from_moments",
    "independent_levels_nll",
    "mmd",
    "mode_coverage",
    "sliced_wasserstein",
]

_LN2 = math.log(2.0)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but found {value!r}.")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"Expected {name} to be a positive finite number, but found {value!r}.")


def _check_samples(name: str, x: object, *, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected {name} to be a Tensor, but found {type(x).__name__}.")
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(
            f"Expected {name} of shape (N, D) with N >= {min_rows} and D >= 1, but found {tuple(x.shape)}."
        )
    return x.detach().to(torch.float64)


def _check_same_dim(x: Tensor, y: Tensor, names: str = "x and y") -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"Expected {names} with the same number of columns, but found {x.shape[1]} and {y.shape[1]}."
        )


# --- likelihoods --------------------------------------------------------------


def mean_and_stderr(values: Sequence[float] | Tensor) -> tuple[float, float]:
    r"""The mean of ``values`` and its standard error :math:`s / \sqrt n` (``s`` the sample std).

    For repeated Monte Carlo measurements, e.g. a distance under several seeds.

    Args:
        values: ``n >= 1`` numbers (a sequence or a 1-D tensor).

    Returns:
        ``(mean, stderr)``; the standard error is NaN when ``n = 1``.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 1:
        raise ValueError("Expected at least one value, but found none.")
    n = v.numel()
    return float(v.mean()), float(v.std() / math.sqrt(n)) if n > 1 else math.nan


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor:
    r"""Converts a negative log-likelihood in nats per example to bits per dimension.

    :math:`\mathrm{bpd} = \mathrm{NLL} / (D \ln 2)`, elementwise.

    Args:
        nll_nats: (B,) (or any shape, or a float) negative log-likelihoods in nats per example.
        num_dims: D, the number of dimensions of one example.

    Returns:
        Tensor of the same shape as ``nll_nats`` (0-dim for a float), in bits/dim.
    """
    _check_positive_int("num_dims", num_dims)
    nll = torch.as_tensor(nll_nats)
    if not nll.is_floating_point():
        nll = nll.to(torch.get_default_dtype())
    return nll / (num_dims * _LN2)


def independent_levels_nll(train: Tensor, test: Tensor, num_levels: int, *, alpha: float = 1.0) -> Tensor:
    r"""NLL of ``test`` under independent per-dimension categoricals fitted to ``train``.

    The baseline every model of discrete data must beat: each dimension gets
    its own ``num_levels``-way categorical with add-``alpha`` (Laplace)
    smoothing, estimated on ``train``.

    Args:
        train: integer levels, ``(N, D)``.
        test: integer levels, ``(M, D)``.
        num_levels: L.
        alpha: pseudo-count per level.

    Returns:
        Tensor ``(M,)``: NLL in nats per example.
    """
    train, test = _check_samples("train", train), _check_samples("test", test)
    _check_same_dim(train, test, "train and test")
    _check_positive_int("num_levels", num_levels)
    counts = torch.nn.functional.one_hot(train.long(), num_levels).sum(0).double() + alpha  # (D, L)
    log_probs = counts.log() - counts.sum(-1, keepdim=True).log()
    return -log_probs.gather(-1, test.long().T).T.sum(-1)


def discrete_nll_from_density(
    nll_density_nats: Tensor, num_dims: int, num_levels: int, *, scale: float = 1.0
) -> Tensor:
    r"""Upper bound on the NLL of ``L``-level data from the NLL of a density on dequantized data.

    The models of the evaluation protocol see dequantized data
    :math:`y = s (v + u) / L + c` with :math:`v \in \{0, \dots, L-1\}^D`,
    :math:`u \sim \mathcal{U}[0, 1)^D`, scale :math:`s` (1 for :math:`[0, 1)`, 2 for
    :math:`[-1, 1)`) and any shift :math:`c`. The density :math:`p_y` induces the
    discrete model :math:`P(v) = \int_{C_v} p_y(y)\,dy` where the cell
    :math:`C_v = \{s (v + u) / L + c : u \in [0, 1)^D\}` has volume :math:`(s/L)^D`, so

    .. math::
        \log P(v) = D \log(s/L) + \log \mathbb{E}_u[p_y(y(u))]
        \ge D \log(s/L) + \mathbb{E}_u[\log p_y(y(u))]

    by Jensen's inequality, i.e.
    :math:`-\log P(v) \le \mathbb{E}_u[-\log p_y(y)] + D \log(L / s)`.
    A single draw of :math:`u` gives an unbiased estimate of the right-hand side.
    The bound is tight when :math:`p_y` is constant on every cell.

    Args:
        nll_density_nats: (B,) :math:`-\log p_y(y)` in nats per example (any shape is kept).
        num_dims: D, the number of dimensions of one example.
        num_levels: L, the number of discrete levels (17 for the digits).
        scale: s, the length of the dequantized data range per dimension.

    Returns:
        Tensor shaped like ``nll_density_nats``: the bound on :math:`-\log P(v)` in nats.

    References:
        Theis, van den Oord, Bethge, "A note on the evaluation of generative models", 2016
        (arXiv:1511.01844); Ho et al., "Flow++", 2019 (arXiv:1902.00275).
    """
    _check_positive_int("num_dims", num_dims)
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"Expected num_levels to be an int >= 2, but found {num_levels!r}.")
    _check_positive_float("scale", scale)
    nll = torch.as_tensor(nll_density_nats)
    if not nll.is_floating_point():
        nll = nll.to(torch.get_default_dtype())
    return nll + num_dims * math.log(num_levels / scale)


# --- sample-based distances -------------------------------------------------------


def _wasserstein_1d_pp(xs: Tensor, ys: Tensor, p: int) -> Tensor:
    r"""Exact :math:`W_p^p` between empirical 1-D distributions, row by row.

    ``xs`` (P, N) and ``ys`` (P, M) are sorted along dim 1. The quantile functions
    are step functions with breaks at :math:`i/N` and :math:`j/M`; on every piece of
    the merged grid both are constant, so the integral is a finite sum.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).abs().pow(p).mean(dim=1)
    grid = torch.cat(
        [torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m]
    )
    grid = torch.unique(grid)  # sorted, from 0 to 1
    widths = grid[1:] - grid[:-1]
    mids = 0.5 * (grid[1:] + grid[:-1])
    ix = (mids * n).floor().long().clamp_(max=n - 1)
    iy = (mids * m).floor().long().clamp_(max=m - 1)
    return ((xs[:, ix] - ys[:, iy]).abs().pow(p) * widths).sum(dim=1)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    *,
    num_projections: int = 512,
    p: int = 2,
    generator: torch.Generator | None = None,
) -> float:
    r"""Monte Carlo sliced Wasserstein-p distance between two sample sets.

    :math:`\mathrm{SW}_p = \big(\mathbb{E}_\theta\, W_p^p(\theta^\top x, \theta^\top y)\big)^{1/p}`
    over directions :math:`\theta` uniform on the unit sphere, estimated with
    ``num_projections`` directions. Each 1-D :math:`W_p^p` between the empirical
    projections is exact, also for ``N != M`` (quantile functions compared on the
    merged grid of breakpoints :math:`i/N`, :math:`j/M`). Computed in float64.

    For two distributions that differ by a shift :math:`v`,
    :math:`\mathrm{SW}_2 = |v| / \sqrt{D}` since :math:`\mathbb{E}(v^\top\theta)^2 = |v|^2 / D`.

    Args:
        x: (N, D) samples.
        y: (M, D) samples.
        num_projections: number of random directions.
        p: order of the distance, ``>= 1``.
        generator: source of the directions; default a fresh generator seeded with 0,
            so the metric is reproducible.

    Returns:
        The distance as a Python float.

    References:
        Bonneel et al., "Sliced and Radon Wasserstein barycenters of measures", 2015.
    """
    x = _check_samples("x", x)
    y = _check_samples("y", y)
    _check_same_dim(x, y)
    _check_positive_int("num_projections", num_projections)
    _check_positive_int("p", p)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    # (P, N) layout: sorting contiguous rows is several times faster than sorting columns.
    xs = (theta @ x.T).sort(dim=1).values
    ys = (theta @ y.T).sort(dim=1).values
    w_pp = _wasserstein_1d_pp(xs, ys, p)
    return float(w_pp.mean().pow(1.0 / p))


def _pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_(min=0.0)


def _median_pairwise_distance(z: Tensor, max_points: int = 2000) -> float:
    if z.shape[0] > max_points:  # evenly strided subset: deterministic and order-agnostic enough
        z = z[torch.linspace(0, z.shape[0] - 1, max_points).round().long()]
    d2 = _pairwise_sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    return float(d2[iu[0], iu[1]].sqrt().median())


def _kernel_sum(a: Tensor, b: Tensor, gammas: Tensor, block: int = 1024) -> float:
    """Sum over all pairs of the sum of RBF kernels ``exp(-gamma |a_i - b_j|^2)``."""
    total = 0.0
    for start in range(0, a.shape[0], block):
        d2 = _pairwise_sq_dists(a[start : start + block], b)
        total += float(torch.exp(-d2[..., None] * gammas).sum())
    return total


def mmd(x: Tensor, y: Tensor, *, bandwidths: Sequence[float] | None = None) -> float:
    r"""Unbiased estimate of the squared maximum mean discrepancy with a sum of RBF kernels.

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{\sum_{i \ne j} k(x_i, x_j)}{N(N-1)}
        + \frac{\sum_{i \ne j} k(y_i, y_j)}{M(M-1)} - \frac{2 \sum_{i,j} k(x_i, y_j)}{NM},
        \qquad k(a, b) = \sum_h \exp\!\big(-|a - b|^2 / (2 h^2)\big).

    The estimate is unbiased, so it can be slightly negative when the two
    distributions agree. Computed in float64, in blocks (memory ``O(1024 (N + M))``).

    Args:
        x: (N, D) samples, ``N >= 2``.
        y: (M, D) samples, ``M >= 2``.
        bandwidths: kernel bandwidths :math:`h`; default the median pairwise distance
            of the pooled samples (on an evenly strided subset of at most 2,000 points)
            times ``(0.5, 1, 2)``.

    Returns:
        :math:`\widehat{\mathrm{MMD}}^2_u` as a Python float.

    References:
        Gretton et al., "A kernel two-sample test", JMLR 2012.
    """
    x = _check_samples("x", x, min_rows=2)
    y = _check_samples("y", y, min_rows=2)
    _check_same_dim(x, y)
    if bandwidths is None:
        med = _median_pairwise_distance(torch.cat([x, y]))
        if med <= 0.0:
            med = 1.0  # all points identical: any bandwidth gives MMD 0
        bandwidths = (0.5 * med, med, 2.0 * med)
    bandwidths = list(bandwidths)
    if not bandwidths:
        raise ValueError("Expected at least one bandwidth, but found an empty sequence.")
    for h in bandwidths:
        _check_positive_float("bandwidth", h)
    gammas = torch.tensor([0.5 / h**2 for h in bandwidths], dtype=torch.float64)
    n, m, k = x.shape[0], y.shape[0], len(bandwidths)
    kxx = (_kernel_sum(x, x, gammas) - n * k) / (n * (n - 1))  # drop the diagonal, k(a, a) = k
    kyy = (_kernel_sum(y, y, gammas) - m * k) / (m * (m - 1))
    kxy = _kernel_sum(x, y, gammas) / (n * m)
    return kxx + kyy - 2.0 * kxy


def _sqrtm_psd(a: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (evecs * evals.clamp(min=0.0).sqrt()) @ evecs.T


def frechet_distance_from_moments(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    r"""Fréchet (2-Wasserstein) distance squared between two Gaussians.

    .. math::
        |\mu_1 - \mu_2|^2 + \mathrm{Tr}\big(\Sigma_1 + \Sigma_2
        - 2 (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}\big)

    computed in float64 with symmetric eigendecompositions; tiny negative
    eigenvalues from round-off are clamped to 0, and so is the result.

    Args:
        mu1: (F,) mean of the first Gaussian.
        cov1: (F, F) covariance of the first Gaussian (symmetric PSD).
        mu2: (F,) mean of the second Gaussian.
        cov2: (F, F) covariance of the second Gaussian.

    Returns:
        The squared distance as a Python float (this is what "FID" reports).

    References:
        Dowson & Landau, "The Fréchet distance between multivariate normal distributions", 1982;
        Heusel et al., "GANs trained by a two time-scale update rule ...", 2017.
    """
    tensors = {"mu1": mu1, "cov1": cov1, "mu2": mu2, "cov2": cov2}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected {name} to be a Tensor, but found {type(t).__name__}.")
    f = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, t, shape in (
        ("mu1", mu1, (f,)),
        ("mu2", mu2, (f,)),
        ("cov1", cov1, (f, f)),
        ("cov2", cov2, (f, f)),
    ):
        if f < 1 or tuple(t.shape) != shape:
            raise ValueError(
                f"Expected mu1, mu2 of shape (F,) and cov1, cov2 of shape (F, F), "
                f"but found {name} of shape {tuple(t.shape)} (mu1 {tuple(mu1.shape)})."
            )
    mu1, cov1, mu2, cov2 = (t.detach().to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    s1 = _sqrtm_psd(cov1)
    cross = s1 @ (0.5 * (cov2 + cov2.T)) @ s1
    evals = torch.linalg.eigvalsh(0.5 * (cross + cross.T)).clamp(min=0.0)
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * evals.sqrt().sum()
    return max(float(value), 0.0)


def frechet_distance(feat_x: Tensor, feat_y: Tensor) -> float:
    r"""Fréchet distance (squared) between Gaussians fitted to two feature sets.

    Means and unbiased covariances are computed in float64 and passed to
    :func:`frechet_distance_from_moments`.

    Args:
        feat_x: (N, F) features, ``N >= 2``.
        feat_y: (M, F) features, ``M >= 2``.

    Returns:
        The squared Fréchet distance as a Python float.
    """
    x = _check_samples("feat_x", feat_x, min_rows=2)
    y = _check_samples("feat_y", feat_y, min_rows=2)
    _check_same_dim(x, y, "feat_x and feat_y")
    return frechet_distance_from_moments(
        x.mean(0), torch.cov(x.T).reshape(x.shape[1], -1), y.mean(0), torch.cov(y.T).reshape(y.shape[1], -1)
    )


# --- digits classifier -----------------------------------------------------------

_DIGITS_DIM = 64
_DIGITS_MAX_LEVEL = 16.0


class _DigitsMLP(nn.Module):
    """64 -> 128 -> 64 (features) -> 10 ReLU MLP on digit levels ``0..16`` (scaled by 1/16 inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(_DIGITS_DIM, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x / _DIGITS_MAX_LEVEL)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


_CLASSIFIER_SEED = 0
_CLASSIFIER_EPOCHS = 10
_CLASSIFIER_BATCH = 32


def _train_digits_classifier() -> nn.Module:
    """Trains the digits classifier from scratch (uncached; see :func:`digits_classifier`)."""
    from probgen.data import load_digits  # deferred: only this metric needs the data

    x, y = load_digits("train", form="int", return_labels=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    # A forked RNG gives a reproducible initialisation without touching the global RNG;
    # the minibatch order comes from a local generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_CLASSIFIER_SEED)
        net = _DigitsMLP()
    generator = torch.Generator().manual_seed(_CLASSIFIER_SEED)
    optim = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    # One thread: the reductions' order, hence the weights bit for bit, would otherwise depend on
    # torch's thread count (1e-5 apart between 1 and 2 threads), and so would every distance.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(_CLASSIFIER_EPOCHS):
                order = torch.randperm(x.shape[0], generator=generator)
                for start in range(0, x.shape[0], _CLASSIFIER_BATCH):
                    idx = order[start : start + _CLASSIFIER_BATCH]
                    optim.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                    optim.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    net.requires_grad_(False)
    return net


@functools.lru_cache(maxsize=1)
def digits_classifier() -> nn.Module:
    r"""The project's digits classifier: deterministic, trained once per process, in eval mode.

    A 64 -> 128 -> 64 -> 10 ReLU MLP trained on the digits train split with Adam
    (lr 2e-3, weight decay 1e-4, 10 epochs of minibatches of 32 in an order drawn
    from a local generator), initialised under a forked RNG seeded with 0: the
    global RNG is untouched and every retraining in a process gives the same
    weights. Takes about a second on CPU; test accuracy is about 0.98. Its
    parameters do not require grad.

    Returns:
        The module; ``module(x)`` maps (B, 64) digit levels in ``0..16`` to (B, 10) logits
        and ``module.features(x)`` to (B, 64) penultimate features.
    """
    return _train_digits_classifier()


def _check_digits(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected {name} to be a Tensor, but found {type(x).__name__}.")
    if x.ndim != 2 or x.shape[1] != _DIGITS_DIM:
        raise ValueError(
            f"Expected {name} of shape (B, 64) in level units 0..16, but found {tuple(x.shape)}."
        )
    return x.detach().to(torch.float32)


def digits_features(x: Tensor) -> Tensor:
    r"""Penultimate features of :func:`digits_classifier`.

    Args:
        x: (B, 64) digit images in level units ``0..16`` (float; dequantized values are fine).

    Returns:
        (B, F) float32 features, F = 64.
    """
    x = _check_digits("x", x)
    with torch.no_grad():
        return digits_classifier().features(x)


def digits_frechet_distance(samples: Tensor, reference: Tensor) -> float:
    r"""Fréchet distance between samples and reference digits in the classifier's features.

    Args:
        samples: (N, 64) generated digits in level units ``0..16``.
        reference: (M, 64) reference digits (e.g. the test split) in level units.

    Returns:
        The squared Fréchet distance of the two feature sets, as a Python float.
    """
    return frechet_distance(digits_features(samples), digits_features(reference))


# --- mode coverage ----------------------------------------------------------------


def mode_coverage(
    samples: Tensor,
    centres: Tensor,
    std: float,
    *,
    threshold: float = 3.0,
    min_fraction: float | None = None,
) -> dict:
    r"""Counts the mixture modes that a sampler covers.

    Each sample goes to its nearest centre; it is *high quality* if it lies within
    ``threshold * std`` of that centre. A mode is *captured* if it receives at least
    ``min_fraction * N`` high-quality samples. This is the mode-counting convention
    of the unrolled-GAN, VEEGAN and PacGAN mixture experiments (high quality = within
    three standard deviations; a mode counts when it receives a fixed fraction of
    its expected share of samples); by default that fraction is a quarter of the
    share of a uniform mixture, ``min_fraction = 1 / (4 K)``.

    Args:
        samples: (N, D) samples.
        centres: (K, D) mode centres.
        std: standard deviation of each mixture component.
        threshold: radius of the high-quality ball in units of ``std``.
        min_fraction: share of all N samples a mode needs; default ``1 / (4 K)``.

    Returns:
        A dict with ``"modes_captured"`` (int), ``"num_modes"`` (K),
        ``"high_quality_fraction"`` (float, share of samples that are high quality),
        ``"weights"`` (list of K floats: share of the high-quality samples per mode,
        summing to 1, or all 0 if there are none) and ``"max_weight_error"``
        (float, :math:`\max_k |w_k - 1/K|`).

    References:
        Metz et al., "Unrolled generative adversarial networks", 2017;
        Srivastava et al., "VEEGAN", 2017; Lin et al., "PacGAN", 2018.
    """
    x = _check_samples("samples", samples)
    c = _check_samples("centres", centres)
    _check_same_dim(x, c, "samples and centres")
    _check_positive_float("std", std)
    _check_positive_float("threshold", threshold)
    n, k = x.shape[0], c.shape[0]
    if min_fraction is None:
        min_fraction = 1.0 / (4 * k)
    if (
        isinstance(min_fraction, bool)
        or not isinstance(min_fraction, (int, float))
        or not 0 < min_fraction <= 1
    ):
        raise ValueError(f"Expected min_fraction in (0, 1], but found {min_fraction!r}.")
    d2 = _pairwise_sq_dists(x, c)
    dmin2, nearest = d2.min(dim=1)
    good = dmin2 <= (threshold * std) ** 2
    counts = torch.bincount(nearest[good], minlength=k).to(torch.float64)
    total = float(counts.sum())
    weights = counts / total if total > 0 else counts
    return {
        "modes_captured": int((counts >= min_fraction * n).sum()),
        "num_modes": k,
        "high_quality_fraction": float(good.to(torch.float64).mean()),
        "weights": [float(w) for w in weights],
        "max_weight_error": float((weights - 1.0 / k).abs().max()),
    }
