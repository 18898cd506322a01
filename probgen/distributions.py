r"""Pyro distributions for discrete data likelihoods.

:class:`DiscretizedLogistic` puts a logistic density on the real line and
integrates it over the bins of ``num_levels`` integer levels, with the two
edge bins absorbing the tails (Salimans et al. 2017, PixelCNN++,
arXiv:1701.05517). A mixture of them is ``MixtureSameFamily`` over it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["DiscretizedLogistic"]


class DiscretizedLogistic(TorchDistribution):
    r"""Logistic distribution discretized to the integer levels ``0 .. num_levels - 1``.

    .. math::
        P(v) = \sigma\Big(\frac{v + \frac12 - \mu}{s}\Big) - \sigma\Big(\frac{v - \frac12 - \mu}{s}\Big),

    with :math:`v - \frac12` replaced by :math:`-\infty` for :math:`v = 0` and
    :math:`v + \frac12` by :math:`+\infty` for :math:`v = L - 1`, computed in log
    space as :math:`\log\sigma(a) + \log\sigma(-b) + \log(1 - e^{b - a})`.

    Args:
        loc: location :math:`\mu` in level units, any shape.
        scale: scale :math:`s > 0` in level units, broadcastable with ``loc``.
        num_levels: number of levels L >= 2.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc, scale, num_levels: int, validate_args=None) -> None:
        if num_levels < 2:
            raise ValueError(f"Expected num_levels >= 2, but found {num_levels}.")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_levels = int(num_levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.to(self.loc.dtype)
        inv_s = self.scale.reciprocal()
        a = (value + 0.5 - self.loc) * inv_s  # upper edge
        b = (value - 0.5 - self.loc) * inv_s  # lower edge
        interior = F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-inv_s))
        lowest = F.logsigmoid(a)
        highest = F.logsigmoid(-b)
        out = torch.where(value <= 0, lowest, interior)
        return torch.where(value >= self.num_levels - 1, highest, out)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
        return x.round().clamp(0, self.num_levels - 1)

    @property
    def mean(self) -> torch.Tensor:
        levels = torch.arange(self.num_levels, dtype=self.loc.dtype, device=self.loc.device)
        lp = self.log_prob(levels.view((-1,) + (1,) * self.loc.dim()).expand((-1,) + self.loc.shape))
        return (lp.exp() * levels.view((-1,) + (1,) * self.loc.dim())).sum(0)
