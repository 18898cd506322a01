"""probgen: classic generative models written as probabilistic programs.

The core package holds building blocks only (data, networks, schedules, SDEs,
distributions, metrics, plotting, checkpoints). Methods live in
:mod:`probgen.models`, algorithms in :mod:`probgen.inference`.
Importing probgen changes no global state (RNG seeds, default dtype, or
distribution validation).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
