import importlib
import json
import math

import pytest
import torch

from probgen.apps.evaluate import evaluate, log_likelihood, to_levels
from probgen.data import load_dataset, toy_entropy
from probgen.models import VAE
from tests.common import assert_close

# The package exports the function evaluate(), which shadows the submodule's attribute name.
evaluate_module = importlib.import_module("probgen.apps.evaluate")


def _vae(name, form="int", **kwargs):
    torch.manual_seed(0)
    return VAE.from_data(load_dataset(name, "train", form=form), hidden=[16], latent_dim=2, **kwargs)


def _finite(x):
    return x is not None and math.isfinite(x)


def test_digits_report_layout_and_bits_per_dim():
    report = evaluate(_vae("digits"), "digits", form="int", num_samples=4, num_generated=200)
    assert set(report) >= {"method", "data", "form", "nll", "samples", "num_test", "seconds"}
    assert (report["method"], report["data"], report["num_test"]) == ("vae", "digits", 297)
    nll = report["nll"]
    assert nll["kind"] == "IWAE bound (lower bound on log p), K=4" and nll["reason"] is None
    assert _finite(nll["nats"]) and nll["nats"] > 0
    # bits/dim of the 17-level 8x8 digits: nats / (64 ln 2).
    assert_close(nll["bits_per_dim"], nll["nats"] / (64 * math.log(2)), rtol=1e-12)
    refs = nll["references_bits_per_dim"]
    assert_close(refs["uniform"], math.log2(17), rtol=1e-12)
    assert 2.3 < refs["per_dimension_categorical"] < 2.5  # DESIGN.md quotes 2.42
    fd = report["samples"]["frechet_distance"]
    assert _finite(fd["value"]) and _finite(fd["floor"]) and 0 <= fd["floor"] < fd["value"]
    assert report["samples"]["num_generated"] == 200
    assert set(report["seconds"]) == {"nll", "sampling", "metrics"}
    json.dumps(report, allow_nan=False)


def test_evaluate_is_reproducible_and_leaves_the_global_rng_alone():
    method = _vae("digits")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = evaluate(method, "digits", form="int", num_samples=2, num_generated=100, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = evaluate(method, "digits", form="int", num_samples=2, num_generated=100, seed=5)
    c = evaluate(method, "digits", form="int", num_samples=2, num_generated=100, seed=6)
    assert a["nll"] == b["nll"] and a["samples"] == b["samples"]
    assert a["samples"]["frechet_distance"]["value"] != c["samples"]["frechet_distance"]["value"]


def test_toy_report_has_entropy_floor_distances_and_mode_coverage():
    report = evaluate(
        _vae("eight_gaussians"), "eight_gaussians", form="int", num_samples=4, num_generated=300
    )
    nll = report["nll"]
    assert _finite(nll["nats"]) and nll["bits_per_dim"] is None
    assert_close(nll["entropy_floor"], toy_entropy("eight_gaussians"), rtol=1e-12)
    samples = report["samples"]
    for key in ("sliced_wasserstein", "mmd"):
        assert _finite(samples[key]["value"]) and _finite(samples[key]["floor"])
        assert samples[key]["floor"] < samples[key]["value"]  # an untrained VAE is far from the data
    coverage = samples["mode_coverage"]
    assert coverage["floor"]["modes_captured"] == 8 and coverage["value"]["num_modes"] == 8
    assert report["num_test"] == 5000 and "300 points" in samples["floor"]
    json.dumps(report, allow_nan=False)


def test_density_nll_on_centered_digits_becomes_a_bound_on_the_levels():
    method = _vae("digits", form="centered")
    assert method.likelihood == "gaussian"
    report = evaluate(method, "digits", form="centered", num_samples=3, num_generated=100)
    nll = report["nll"]
    # -log P(v) <= -log p(y) + D log(L / s) with s = 2 for data in [-1, 1).
    assert_close(nll["nats"], nll["density_nats"] + 64 * math.log(17 / 2), rtol=1e-10)
    assert_close(nll["bits_per_dim"], nll["nats"] / (64 * math.log(2)), rtol=1e-12)
    assert "17-level" in nll["kind"]
    assert _finite(report["samples"]["frechet_distance"]["value"])


@pytest.mark.parametrize("form", ["int", "dequantized", "centered"])
def test_to_levels_inverts_each_data_form(form):
    levels = load_dataset("digits", "test", form="int").x
    y = load_dataset("digits", "test", form=form, seed=3).x
    assert torch.equal(to_levels(y, form, 17), levels)
    assert to_levels(torch.tensor([-5.0, 99.0]), form, 17).tolist() == [0.0, 16.0]


def test_method_without_estimator_reports_none_with_reason():
    class NoDensity(type(_vae("eight_gaussians"))):
        name = "no_estimator"
        likelihoods = {}

    method = _vae("eight_gaussians")
    method.__class__ = NoDensity
    with pytest.raises(NotImplementedError, match="no_estimator"):
        log_likelihood(method, torch.zeros(2, 2))
    report = evaluate(method, "eight_gaussians", form="int", num_samples=2, num_generated=100)
    assert report["nll"]["nats"] is None and "no_estimator" in report["nll"]["reason"]
    assert _finite(report["samples"]["sliced_wasserstein"]["value"])


def test_the_estimator_a_class_declares_is_used_and_a_guide_gets_iwae():
    base = type(_vae("eight_gaussians"))
    assert list(base.likelihoods) == ["iwae"]  # a method with a guide: IWAE by default

    class ExactToy(base):
        likelihoods = {"exact": lambda m, x, **kw: (torch.full((x.shape[0],), -3.0), "exact"), "iwae": "iwae"}

    method = _vae("eight_gaussians")
    method.__class__ = ExactToy
    report = evaluate(method, "eight_gaussians", form="int", num_samples=2, num_generated=100)
    assert report["nll"]["nats"] == 3.0 and report["nll"]["kind"] == "exact"
    ll, kind = log_likelihood(method, torch.zeros(3, 2), estimator="iwae", num_samples=2)
    assert ll.shape == (3,) and kind.startswith("IWAE")
    with pytest.raises(ValueError, match=r"Expected a likelihood estimator in \['exact', 'iwae'\]"):
        log_likelihood(method, torch.zeros(3, 2), estimator="nope")


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"num_generated": 0}])
def test_bad_counts_are_rejected(kwargs):
    with pytest.raises(ValueError, match="positive int"):
        evaluate(_vae("eight_gaussians"), "eight_gaussians", form="int", **kwargs)
