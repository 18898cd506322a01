"""Contract tests over every method that ``probgen list`` reports: a new method is tested without edits.

For each method: it builds from data (or says why it cannot, e.g. it needs a teacher), one fit step
works, every sampler its class declares gives finite samples of the right shape, every likelihood it
declares is finite, ``inspect_trace`` works, and a fitted run directory loads back to the same method.
Interrupted-and-resumed training equal to an uninterrupted run is in ``tests/inference/test_faults.py``
(over the same methods); the two-process runs in ``tests/inference/test_distributed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from probgen.data import load_dataset
from probgen.inference import fit, inspect_trace, log_likelihood
from probgen.inference.sampling import draw_samples, resolve, sampler_knobs, samplers_for
from probgen.models import Method, available, load_method, method_class
from tests.common import TINY, tiny_method, toy_data

METHODS = available()


@pytest.fixture(scope="module")
def toy():
    return load_dataset("eight_gaussians", "train", n=512)


def _trained(name: str, tmp_path=None):
    method = tiny_method(name)
    fit(method, toy_data(), steps=10, batch_size=64, progress=False, run_dir=tmp_path)
    return method


@pytest.mark.parametrize("name", METHODS)
def test_has_a_tiny_instance_for_these_tests(name):
    assert name in TINY, f"add a tiny {name!r} to tests.common.TINY so that the contract tests cover it"


@pytest.mark.parametrize("name", METHODS)
def test_builds_from_data_and_fits_one_step(name, toy, tmp_path):
    cls = method_class(name)
    if cls.from_data.__func__ is Method.from_data.__func__:
        with pytest.raises(NotImplementedError):
            cls.from_data(toy)
        pytest.skip(f"{name} is not built from data alone and names no teacher method")
    options = {}
    if cls.teacher_method:  # a student: built from a run of its teacher method
        teacher = tiny_method(cls.teacher_method)
        fit(teacher, toy.x, steps=2, batch_size=64, progress=False, run_dir=tmp_path / "teacher")
        options["teacher"] = str(tmp_path / "teacher")
    torch.manual_seed(0)
    method = cls.from_data(toy, **options)
    assert isinstance(method, cls) and method.event_dim == 2
    result = fit(method, toy.x, steps=1, batch_size=64, progress=False)
    assert result.step == 1
    assert all(math.isfinite(v) for points in result.history.values() for _, v in points)


@pytest.mark.parametrize("name", METHODS)
def test_every_declared_sampler_gives_finite_samples(name):
    method = _trained(name)
    assert samplers_for(method), f"{name} declares no sampler"
    for sampler in samplers_for(method):  # each with its own defaults
        x = draw_samples(method, 8, sampler=sampler, seed=1)
        assert x.shape == (8, 2) and bool(torch.isfinite(x).all()), sampler
        again = draw_samples(method, 8, sampler=sampler, seed=1)
        assert torch.equal(x, again), f"{sampler} is not a function of its seed"
    with pytest.raises(ValueError, match="Expected a sampler in"):
        draw_samples(method, 2, sampler="no-such-sampler")
    first = samplers_for(method)[0]
    knobs, more = sampler_knobs(resolve(method, first))
    if not more:  # a knob the sampler does not take is refused, naming the ones it takes
        with pytest.raises(ValueError, match="Expected knobs of the"):
            draw_samples(method, 2, sampler=first, options={"no_such_knob": 1})


@pytest.mark.parametrize("name", METHODS)
def test_every_declared_likelihood_is_finite(name):
    method = _trained(name)
    table = type(method).likelihoods
    if not table:
        with pytest.raises(NotImplementedError, match="declares no log-likelihood"):
            log_likelihood(method, toy_data(4))
        pytest.skip(f"{name} declares no likelihood (it has no density to evaluate)")
    for estimator in table:
        ll, description = log_likelihood(method, toy_data(6), estimator=estimator, num_samples=4)
        assert ll.shape == (6,) and bool(torch.isfinite(ll).all()) and description, estimator


@pytest.mark.parametrize("name", METHODS)
def test_inspect_trace_works(name):
    report = inspect_trace(tiny_method(name), toy_data(4))
    assert report.rows and all(
        row.log_prob_sum is None or math.isfinite(row.log_prob_sum) for row in report.rows
    )
    assert str(report).startswith(f"{name}: trace of one batch of 4")


@pytest.mark.parametrize("name", METHODS)
def test_a_run_directory_loads_back_the_same_method(name, tmp_path):
    method = _trained(name, tmp_path)
    loaded, meta = load_method(tmp_path, "last")
    assert type(loaded) is type(method) and meta["method"] == name
    for key, value in method.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
