"""Generative methods, each one PyroModule with ``model(x)`` and ``guide(x)``.

``build(name, **config)`` constructs a registered method; ``available()`` lists
them. A new module that decorates its class with ``@register("name")`` and is
imported here is picked up by the trainer, the checkpoints and the CLI.
"""

from probgen.models.base import Method, available, build, load_method, method_class, register
from probgen.models.consistency import Consistency
from probgen.models.ddpm import DDPM
from probgen.models.distilled import Distilled
from probgen.models.flow import Flow
from probgen.models.gan import GAN
from probgen.models.ncsn import NCSN
from probgen.models.score_matching import ScoreMatching
from probgen.models.score_sde import ScoreSDE
from probgen.models.vae import VAE

__all__ = [
    "Consistency",
    "DDPM",
    "Distilled",
    "Flow",
    "GAN",
    "NCSN",
    "Method",
    "ScoreMatching",
    "ScoreSDE",
    "VAE",
    "available",
    "build",
    "load_method",
    "method_class",
    "register",
]
