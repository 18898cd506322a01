r"""Score matching as Pyro programs: implicit (Hyvärinen), sliced, and denoising.

A score model :math:`s_\theta(x) \approx \nabla_x \log p(x)` is fitted by minimizing the Fisher
divergence :math:`\tfrac12 \mathbb E_p \lVert s_\theta(x) - \nabla_x \log p(x) \rVert^2`, which
never needs the unknown :math:`\nabla \log p`. Each objective enters the program as a term of
Pyro's ELBO:

* **implicit** (Hyvärinen 2005, JMLR 6, eq. 4): integrating by parts,
  :math:`\tfrac12 \mathbb E_p \lVert s - \nabla \log p \rVert^2 = \mathbb E_p\big[\operatorname{tr}
  \nabla_x s(x) + \tfrac12 \lVert s(x) \rVert^2\big] + C` with
  :math:`C = \tfrac12 \mathbb E_p \lVert \nabla \log p \rVert^2`; the Jacobian trace is exact
  (D backward passes, for low D). The model holds ``pyro.factor("fisher", -term)`` per example.
* **sliced** (Song, Garg, Shi & Ermon 2019, arXiv:1905.07088, eq. 6): with projections
  :math:`v` (:math:`\mathbb E[v v^\top] = I`), the term is :math:`v^\top \nabla_x s\, v + \tfrac12
  (v^\top s)^2`, an unbiased estimate of the implicit one at the cost of one backward pass;
  **sliced_vr** (their eq. 8, "SSM-VR") replaces :math:`\tfrac12 (v^\top s)^2` by its expectation
  :math:`\tfrac12 \lVert s \rVert^2`. The projections are a site ``"v"`` with the same law
  :math:`\mathcal N(0, I)` in model and guide (their KL is exactly 0); Rademacher projections
  are :math:`\operatorname{sign}(v)`.
* **dsm** (Vincent 2011, Neural Computation 23(7)): with :math:`\tilde x = x + \sigma \epsilon`,
  :math:`\tfrac12 \mathbb E \lVert s(\tilde x) - \nabla_{\tilde x} \log q_\sigma(\tilde x \mid x)
  \rVert^2 = \tfrac12 \mathbb E \lVert s(\tilde x) + \epsilon / \sigma \rVert^2` is the Fisher
  divergence to the *perturbed* density :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)` up to a
  constant. The program observes :math:`\epsilon` under :math:`\mathcal N(-\sigma s(\tilde x), I)`:

  .. math::
      \log \mathcal N(\epsilon; -\sigma s, I) = -\tfrac12 \lVert \epsilon + \sigma s \rVert^2
      - \tfrac D2 \log 2\pi = -\sigma^2 \cdot \tfrac12 \lVert s + \epsilon / \sigma \rVert^2
      - \tfrac D2 \log 2\pi,

  the :math:`\sigma^2`-weighted DSM loss up to a constant (:func:`denoising_sites`). The site
  ``"x_tilde"`` :math:`\sim \mathcal N(x, \sigma^2 I)` is in model and guide with the same law,
  and :math:`\epsilon = (\tilde x - x) / \sigma`.

With :class:`~probgen.elbo.AnalyticKL_ELBO`, the negative ELBO of every program is the objective
summed over the batch (plus the constant :math:`\tfrac D2 \log 2\pi` per example for ``dsm``).
Plain score matching needs a density: on data supported on a curve the first three objectives
are unbounded below (the scores grow without end on the support) and nothing in them constrains
the field off it, while DSM's perturbed density lives everywhere
(``examples/score_matching_support.py``).

Running :meth:`ScoreMatching.model` with nothing observed runs Langevin dynamics with the learned
score as a Pyro Markov chain (:func:`langevin_chain`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.elbo import AnalyticKL_ELBO
from probgen.models.base import Method, register
from probgen.nets import MLP
from probgen.schedules import append_dims
from probgen.sdes import langevin_step

__all__ = [
    "OBJECTIVES",
    "PROJECTIONS",
    "ScoreMatching",
    "denoising_sites",
    "hyvarinen_term",
    "langevin_chain",
    "perturbation",
    "sliced_term",
]

OBJECTIVES = ("implicit", "sliced", "sliced_vr", "dsm")
PROJECTIONS = ("rademacher", "gaussian")


def hyvarinen_term(score_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Per-example :math:`\operatorname{tr} \nabla_x s(x) + \tfrac12 \lVert s(x) \rVert^2`, exact trace.

    Args:
        score_fn: ``s(x)``, ``(B, D) -> (B, D)``, each row depending on its own input only.
        x: points ``(B, D)``.

    Returns:
        ``(B,)``, differentiable in the parameters of ``score_fn`` (also under ``torch.no_grad``).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        trace = torch.zeros_like(s[:, 0])
        for i in range(x.shape[-1]):  # D backward passes: the cost that makes this a low-D objective
            (grad,) = torch.autograd.grad(s[:, i].sum(), x, create_graph=True)
            trace = trace + grad[:, i]
        return trace + 0.5 * s.pow(2).sum(-1)


def sliced_term(
    score_fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, *, variance_reduced: bool = False
) -> Tensor:
    r"""Per-example sliced score matching term, averaged over the projections.

    :math:`\frac1M \sum_m \big[v_m^\top \nabla_x s(x)\, v_m + \tfrac12 (v_m^\top s(x))^2\big]`, or with
    ``variance_reduced`` :math:`\frac1M \sum_m v_m^\top \nabla_x s(x)\, v_m + \tfrac12 \lVert s(x)
    \rVert^2` (SSM-VR, for projections with :math:`\mathbb E[v v^\top] = I`).

    Args:
        score_fn: ``s(x)``, ``(B, D) -> (B, D)``, each row depending on its own input only.
        x: points ``(B, D)``.
        v: projections ``(B, M, D)``.
        variance_reduced: use the SSM-VR form.

    Returns:
        ``(B,)``, differentiable in the parameters of ``score_fn`` (also under ``torch.no_grad``).
    """
    if v.dim() != 3 or v.shape[0] != x.shape[0] or v.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"Expected projections of shape ({x.shape[0]}, M, {x.shape[-1]}), but found {tuple(v.shape)}."
        )
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        sv = (v * s.unsqueeze(-2)).sum(-1)  # (B, M): v_m^T s
        vjv = []
        for m in range(v.shape[-2]):
            (grad,) = torch.autograd.grad(sv[:, m].sum(), x, create_graph=True)  # (J^T v_m) per row
            vjv.append((grad * v[:, m]).sum(-1))
        term = torch.stack(vjv, -1).mean(-1)
        if variance_reduced:
            return term + 0.5 * s.pow(2).sum(-1)
        return term + 0.5 * sv.pow(2).mean(-1)


def perturbation(x: Tensor, sigma: Tensor | float) -> dist.Distribution:
    r"""The perturbation kernel :math:`q_\sigma(\tilde x \mid x) = \mathcal N(x, \sigma^2 I)`.

    Args:
        x: clean data ``(B, D)``.
        sigma: noise levels ``(B,)`` or a scalar.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return dist.Normal(x, append_dims(sigma, x.ndim).expand_as(x)).to_event(1)


def denoising_sites(score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor) -> Tensor:
    r"""The model's DSM sites: ``"x_tilde"`` :math:`\sim \mathcal N(x, \sigma^2 I)`, the observed ``"eps"``.

    Call inside ``pyro.plate("data", B)``; the guide samples ``"x_tilde"`` from :func:`perturbation`.
    The observed site is :math:`\epsilon = (\tilde x - x)/\sigma \sim \mathcal N(-\sigma
    s(\tilde x, \sigma), I)`, whose log-probability is :math:`-\sigma^2 \cdot \tfrac12 \lVert s +
    \epsilon / \sigma \rVert^2 - \tfrac D2 \log 2\pi` (see the module docstring).

    Args:
        score_fn: ``s(x_tilde, sigma)``, ``(B, D), (B,) -> (B, D)``.
        x: clean data ``(B, D)``.
        sigma: noise levels ``(B,)``.

    Returns:
        ``x_tilde``, ``(B, D)``.
    """
    x_tilde = pyro.sample("x_tilde", perturbation(x, sigma))
    scale = append_dims(sigma, x.ndim)
    eps = (x_tilde - x) / scale
    pyro.sample("eps", dist.Normal(-scale * score_fn(x_tilde, sigma), 1.0).to_event(1), obs=eps)
    return x_tilde


def langevin_chain(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    step_sizes: Tensor,
    steps_per_level: int,
    *,
    denoise: bool = False,
) -> Tensor:
    r"""(Annealed) Langevin dynamics as a Pyro Markov chain, one site ``f"x_{i}_{m}"`` per step.

    At level :math:`i` (noise :math:`\sigma_i`, step :math:`\alpha_i`) each of the ``M`` steps is
    :math:`x \sim \mathcal N(x + \tfrac{\alpha_i}{2} s(x, \sigma_i), \alpha_i I)` (Song & Ermon 2019,
    arXiv:1907.05600, Algorithm 1); with ``denoise`` the last state moves to
    :math:`x + \sigma_L^2 s(x, \sigma_L)` (Tweedie's formula). The result is the site ``"x"``
    (a ``Delta``). Call inside ``pyro.plate("data", B)``.

    Args:
        score_fn: ``s(x, sigma)``, ``(B, D), (B,) -> (B, D)``.
        x: start states ``(B, D)``.
        sigmas: noise levels ``(L,)``, in the order visited.
        step_sizes: :math:`\alpha_i`, ``(L,)``.
        steps_per_level: ``M``.
        denoise: end with the denoising step.

    Returns:
        The final states ``(B, D)``.
    """
    if sigmas.shape != step_sizes.shape or sigmas.dim() != 1:
        raise ValueError(
            f"Expected sigmas and step_sizes of the same shape (L,), but found {tuple(sigmas.shape)} "
            f"and {tuple(step_sizes.shape)}."
        )
    n = x.shape[0]
    for i, (sigma, alpha) in enumerate(zip(sigmas, step_sizes), start=1):
        sigma_b = sigma.expand(n)
        for m in range(1, steps_per_level + 1):
            loc, scale = langevin_step(x, score_fn(x, sigma_b), alpha)
            x = pyro.sample(f"x_{i}_{m}", dist.Normal(loc, scale.expand_as(loc)).to_event(1))
    if denoise:
        x = x + sigmas[-1] ** 2 * score_fn(x, sigmas[-1].expand(n))
    return pyro.sample("x", dist.Delta(x, event_dim=1))


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected {what} in {choices}, but found {value!r}.")


@register("score-matching")
class ScoreMatching(Method):
    r"""An unconditional score :math:`s_\theta(x)` by implicit, sliced or denoising score matching.

    Args:
        data_dim: flat size D of one observation (``"implicit"`` costs D backward passes).
        objective: ``"implicit"``, ``"sliced"``, ``"sliced_vr"`` or ``"dsm"``.
        projection: sliced projections, ``"rademacher"`` or ``"gaussian"``.
        num_projections: M projections per example.
        sigma: the noise level of ``"dsm"`` (its score is that of the perturbed density).
        hidden: widths of the MLP's hidden layers.
        activation: MLP activation (smooth, since the objectives differentiate the Jacobian).
        init_low, init_high: Langevin chains start uniform in ``[init_low, init_high]^D``.
        step_size: Langevin step :math:`\alpha`.
        num_steps: Langevin steps of :meth:`sample`.
        net: a custom score network ``net(x) -> (B, D)`` (not saved in :attr:`config`).

    Example:
        >>> sm = ScoreMatching(2, objective="sliced_vr")
        >>> loss = sm.elbo().differentiable_loss(sm.model, sm.guide, x)  # x: (B, 2)
        >>> s = sm.score(x)                                              # (B, 2)
    """

    likelihoods = {}

    finite_data = True

    def __init__(
        self,
        data_dim: int,
        *,
        objective: str = "sliced_vr",
        projection: str = "rademacher",
        num_projections: int = 1,
        sigma: float = 0.1,
        hidden: Sequence[int] = (128, 128),
        activation: str = "softplus",
        init_low: float = -4.0,
        init_high: float = 4.0,
        step_size: float = 1e-2,
        num_steps: int = 1000,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"Expected data_dim >= 1 (an int), but found {data_dim!r}.")
        _check_choice("objective", objective, OBJECTIVES)
        _check_choice("projection", projection, PROJECTIONS)
        for what, value in (("num_projections", num_projections), ("num_steps", num_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {what} >= 1 (an int), but found {value!r}.")
        for what, value in (("sigma", sigma), ("step_size", step_size)):
            if not value > 0:
                raise ValueError(f"Expected {what} > 0, but found {value!r}.")
        if not init_high > init_low:
            raise ValueError(f"Expected init_high > init_low, but found [{init_low}, {init_high}].")
        self.config = dict(
            data_dim=data_dim,
            objective=objective,
            projection=projection,
            num_projections=num_projections,
            sigma=float(sigma),
            hidden=list(hidden),
            activation=activation,
            init_low=float(init_low),
            init_high=float(init_high),
            step_size=float(step_size),
            num_steps=num_steps,
        )
        self.data_dim, self.score_objective, self.projection = data_dim, objective, projection
        self.num_projections, self.num_steps = num_projections, num_steps
        self.net = net if net is not None else MLP(data_dim, data_dim, hidden, activation=activation)
        self.register_buffer("sigma", torch.tensor(float(sigma)), persistent=False)
        self.register_buffer("step_size", torch.tensor(float(step_size)), persistent=False)
        init_range = torch.tensor([float(init_low), float(init_high)])
        self.register_buffer("init_range", init_range, persistent=False)

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Uniformly dequantized values in [0, 1] for the digits, raw values otherwise."""
        return "dequantized" if dataset_name == "digits" else "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> ScoreMatching:
        """A score model for ``dataset``: Langevin chains start uniform over the data's range."""
        x = dataset.x
        defaults: dict[str, Any] = {
            "data_dim": x.shape[-1],
            "init_low": float(x.min()),
            "init_high": float(x.max()),
        }
        defaults.update(kwargs)
        return cls(**defaults)

    def elbo(self) -> ELBO:
        return AnalyticKL_ELBO()

    def score(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        r"""The learned score :math:`s_\theta(x)`, ``(B, D)`` for ``x`` ``(B, D)``; ``sigma`` is ignored."""
        return self.net(x)

    def _projections(self, n: int, like: Tensor) -> Tensor:
        zeros = like.new_zeros(()).expand(n, self.num_projections, self.data_dim)
        return pyro.sample("v", dist.Normal(zeros, 1.0).to_event(2))

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> Tensor | None:
        """The score-matching program; with ``x=None``, Langevin dynamics (sampling).

        Args:
            x: observations ``(B, D)``, or None.
            batch_size: number of chains when ``x`` is None.
        """
        if x is None:
            return self.chain_model(batch_size)
        x = x.to(self.sigma.dtype)
        with pyro.plate("data", x.shape[0]):
            if self.score_objective == "dsm":
                denoising_sites(self.score, x, self.sigma.expand(x.shape[0]))
                return None
            if self.score_objective == "implicit":
                term = hyvarinen_term(self.score, x)
            else:
                v = self._projections(x.shape[0], x)
                v = v.sign() if self.projection == "rademacher" else v
                term = sliced_term(self.score, x, v, variance_reduced=self.score_objective == "sliced_vr")
            pyro.factor("fisher", -term)
        return None

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """The auxiliary sites (``"v"`` or ``"x_tilde"``) with the model's laws. ``x``: ``(B, D)``."""
        if x is None:
            raise ValueError("Expected observations x for the guide, but found None.")
        x = x.to(self.sigma.dtype)
        with pyro.plate("data", x.shape[0]):
            if self.score_objective == "dsm":
                pyro.sample("x_tilde", perturbation(x, self.sigma))
            elif self.score_objective != "implicit":
                self._projections(x.shape[0], x)

    def init_sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """Langevin start points, uniform in ``[init_low, init_high]^D``: ``(num, D)``."""
        lo, hi = self.init_range
        u = torch.rand(num, self.data_dim, generator=generator, device=lo.device, dtype=lo.dtype)
        return lo + (hi - lo) * u

    def chain_model(self, batch_size: int | None = None) -> Tensor:
        r"""Langevin dynamics with :math:`s_\theta` from uniform starts: ``"x_init"``, the steps, ``"x"``."""
        n = 1 if batch_size is None else int(batch_size)
        lo, hi = self.init_range
        with pyro.plate("data", n):
            x = pyro.sample("x_init", dist.Uniform(lo, hi).expand([n, self.data_dim]).to_event(1))
            sigma, step = self.sigma.reshape(1), self.step_size.reshape(1)
            denoise = self.score_objective == "dsm"
            return langevin_chain(self.score, x, sigma, step, self.num_steps, denoise=denoise)

    @torch.no_grad()
    def sample(self, num: int) -> Tensor:
        """``num`` Langevin samples ``(num, D)`` (:meth:`chain_model`, ``num_steps`` steps)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"Expected num >= 1, but found {num!r}.")
        with pyro.validation_enabled(False):
            return self.chain_model(num)
