r"""Gaussian data under the diffusion SDEs: every marginal, score and flow in closed form.

For data :math:`\mathcal N(\mu, \Sigma)` and :math:`x_t = m(t) x_0 + s(t) z`,
:math:`p_t = \mathcal N(m \mu, A_t)` with :math:`A_t = m^2 \Sigma + s^2 I`, so the score is
:math:`-A_t^{-1}(x - m \mu)`. All :math:`A_t` share the eigenvectors :math:`U` of :math:`\Sigma`, and the
probability-flow ODE maps :math:`x_a` to :math:`x_b = m_b \mu + A_b^{1/2} A_a^{-1/2} (x_a - m_a \mu)`
(in the eigenbasis each coordinate of :math:`y = x - m\mu` obeys
:math:`\dot y_k = (a + g^2 / (2 A_k)) y_k = \tfrac{d}{dt} \log \sqrt{A_k}\; y_k`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from probgen.sdes import VESDE, VPSDE, DiffusionSDE, SubVPSDE

__all__ = ["COV", "MU", "SDES", "GaussianOracle", "assert_moments"]

#: the Gaussian data of the oracle tests, and the SDEs they run under.
MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


class GaussianOracle:
    """Closed-form marginals of ``N(mu, cov)`` data under ``sde`` (float64)."""

    def __init__(self, sde: DiffusionSDE, mu: Tensor, cov: Tensor) -> None:
        self.sde = sde
        self.mu = mu.double()
        self.cov = cov.double()
        self.D = len(mu)
        self.evals, self.evecs = torch.linalg.eigh(self.cov)

    def _ms(self, t: float | Tensor, n: int = 1) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.expand(n) if t.ndim == 0 else t
        return self.sde.marginal_params(t)

    def mean(self, t: float) -> Tensor:
        """The mean of p_t, ``(D,)``."""
        m, _ = self._ms(t)
        return m[0] * self.mu

    def cov_t(self, t: float) -> Tensor:
        """The covariance of p_t, ``(D, D)``."""
        m, s = self._ms(t)
        return m[0] ** 2 * self.cov + s[0] ** 2 * torch.eye(self.D, dtype=torch.float64)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact score of p_t at ``x`` ``(B, D)``, ``t`` ``(B,)``."""
        m, s = self.sde.marginal_params(t.double())
        lam = m[:, None] ** 2 * self.evals + s[:, None] ** 2  # (B, D): eigenvalues of A_t
        y = (x.double() - m[:, None] * self.mu) @ self.evecs
        return (-(y / lam) @ self.evecs.T).to(x.dtype)

    def log_prob(self, x: Tensor, t: float) -> Tensor:
        """log p_t(x), ``(B,)``."""
        return MultivariateNormal(self.mean(t), self.cov_t(t)).log_prob(x.double())

    def sample(self, t: float, n: int, generator: torch.Generator) -> Tensor:
        """n draws of p_t, ``(n, D)``."""
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        return self.mean(t) + z @ torch.linalg.cholesky(self.cov_t(t)).T

    def transport(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The probability-flow ODE's map from time ``t_from`` to ``t_to``, ``(B, D)``."""
        (ma,), (sa,) = self._ms(t_from)
        (mb,), (sb,) = self._ms(t_to)
        ratio = ((mb**2 * self.evals + sb**2) / (ma**2 * self.evals + sa**2)).sqrt()
        y = (x.double() - ma * self.mu) @ self.evecs
        return mb * self.mu + (y * ratio) @ self.evecs.T

    def denoised_moments(self, t: float) -> tuple[Tensor, Tensor]:
        r"""Mean and covariance of Tweedie's :math:`(x + s^2 \nabla \log p_t(x)) / m` for :math:`x \sim p_t`.

        :math:`\hat x = (x - s^2 A^{-1}(x - m\mu)) / m` has mean :math:`\mu` and covariance
        :math:`(I - s^2 A^{-1}) A (I - s^2 A^{-1}) / m^2 = (m^2 \Sigma - s^2 I + s^4 A^{-1}) / m^2`.
        """
        (m,), (s,) = self._ms(t)
        A = self.cov_t(t)
        eye = torch.eye(self.D, dtype=torch.float64)
        return self.mu.clone(), (m**2 * self.cov - s**2 * eye + s**4 * torch.linalg.inv(A)) / m**2


def assert_moments(x: Tensor, mean: Tensor, cov: Tensor, z: float = 4.0) -> None:
    r"""Sample mean and covariance of ``x`` ``(n, D)`` within ``z`` Monte Carlo standard errors.

    For Gaussian draws the standard error of the mean's coordinate :math:`i` is
    :math:`\sqrt{C_{ii} / n}` and that of the sample covariance entry :math:`(i, j)` is
    :math:`\sqrt{(C_{ii} C_{jj} + C_{ij}^2) / n}` (to :math:`O(1/n)`; Anderson 2003, Thm. 3.4.4).
    """
    n = x.shape[0]
    x = x.double()
    var = torch.diagonal(cov)
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    err_mean = (x.mean(0) - mean).abs()
    err_cov = (x.T.cov() - cov).abs()
    assert bool((err_mean <= z * se_mean).all()), (
        f"mean off by {err_mean.tolist()} > {z} x {se_mean.tolist()}"
    )
    assert bool((err_cov <= z * se_cov).all()), f"cov off by {err_cov.tolist()} > {z} x {se_cov.tolist()}"
