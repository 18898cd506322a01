import math

import pytest
import torch

from probgen.distributions import DiscretizedLogistic
from tests.common import mc_tolerance


def _logistic_cdf(x, loc, scale):
    return 1.0 / (1.0 + math.exp(-(x - loc) / scale))


@pytest.mark.parametrize("loc, scale", [(0.0, 0.3), (7.3, 1.5), (16.0, 0.1), (-3.0, 2.0), (8.0, 40.0)])
def test_probabilities_match_cdf_differences_and_sum_to_one(loc, scale):
    levels = torch.arange(17.0, dtype=torch.float64)
    d = DiscretizedLogistic(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), 17
    )
    probs = d.log_prob(levels).exp()
    expected = []
    for v in range(17):
        hi = 1.0 if v == 16 else _logistic_cdf(v + 0.5, loc, scale)
        lo = 0.0 if v == 0 else _logistic_cdf(v - 0.5, loc, scale)
        expected.append(hi - lo)
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert abs(float(probs.sum()) - 1.0) < 1e-12


def test_log_prob_is_finite_for_tiny_scales():
    d = DiscretizedLogistic(torch.tensor([3.0, 3.0]), torch.tensor([1e-3, 1e-3]), 17)
    lp = d.log_prob(torch.tensor([3.0, 9.0]))
    assert torch.isfinite(lp).all() and lp[0] > -1e-3 and lp[1] < -1000


def test_sample_frequencies_match_probabilities():
    d = DiscretizedLogistic(torch.tensor(5.2), torch.tensor(1.3), 17)
    n = 200_000
    torch.manual_seed(0)
    counts = torch.bincount(d.sample((n,)).long(), minlength=17).double() / n
    probs = d.log_prob(torch.arange(17.0)).exp().double()
    # Each frequency is within 4 binomial standard errors of its probability.
    tol = torch.tensor([mc_tolerance(math.sqrt(p * (1 - p)), n) for p in probs.tolist()]) + 1e-9
    assert ((counts - probs).abs() <= tol).all()


def test_mean_and_expand():
    d = DiscretizedLogistic(torch.tensor([2.0, 15.5]), torch.tensor([0.5, 0.5]), 17)
    assert d.mean.shape == (2,)
    assert abs(float(d.mean[0]) - 2.0) < 0.05
    e = d.expand((4, 2))
    assert e.batch_shape == (4, 2) and e.log_prob(torch.zeros(4, 2)).shape == (4, 2)


def test_validation():
    with pytest.raises(ValueError, match="num_levels"):
        DiscretizedLogistic(0.0, 1.0, 1)
    d = DiscretizedLogistic(torch.tensor(0.0), torch.tensor(1.0), 17, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor(17.0))
