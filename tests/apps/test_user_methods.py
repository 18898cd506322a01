"""A method in the user's own module is a first-class method (API, run directory, CLI).

The issue's case: a VAE with a Student-t prior written in one user file, trained and sampled through
the API and the command line, loaded without hand-written metadata, evaluated with the IWAE bound it
gets by default.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from probgen.apps.evaluate import evaluate
from probgen.cli import main
from probgen.inference import fit
from probgen.models import available, load_method

USER_MODULE = '''
import pyro
import pyro.distributions as dist
import torch

from probgen.models import VAE, register


@register("tvae")
class TVAE(VAE):
    """A VAE whose prior is a Student-t with 3 degrees of freedom."""

    def model(self, x=None, batch_size=None):
        with pyro.plate("data", self._batch_size(x, batch_size)):
            prior = dist.StudentT(3.0, self._prior_loc, self._prior_scale).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood_dist(z), obs=x)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tvae.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "my_tvae"
    sys.modules.pop("my_tvae", None)
    from probgen.models import base

    base._REGISTRY.pop("tvae", None)


def test_a_user_method_through_the_api(user_module, tmp_path):
    import importlib

    TVAE = importlib.import_module(user_module).TVAE
    assert "tvae" in available()
    train = torch.randn(256, 2)
    method = TVAE(2, latent_dim=2, hidden=(16,), likelihood="gaussian")
    fit(method, train, steps=5, batch_size=64, run_dir=tmp_path / "run", progress=False)  # no metadata
    loaded, meta = load_method(tmp_path / "run")
    assert type(loaded) is TVAE and meta["method_class"] == "my_tvae:TVAE"
    assert loaded.sample(7).shape == (7, 2)
    report = evaluate(loaded, "eight_gaussians", form="int", num_samples=4, num_generated=100)
    assert report["nll"]["kind"].startswith("IWAE") and report["nll"]["nats"] > 0


def test_a_user_method_through_the_cli(user_module, tmp_path, capsys):
    run = tmp_path / "cli-run"
    argv = ["--import", user_module, "train", "tvae", "--data", "eight_gaussians", "--out", str(run)]
    argv += ["--steps", "6", "--val-every", "3", "--no-progress", "--set", "hidden=[16]"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["--import", user_module, "sample", str(run), "--out", str(tmp_path / "s.png")]) == 0
    assert main(["--import", user_module, "list"]) == 0
    assert "tvae" in capsys.readouterr().out


def test_an_unknown_user_module_or_method_is_one_clear_error(tmp_path, capsys):
    assert main(["--import", "no_such_module_here", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Expected an importable module for --import" in err[0], err
    assert main(["train", "tvae", "--data", "moons", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'tvae'" in err[0], err
