r"""Normalizing flows as Pyro programs: an observed ``TransformedDistribution`` of a standard Normal.

A flow is a bijection :math:`x = T(z)` of a base :math:`z \sim \mathcal N(0, I_D)`, so by the
change of variables

.. math::
    \log p(x) = \log \mathcal N(T^{-1}(x); 0, I) + \log \lvert \det \partial T^{-1}(x) / \partial x \rvert.

:class:`Flow` writes it as a Pyro program: ``model(x)`` observes ``x`` under
``dist.TransformedDistribution(Normal(0, 1).expand([D]).to_event(1), transforms)`` in a
``pyro.plate("data", B)``, and ``guide(x)`` is empty, so Pyro's ``Trace_ELBO`` over the pair is
exactly :math:`-\log p(x)` and :func:`probgen.inference.fit` is maximum likelihood. The layers are
Pyro's own transforms, held in a ``torch.nn.ModuleList`` so that their parameters are the
method's parameters:

* ``"spline_coupling"``: rational-quadratic spline coupling (Durkan, Bekasov, Murray &
  Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04545): the first half of the
  coordinates pass through an elementwise spline, the second half through a spline whose knots a
  network computes from the first half. Each spline is monotone on :math:`[-B, B]` (``bound``)
  and the identity outside (linear tails).
* ``"affine_coupling"``: RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803):
  :math:`y_{1:d} = x_{1:d}`, :math:`y_{d+1:D} = \mu(x_{1:d}) + \sigma(x_{1:d}) \odot x_{d+1:D}`.
* ``"maf"``: masked autoregressive flow (Papamakarios, Pavlakou & Murray 2017, arXiv:1705.07057):
  Pyro's ``AffineAutoregressive`` used in its inverse direction, so that the density is one
  network pass (data to noise, :math:`z_i = (x_i - \mu_i(x_{<i})) e^{-\alpha_i(x_{<i})}`) and
  sampling is D sequential passes, as in the paper.

Between layers the coordinates are permuted (reversed, or a fixed random permutation drawn from
``permutation_seed``). Last (on the data side) sits a fixed elementwise affine map
:math:`x = \text{loc} + \text{scale} \odot h`, chosen by :meth:`Flow.from_data` to standardize the
training data so that the splines' box :math:`[-B, B]` covers it; its Jacobian
:math:`\sum_i \log \text{scale}_i` is part of the density like every other layer's.

**As a guide.** :meth:`Flow.distribution` is the flow's distribution (event shape ``(D,)``),
usable as the distribution of a latent site in another method's guide, e.g.
``pyro.sample("z", flow.distribution())`` in a ``pyro.plate``; keep the flow as a submodule of
that guide's module so its parameters are trained with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import (
    AffineAutoregressive,
    AffineCoupling,
    AffineTransform,
    Permute,
    SplineCoupling,
)
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import Tensor, nn

from probgen.data import TOYS
from probgen.models.base import Method, register

__all__ = ["Flow", "TRANSFORMS", "PERMUTATIONS"]

TRANSFORMS = ("spline_coupling", "affine_coupling", "maf")
PERMUTATIONS = ("reverse", "random")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but found {value!r}.")
    return value


def _vector(name: str, value: Sequence[float] | None, dim: int, positive: bool = False) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in value]
    if len(values) != dim:
        raise ValueError(f"Expected {name} with {dim} entries (one per dimension), but found {len(values)}.")
    if not all(torch.isfinite(torch.tensor(values))) or (positive and min(values) <= 0):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"Expected {kind} values in {name}, but found {values}.")
    return values


# softplus^{-1}(1 - 2e-3): with Pyro's minimum derivative 1e-3 a spline knot's slope is then
# 1 - 1e-3, the slope Pyro pins at the box's edges, so equal bins make the spline the identity.
_IDENTITY_SLOPE = math.log(math.expm1(1.0 - 2e-3))
_INIT_GAIN = 1e-2


@torch.no_grad()
def _near_identity(last: nn.Linear, derivative_slice: slice | None = None) -> None:
    """Shrink a conditioner's output layer so its layer starts near the identity (and still learns)."""
    last.weight.mul_(_INIT_GAIN)
    last.bias.zero_()
    if derivative_slice is not None:
        last.bias[derivative_slice] = _IDENTITY_SLOPE


class _AffineAutoregressive(AffineAutoregressive):
    """Pyro's ``AffineAutoregressive`` with its sequential inverse in the input's dtype and device.

    (Pyro's own starts from default-dtype zeros, which breaks sampling a float64 MAF.)
    """

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        for idx in self.arn.permutation.tolist():
            mean, log_scale = self.arn(x)
            log_scale = clamp_preserve_gradients(log_scale, self.log_scale_min_clip, self.log_scale_max_clip)
            x_idx = (y - mean)[..., idx : idx + 1] * torch.exp(-log_scale[..., idx : idx + 1])
            x = torch.cat([x[..., :idx], x_idx, x[..., idx + 1 :]], dim=-1)
        self._cached_log_scale = log_scale
        return x


def _layer(transform: str, dim: int, hidden: list[int], count_bins: int, bound: float) -> nn.Module:
    """One learnable layer, a Pyro ``TransformModule``.

    Coupling layers map base to data; the MAF layer maps data to noise (its cheap direction) and is
    used through ``.inv``. Every layer starts close to the identity, so the untrained flow is close
    to its base.
    """
    split, rest = dim // 2, dim - dim // 2
    if transform == "spline_coupling":
        sizes = [rest * count_bins, rest * count_bins, rest * (count_bins - 1)]
        hypernet = DenseNN(split, hidden, param_dims=sizes)
        _near_identity(hypernet.layers[-1], slice(sizes[0] + sizes[1], None))
        layer = SplineCoupling(dim, split, hypernet, count_bins=count_bins, bound=bound, order="quadratic")
        with torch.no_grad():
            lower = layer.lower_spline
            lower.unnormalized_widths.mul_(_INIT_GAIN)
            lower.unnormalized_heights.mul_(_INIT_GAIN)
            lower.unnormalized_derivatives.mul_(_INIT_GAIN).add_(_IDENTITY_SLOPE)
        return layer
    if transform == "affine_coupling":
        hypernet = DenseNN(split, hidden, param_dims=[rest, rest])
        _near_identity(hypernet.layers[-1])
        return AffineCoupling(split, hypernet)
    # The autoregressive order is the identity; the permutations between layers vary it.
    arn = AutoRegressiveNN(dim, hidden, permutation=torch.arange(dim))
    _near_identity(arn.layers[-1])
    return _AffineAutoregressive(arn)


@register("flow")
class Flow(Method):
    r"""A normalizing flow over vectors, trained by maximum likelihood with an empty guide.

    Args:
        data_dim: flat size D of one observation (D >= 2: the layers couple coordinates).
        transform: ``"spline_coupling"``, ``"affine_coupling"`` (RealNVP) or ``"maf"``.
        num_layers: number of learnable layers, with a permutation between consecutive ones.
        hidden: hidden widths of each layer's conditioner network.
        count_bins: spline segments per dimension (``"spline_coupling"`` only).
        bound: B, the splines act on :math:`[-B, B]` (after the standardization) and are the
            identity outside (``"spline_coupling"`` only).
        permutation: ``"reverse"`` or ``"random"`` (one fixed permutation per gap between layers).
        permutation_seed: seed of the random permutations (they are rebuilt from the config).
        loc, scale: the fixed data-side affine map :math:`x = \text{loc} + \text{scale} \odot h`,
            D values each; None for the identity.

    Example:
        >>> flow = Flow(2, transform="spline_coupling")
        >>> log_p = flow.log_prob(x)                                           # x: (B, 2) -> (B,)
        >>> loss = flow.elbo().differentiable_loss(flow.model, flow.guide, x)  # = -log_p.sum()
        >>> samples = flow.sample(16)                                          # (16, 2)
    """

    likelihoods = {"exact": "exact"}

    finite_data = True

    def __init__(
        self,
        data_dim: int,
        *,
        transform: str = "spline_coupling",
        num_layers: int = 4,
        hidden: Sequence[int] = (64, 64),
        count_bins: int = 16,
        bound: float = 4.0,
        permutation: str = "reverse",
        permutation_seed: int = 0,
        loc: Sequence[float] | None = None,
        scale: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _positive_int("data_dim", data_dim)
        if data_dim < 2:
            raise ValueError(f"Expected data_dim >= 2 (the layers couple coordinates), but found {data_dim}.")
        if transform not in TRANSFORMS:
            raise ValueError(f"Expected transform in {TRANSFORMS}, but found {transform!r}.")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"Expected permutation in {PERMUTATIONS}, but found {permutation!r}.")
        _positive_int("num_layers", num_layers)
        hidden = [_positive_int("each hidden width", h) for h in hidden]
        if not hidden:
            raise ValueError("Expected at least one hidden width, but found none.")
        if transform == "spline_coupling" and (
            isinstance(count_bins, bool) or not isinstance(count_bins, int) or count_bins < 2
        ):
            raise ValueError(f"Expected count_bins >= 2 (an int), but found {count_bins!r}.")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < float("inf"):
            raise ValueError(f"Expected bound to be a positive finite number, but found {bound!r}.")
        if isinstance(permutation_seed, bool) or not isinstance(permutation_seed, int):
            raise ValueError(f"Expected permutation_seed to be an int, but found {permutation_seed!r}.")
        loc = _vector("loc", loc, data_dim)
        scale = _vector("scale", scale, data_dim, positive=True)
        self.config = dict(
            data_dim=data_dim,
            transform=transform,
            num_layers=num_layers,
            hidden=hidden,
            count_bins=count_bins,
            bound=float(bound),
            permutation=permutation,
            permutation_seed=permutation_seed,
            loc=loc,
            scale=scale,
        )
        self.data_dim, self.transform = data_dim, transform
        self.layers = nn.ModuleList(
            _layer(transform, data_dim, hidden, count_bins, float(bound)) for _ in range(num_layers)
        )
        # Permutations, loc and scale are functions of the config, so they are not saved as state.
        gen = torch.Generator().manual_seed(permutation_seed)
        for i in range(num_layers - 1):
            if permutation == "random":
                perm = torch.randperm(data_dim, generator=gen)
            else:
                perm = torch.arange(data_dim - 1, -1, -1)
            self.register_buffer(f"_perm{i}", perm, persistent=False)
        loc_t = torch.tensor(loc) if loc is not None else torch.zeros(data_dim)
        scale_t = torch.tensor(scale) if scale is not None else torch.ones(data_dim)
        self.register_buffer("_loc", loc_t, persistent=False)
        self.register_buffer("_scale", scale_t, persistent=False)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Raw values for the 2-D toys, uniformly dequantized ``(v + u) / L`` for level data."""
        return "int" if dataset_name in (*TOYS, "grid25") else "dequantized"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> Flow:
        """A flow for ``dataset`` (in :meth:`data_form`), standardized to its training split.

        2-D data: 4 spline coupling layers of 16 bins (8 layers for the affine transforms, which
        are less expressive per layer), coordinates swapped between layers. Higher-dimensional
        data (the 64-D digits): 6 layers of 8 bins with random permutations; with 1,350 training
        images larger conditioners only overfit sooner.
        """
        x = dataset.x.double()
        dim = x.shape[-1]
        std = x.std(0).clamp_min(1e-3)
        defaults: dict[str, Any] = {"data_dim": dim, "loc": x.mean(0).tolist(), "scale": std.tolist()}
        spline = kwargs.get("transform", "spline_coupling") == "spline_coupling"
        if dim > 2:
            defaults.update(num_layers=6 if spline else 8, count_bins=8, permutation="random")
        else:
            defaults.update(num_layers=4 if spline else 8, count_bins=16)
        defaults.update(kwargs)
        return cls(**defaults)

    def check_data(self, x: Tensor) -> Tensor:
        """Validate a batch ``x`` of shape ``(B, D)``: floating point and finite."""
        if isinstance(x, Tensor) and not x.is_floating_point():
            raise ValueError(f"Expected floating-point data for a flow, but found dtype {x.dtype}.")
        return super().check_data(x)

    def transforms(self) -> list[dist.transforms.Transform]:
        r"""The bijection :math:`T` as Pyro transforms, base side first, data side last.

        Built afresh on each call (with every layer's cache of its last input cleared), so a value
        computed before a parameter update is never reused after it.
        """
        for module in self.modules():
            if isinstance(module, torch.distributions.Transform) and module._cache_size == 1:
                module._cached_x_y = None, None
        parts: list[dist.transforms.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                parts.append(Permute(getattr(self, f"_perm{i - 1}")))
            parts.append(layer.inv if self.transform == "maf" else layer)
        parts.append(AffineTransform(self._loc, self._scale, event_dim=1))
        return parts

    def distribution(self) -> dist.TransformedDistribution:
        r"""The flow's distribution :math:`p(x)`: batch shape ``()``, event shape ``(D,)``.

        Build it again after the parameters change (see :meth:`transforms`).
        """
        base = dist.Normal(self._zero.expand(self.data_dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """Observe ``x`` (``(B, D)``) under the flow, or sample ``batch_size`` points when None."""
        with pyro.plate("data", self._batch_size(x, batch_size)):
            pyro.sample("x", self.distribution(), obs=x)

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """Empty: a flow has no latent site, so ``Trace_ELBO`` is the exact negative log-likelihood."""

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x`` (``(B, D)``) in nats, ``(B,)``."""
        self.check_data(x)
        return self.distribution().log_prob(x)

    def to_base(self, x: Tensor) -> Tensor:
        r"""The base point :math:`z = T^{-1}(x)` of each row of ``x`` (``(B, D)``), ``(B, D)``."""
        self.check_data(x)
        for t in reversed(self.transforms()):
            x = t.inv(x)
        return x
