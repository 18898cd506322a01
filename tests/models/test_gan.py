import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Predictive

from probgen.data import load_dataset
from probgen.models import build, method_class
from probgen.models.gan import GAN
from tests.common import assert_close


def _gan(data_dim=3, discriminator_hidden=(16,)):
    torch.manual_seed(0)
    return GAN(data_dim, latent_dim=4, generator_hidden=(16,), discriminator_hidden=discriminator_hidden)


def _linear_gan(w, b):
    """A GAN whose discriminator is D(x) = w.x + b (an MLP with no hidden layer)."""
    gan = _gan(data_dim=w.numel(), discriminator_hidden=())
    with torch.no_grad():
        gan.discriminator.out.weight.copy_(w[None])
        gan.discriminator.out.bias.fill_(b)
    return gan


def test_generator_program_under_predictive_has_z_and_deterministic_x():
    gan = _gan()
    samples = Predictive(gan.model, num_samples=3)(batch_size=5)
    assert samples["z"].shape == (3, 5, 4)
    assert samples["x"].shape == (3, 5, 3)
    # x is a deterministic function of z: G(z) exactly.
    assert_close(samples["x"], gan.generate(samples["z"]), atol=1e-6)
    trace = poutine.trace(gan.model).get_trace(batch_size=7)
    site = trace.nodes["x"]
    assert site["infer"].get("_deterministic") and site["value"].shape == (7, 3)
    assert trace.nodes["z"]["fn"].event_shape == (4,) and trace.nodes["z"]["fn"].batch_shape == (7,)
    # A deterministic site adds nothing to the log-joint: only z ~ N(0, I) counts.
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(trace.nodes["z"]["value"]).sum()
    assert_close(trace.log_prob_sum(), expected, atol=1e-4)
    assert gan.sample(6).shape == (6, 3)


def test_discriminator_program_log_prob_is_log_sigmoid_of_the_logits():
    gan = _gan()
    x = torch.randn(6, 3)
    logits = gan.discriminate(x)
    real = poutine.trace(gan.discriminator_program).get_trace(x, True)
    fake = poutine.trace(gan.discriminator_program).get_trace(x, False)
    assert_close(real.nodes["real"]["fn"].log_prob(real.nodes["real"]["value"]), F.logsigmoid(logits))
    assert_close(fake.nodes["real"]["fn"].log_prob(fake.nodes["real"]["value"]), F.logsigmoid(-logits))
    assert torch.equal(real.nodes["real"]["value"], torch.ones(6))
    assert torch.equal(fake.nodes["real"]["value"], torch.zeros(6))
    assert "r1" not in real.nodes


def test_r1_factor_is_the_hand_computed_gradient_norm_of_a_linear_discriminator():
    w, b, gamma = torch.tensor([0.5, -2.0, 1.5]), 0.3, 0.7
    gan = _linear_gan(w, b)
    x = torch.randn(5, 3)
    with torch.no_grad():  # the penalty is built with grad enabled all the same
        trace = poutine.trace(gan.discriminator_program).get_trace(x, True, r1_gamma=gamma)
    site = trace.nodes["r1"]
    # grad_x (w.x + b) = w for every example, so the log-factor is -gamma/2 ||w||^2 per example.
    assert_close(site["fn"].log_prob(site["value"]), torch.full((5,), -0.5 * gamma * float(w @ w)))
    trace = poutine.trace(gan.discriminator_program).get_trace(x, True, r1_gamma=gamma)
    penalty = trace.nodes["r1"]["fn"].log_prob(trace.nodes["r1"]["value"]).sum()
    (grad_w,) = torch.autograd.grad(penalty, gan.discriminator.out.weight)
    assert_close(grad_w[0], -5 * gamma * w)  # d/dw of -5 gamma/2 ||w||^2


def test_model_refuses_observations_and_there_is_no_guide_or_elbo():
    gan = _gan()
    with pytest.raises(ValueError, match="Expected x=None"):
        gan.model(torch.randn(2, 3))
    with pytest.raises(NotImplementedError, match="GAN.objective"):
        gan.guide(torch.randn(2, 3))
    with pytest.raises(NotImplementedError, match="no variational guide or ELBO"):
        gan.elbo()


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((torch.randn(2, 4), True), {}, r"Expected x of shape \(B, 3\), but found \(2, 4\)"),
        ((torch.randn(2, 3), 1.0), {}, "Expected the label real to be a bool, but found 1.0"),
        ((torch.randn(2, 3), True), {"r1_gamma": -1.0}, "Expected r1_gamma >= 0, but found -1.0"),
    ],
)
def test_discriminator_program_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _gan().discriminator_program(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data_dim=0), "Expected data_dim >= 1"),
        (dict(data_dim=2, latent_dim=0), "Expected latent_dim >= 1"),
        (dict(data_dim=2, output="sigmoid"), "Expected output in"),
        (dict(data_dim=4, event_shape=(3,)), "Expected an event_shape with 4 elements"),
    ],
)
def test_gan_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GAN(**kwargs)


def test_from_data_and_registry():
    assert method_class("gan") is GAN
    toy = GAN.from_data(load_dataset("eight_gaussians", "train", n=64))
    assert toy.output == "identity" and toy.data_dim == 2
    form = GAN.data_form("digits")
    assert form == "centered" and GAN.data_form("moons") == "int"
    digits = GAN.from_data(load_dataset("digits", "train", form=form, n=32))
    assert digits.output == "tanh" and digits.event_shape == (1, 8, 8)
    x = digits.sample(10)
    assert x.shape == (10, 64) and x.abs().max() <= 1
    rebuilt = build("gan", **digits.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in digits.state_dict().items()
    }
