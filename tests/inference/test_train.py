import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule

from probgen.checkpoint import has_checkpoint, load_checkpoint
from probgen.inference import TrainingError, fit
from probgen.models import VAE
from tests.common import assert_close


class GaussianDensity(PyroModule):
    """x ~ N(loc, exp(log_scale)): a model with an empty guide and a deterministic loss."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.log_scale = torch.nn.Parameter(torch.zeros(dim))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, self.log_scale.exp()).to_event(1), obs=x)

    def guide(self, x):
        pass

    def elbo(self):
        return Trace_ELBO()


def _data(n=256, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * 2.0 + 1.0


def _small_vae():
    torch.manual_seed(0)
    return VAE(6, latent_dim=2, hidden=(16,), likelihood="gaussian")


def test_fit_maximum_likelihood_recovers_gaussian_mle():
    x = _data(512)
    method = GaussianDensity()
    fit(method, x, steps=1500, batch_size=512, lr=0.05, progress=False)
    # Full-batch gradient descent on an exact likelihood converges to the MLE.
    assert_close(method.loc.detach(), x.mean(0), atol=1e-3, rtol=0)
    assert_close(method.log_scale.exp().detach(), x.std(0, unbiased=False), atol=1e-3, rtol=0)


def test_resume_continues_exactly(tmp_path):
    x = torch.randn(200, 6)
    full = _small_vae()
    losses_full = []
    fit(full, x, steps=40, batch_size=32, seed=3, progress=False, callback=lambda s, v: losses_full.append(v))

    part = _small_vae()
    losses_part = []
    fit(
        part,
        x,
        steps=20,
        batch_size=32,
        seed=3,
        progress=False,
        run_dir=tmp_path,
        checkpoint_every=20,
        callback=lambda s, v: losses_part.append(v),
    )
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = _small_vae()
    fit(
        resumed,
        x,
        steps=40,
        batch_size=32,
        seed=3,
        progress=False,
        run_dir=tmp_path,
        resume=True,
        callback=lambda s, v: losses_part.append(v),
    )
    assert losses_part == losses_full
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_best_checkpoint_and_early_stopping(tmp_path):
    x, xv = torch.randn(200, 6), torch.randn(50, 6)
    method = _small_vae()
    scores = iter([5.0, 4.0, 4.5, 4.6, 4.7, 1.0])
    result = fit(
        method,
        x,
        val_data=xv,
        steps=100,
        batch_size=32,
        val_every=10,
        patience=3,
        val_fn=lambda m, v: next(scores),
        run_dir=tmp_path,
        progress=False,
    )
    assert result.stopped_early and result.step == 50
    assert result.best_step == 20 and result.best_val == 4.0
    tensors, info = load_checkpoint(tmp_path, "best")
    assert info["metadata"]["step"] == 20
    # The method holds the best parameters on return.
    for name, value in method.state_dict().items():
        assert torch.equal(value, tensors[f"model.{name}"])


def test_nonfinite_loss_names_step_and_site_and_keeps_checkpoint(tmp_path):
    x = torch.randn(64, 6)
    method = _small_vae()

    def poison(step, loss):
        if step == 7:
            with torch.no_grad():
                method.log_scale.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 8.*site 'x'"):
        fit(
            method,
            x,
            steps=50,
            batch_size=16,
            checkpoint_every=5,
            run_dir=tmp_path,
            progress=False,
            callback=poison,
        )
    # The step-7 parameters are poisoned, so the last good checkpoint (step 5) is kept.
    tensors, info = load_checkpoint(tmp_path, "last")
    assert info["metadata"]["step"] == 5
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


def test_nonfinite_data_is_reported_and_nothing_bad_is_saved(tmp_path):
    x = torch.randn(64, 6)
    x[5, 2] = float("inf")
    method = _small_vae()
    with pytest.raises(TrainingError, match=r"Non-finite loss at step 1 .*non-finite values.*no good state"):
        fit(method, x, steps=50, batch_size=64, run_dir=tmp_path, progress=False)
    assert not has_checkpoint(tmp_path, "last")


def test_interrupt_saves_last_checkpoint(tmp_path):
    x = torch.randn(64, 6)
    method = _small_vae()

    def interrupt(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fit(
            method,
            x,
            steps=50,
            batch_size=16,
            checkpoint_every=100,
            run_dir=tmp_path,
            progress=False,
            callback=interrupt,
        )
    _, info = load_checkpoint(tmp_path, "last")
    assert info["metadata"]["step"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(batch_size=1000), "batch_size"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(resume=True), "run_dir"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(_small_vae(), torch.randn(64, 6), progress=False, **{"batch_size": 16, **kwargs})


def test_fit_rejects_mismatched_validation_data():
    with pytest.raises(ValueError, match="Expected val_data of shape"):
        fit(_small_vae(), torch.randn(64, 6), val_data=torch.randn(10, 5), progress=False)


class UnitGaussianMean(PyroModule):
    """x ~ N(loc, I): the loss per example is 0.5 ||x - loc||^2 + const, so SGD's iterates are known."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(dim))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass

    def elbo(self):
        return Trace_ELBO()


def test_ema_of_sgd_on_a_quadratic_matches_closed_form(tmp_path):
    # Full-batch SGD on 0.5 ||loc - m||^2: loc_k = m + (1 - lr)^k (loc_0 - m). The average starts at
    # loc_0 and takes e_k = d_k e_{k-1} + (1 - d_k) loc_k with d_k = min(d, (1 + k) / (10 + k)).
    x = _data(64)
    m, lr, decay, steps = x.double().mean(0), 0.3, 0.6, 7
    method = UnitGaussianMean()
    seen = []
    fit(
        method,
        x,
        val_data=x[:8],
        val_every=1,
        val_fn=lambda mod, v: (seen.append(mod.loc.detach().clone()), -len(seen))[1],  # always improves
        steps=steps,
        batch_size=64,
        lr=lr,
        optimizer="sgd",
        ema_decay=decay,
        run_dir=tmp_path,
        progress=False,
    )
    loc0 = torch.zeros(3, dtype=torch.float64)
    ema, expected = loc0.clone(), []
    for k in range(1, steps + 1):
        d = min(decay, (1 + k) / (10 + k))
        ema = d * ema + (1 - d) * (m + (1 - lr) ** k * (loc0 - m))
        expected.append(ema.clone())
    # Validation sees the average after every step; the method holds the best (= last) average.
    assert len(seen) == steps
    for got, want in zip(seen, expected):
        assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert_close(method.loc.detach().double(), expected[-1], atol=1e-5, rtol=0)
    tensors, _ = load_checkpoint(tmp_path, "last")
    assert_close(tensors["model.loc"].double(), m + (1 - lr) ** steps * (loc0 - m), atol=1e-5, rtol=0)
    assert_close(tensors["ema.loc"].double(), expected[-1], atol=1e-5, rtol=0)
    best, _ = load_checkpoint(tmp_path, "best")
    assert torch.equal(best["model.loc"], tensors["ema.loc"])


def test_resume_with_ema_continues_exactly(tmp_path):
    x = torch.randn(200, 6)
    kwargs = dict(batch_size=32, seed=3, progress=False, ema_decay=0.9)
    full, losses_full = _small_vae(), []
    fit(full, x, steps=30, run_dir=tmp_path / "full", callback=lambda s, v: losses_full.append(v), **kwargs)

    part, losses_part = _small_vae(), []
    fit(
        part,
        x,
        steps=15,
        run_dir=tmp_path / "part",
        checkpoint_every=15,
        callback=lambda s, v: losses_part.append(v),
        **kwargs,
    )
    torch.manual_seed(12345)
    resumed = _small_vae()
    fit(
        resumed,
        x,
        steps=30,
        run_dir=tmp_path / "part",
        resume=True,
        callback=lambda s, v: losses_part.append(v),
        **kwargs,
    )
    assert losses_part == losses_full
    a, _ = load_checkpoint(tmp_path / "full", "last")
    b, _ = load_checkpoint(tmp_path / "part", "last")
    assert any(k.startswith("ema.") for k in a) and a.keys() == b.keys()
    for k in a:
        if k.startswith(("model.", "ema.")):
            assert torch.equal(a[k], b[k]), k
    # On return the methods hold the averages, which differ from the raw weights.
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, a[f"ema.{name}"]) and torch.equal(value, full.state_dict()[name])
    assert not torch.equal(a["ema.log_scale"], a["model.log_scale"])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, True, "0.9"])
def test_fit_rejects_bad_ema_decay(decay):
    with pytest.raises(ValueError, match=r"Expected ema_decay in \(0, 1\)"):
        fit(_small_vae(), torch.randn(64, 6), batch_size=16, progress=False, ema_decay=decay)


def test_load_method_prefers_the_averaged_weights(tmp_path):
    from probgen.models import load_method

    x = torch.randn(64, 6)
    method = _small_vae()
    fit(
        method,
        x,
        steps=30,
        batch_size=16,
        ema_decay=0.9,
        run_dir=tmp_path,
        progress=False,
    )
    loaded, _ = load_method(tmp_path, "last")
    tensors, _ = load_checkpoint(tmp_path, "last")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, tensors[f"ema.{name}"])
    raw = [k for k in tensors if k.startswith("model.") and "log_scale" in k]
    assert raw and not torch.equal(tensors[raw[0]], tensors["ema." + raw[0][len("model.") :]])


def test_a_module_without_an_objective_is_one_clear_error():
    with pytest.raises(ValueError, match="Expected a method that hands out its objective"):
        fit(torch.nn.Linear(2, 2), torch.randn(16, 2), steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="Expected an Objective, but found str"):
        fit(_small_vae(), torch.randn(16, 6), objective="elbo", steps=1, batch_size=8, progress=False)
