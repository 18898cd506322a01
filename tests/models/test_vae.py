import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO

from probgen.checkpoint import load_checkpoint, save_checkpoint
from probgen.data import load_dataset
from probgen.inference import inspect_trace
from probgen.models import VAE, build
from tests.common import assert_close

CASES = {
    "categorical": (lambda: torch.randint(0, 17, (5, 12)).float(), dict(num_levels=17)),
    "logistic": (lambda: torch.randint(0, 17, (5, 12)).float(), dict(num_levels=17, num_mixtures=2)),
    "bernoulli": (lambda: torch.randint(0, 2, (5, 12)).float(), {}),
    "gaussian": (lambda: torch.randn(5, 12), {}),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    make_x, kwargs = CASES[request.param]
    vae = VAE(12, latent_dim=3, hidden=(16, 16), likelihood=request.param, **kwargs)
    return vae, make_x()


def test_loss_finite_and_gradients_reach_every_parameter(case):
    vae, x = case
    loss = vae.elbo().differentiable_loss(vae.model, vae.guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sampling_shapes_and_support(case):
    vae, x = case
    samples = vae.sample(7)
    assert samples.shape == (7, 12)
    assert torch.isfinite(samples.float()).all()
    if vae.likelihood in ("categorical", "logistic"):
        assert samples.min() >= 0 and samples.max() <= 16 and (samples == samples.round()).all()
    if vae.likelihood == "bernoulli":
        assert set(samples.unique().tolist()) <= {0.0, 1.0}
    # Predictive over the model is the generative program too.
    pred = Predictive(vae.model, num_samples=4, return_sites=["x", "z"])(None, batch_size=3)
    assert pred["x"].shape == (4, 3, 12) and pred["z"].shape == (4, 3, 3)
    assert vae.reconstruct(x).shape == x.shape


def test_analytic_kl_elbo_matches_monte_carlo_elbo_in_expectation(case):
    vae, x = case
    vae.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        mc = torch.stack([torch.tensor(Trace_ELBO().loss(vae.model, vae.guide, x)) for _ in range(2000)])
        analytic = torch.stack(
            [torch.tensor(TraceMeanField_ELBO().loss(vae.model, vae.guide, x)) for _ in range(400)]
        )
    # Both estimate the same ELBO; tolerance: 4 standard errors of the difference of means.
    se = (mc.var() / len(mc) + analytic.var() / len(analytic)).sqrt()
    assert (mc.mean() - analytic.mean()).abs() <= 4 * se + 1e-6


def test_inspect_elbo_parts_equal_pyro_losses(case):
    vae, x = case
    report = inspect_trace(vae, x, seed=3)
    torch.manual_seed(3)
    trace_loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    torch.manual_seed(3)
    mf_loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    parts = report.elbo_parts
    assert_close(parts["ELBO (one sample)"], -trace_loss / x.shape[0], atol=1e-4)
    assert_close(parts["ELBO (analytic KL)"], -mf_loss / x.shape[0], atol=1e-4)
    text = str(report)
    for needle in ("model", "guide", "observed", "latent", "KL(q || p)"):
        assert needle in text
    assert {row.name for row in report.rows} == {"z", "x"}


def test_save_load_round_trip(case, tmp_path):
    vae, x = case
    save_checkpoint(
        tmp_path,
        "best",
        {f"model.{k}": v for k, v in vae.state_dict().items()},
        {"method": "vae", "config": vae.config},
    )
    tensors, info = load_checkpoint(tmp_path, "best")
    clone = build("vae", **info["metadata"]["config"])
    clone.load_state_dict({k[len("model.") :]: v for k, v in tensors.items()})
    torch.manual_seed(0)
    a = inspect_trace(vae, x, seed=0).elbo_parts
    b = inspect_trace(clone, x, seed=0).elbo_parts
    assert a == b


def test_from_data_picks_likelihood():
    assert VAE.from_data(load_dataset("digits", "val")).likelihood == "logistic"
    assert VAE.from_data(load_dataset("moons", "val", n=100)).likelihood == "gaussian"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(likelihood="poisson"), "likelihood"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(likelihood="categorical", num_levels=1), "num_levels"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(4, **kwargs)


def test_check_data_message():
    vae = VAE(4, likelihood="gaussian")
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 4\) for VAE, but found \(3, 5\)"):
        vae.check_data(torch.zeros(3, 5))
