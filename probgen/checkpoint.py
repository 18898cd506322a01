r"""Checkpoints: safetensors weights plus a JSON file of metadata, written atomically.

A run directory holds, for every tag (``"last"``, ``"best"``, ...), two files::

    runs/x/last.json                           the commit point
    runs/x/last-1200-3f9c0a7d12e4b5a6.safetensors  the weights it names

:func:`save_checkpoint` first writes a *new*, uniquely named weights file, then
replaces ``{tag}.json`` (temp file, ``fsync``, ``os.replace``, directory
``fsync``), then removes the weights files that ``{tag}.json`` no longer
names. A crash or Ctrl-C at any point therefore leaves ``{tag}.json`` naming a
complete weights file whose SHA-256 it records. From format version 2 the JSON also
records the SHA-256 of the whole record (config, step, every metadata field), so an
edited run directory is refused instead of loaded. Loading reads JSON and
safetensors only; nothing is ever unpickled.

Nested Python state (optimizer ``state_dict()``, RNG states) is stored with
:func:`flatten_state`, which splits it into a flat ``{name: Tensor}`` dict and a
JSON skeleton, and restored exactly with :func:`unflatten_state`.

One writer per run directory is assumed; readers may run concurrently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from probgen import __version__

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "CheckpointError",
    "atomic_write_bytes",
    "flatten_state",
    "has_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_json",
    "save_checkpoint",
    "unflatten_state",
    "write_json_atomic",
]

FORMAT_VERSION = 2
#: format versions :func:`load_checkpoint` reads: 1 (digest of the weights only) and 2 (also of the record).
READABLE_VERSIONS = (1, 2)

_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_WEIGHTS_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Skeleton tags: every JSON object in a skeleton is one of these one-key objects.
_TENSOR, _NDARRAY, _TUPLE, _DICT, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__"
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible; the message names the path and problem."""


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    r"""Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a mix.

    The bytes go to a temp file in the same directory, which is ``fsync``-ed and
    moved over ``path`` with ``os.replace``; the directory is then ``fsync``-ed.
    Missing parent directories are created.

    Args:
        path: Destination file.
        data: The complete new contents.

    Returns:
        The destination path.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"Expected data to be bytes, but found {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temp file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; directories cannot be opened on some platforms (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_json(obj: Any, where: str, active: set[int] | None = None) -> None:
    # json.dumps would silently turn int keys and tuples into str keys and lists; keys are the
    # one case that breaks a round trip, so they are refused (tuples become lists, documented).
    active = set() if active is None else active
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in active:
            raise CheckpointError(f"Expected JSON-serializable data, but found a cycle at {where}")
        active.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise CheckpointError(
                        f"Expected str keys (JSON object keys are strings; use flatten_state for "
                        f"other keys), but found {type(key).__name__} key {key!r} at {where}"
                    )
                _check_json(value, f"{where}[{key!r}]", active)
        else:
            for i, value in enumerate(obj):
                _check_json(value, f"{where}[{i}]", active)
        active.discard(id(obj))
        return
    hint = "; store tensors in `tensors` (see flatten_state)" if isinstance(obj, Tensor) else ""
    raise CheckpointError(
        "Expected JSON-serializable data (dict with str keys, list, tuple, str, int, float, "
        f"bool, None), but found {type(obj).__module__}.{type(obj).__qualname__} at {where}{hint}"
    )


def _dumps(obj: Any, where: str) -> bytes:
    _check_json(obj, where)
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"Expected JSON-serializable data at {where}, but found: {e}") from e
    return (text + "\n").encode("utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    r"""Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write_bytes`).

    Args:
        path: Destination file.
        obj: Dicts with str keys, lists, tuples (written as lists), str, int, float, bool,
            None. Non-finite floats are written as ``NaN``/``Infinity`` (Python's JSON).

    Returns:
        The destination path.

    Raises:
        CheckpointError: If ``obj`` is not JSON-serializable (nothing is written); the message
            names the offending key path.
    """
    return atomic_write_bytes(path, _dumps(obj, "value"))


def read_json(path: str | os.PathLike) -> Any:
    r"""Read a JSON file.

    Raises:
        CheckpointError: If the file is missing, unreadable or not valid UTF-8 JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file {path}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"invalid JSON in {path}: {e}") from e


# ----------------------------------------------------------------------------- checkpoints


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ValueError(
            "Expected tag to be 1-100 characters of letters, digits, '_', '.', '-' not starting "
            f"with '.' or '-', but found {tag!r}"
        )


def _weights_re(tag: str) -> re.Pattern[str]:
    return re.compile(re.escape(tag) + r"-(\d+)-[0-9a-f]{16}\.safetensors")


def _temp_re(tag: str) -> re.Pattern[str]:
    return re.compile(
        r"\." + re.escape(tag) + r"(?:\.json|-\d+-[0-9a-f]{16}\.safetensors)\.[0-9a-f]{16}\.tmp"
    )


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(tensors, Mapping):
        raise ValueError(
            f"Expected tensors to be a mapping str -> Tensor, but found {type(tensors).__name__}"
        )
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Expected tensor names to be non-empty str, but found {name!r}")
        if not isinstance(t, Tensor):
            raise ValueError(f"Expected a Tensor for {name!r}, but found {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"Expected a dense (strided) tensor for {name!r}, but found layout {t.layout}")
        t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights, views, optimizer aliases).
        if ptr and ptr in storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    tag: str,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
) -> Path:
    r"""Save ``tensors`` and ``metadata`` as checkpoint ``tag`` of ``run_dir``, atomically.

    Writes ``{tag}-{step}-{hex}.safetensors`` (``step`` is ``metadata["step"]`` when it is a
    non-negative int, a counter otherwise), then commits by replacing ``{tag}.json``, then
    removes the older weights files and stale temp files of ``tag``.

    Args:
        run_dir: Run directory, created if needed.
        tag: Checkpoint name, e.g. ``"last"`` or ``"best"``.
        tensors: Flat ``{name: Tensor}``; any device, layout strided. Stored as contiguous CPU
            copies (tensors sharing memory are cloned). Names are arbitrary strings.
        metadata: JSON-serializable dict with str keys (method name, constructor arguments,
            data, step, state skeletons, ...). Tuples are stored as lists.

    Returns:
        The path of ``{tag}.json``.

    Raises:
        CheckpointError: If ``metadata`` is not JSON-serializable or a tensor cannot be
            serialized; nothing is written then.
    """
    run_dir = Path(run_dir)
    _check_tag(tag)
    if not isinstance(metadata, Mapping):
        raise ValueError(f"Expected metadata to be a mapping, but found {type(metadata).__name__}")
    metadata = dict(metadata)
    try:
        _dumps(metadata, "metadata")
    except CheckpointError as e:
        raise CheckpointError(f"cannot save checkpoint {tag!r} in {run_dir}: {e}") from e
    prepared = _prepare_tensors(tensors)
    try:
        blob = safetensors.torch.save(prepared, metadata={"format": "pt"})
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot serialize tensors of checkpoint {tag!r} in {run_dir}: {e}") from e
    del prepared

    run_dir.mkdir(parents=True, exist_ok=True)
    step = metadata.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        numbers = [int(m.group(1)) for m in map(_weights_re(tag).fullmatch, os.listdir(run_dir)) if m]
        step = max(numbers, default=-1) + 1
    weights_name = f"{tag}-{step}-{secrets.token_hex(8)}.safetensors"
    atomic_write_bytes(run_dir / weights_name, blob)

    info = {
        "format_version": FORMAT_VERSION,
        "probgen_version": __version__,
        "tag": tag,
        "weights": weights_name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "metadata": metadata,
    }
    info["record_sha256"] = _record_digest(info)
    json_path = atomic_write_bytes(run_dir / f"{tag}.json", _dumps(info, "checkpoint"))

    weights_re, temp_re = _weights_re(tag), _temp_re(tag)
    for name in os.listdir(run_dir):
        if (name != weights_name and weights_re.fullmatch(name)) or temp_re.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(run_dir / name)
    return json_path


def _record_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the whole record (every field but the digest itself)."""
    record = {k: v for k, v in info.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _check_info(info: Any, json_path: Path) -> tuple[str, str]:
    if not isinstance(info, dict) or "format_version" not in info:
        raise CheckpointError(f"{json_path} is not a probgen checkpoint (no format_version)")
    version = info["format_version"]
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"incompatible checkpoint {json_path}: written with format_version {version!r} by "
            f"probgen {info.get('probgen_version')!r}; probgen {__version__} reads format_version "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )
    weights, digest = info.get("weights"), info.get("sha256")
    if not isinstance(weights, str) or not _WEIGHTS_NAME_RE.fullmatch(weights):
        raise CheckpointError(f"corrupt checkpoint {json_path}: invalid weights file name {weights!r}")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise CheckpointError(f"corrupt checkpoint {json_path}: invalid sha256 {digest!r}")
    if not isinstance(info.get("metadata"), dict):
        raise CheckpointError(f"corrupt checkpoint {json_path}: 'metadata' is not a JSON object")
    if version >= 2:
        recorded = info.get("record_sha256")
        try:
            actual = _record_digest(info)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"corrupt checkpoint {json_path}: the record is not strict JSON ({exc})"
            ) from None
        if recorded != actual:
            raise CheckpointError(
                f"corrupt checkpoint {json_path}: the record (config, step, metadata) does not match its "
                f"record_sha256 (the file was edited or damaged); restore it, or start a new run"
            )
    return weights, digest


def load_checkpoint(
    run_dir: str | os.PathLike, tag: str = "last", *, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    r"""Load checkpoint ``tag`` of ``run_dir`` (JSON and safetensors only, never pickle).

    Args:
        run_dir: Run directory.
        tag: Checkpoint name.
        device: Device the tensors are moved to.

    Returns:
        ``(tensors, info)``: the flat ``{name: Tensor}`` dict and the whole JSON record, whose
        ``"metadata"`` is what was saved, next to ``"format_version"``, ``"probgen_version"``,
        ``"weights"``, ``"sha256"``, ``"saved_at"``.

    Raises:
        CheckpointError: If the checkpoint is missing, its JSON or weights are damaged or edited
            (a SHA-256 mismatch of the weights, or of the whole record from format version 2:
            "corrupt"), or its format version is not one of :data:`READABLE_VERSIONS`.
    """
    run_dir = Path(run_dir)
    _check_tag(tag)
    device = torch.device(device)
    json_path = run_dir / f"{tag}.json"
    for attempt in range(3):
        if not json_path.is_file():
            missing = "" if run_dir.is_dir() else "; the run directory does not exist"
            raise CheckpointError(f"no checkpoint {tag!r} in {run_dir} (expected {json_path}{missing})")
        info = read_json(json_path)
        weights, digest = _check_info(info, json_path)
        weights_path = run_dir / weights
        try:
            data = weights_path.read_bytes()
            break
        except FileNotFoundError:
            # A concurrent save may have committed a newer checkpoint and removed this file.
            with contextlib.suppress(CheckpointError):
                if attempt < 2 and read_json(json_path).get("weights") != weights:
                    continue
            raise CheckpointError(
                f"corrupt checkpoint {tag!r} in {run_dir}: weights file {weights_path} named by "
                f"{json_path} is missing"
            ) from None
        except OSError as e:
            raise CheckpointError(f"cannot read {weights_path}: {e}") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CheckpointError(
            f"corrupt checkpoint {tag!r} in {run_dir}: sha256 of {weights_path} is {actual[:16]}..., "
            f"but {json_path} records {digest[:16]}... (the file was damaged or modified)"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and friends come from deep inside the Rust reader
        raise CheckpointError(f"corrupt weights file {weights_path}: {e}") from e
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, info


def _is_checkpoint(run_dir: Path, tag: str) -> bool:
    json_path = run_dir / f"{tag}.json"
    if not json_path.is_file():
        return False
    try:
        info = read_json(json_path)
    except CheckpointError:  # damaged: still "present", load_checkpoint reports the problem
        return True
    return isinstance(info, dict) and "format_version" in info and "weights" in info


def has_checkpoint(run_dir: str | os.PathLike, tag: str = "last") -> bool:
    r"""Whether ``run_dir`` holds checkpoint ``tag`` (:func:`load_checkpoint` may still find it damaged)."""
    _check_tag(tag)
    return _is_checkpoint(Path(run_dir), tag)


def list_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    r"""Sorted tags of the checkpoints in ``run_dir`` (e.g. ``["best", "last"]``); ``[]`` if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    tags = [name[: -len(".json")] for name in os.listdir(run_dir) if name.endswith(".json")]
    return sorted(t for t in tags if _TAG_RE.fullmatch(t) and _is_checkpoint(run_dir, t))


# ----------------------------------------------------------------------------- nested state


def _encode_scalar(x: Any) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x) if math.isfinite(x) else {_FLOAT: repr(float(x))}
    raise TypeError


def flatten_state(obj: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    r"""Split nested state into flat tensors and a JSON-serializable skeleton.

    Handles dicts (keys str, int, bool, float or None), lists, tuples, tensors, numpy arrays
    and Python scalars, e.g. ``optimizer.state_dict()`` or ``torch.get_rng_state()``. Tensor
    leaves are named ``prefix`` plus their path (``"optim.state.0.exp_avg"``; ``#1``, ``#2``
    are appended on collisions) and replaced in the skeleton by references. The skeleton is
    strict JSON (non-finite floats encoded); :func:`unflatten_state` inverts exactly, except
    that dict subclasses and named tuples come back as ``dict`` and ``tuple`` and numpy
    scalars as Python scalars. A tensor object appearing twice is stored once.

    Args:
        obj: The nested state.
        prefix: Non-empty name prefix, e.g. ``"optim"``.

    Returns:
        ``(tensors, skeleton)``; the tensors are detached, not copied.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"Expected prefix to be a non-empty str, but found {prefix!r}")
    tensors: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    active: set[int] = set()

    def leaf(x: Tensor | np.ndarray, path: str, where: str) -> dict[str, str]:
        kind = _TENSOR if isinstance(x, Tensor) else _NDARRAY
        if id(x) not in seen:
            if kind == _TENSOR:
                t = x.detach()
            else:
                try:
                    t = torch.from_numpy(np.ascontiguousarray(x))
                except TypeError:
                    raise ValueError(
                        f"Expected a numpy array of a torch dtype, but found {x.dtype} at {where}"
                    ) from None
            name, i = prefix + path, 1
            while name in tensors:
                name, i = f"{prefix}{path}#{i}", i + 1
            seen[id(x)] = name
            tensors[name] = t
        return {kind: seen[id(x)][len(prefix) :]}

    def encode(x: Any, path: str, where: str) -> Any:
        with contextlib.suppress(TypeError):
            return _encode_scalar(x.item() if isinstance(x, np.generic) else x)
        if isinstance(x, (Tensor, np.ndarray)):
            return leaf(x, path, where)
        if not isinstance(x, (dict, list, tuple)):
            raise ValueError(
                "Expected dicts, lists, tuples, tensors, numpy arrays or Python scalars, but found "
                f"{type(x).__module__}.{type(x).__qualname__} at {where}"
            )
        if id(x) in active:
            raise ValueError(f"Expected a tree, but found a cycle at {where}")
        active.add(id(x))
        if isinstance(x, dict):
            pairs = []
            for k, v in x.items():
                try:
                    key = _encode_scalar(k)
                except TypeError:
                    raise ValueError(
                        f"Expected dict keys str, int, bool, float or None, but found "
                        f"{type(k).__name__} at {where}"
                    ) from None
                pairs.append([key, encode(v, f"{path}.{k}", f"{where}[{k!r}]")])
            out: Any = {_DICT: pairs}
        else:
            items = [encode(v, f"{path}.{i}", f"{where}[{i}]") for i, v in enumerate(x)]
            out = items if isinstance(x, list) else {_TUPLE: items}
        active.discard(id(x))
        return out

    return tensors, encode(obj, "", prefix)


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any, prefix: str) -> Any:
    r"""Rebuild the state that :func:`flatten_state` split into ``tensors`` and ``skeleton``.

    Args:
        tensors: A mapping holding (at least) the tensors named ``prefix + ...``, e.g. the first
            output of :func:`load_checkpoint`.
        skeleton: The skeleton, possibly after a JSON round trip.
        prefix: The prefix used when flattening (another one may be used if names were moved).

    Returns:
        The nested state; tensor leaves are the objects of ``tensors`` (not copies).

    Raises:
        CheckpointError: If a referenced tensor is missing or the skeleton is malformed.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"Expected prefix to be a non-empty str, but found {prefix!r}")
    arrays: dict[str, np.ndarray] = {}

    def fetch(rel: Any, where: str) -> Tensor:
        name = prefix + rel if isinstance(rel, str) else None
        if name not in tensors:
            raise CheckpointError(
                f"Expected tensor {name!r} referenced at {where} of the state skeleton, but found "
                "no such tensor"
            )
        return tensors[name]

    def decode(s: Any, where: str) -> Any:
        if s is None or isinstance(s, (bool, int, float, str)):
            return s
        if isinstance(s, list):
            return [decode(v, f"{where}[{i}]") for i, v in enumerate(s)]
        if isinstance(s, dict) and len(s) == 1:
            ((kind, value),) = s.items()
            if kind == _TENSOR:
                return fetch(value, where)
            if kind == _NDARRAY:
                t = fetch(value, where)
                if value not in arrays:
                    arrays[value] = t.cpu().numpy()
                return arrays[value]
            if kind == _FLOAT and isinstance(value, str) and value in _NONFINITE:
                return _NONFINITE[value]
            if kind == _TUPLE and isinstance(value, list):
                return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(value))
            if kind == _DICT and isinstance(value, list):
                out = {}
                for pair in value:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        break
                    key = decode(pair[0], f"{where} key")
                    if isinstance(key, (list, tuple, dict, Tensor, np.ndarray)):
                        break
                    out[key] = decode(pair[1], f"{where}[{key!r}]")
                else:
                    return out
        raise CheckpointError(f"malformed state skeleton at {where}: {str(s)[:80]}")

    return decode(skeleton, prefix)
