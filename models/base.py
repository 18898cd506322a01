"""The method protocol: one ``PyroModule`` with ``model(x)`` and ``guide(x)``, and a registry.

A method is a probabilistic program. ``model(x)`` scores a batch ``x`` of shape
``(B, *event_shape)`` (flattened to ``(B, D)`` for vector data) and, called with
``x=None``, is a generative program that samples it. ``guide(x)`` is the
variational program the method is trained with, and :meth:`Method.elbo` names
the ELBO that turns the pair into an objective. Everything the trainer, the
checkpoints and the command line need to know about a method is here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.nn import PyroModule

from probgen.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from probgen.objectives import ELBOObjective, Objective

__all__ = [
    "MAX_CONFIG_INT",
    "MAX_PARAMETERS",
    "Method",
    "available",
    "build",
    "check_config_sizes",
    "check_parameter_count",
    "declared",
    "import_methods",
    "load_method",
    "load_plugins",
    "method_class",
    "register",
]

#: the largest integer a config (or a ``--set`` override) may hold: every size is checked against it
#: before anything is allocated, so a typo or a crafted run directory cannot exhaust memory.
MAX_CONFIG_INT = 10**7
#: the most parameters a method may have (counted on the ``meta`` device, before allocation).
MAX_PARAMETERS = 10**9

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
    #: the samplers of ``probgen sample --sampler NAME``: ``{name: algorithm}``, an algorithm being a key of
    #: ``probgen.inference.sampling.ALGORITHMS`` or a callable ``fn(method, num, *, generator, **knobs)``.
    samplers: ClassVar[Mapping[str, str | Callable[..., Any]]] = {"ancestral": "ancestral"}
    #: the log-likelihood estimators of ``probgen evaluate``, the default first: ``{name: estimator}``, a
    #: key of ``probgen.inference.likelihood.ESTIMATORS`` or a callable
    #: ``fn(method, x, *, num_samples, seed) -> (log_lik (B,), description)``. A method with a guide gets
    #: the IWAE bound; a method without a density declares ``{}``.
    likelihoods: ClassVar[Mapping[str, str | Callable[..., Any]]] = {"iwae": "iwae"}
    #: the method a student method is trained from (``from_data(dataset, teacher=RUN_DIR)``), or None:
    #: ``probgen compare`` trains that method first and hands its run directory over.
    teacher_method: ClassVar[str | None] = None
    #: whether :meth:`check_data` also rejects NaN and infinite values (the continuous-data methods).
    finite_data: ClassVar[bool] = False
    config: dict[str, Any]

    def model(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        raise NotImplementedError

    def guide(self, x: torch.Tensor | None = None, batch_size: int | None = None) -> None:
        raise NotImplementedError

    def elbo(self) -> ELBO:
        """The Pyro ELBO this method is trained with (default ``Trace_ELBO``)."""
        return Trace_ELBO()

    def objective(self) -> Objective:
        """What :func:`probgen.inference.fit` drives: by default the negative ELBO of model/guide
        (:class:`~probgen.objectives.ELBOObjective` over :meth:`elbo`)."""
        return ELBOObjective(self)

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
        """Flat size D of one observation (the method's ``data_dim``)."""
        return self.data_dim

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a batch ``x`` of shape ``(B, D)`` (finite with :attr:`finite_data`); return it as is."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Expected x to be a torch.Tensor, but found {type(x).__name__}.")
        if x.dim() != 2 or x.shape[-1] != self.event_dim:
            raise ValueError(
                f"Expected data of shape (B, {self.event_dim}) for {type(self).__name__}, "
                f"but found {tuple(x.shape)}."
            )
        if self.finite_data and not bool(torch.isfinite(x.to(torch.float32)).all()):
            raise ValueError(
                "Expected finite data within float32's range (the methods compute in float32), "
                "but found NaN, infinite or overflowing values."
            )
        return x

    def _states_and_levels(
        self, x: torch.Tensor, level: float | torch.Tensor, name: str = "t"
    ) -> torch.Tensor:
        """Check states ``x`` ``(B, D)``; return ``level`` (a time or noise level) as a ``(B,)`` tensor."""
        if x.dim() != 2 or x.shape[-1] != self.event_dim:
            raise ValueError(f"Expected x of shape (B, {self.event_dim}), but found {tuple(x.shape)}.")
        level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
        if level.dim() == 0:
            return level.expand(x.shape[0])
        if level.shape != x.shape[:1]:
            raise ValueError(f"Expected {name} of shape ({x.shape[0]},), but found {tuple(level.shape)}.")
        return level

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


def declared(
    method: Any, table: str, key: str, library: Mapping[str, Callable[..., Any]], what: str
) -> Callable[..., Any]:
    """The function a method's class declares as ``key`` in its table ``table`` (``samplers``, ...).

    A declared value is a callable of the user's own, or the name of a function of ``library`` (the
    inference package's algorithms; models never import them, so the library is passed in).

    Raises:
        ValueError: ``key`` is not declared (the message lists what is), or names no ``library`` entry.
    """
    entries = getattr(type(method), table, None) or {}
    if key not in entries:
        name = getattr(method, "name", "") or type(method).__name__
        raise ValueError(f"Expected a {what} in {list(entries)} for {name}, but found {key!r}.")
    value = entries[key]
    if callable(value):
        return value
    if value not in library:
        raise ValueError(
            f"Expected {type(method).__name__}.{table}[{key!r}] to name one of {sorted(library)} "
            f"or to be a callable, but found {value!r}."
        )
    return library[value]


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to the registry under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"Expected a new method name, but found {name!r} already registered.")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


ENTRY_POINT_GROUP = "probgen.methods"
_PLUGINS_LOADED = False


def load_plugins() -> list[str]:
    """Import the methods that installed packages declare in the entry-point group ``probgen.methods``.

    An entry point names a method class (``tvae = "my_package.tvae:TVAE"``) or a module whose import
    registers its methods with :func:`register`; a class that is not registered yet is registered under
    its ``name`` (else the entry point's name). Runs once per process.

    Returns:
        The names of the entry points loaded.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return []
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method) and obj not in _REGISTRY.values():
            register(obj.__dict__.get("name") or ep.name)(obj)
        loaded.append(ep.name)
    return loaded


def import_methods(modules: list[str] | tuple[str, ...]) -> None:
    """Import the user's modules (``--import MODULE``) so that the methods they register are found.

    Raises:
        ValueError: a module that cannot be imported (the message says why).
    """
    import importlib
    import sys

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules beside the working directory
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"Expected an importable module for --import, but found {module!r}: {exc}"
            ) from exc


def available() -> list[str]:
    """Names of every registered method (with those of installed ``probgen.methods`` entry points)."""
    load_plugins()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Expected a method name in {available()}, but found {name!r}.") from None


def check_config_sizes(config: Any, where: str = "config") -> None:
    """Refuse integers above :data:`MAX_CONFIG_INT` anywhere in ``config`` (nested lists and dicts).

    Raises:
        ValueError: naming the key and the limit.
    """
    if isinstance(config, bool):
        return
    if isinstance(config, int):
        if abs(config) > MAX_CONFIG_INT:
            raise ValueError(f"Expected {where} <= {MAX_CONFIG_INT:.0e} (a size limit), but found {config}.")
    elif isinstance(config, float) and abs(config) > MAX_CONFIG_INT and float(config).is_integer():
        raise ValueError(f"Expected {where} <= {MAX_CONFIG_INT:.0e} (a size limit), but found {config}.")
    elif isinstance(config, dict):
        for key, value in config.items():
            check_config_sizes(value, f"{where}.{key}" if where != "config" else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_config_sizes(value, f"{where}[{i}]")


def check_parameter_count(factory: Callable[[], Method]) -> None:
    """Refuse a method that ``factory()`` would build with over :data:`MAX_PARAMETERS` parameters.

    ``factory`` runs on the ``meta`` device first, so nothing is allocated; a constructor that computes
    with real values on the way (e.g. ``Tensor.item()``) cannot be counted there and is let through
    (its integer sizes are still capped by :func:`check_config_sizes`).

    Raises:
        ValueError: over the limit (and what ``factory`` raises for bad arguments).
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a teacher's weights copied onto meta tensors (a no-op)
            module = factory()
    except (TypeError, ValueError):
        raise
    except Exception:  # not countable on the meta device
        return
    count = sum(p.numel() for p in module.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"Expected at most {MAX_PARAMETERS:.0e} parameters, but found {count:.3g} in this config."
        )


def build(name: str, **config: Any) -> Method:
    """Construct the method ``name`` from its constructor keyword arguments.

    Sizes are checked before anything is allocated (:func:`check_config_sizes`, then the parameter
    count on the ``meta`` device against :data:`MAX_PARAMETERS`).

    Raises:
        ValueError: an unknown name, a bad argument, or a size over the limits.
    """
    cls = method_class(name)
    check_config_sizes(config)
    check_parameter_count(lambda: cls(**config))
    return cls(**config)


def _imported_class(path: Any) -> type[Method] | None:
    """The already imported :class:`Method` subclass named ``"module:qualname"`` (nothing is imported)."""
    if not isinstance(path, str) or ":" not in path:
        return None
    stack, seen = list(Method.__subclasses__()), set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if f"{cls.__module__}:{cls.__qualname__}" == path:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def load_method(
    run_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    device: str | torch.device = "cpu",
    expected: str | None = None,
) -> tuple[Method, dict[str, Any]]:
    """Rebuild a trained method from a run directory written by ``probgen.inference.fit``.

    The checkpoint's metadata must name the method and its constructor arguments
    (``{"method": "vae", "config": {...}, ...}``, as ``probgen train`` saves
    them); the method is rebuilt with :func:`build` and its ``model.*`` tensors
    are loaded with ``load_state_dict(strict=True)``.

    Args:
        run_dir: the run directory.
        tag: which checkpoint (``"best"``, ``"last"``, ...); default ``"best"``
            when present, else ``"last"``.
        device: device of the returned method.
        expected: the method name the caller needs (e.g. ``"ddpm"`` for a DDIM
            sampler or a teacher); a checkpoint of another method is an error.

    Returns:
        ``(method, metadata)``: the method in eval mode (with the averaged
            weights ``ema.*`` where the run kept an EMA) and the checkpoint's
        metadata, with ``"tag"`` set to the checkpoint that was loaded.

    Raises:
        CheckpointError: the directory holds no probgen checkpoint, the checkpoint is
            corrupt, its metadata does not name a registered method and its config,
            or the saved tensors do not fit that config.
    """
    run_dir = Path(run_dir)
    if tag is None:
        if not run_dir.is_dir():
            raise CheckpointError(f"no run directory {run_dir} (it does not exist or is not a directory)")
        if has_checkpoint(run_dir, "best"):
            tag = "best"
        elif has_checkpoint(run_dir, "last"):
            tag = "last"
        else:
            raise CheckpointError(f"{run_dir} is not a probgen run directory (no best.json or last.json)")
    tensors, info = load_checkpoint(run_dir, tag, device=device)
    where = f"checkpoint {tag!r} in {run_dir}"
    metadata = dict(info["metadata"])
    name, config = metadata.get("method"), metadata.get("config")
    if not isinstance(name, str) or not isinstance(config, dict):
        raise CheckpointError(
            f"Expected the metadata of {where} to hold 'method' (a name) and 'config' (a dict), "
            f"but found method={name!r} and config of type {type(config).__name__}"
        )
    if expected is not None and name != expected:
        raise CheckpointError(f"Expected a checkpoint of method {expected!r}, but found {name!r} in {where}")
    cls = _REGISTRY.get(name) or _imported_class(metadata.get("method_class"))
    if cls is not None and cls.__dict__.get("name") not in (None, "", name):
        cls = None  # the record's class is another method's: the record names a method it is not
    if cls is None:
        load_plugins()
        cls = _REGISTRY.get(name)
    if cls is None:
        where_from = metadata.get("method_class")
        hint = f" (class {where_from})" if isinstance(where_from, str) else ""
        raise CheckpointError(
            f"Expected the method of {where} in {available()}, but found {name!r}{hint}: import the module "
            "that defines it first (probgen --import MODULE ..., or a 'probgen.methods' entry point)"
        )
    try:
        check_config_sizes(config)
        check_parameter_count(lambda: cls(**config))
        method = cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild {name!r} from the config of {where}: {exc}") from exc
    # A run trained with an EMA keeps the averaged weights as ema.* beside the raw model.*
    # (which are for resuming); the average is the model to use.
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    needed = method.state_dict()
    problems = [f"missing {k}" for k in needed if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in needed]
    problems += [
        f"{k} has shape {tuple(state[k].shape)} but the config needs {tuple(v.shape)}"
        for k, v in needed.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"the tensors of {where} do not fit a {name!r} with its saved config: {shown}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"the tensors of {where} are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
            "the run diverged before this checkpoint; load another tag or retrain"
        )
    method.load_state_dict(state, strict=True)
    method.to(device)
    method.eval()
    metadata["tag"] = tag
    return method, metadata
