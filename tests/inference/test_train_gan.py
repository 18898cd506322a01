import os
import signal

import pytest
import torch
import torch.nn.functional as F

from probgen.checkpoint import has_checkpoint, load_checkpoint
from probgen.inference import TrainingError, fit
from probgen.models import load_method
from probgen.models.gan import GAN, AdversarialObjective, discriminator_loss, generated_batch, generator_loss
from tests.common import assert_close


def _gan(data_dim=2, discriminator_hidden=(16,), **options):
    torch.manual_seed(0)
    return GAN(
        data_dim, latent_dim=3, generator_hidden=(16,), discriminator_hidden=discriminator_hidden, **options
    )


def _data(n=256, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) + torch.tensor([1.0, -1.0])


def test_player_objectives_equal_the_closed_form_log_sigmoids():
    gan = _gan()
    x_real, x_fake, z = torch.randn(6, 2), torch.randn(4, 2), torch.randn(5, 3)
    d_real, d_fake = gan.discriminate(x_real), gan.discriminate(x_fake)
    expected_d = -F.logsigmoid(d_real).mean() - F.logsigmoid(-d_fake).mean()
    assert_close(discriminator_loss(gan, x_real, x_fake), expected_d)
    # The generator program conditioned on z generates G(z); the non-saturating loss scores it.
    assert_close(generated_batch(gan, 5, z=z), gan.generate(z))
    expected_g = -F.logsigmoid(gan.discriminate(gan.generate(z))).mean()
    assert_close(generator_loss(gan, 5, z=z), expected_g)


def test_r1_penalty_in_the_discriminator_loss_of_a_linear_discriminator():
    gan = _gan(discriminator_hidden=())
    w = gan.discriminator.out.weight[0]
    x_real, x_fake, gamma = torch.randn(8, 2), torch.randn(8, 2), 2.5
    plain = discriminator_loss(gan, x_real, x_fake)
    penalized = discriminator_loss(gan, x_real, x_fake, r1_gamma=gamma)
    # grad_x (w.x + b) = w, so the mean penalty is gamma/2 ||w||^2 and its gradient in w is gamma w.
    assert_close(penalized - plain, 0.5 * gamma * (w @ w))
    (grad_plain,) = torch.autograd.grad(plain, gan.discriminator.out.weight)
    (grad_penalized,) = torch.autograd.grad(penalized, gan.discriminator.out.weight)
    assert_close(grad_penalized[0] - grad_plain[0], gamma * w.detach())


def test_each_objective_moves_only_its_own_player():
    gan = _gan()
    x_fake = generated_batch(gan, 8)  # carries the generator's graph: the loss must cut it
    discriminator_loss(gan, torch.randn(8, 2), x_fake, r1_gamma=1.0).backward()
    assert all(p.grad is None for p in gan.generator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.discriminator.parameters())
    gan.zero_grad(set_to_none=True)
    generator_loss(gan, 8).backward()
    assert all(p.grad is None for p in gan.discriminator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator.parameters())
    assert all(p.requires_grad for p in gan.parameters())  # the discriminator is unfrozen again


def test_fit_writes_checkpoints_that_load_as_the_method(tmp_path):
    x, xv = _data(), _data(64, seed=1)
    gan = _gan()
    meta = {"data": "toy"}
    result = fit(
        gan, x, val_data=xv, steps=12, batch_size=32, val_every=4, run_dir=tmp_path, metadata=meta,
        progress=False,
    )  # fmt: skip
    assert result.step == 12 and len(result.history["val"]) == 3
    assert [s for s, _ in result.history["generator"]] == [10, 12]
    assert set(result.history) == {"discriminator", "generator", "val"}
    assert has_checkpoint(tmp_path, "last") and has_checkpoint(tmp_path, "best")
    loaded, info = load_method(tmp_path, expected="gan")
    assert info["tag"] == "best" and info["step"] == result.best_step
    # The GAN holds the best parameters on return, as the best checkpoint does.
    for name, value in gan.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])


def test_resume_continues_exactly(tmp_path):
    x = _data()
    kwargs = dict(batch_size=32, seed=3, ema_decay=0.9, progress=False)
    options = dict(d_steps=2, r1_gamma=0.5)
    full, losses_full = _gan(**options), []
    fit(full, x, steps=16, callback=lambda s, v: losses_full.append(v), **kwargs)

    part, losses_part = _gan(**options), []
    record = lambda s, v: losses_part.append(v)  # noqa: E731
    fit(part, x, steps=8, run_dir=tmp_path, checkpoint_every=8, callback=record, **kwargs)
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = _gan(**options)
    result = fit(resumed, x, steps=16, run_dir=tmp_path, resume=True, callback=record, **kwargs)
    assert result.step == 16 and len(losses_part) == 16
    assert losses_part == losses_full
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_nonfinite_objective_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    gan = _gan()

    def poison(step, losses):
        if step == 7:
            with torch.no_grad():
                gan.generator.out.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"Non-finite discriminator loss at step 8.*generator\.out"):
        fit(
            gan, _data(64), steps=50, batch_size=16, checkpoint_every=5, run_dir=tmp_path, progress=False,
            callback=poison,
        )  # fmt: skip
    tensors, info = load_checkpoint(tmp_path, "last")
    assert info["metadata"]["step"] == 5
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


def test_interrupt_saves_last_checkpoint(tmp_path):
    def interrupt(step, losses):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fit(
            _gan(), _data(64), steps=50, batch_size=16, checkpoint_every=100, run_dir=tmp_path,
            progress=False, callback=interrupt,
        )  # fmt: skip
    assert load_checkpoint(tmp_path, "last")[1]["metadata"]["step"] == 3


def test_early_stopping_on_the_validation_score(tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    result = fit(
        _gan(), _data(64), val_data=_data(16, 1), steps=100, batch_size=16, val_every=2, patience=2,
        val_fn=lambda m, v: next(scores), progress=False,
    )  # fmt: skip
    assert result.stopped_early and result.step == 8
    assert result.best_step == 4 and result.best_val == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr_discriminator=-1.0), "Expected a positive finite lr_discriminator or None, but found -1.0"),
        (dict(betas=(1.0, 0.9)), r"Expected betas as two numbers in \[0, 1\), but found \(1.0, 0.9\)"),
        (dict(d_steps=0), "Expected d_steps to be a positive integer, but found 0"),
        (dict(r1_gamma=-0.1), "Expected r1_gamma >= 0, but found -0.1"),
    ],
)
def test_gan_rejects_bad_training_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _gan(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "Expected steps to be a positive integer, but found 0"),
        (dict(ema_decay=1.0), r"Expected ema_decay in \(0, 1\) or None, but found 1.0"),
        (dict(resume=True), "Expected a run_dir to resume from, but found None"),
    ],
)
def test_fit_of_a_gan_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(_gan(), _data(64), batch_size=16, progress=False, **kwargs)


def test_fit_of_a_gan_rejects_bad_data():
    with pytest.raises(ValueError, match=r"Expected data of shape \(B, 2\) for GAN, but found \(64, 3\)"):
        fit(_gan(), torch.randn(64, 3), batch_size=16, progress=False)


def test_the_objective_has_two_players_with_their_own_options():
    gan = _gan(lr_generator=1e-4, betas=(0.0, 0.9), d_steps=3)
    objective = gan.objective()
    assert isinstance(objective, AdversarialObjective) and objective.batches_per_step == 3
    players = objective.players()
    assert list(players) == ["discriminator", "generator"]
    assert players["generator"].lr == 1e-4 and players["discriminator"].lr is None
    assert players["generator"].betas == (0.0, 0.9)
    assert {id(p) for p in players["generator"].params} == {id(p) for p in gan.generator.parameters()}
