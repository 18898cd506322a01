r"""Budgets of :func:`~probgen.apps.compare.compare`: how each method is trained and sampled.

A :class:`Budget` holds, per kind of data (``"vector"``: 2-D toys and arrays; ``"image"``), one
:class:`MethodSettings` per method name and a fallback for methods it does not name, so a newly
registered method is compared with generic settings and no edit here. ``"default"`` scales the
steps of ``examples/*.py`` down so that eight_gaussians, checkerboard and digits together take
about 15 minutes on 2 CPU cores; ``"quick"`` takes seconds and only checks that everything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUDGETS", "Budget", "MethodSettings", "settings_for"]


@dataclass(frozen=True)
class MethodSettings:
    """How one method is trained and sampled in a comparison.

    Attributes:
        steps: optimizer steps.
        batch_size: minibatch size.
        lr: learning rate.
        ema_decay: EMA of the weights (None: none).
        sampler: a name from :func:`~probgen.inference.sampling.samplers_for` (``"ancestral"``:
            the method's own generative program).
        sampler_steps: the sampler's number of steps (None: its default).
        config: constructor overrides passed to ``from_data`` (training options of an objective
            live there too, e.g. GAN's ``r1_gamma``).
    """

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float | None = None
    sampler: str = "ancestral"
    sampler_steps: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """A comparison budget: per-method settings per kind of data, and the evaluation sizes.

    Attributes:
        name: ``"default"`` or ``"quick"`` (or a caller's name).
        methods: ``{kind: {method name: MethodSettings}}`` with kind ``"vector"`` (2-D toys,
            arrays) or ``"image"``; a method not listed gets ``fallback`` settings.
        fallback: ``{kind: MethodSettings}`` for methods the table does not know (new ones).
        num_generated: ``{kind: samples}`` drawn per method for the sample metrics.
        nll_examples: ``{kind: test examples}`` in the NLL (None: the whole test split).
        likelihood_samples: importance samples K (or the estimator's equivalent).
        num_reference: test points the sample metrics compare against (None: the whole split).
        num_val: validation examples for model selection (a toy's val split has 5,000).
        validations: validations per training run (the best one's parameters are kept).
    """

    name: str
    methods: Mapping[str, Mapping[str, MethodSettings]]
    fallback: Mapping[str, MethodSettings]
    num_generated: Mapping[str, int]
    nll_examples: Mapping[str, int | None]
    likelihood_samples: int
    num_reference: int | None = None
    num_val: int = 1000
    validations: int = 5


def _s(steps: int, **kw: Any) -> MethodSettings:
    return MethodSettings(steps=steps, **kw)


# Steps scaled down from examples/*.py so that the three data sets fit about 15 minutes on 2 cores.
_DEFAULT = Budget(
    name="default",
    methods={
        "vector": {
            "vae": _s(2000),
            "gan": _s(2000, batch_size=128, ema_decay=0.999, config={"r1_gamma": 0.1}),
            "flow": _s(800, batch_size=1024, lr=2e-3),
            "ddpm": _s(2000, config={"weighting": "simple"}),
            "ncsn": _s(2000, ema_decay=0.999),
            "score-matching": _s(1500),
            "score-sde": _s(2000, lr=2e-3, ema_decay=0.999, config={"sample_steps": 500}),
            "consistency": _s(2000),  # distillation from this comparison's score-sde, one-step sampling
            "distilled": _s(1000, config={"steps": 4}),  # one stage from the ddpm's DDIM-8
        },
        "image": {
            "vae": _s(2000, batch_size=128),
            "gan": _s(2000, batch_size=128, ema_decay=0.999),
            "flow": _s(500, batch_size=128),
            "ddpm": _s(
                800,
                batch_size=128,
                ema_decay=0.999,
                sampler="ddim",
                sampler_steps=50,
                config={"base_channels": 16, "weighting": "simple", "variance": "beta_tilde"},
            ),
            "ncsn": _s(
                800, batch_size=128, ema_decay=0.999, config={"base_channels": 16, "steps_per_level": 5}
            ),
            "consistency": _s(400, batch_size=128, config={"base_channels": 16}),
            "distilled": _s(400, batch_size=128, config={"steps": 8}),
            # The default Langevin step 1e-2 diverges on the 64-D digits at this budget (all samples NaN).
            "score-matching": _s(1000, batch_size=128, config={"num_steps": 200, "step_size": 1e-3}),
            "score-sde": _s(
                800,
                batch_size=128,
                lr=2e-3,
                ema_decay=0.999,
                config={"base_channels": 16, "sample_steps": 200},
            ),
        },
    },
    fallback={"vector": _s(1000), "image": _s(500, batch_size=128)},
    num_generated={"vector": 5000, "image": 500},
    nll_examples={"vector": 1000, "image": None},
    likelihood_samples=1000,
)

# Tiny: runs in the test suite (every method, one toy) in seconds; numbers mean nothing.
_QUICK_CONFIG = {
    "ddpm": {"T": 20},
    "ncsn": {"steps_per_level": 2},
    "score-matching": {"num_steps": 10},
    "score-sde": {"sample_steps": 10},
}
_QUICK = Budget(
    name="quick",
    methods={
        kind: {name: _s(10, batch_size=64, config=cfg) for name, cfg in _QUICK_CONFIG.items()}
        for kind in ("vector", "image")
    },
    fallback={"vector": _s(10, batch_size=64), "image": _s(10, batch_size=64)},
    num_generated={"vector": 200, "image": 64},
    nll_examples={"vector": 64, "image": 16},
    likelihood_samples=8,
    num_reference=500,
    num_val=200,
    validations=1,
)

BUDGETS: dict[str, Budget] = {"default": _DEFAULT, "quick": _QUICK}


def settings_for(budget: Budget, name: str, kind: str) -> MethodSettings:
    """The settings of method ``name`` on data of ``kind`` (``"vector"`` or ``"image"``) in ``budget``."""
    return budget.methods.get(kind, {}).get(name) or budget.fallback[kind]
