"""Shared helpers for the test suite."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "TINY",
    "assert_close",
    "assert_mean_and_covariance",
    "is_png",
    "load_script",
    "mc_tolerance",
    "tiny_method",
    "toy_data",
]


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Assert two tensors (or numbers) agree elementwise within ``atol + rtol * |expected|``."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def mc_tolerance(std: float, n: int, z: float = 4.0) -> float:
    """Half-width of a ``z``-sigma Monte Carlo interval for a mean of ``n`` draws of spread ``std``."""
    return z * std / math.sqrt(n)


def _tiny_distilled():
    from probgen.models import DDPM, Distilled

    teacher = DDPM(2, T=16, hidden=(16,), embed_dim=8)
    student = Distilled.from_teacher(teacher, 4)
    student.attach_teacher(teacher.requires_grad_(False))
    return student


def _tiny(name: str, **config):
    def build():
        from probgen.models import build as build_method

        return build_method(name, **config)

    return build


SDE = {"sde": "ve", "sigma_min": 0.01, "sigma_max": 4.0}
#: a tiny instance of every method of ``probgen list`` on 2-D data, for contract tests; a new method
#: must add one (the contract tests check that every listed method has one).
TINY = {
    "vae": _tiny("vae", data_dim=2, latent_dim=2, hidden=(16,), likelihood="gaussian"),
    "gan": _tiny("gan", data_dim=2, latent_dim=2, generator_hidden=(16,), discriminator_hidden=(16,)),
    "flow": _tiny("flow", data_dim=2, num_layers=2, hidden=(16,)),
    "ddpm": _tiny("ddpm", data_dim=2, T=16, hidden=(16,), embed_dim=8),
    "ncsn": _tiny("ncsn", data_dim=2, num_levels=4, hidden=(16,), embed_dim=8),
    "score-matching": _tiny("score-matching", data_dim=2, hidden=(16,)),
    "score-sde": _tiny("score-sde", data_dim=2, **SDE, hidden=(16,), embed_dim=8),
    "consistency": _tiny("consistency", data_dim=2, **SDE, hidden=(16,), embed_dim=8, sigma_data=1.0),
    "distilled": _tiny_distilled,
}


def tiny_method(name: str, seed: int = 0):
    """A freshly initialized tiny ``name`` (initialization seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TINY[name]()


def toy_data(n: int = 256, seed: int = 0) -> torch.Tensor:
    """``n`` points of a 2-D Gaussian blob away from the origin, ``(n, 2)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * 0.7 + torch.tensor([1.0, -0.5])


def load_script(name: str, folder: str = "examples"):
    """Import ``ROOT/folder/name.py`` (an example or a benchmark script) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_png(path) -> bool:
    """Whether ``path`` is a file that starts with the PNG signature."""
    path = Path(path)
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_mean_and_covariance(x, mean, cov, z: float = 4.0) -> None:
    """Assert that the samples ``x`` ``(n, D)`` have mean ``mean`` and covariance ``cov`` within ``z``
    Monte Carlo standard errors (each mean coordinate, each product of centred coordinates)."""
    n = x.shape[0]
    assert bool(((x.mean(0) - mean).abs() < z * (cov.diagonal() / n).sqrt()).all()), (x.mean(0), mean)
    xc = x - x.mean(0)
    for j in range(x.shape[1]):
        for k in range(x.shape[1]):
            prod = xc[:, j] * xc[:, k]
            assert abs(float(prod.mean() - cov[j, k])) < mc_tolerance(float(prod.std()), n, z), (j, k)


def run_chains(kernel, init: dict, warmup: int, num_samples: int) -> dict:
    """Drive an MCMC kernel as ``pyro.infer.MCMC`` does; the stacked samples of each site, ``(C, T, ...)``."""
    kernel.initial_params = init
    kernel.setup(warmup)
    params = kernel.initial_params
    for _ in range(warmup):
        params = kernel.sample(params)
    out = []
    for _ in range(num_samples):
        params = kernel.sample(params)
        out.append(params)
    return {k: torch.stack([p[k] for p in out], 1) for k in init}


class RecordingNet(torch.nn.Module):
    """A stand-in network ``net(h, c) -> ones_like(h)`` that records its inputs in :attr:`calls`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def forward(self, h, c):
        self.calls.append((h, c))
        return torch.ones_like(h)


def assert_every_parameter_learns(module: torch.nn.Module) -> None:
    """After a backward pass: every parameter of ``module`` has a finite, nonzero gradient."""
    for name, p in module.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0), (
            name
        )
