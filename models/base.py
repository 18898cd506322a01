"""The method protocol: one ``PyroModule`` with ``model(x)`` and ``guide(x)``, and a registry.

A method is a probabilistic program. ``model(x)`` scores a batch ``x`` of shape
``(B, *event_shape)`` (flattened to ``(B, D)`` for vector data) and, called with
``x=None``, is a generative program that samples it. ``guide(x)`` is the
variational program the method is trained with, and :meth:`Method.elbo` names
the ELBO that turns the pair into an objective. Everything the trainer, the
checkpoints and the command line need to know about a method is here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.nn import PyroModule

__all__ = ["Method", "register", "build", "available", "method_class"]

_REGISTRY: dict[str, type[Method]] = {}


class Method(PyroModule):
    r"""Base class of every generative method.

    Subclasses set :attr:`name`, store their constructor arguments in
    :attr:`config` (JSON-serializable, enough to rebuild the method) and define
    ``model(x=None, batch_size=None)`` and ``guide(x)``.

    Attributes:
        name: the registry name (``"vae"``, ``"ddpm"``, ...).
        observed_site: the name of the site that holds the data (``"x"``).
        config: constructor keyword arguments, saved in checkpoints.
    """

    name: ClassVar[str] = ""
    observed_site: ClassVar[str] = "x"
    config: dict[str, Any]

    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        raise NotImplementedError

    def guide(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        raise NotImplementedError

    def elbo(self) -> ELBO:
        """The Pyro ELBO this method is trained with (default ``Trace_ELBO``)."""
        return Trace_ELBO()

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """The form of a data set this method trains on (``"int"``, ``"dequantized"``, ``"centered"``)."""
        return "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> Method:
        """Construct the method with the sizes and likelihood that suit ``dataset``.

        Args:
            dataset: a :class:`probgen.data.Dataset` in this method's :meth:`data_form`.
            **kwargs: constructor arguments that override the defaults.
        """
        raise NotImplementedError

    @property
    def event_dim(self) -> int:
        """Flat size D of one observation."""
        raise NotImplementedError

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a batch ``x`` of shape ``(B, D)`` and return it unchanged."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Expected x to be a torch.Tensor, but found {type(x).__name__}.")
        if x.dim() != 2 or x.shape[-1] != self.event_dim:
            raise ValueError(
                f"Expected data of shape (B, {self.event_dim}) for {type(self).__name__}, "
                f"but found {tuple(x.shape)}."
            )
        return x

    def _batch_size(self, x: torch.Tensor | None, batch_size: int | None) -> int:
        if x is not None:
            return x.shape[-2] if x.dim() >= 2 else 1
        return 1 if batch_size is None else int(batch_size)

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """Draw ``num`` observations by running ``model`` with nothing observed.

        Returns:
            Tensor of shape ``(num, D)``: the value of the observed site.
        """
        if num < 1:
            raise ValueError(f"Expected num >= 1, but found {num}.")
        trace = poutine.trace(self.model).get_trace(None, batch_size=num)
        return trace.nodes[self.observed_site]["value"]


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to the registry under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"Expected a new method name, but found {name!r} already registered.")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Names of every registered method."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Expected a method name in {available()}, but found {name!r}.") from None


def build(name: str, **config: Any) -> Method:
    """Construct the method ``name`` from its constructor keyword arguments."""
    return method_class(name)(**config)
