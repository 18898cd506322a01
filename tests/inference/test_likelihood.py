"""IWAE against a linear-Gaussian model whose marginal likelihood is known in closed form."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from probgen.inference import iwae_log_likelihood
from probgen.models import VAE
from tests.common import mc_tolerance

torch.set_default_dtype(torch.float32)


class LinearGaussian(PyroModule):
    """z ~ N(0, I_2), x | z ~ N(W z + b, s^2 I_3); the guide is the exact posterior mean with the
    posterior covariance's Cholesky factor inflated by ``inflate`` (so the IWAE bound is not tight at K=1)."""

    def __init__(self, inflate: float = 1.6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.b = torch.randn(3, generator=g, dtype=torch.float64)
        self.s = 0.5
        prec = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s**2
        self.post_cov = torch.linalg.inv(prec)
        self.inflate = inflate

    def marginal(self) -> dist.MultivariateNormal:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, cov)

    def model(self, x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x):
        mean = (x - self.b) @ self.W @ self.post_cov.T / self.s**2
        scale_tril = torch.linalg.cholesky(self.post_cov) * self.inflate
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=scale_tril))


def test_iwae_converges_to_exact_log_likelihood():
    m = LinearGaussian()
    x = m.marginal().sample(torch.Size([4]))
    exact = m.marginal().log_prob(x)
    gaps = {}
    for k in (1, 10, 100):
        estimates = torch.stack([iwae_log_likelihood(m, x, num_samples=k, seed=s) for s in range(40)])
        gaps[k] = float((exact - estimates.mean(0)).mean())
    # The bound's gap shrinks monotonically with K (each gap's MC error is < 0.01 here).
    assert gaps[1] > gaps[10] > gaps[100] > 0
    assert gaps[1] > 0.1
    # At K = 20000 the bias is O(1/K); the estimate agrees with log p(x) within its MC error.
    repeats = torch.stack(
        [iwae_log_likelihood(m, x, num_samples=20000, particles_per_chunk=5000, seed=s) for s in range(8)]
    )
    mean, std = repeats.mean(0), repeats.std(0)
    tol = torch.tensor([mc_tolerance(float(sd), repeats.shape[0]) for sd in std]) + 1e-4
    assert ((mean - exact).abs() <= tol).all(), (mean - exact, tol)


def test_iwae_exact_with_exact_posterior():
    m = LinearGaussian(inflate=1.0)
    x = m.marginal().sample(torch.Size([5]))
    # With q equal to the posterior every importance weight equals p(x): zero variance.
    torch.testing.assert_close(iwae_log_likelihood(m, x, num_samples=3), m.marginal().log_prob(x))


def test_iwae_on_vae_shapes_and_bound_order():
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=4, hidden=(32,), likelihood="categorical")
    x = torch.randint(0, 17, (7, 64)).float()
    l1 = iwae_log_likelihood(vae, x, num_samples=1, seed=0)
    l50 = iwae_log_likelihood(vae, x, num_samples=50, particles_per_chunk=16, batch_size=3, seed=0)
    assert l1.shape == l50.shape == (7,)
    assert torch.isfinite(l50).all()
    assert (l50 > l1).float().mean() > 0.5


def test_iwae_rejects_bad_arguments():
    vae = VAE(4, latent_dim=2, hidden=(8,), likelihood="gaussian")
    with pytest.raises(ValueError, match="Expected num_samples"):
        iwae_log_likelihood(vae, torch.randn(3, 4), num_samples=0)
