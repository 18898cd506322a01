"""Named samplers per method, so the CLI and the evaluation pick them up without edits elsewhere.

``draw_samples(method, num, sampler="ddim", steps=50)`` dispatches on the method's registry
name. Every method has ``"ancestral"`` (its model run with nothing observed); others add
their own (DDPM: ``"ddim"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from probgen.inference.ancestral import ancestral_sample, ddim_sample

__all__ = ["draw_samples", "register_sampler", "samplers_for"]

_SAMPLERS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def register_sampler(method_name: str, sampler_name: str, fn: Callable[..., torch.Tensor]) -> None:
    """Register ``fn(method, num, *, steps, eta, generator, **options) -> (num, D)`` as ``sampler_name``.

    ``options`` are the sampler's own keyword arguments (e.g. DDIM's ``spacing``); a sampler
    rejects the ones it does not know with a ``TypeError`` or ``ValueError``.
    """
    _SAMPLERS[(method_name, sampler_name)] = fn


def samplers_for(method_name: str) -> list[str]:
    """The sampler names available for a method (``"ancestral"`` always)."""
    return sorted({"ancestral"} | {s for (m, s) in _SAMPLERS if m == method_name})


def draw_samples(
    method: nn.Module,
    num: int,
    *,
    sampler: str = "ancestral",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int | None = 0,
    options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Draw ``num`` samples, ``(num, D)``, from ``method`` with the named sampler.

    Args:
        method: a registered method.
        num: number of samples.
        sampler: a name from :func:`samplers_for`.
        steps: number of steps, for samplers that take one.
        eta: stochasticity of DDIM-like samplers.
        seed: seeds a private generator (None: the global RNG).
        options: further keyword arguments of the sampler (e.g. ``{"spacing": "quadratic"}``
            for DDIM).
    """
    name = getattr(method, "name", "") or type(method).__name__
    fn = _SAMPLERS.get((name, sampler))
    if fn is None and sampler != "ancestral":
        raise ValueError(f"Expected a sampler in {samplers_for(name)} for {name}, but found {sampler!r}.")
    generator = None if seed is None else torch.Generator(device=_device(method)).manual_seed(seed)
    options = dict(options or {})
    if fn is None:
        if options:
            raise ValueError(f"Expected no options for the ancestral sampler of {name}, but found {options}.")
        with torch.random.fork_rng(devices=_cuda(method)):
            if seed is not None:
                torch.manual_seed(seed)
            return method.sample(num)
    try:
        return fn(method, num, steps=steps, eta=eta, generator=generator, **options)
    except TypeError as exc:
        if options and "unexpected keyword argument" in str(exc):
            raise ValueError(
                f"Expected options of the {sampler!r} sampler, but found {options}: {exc}"
            ) from exc
        raise


def _device(method: nn.Module) -> torch.device:
    tensor = next(iter(method.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _cuda(method: nn.Module) -> list[int]:
    device = _device(method)
    return [device.index or 0] if device.type == "cuda" else []


def _ddpm_ancestral(method, num: int, *, steps: Any, eta: float, generator) -> torch.Tensor:
    return ancestral_sample(method, num, generator=generator)


def _ddpm_ddim(
    method,
    num: int,
    *,
    steps: int | None,
    eta: float,
    generator,
    spacing: str = "linear",
    final: str = "mode",
) -> torch.Tensor:
    return ddim_sample(
        method, num, steps=steps or 50, eta=eta, spacing=spacing, final=final, generator=generator
    )


register_sampler("ddpm", "ancestral", _ddpm_ancestral)
register_sampler("ddpm", "ddim", _ddpm_ddim)
