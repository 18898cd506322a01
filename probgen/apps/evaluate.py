r"""``evaluate``: every method reported on the same footing (the protocol of ``DESIGN.md``).

On the held-out *test* split of a data set, :func:`evaluate` reports

* the negative log-likelihood, from the estimator the method declares first
  (:attr:`probgen.models.Method.likelihoods`; IWAE for a method with a guide): nats per example,
  plus bits/dim of the discrete data for level data (a density on dequantized
  data is turned into a bound on the discrete levels first), next to the
  entropy of a toy (the best NLL any model can reach);
* sample quality of ``num_generated`` samples: the digits Fréchet distance, or
  the sliced Wasserstein distance and MMD (plus mode coverage on mixtures),
  each next to the same metric between two data splits (its floor).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from probgen.data import TOYS, Dataset, load_dataset, mixture_modes, toy_entropy
from probgen.inference.likelihood import log_likelihood
from probgen.inference.sampling import draw_samples
from probgen.metrics import (
    bits_per_dim,
    digits_frechet_distance,
    discrete_nll_from_density,
    mmd,
    mode_coverage,
    sliced_wasserstein,
)
from probgen.objectives import seeded

__all__ = ["evaluate", "log_likelihood", "to_levels"]  # log_likelihood re-exported

_DENSITY_SCALE = {"dequantized": 1.0, "centered": 2.0}
_MIXTURES = ("eight_gaussians", "grid25")
_CACHEABLE = (*TOYS, "grid25")


def _method_name(method: nn.Module) -> str:
    return getattr(method, "name", "") or type(method).__name__


def to_levels(y: Tensor, form: str, num_levels: int) -> Tensor:
    """Map values in a data form back to integer levels ``0 .. num_levels - 1`` (float tensor).

    ``"int"`` values are rounded; ``"dequantized"`` ``(v + u) / L`` and ``"centered"``
    ``2 (v + u) / L - 1`` values are floored after undoing the affine map. Shapes are kept.
    """
    if form == "int":
        levels = y.round()
    elif form == "dequantized":
        levels = (y * num_levels).floor()
    elif form == "centered":
        levels = ((y + 1) / 2 * num_levels).floor()
    else:
        raise ValueError(f"Expected form in ('int', 'dequantized', 'centered'), but found {form!r}.")
    return levels.clamp(0, num_levels - 1)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but found {value!r}.")


def _device(method: nn.Module) -> torch.device:
    p = next(iter(method.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _per_pixel_bits(train: Tensor, test: Tensor, num_levels: int) -> float:
    """Bits/dim on ``test`` of independent per-dimension categoricals fit to ``train`` (add-one)."""
    counts = torch.ones(train.shape[1], num_levels, dtype=torch.float64)
    counts.scatter_add_(1, train.T.long(), torch.ones(train.shape[1], train.shape[0], dtype=torch.float64))
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    nll = -log_p.gather(1, test.T.long()).sum(0)  # (B,)
    return float(bits_per_dim(nll, train.shape[1]).mean())


def _nll_section(
    method: nn.Module, test: Dataset, test_int: Dataset | None, name: str, form: str, **kwargs: Any
) -> dict[str, Any]:
    section: dict[str, Any] = {"nats": None, "bits_per_dim": None, "kind": None, "reason": None}
    if test.kind == "toy":
        section["entropy_floor"] = toy_entropy(name)
    x = test.x.to(_device(method))
    try:
        # Forked here too, so that an estimator drawing outside its own seeding leaves the stream alone.
        with seeded(kwargs.get("seed", 0), x):
            ll, kind = log_likelihood(method, x, **kwargs)
    except NotImplementedError as exc:
        section["reason"] = str(exc)
        return section
    nll = -ll.detach().double().cpu()
    levels = test_int.num_levels if test_int is not None else None
    dims = test.x.shape[1]
    if form in _DENSITY_SCALE and levels is not None:
        section["density_nats"] = float(nll.mean())
        nll = discrete_nll_from_density(nll, dims, levels, scale=_DENSITY_SCALE[form])
        kind += f"; density on {form} data turned into a bound on the {levels}-level data"
    section["nats"] = float(nll.mean())
    section["kind"] = kind
    if levels is not None:
        section["bits_per_dim"] = float(bits_per_dim(nll, dims).mean())
        train_int = load_dataset(name, "train", form="int")
        section["references_bits_per_dim"] = {
            "uniform": math.log2(levels),
            "per_dimension_categorical": _per_pixel_bits(train_int.x, test_int.x, levels),
        }
    return section


@functools.lru_cache(maxsize=16)
def _sample_floors(dataset_name: str, form: str, num: int) -> dict[str, Any]:
    """Data-vs-data values of the sample metrics: ``num`` validation points against the test split.

    Cached per process for the generated data sets (they are a fixed function of the name):
    the MMD against 5,000 test points is the slow part of an evaluation.
    """
    test = load_dataset(dataset_name, "test", form=form)
    ref = load_dataset(dataset_name, "val", form=form).x[:num]
    floors: dict[str, Any] = {
        "num_val": int(ref.shape[0]),
        "sliced_wasserstein": sliced_wasserstein(ref, test.x),
        "mmd": mmd(ref, test.x),
    }
    if test.name in _MIXTURES:
        floors["mode_coverage"] = mode_coverage(test.x, *mixture_modes(test.name))
    return floors


def evaluate(
    method: nn.Module,
    dataset_name: str,
    *,
    form: str,
    num_samples: int = 1000,
    num_generated: int = 5000,
    seed: int = 0,
    sampler: str = "ancestral",
    sampler_steps: int | None = None,
    eta: float | None = None,
    sampler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    r"""Evaluate ``method`` on the test split of ``dataset_name``: NLL and sample quality.

    Args:
        method: a trained method (``model``/``guide``/``sample``), e.g. from
            :func:`probgen.models.load_method`.
        dataset_name: a toy name, ``"digits"`` or a local file path.
        form: the data form the method was trained on (``"int"``, ``"dequantized"``,
            ``"centered"``).
        num_samples: importance samples K (or the estimator's equivalent) per example.
        num_generated: number of samples drawn for the sample-quality metrics.
        seed: seeds a forked RNG for the likelihood and for sampling; the global
            stream is untouched.
        sampler: the sampler of the generated samples (:func:`~probgen.inference.sampling.draw_samples`).
        sampler_steps: its number of steps (None: the sampler's default).
        eta: stochasticity of DDIM-like samplers (None: not passed).
        sampler_options: further keyword arguments of the sampler.

    Returns:
        A JSON-serializable dict::

            {"method", "data", "form", "num_test", "seed",
             "nll": {"nats", "bits_per_dim", "kind", "reason",
                     "entropy_floor" (toys), "density_nats" (dequantized forms),
                     "references_bits_per_dim" (level data)},
             "samples": {"num_generated", "reference", "floor",
                         METRIC: {"value", "floor"}, ...},
             "seconds": {"nll", "sampling", "metrics"}}

        ``nll.nats`` is the mean negative log-likelihood in nats per example (None,
        with ``reason``, when the method has no estimator). Sample metrics are
        ``frechet_distance`` (digits), ``sliced_wasserstein`` and ``mmd`` (other data),
        ``mode_coverage`` (mixtures; its floor is the test split's own coverage).
    """
    _check_positive("num_samples", num_samples)
    _check_positive("num_generated", num_generated)
    test = load_dataset(dataset_name, "test", form=form)
    # The same examples as integer levels, where the data are levels (None for continuous data).
    test_int = test if form == "int" else load_dataset(dataset_name, "test", form="int")
    test_int = test_int if test_int.num_levels is not None else None
    name = test.name
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    nll = _nll_section(method, test, test_int, name, form, num_samples=num_samples, seed=seed)
    seconds["nll"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        generated = draw_samples(
            method,
            num_generated,
            sampler=sampler,
            steps=sampler_steps,
            eta=eta,
            seed=seed + 1,
            options=sampler_options,
        )
        generated = generated.detach().to("cpu", torch.float32)
    seconds["sampling"] = time.perf_counter() - start
    generated = generated.reshape(num_generated, -1)

    start = time.perf_counter()
    samples: dict[str, Any] = {
        "num_generated": num_generated,
        "sampler": sampler,
        "sampler_steps": sampler_steps,
        "eta": eta,
        "sampler_options": dict(sampler_options or {}),
    }
    if name == "digits":
        levels = to_levels(generated, form, test_int.num_levels)
        train_int = load_dataset(name, "train", form="int")
        samples["reference"] = f"test split ({len(test_int)} images), in level units"
        samples["floor"] = "train split vs test split"
        samples["frechet_distance"] = {
            "value": digits_frechet_distance(levels, test_int.x),
            "floor": digits_frechet_distance(train_int.x, test_int.x),
        }
    else:
        if name in _CACHEABLE:  # a deep copy: callers may edit the returned dict
            floors = copy.deepcopy(_sample_floors(dataset_name, form, num_generated))
        else:  # a local file may change between calls
            floors = _sample_floors.__wrapped__(dataset_name, form, num_generated)
        samples["reference"] = f"test split ({len(test)} points)"
        samples["floor"] = f"val split ({floors['num_val']} points) vs test split"
        samples["sliced_wasserstein"] = {
            "value": sliced_wasserstein(generated, test.x),
            "floor": floors["sliced_wasserstein"],
        }
        samples["mmd"] = {"value": mmd(generated, test.x), "floor": floors["mmd"]}
        if name in _MIXTURES:
            centres, std = mixture_modes(name)
            samples["mode_coverage"] = {
                "value": mode_coverage(generated, centres, std),
                "floor": floors["mode_coverage"],
            }
    seconds["metrics"] = time.perf_counter() - start

    return {
        "method": _method_name(method),
        "data": name,
        "form": form,
        "num_test": len(test),
        "seed": seed,
        "nll": nll,
        "samples": samples,
        "seconds": seconds,
    }
