"""Samplers as a method declares them: ``draw_samples(method, num, sampler="ddim", steps=50)``.

A method class names its samplers in its ``samplers`` table (:attr:`probgen.models.Method.samplers`):
``{sampler name: algorithm}``, where an algorithm is a key of :data:`ALGORITHMS` (the samplers written
here, each once) or a callable ``fn(method, num, *, generator, **knobs) -> (num, D)`` of the user's own.
Nothing is registered at import time and nothing dispatches on a method's name. A sampler's knobs are
its own keyword arguments: a knob it does not take is an error that lists the ones it takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from probgen.inference.ancestral import ancestral_sample, ddim_sample
from probgen.inference.consistency import consistency_sampler
from probgen.inference.distill import distilled_ddim
from probgen.inference.langevin import ncsn_annealed_langevin
from probgen.inference.score_sde_sampling import score_sde_em, score_sde_ode, score_sde_pc
from probgen.models.base import declared
from probgen.objectives import seeded

__all__ = ["ALGORITHMS", "draw_samples", "resolve", "sampler_knobs", "samplers_for"]


def _device(method: nn.Module) -> torch.device:
    tensor = next(iter(method.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_ancestral(method, num: int, *, generator) -> Tensor:
    """The method's generative program run with nothing observed (:meth:`Method.sample`).

    Pyro samples from torch's global RNG: it is forked and seeded with the generator's seed.
    """
    with seeded(generator.initial_seed(), method._anchor if hasattr(method, "_anchor") else None):
        return method.sample(num)


def ddpm_ancestral(method, num: int, *, generator) -> Tensor:
    """DDPM's T-step ancestral sampler (Ho et al. 2020, Algorithm 2)."""
    return ancestral_sample(method, num, generator=generator)


def ddpm_ddim(
    method, num: int, *, generator, steps: int | None = None, eta: float = 0.0, spacing: str = "linear",
    final: str = "mode",
) -> Tensor:  # fmt: skip
    """DDIM (Song, Meng & Ermon 2020, arXiv:2010.02502) on ``steps`` (default min(50, T)) of the T steps."""
    steps = steps or min(50, method.T)
    return ddim_sample(method, num, steps=steps, eta=eta, spacing=spacing, final=final, generator=generator)


#: every sampling algorithm of the library, by the name a method's ``samplers`` table uses.
ALGORITHMS: Mapping[str, Callable[..., Tensor]] = {
    "ancestral": model_ancestral,
    "ddpm-ancestral": ddpm_ancestral,
    "ddim": ddpm_ddim,
    "annealed-langevin": ncsn_annealed_langevin,
    "reverse-sde": score_sde_em,
    "predictor-corrector": score_sde_pc,
    "probability-flow-ode": score_sde_ode,
    "consistency": consistency_sampler,
    "distilled-ddim": distilled_ddim,
}


def samplers_for(method: nn.Module | type) -> list[str]:
    """The sampler names a method (or method class) declares, ``"ancestral"`` first where it has one."""
    table = getattr(method if isinstance(method, type) else type(method), "samplers", None) or {
        "ancestral": 0
    }
    return sorted(table, key=lambda name: (name != "ancestral", name))


def resolve(method: nn.Module, sampler: str) -> Callable[..., Tensor]:
    """The function behind ``sampler`` for ``method`` (a ``ValueError`` listing the declared ones)."""
    if not getattr(type(method), "samplers", None):
        return (
            model_ancestral
            if sampler == "ancestral"
            else declared(method, "samplers", sampler, {}, "sampler")
        )
    return declared(method, "samplers", sampler, ALGORITHMS, "sampler")


def sampler_knobs(fn: Callable[..., Tensor]) -> tuple[list[str], bool]:
    """The knobs a sampler takes (its keyword-only arguments but ``generator``), and whether it takes more."""
    params = inspect.signature(fn).parameters.values()
    knobs = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "generator"]
    return knobs, any(p.kind is p.VAR_KEYWORD for p in params)


def draw_samples(
    method: nn.Module,
    num: int,
    *,
    sampler: str = "ancestral",
    steps: int | None = None,
    eta: float | None = None,
    seed: int | None = 0,
    options: dict[str, Any] | None = None,
) -> Tensor:
    """Draw ``num`` samples, ``(num, D)``, from ``method`` with the sampler it declares as ``sampler``.

    Args:
        method: a method.
        num: number of samples.
        sampler: a name from :func:`samplers_for`.
        steps: the sampler's ``steps`` knob (None: not passed, the sampler's default).
        eta: the ``eta`` knob of DDIM-like samplers (None: not passed).
        seed: seeds a private generator (None: a fresh one from the global RNG).
        options: further knobs of the sampler (e.g. ``{"spacing": "quadratic"}`` for DDIM).

    Raises:
        ValueError: a sampler the method does not declare, or a knob the sampler does not take (the
            message lists the ones it takes).
    """
    fn = resolve(method, sampler)
    knobs = dict(options or {})
    for key, value in (("steps", steps), ("eta", eta)):
        if value is not None:
            knobs[key] = value
    accepted, more = sampler_knobs(fn)
    unknown = sorted(k for k in knobs if k not in accepted)
    if unknown and not more:
        takes = ", ".join(accepted) if accepted else "no knobs"
        raise ValueError(f"Expected knobs of the {sampler!r} sampler ({takes}), but found {unknown}.")
    device = _device(method)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
    return fn(method, num, generator=generator, **knobs)
