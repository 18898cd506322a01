import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from probgen.elbo import AnalyticKL_ELBO
from tests.common import assert_close


def model(x, scale=1.0, mask=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]), poutine.scale(scale=scale):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3), 2.0).to_event(1))
        loc = (z[..., :2] * w).sum(-1, keepdim=True)
        pyro.sample(
            "x", dist.Normal(loc, 0.5).mask(True if mask is None else mask[:, None]).to_event(1), obs=x
        )
        pyro.factor("penalty", -0.1 * (z**2).sum(-1))


def guide(x, scale=1.0, mask=None):
    w_loc = pyro.param("w_loc", torch.tensor([0.3, -0.2]))
    pyro.sample("w", dist.Normal(w_loc, 0.7).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.expand(-1, 3) * 0.5, 0.8).to_event(1))


@pytest.mark.parametrize("scale", [1.0, 3.5])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_trace_mean_field_elbo_with_same_randomness(scale, masked):
    x = torch.randn(6, 1)
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    torch.manual_seed(0)
    expected = TraceMeanField_ELBO().differentiable_loss(model, guide, x, scale, mask)
    torch.manual_seed(0)
    actual = AnalyticKL_ELBO().differentiable_loss(model, guide, x, scale, mask)
    assert_close(actual.detach(), expected.detach(), atol=1e-5, rtol=1e-6)


def test_gradients_match_trace_mean_field_elbo():
    x = torch.randn(6, 1)
    grads = []
    for elbo in (TraceMeanField_ELBO(), AnalyticKL_ELBO()):
        pyro.clear_param_store()
        torch.manual_seed(1)
        loss = elbo.differentiable_loss(model, guide, x)
        (g,) = torch.autograd.grad(loss, [pyro.param("w_loc").unconstrained()])
        grads.append(g)
    assert_close(grads[0], grads[1], atol=1e-5)


def test_is_unbiased_for_the_monte_carlo_elbo():
    x = torch.randn(4, 1)
    with torch.no_grad():
        torch.manual_seed(2)
        mc = torch.tensor([Trace_ELBO().loss(model, guide, x) for _ in range(3000)])
        torch.manual_seed(3)
        ours = torch.tensor([AnalyticKL_ELBO().loss(model, guide, x) for _ in range(1000)])
    se = (mc.var() / len(mc) + ours.var() / len(ours)).sqrt()
    assert (mc.mean() - ours.mean()).abs() <= 4 * se


def test_num_particles_and_svi_interface():
    x = torch.randn(6, 1)
    elbo = AnalyticKL_ELBO(num_particles=3)
    assert isinstance(elbo.loss(model, guide, x), float)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    before = pyro.param("w_loc").detach().clone() if "w_loc" in pyro.get_param_store() else None
    svi.step(x)
    assert before is None or not torch.equal(before, pyro.param("w_loc"))


def test_rejects_non_reparameterized_guides():
    def m():
        pyro.sample("k", dist.Bernoulli(0.5))

    def g():
        pyro.sample("k", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="reparameterized"):
        AnalyticKL_ELBO().differentiable_loss(m, g)


def test_validation_catches_batch_shape_outside_plates():
    def m(x):
        with pyro.plate("data", 4):
            pyro.sample("x", dist.Normal(torch.zeros(5, 4), 1.0), obs=x)

    with pyro.validation_enabled(True), pytest.raises(ValueError, match="Expected site 'x'"):
        AnalyticKL_ELBO().differentiable_loss(m, lambda x: None, torch.zeros(5, 4))
