r"""Data: 2-D toy densities, sklearn's bundled 8x8 digits, and local IDX/NPY/NPZ files.

Everything here runs offline: the toys are generated, the digits ship with
scikit-learn, and local files are read from disk. Randomness enters only
through a ``seed`` (a :func:`numpy.random.default_rng`) or a
:class:`torch.Generator`; the global RNGs are never seeded.

Toys follow the shapes and scales of FFJORD's ``toy_data.py`` and lie roughly
within :math:`[-4, 4]^2`, with two exact definitions used for the evaluation
protocol: ``checkerboard`` is uniform on the 8 dark cells of a 4x4 board of
side-2 cells covering :math:`[-4, 4]^2` (entropy :math:`\ln 32`), and
``eight_gaussians`` is an equal-weight mixture of 8 isotropic Gaussians with
centres on the circle of radius :math:`4/\sqrt{2}` and std :math:`0.5/\sqrt{2}`.

References:
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models", ICLR 2019 (``toy_data.py``).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DIGITS_LEVELS",
    "DIGITS_SHAPE",
    "TOYS",
    "DataError",
    "Dataset",
    "dequantize",
    "load_dataset",
    "load_digits",
    "mixture_modes",
    "read_array",
    "read_idx",
    "sample_toy",
    "toy_entropy",
]

TOYS: tuple[str, ...] = (
    "swiss_roll",
    "moons",
    "eight_gaussians",
    "checkerboard",
    "circles",
    "pinwheel",
    "two_spirals",
)
DIGITS_LEVELS = 17
DIGITS_SHAPE = (1, 8, 8)

_MIXTURES = ("eight_gaussians", "grid25")
_SAMPLEABLE = TOYS + ("grid25",)
_SPLITS = ("train", "val", "test")
_FORMS = ("int", "dequantized", "centered")
_TOY_SPLIT_SIZES = {"train": 20000, "val": 5000, "test": 5000}
_DIGITS_SPLIT = (1350, 1500)  # train = perm[:1350], val = perm[1350:1500], test = perm[1500:]
_FILE_SUFFIXES = (".npz", ".npy", ".idx", ".gz", "-ubyte", ".ubyte")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Bad input to a data function, or a file that cannot be read (the message names the file)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    r"""A loaded dataset split.

    Attributes:
        name: The dataset name (a toy name, ``"digits"``, or the file path as given).
        x: ``(N, D)`` float32 examples, flattened; ``D = prod(event_shape)``.
        y: ``(N,)`` int64 labels, or ``None``.
        event_shape: Per-example shape, e.g. ``(2,)`` for toys, ``(C, H, W)`` for images.
        num_levels: Number of integer grey levels when ``x`` holds integer levels
            (``form="int"``), else ``None``.
        kind: ``"toy"``, ``"image"`` or ``"array"``.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None
    event_shape: tuple[int, ...]
    num_levels: int | None
    kind: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


# ----------------------------------------------------------------------------- validation helpers


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"Expected n >= 1, but found {n!r}.")
    return int(n)


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"Expected seed to be a non-negative int or None, but found {seed!r}.")
    return int(seed)


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise DataError(f"Expected {what} in {choices}, but found {value!r}.")
    return value  # type: ignore[return-value]


def _torch_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh entropy for this generator only
    else:
        gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------- 2-D toys


def _swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x = make_swiss_roll(n_samples=n, noise=1.0, random_state=int(rng.integers(2**31 - 1)))[0]
    return x[:, [0, 2]] / 5.0


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x = make_moons(n_samples=n, noise=0.1, random_state=int(rng.integers(2**31 - 1)))[0]
    return x * 2.0 + np.array([-1.0, -0.2])


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    from sklearn.datasets import make_circles

    x = make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=int(rng.integers(2**31 - 1)))[0]
    return x * 3.0


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = np.arange(n) % num_classes
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], axis=1)
    rotations = rotations.reshape(-1, 2, 2)
    return 2.0 * rng.permutation(np.einsum("ti,tij->tj", features, rotations))


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    half = n - n // 2
    t = np.sqrt(rng.random((half, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(t) * t + rng.random((half, 1)) * 0.5
    d1y = np.sin(t) * t + rng.random((half, 1)) * 0.5
    arm = np.hstack((d1x, d1y))
    x = np.vstack((arm, -arm[: n // 2])) / 3.0
    x += rng.standard_normal(x.shape) * 0.1
    return rng.permutation(x)


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    # Dark cells: (i + j) even for cell indices i, j in 0..3; cell (i, j) = [-4 + 2i, -2 + 2i) x [...].
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=np.float64)
    which = rng.integers(len(cells), size=n)
    return -4.0 + 2.0 * cells[which] + 2.0 * rng.random((n, 2))


def _mixture_params(name: str) -> tuple[np.ndarray, float]:
    if name == "eight_gaussians":
        angles = np.arange(8) * np.pi / 4
        radius = 4.0 / math.sqrt(2.0)
        return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1), 0.5 / math.sqrt(2.0)
    if name == "grid25":
        ticks = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
        xx, yy = np.meshgrid(ticks, ticks, indexing="ij")
        return np.stack([xx.ravel(), yy.ravel()], axis=1), 0.2
    raise DataError(f"Expected a mixture name in {_MIXTURES}, but found {name!r}.")


def _mixture_sampler(name: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        centres, std = _mixture_params(name)
        which = rng.integers(len(centres), size=n)
        return centres[which] + std * rng.standard_normal((n, 2))

    return sample


_TOY_SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "swiss_roll": _swiss_roll,
    "moons": _moons,
    "eight_gaussians": _mixture_sampler("eight_gaussians"),
    "checkerboard": _checkerboard,
    "circles": _circles,
    "pinwheel": _pinwheel,
    "two_spirals": _two_spirals,
    "grid25": _mixture_sampler("grid25"),
}


def _check_toy(name: object) -> str:
    if name not in _TOY_SAMPLERS:
        raise DataError(f"Expected a toy name in {_SAMPLEABLE}, but found {name!r}.")
    return name  # type: ignore[return-value]


def sample_toy(name: str, n: int, *, seed: int | None = None) -> torch.Tensor:
    r"""Draws ``n`` points from a 2-D toy density.

    Args:
        name: One of :data:`TOYS` (or ``"grid25"``, the 5x5 Gaussian grid of :func:`mixture_modes`).
        n: Number of points N >= 1.
        seed: Seed of the :func:`numpy.random.default_rng` that generates the points;
            ``None`` draws fresh entropy.

    Returns:
        ``(N, 2)`` float32 tensor, roughly within :math:`[-4, 4]^2`.

    Raises:
        DataError: Unknown name (the message lists the known ones), ``n < 1`` or a bad seed.
    """
    name = _check_toy(name)
    n = _check_n(n)
    rng = np.random.default_rng(_check_seed(seed))
    x = _TOY_SAMPLERS[name](rng, n)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def mixture_modes(name: str) -> tuple[torch.Tensor, float]:
    r"""Centres and common std of a Gaussian-mixture toy, for mode-coverage metrics.

    Args:
        name: ``"eight_gaussians"`` (8 centres on the circle of radius :math:`4/\sqrt{2}` at
            angles :math:`k\pi/4`, std :math:`0.5/\sqrt{2}`) or ``"grid25"`` (centres
            :math:`\{-4, -2, 0, 2, 4\}^2`, std 0.2).

    Returns:
        ``(centres, std)``: a ``(K, 2)`` float32 tensor and the component std.

    Raises:
        DataError: ``name`` is not a mixture toy.
    """
    centres, std = _mixture_params(name)
    return torch.from_numpy(centres.astype(np.float32)), float(std)


@functools.cache
def _mixture_entropy(name: str) -> float:
    """-int p log p of an isotropic equal-weight mixture by the trapezoid rule on a uniform grid.

    The integrand is smooth and decays like a Gaussian, so the rule converges geometrically in the
    step; with step std/4 on the box of centres +- 10 std the result agrees with steps std/3 .. std/12
    to ~1e-13 nats, and the truncated tail mass is below 1e-20.
    """
    centres, std = _mixture_params(name)
    step = std / 4.0
    grid = np.arange(centres.min() - 10 * std, centres.max() + 10 * std + step, step)
    log_norm = -math.log(len(centres)) - math.log(2 * math.pi * std**2)
    total = 0.0
    for rows in np.array_split(grid, max(1, len(grid) // 64)):
        pts = np.stack(np.meshgrid(grid, rows, indexing="xy"), axis=-1).reshape(-1, 1, 2)
        logits = -((pts - centres) ** 2).sum(-1) / (2 * std**2)
        top = logits.max(axis=1, keepdims=True)
        log_p = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0] + log_norm
        total -= float((np.exp(log_p) * log_p).sum())
    return total * step * step


def toy_entropy(name: str) -> float | None:
    r"""Differential entropy of a toy density in nats, where it is known; the best NLL a model can reach.

    ``checkerboard`` is uniform on area 32: :math:`\ln 32 \approx 3.4657`. ``eight_gaussians``
    (and ``grid25``) are computed once by integrating :math:`-p \log p` of the exact mixture density
    with the trapezoid rule on a grid of step std/4 over the centres' box widened by 10 std, which
    is accurate to about 1e-12 nats (``eight_gaussians``: 2.831578..., i.e. :math:`\ln 8` plus the
    Gaussian entropy 2.837877 minus an overlap correction of 0.0063); the value is cached.

    Args:
        name: One of :data:`TOYS` (or ``"grid25"``).

    Returns:
        The entropy, or ``None`` for toys whose entropy has no closed form here.

    Raises:
        DataError: Unknown name.
    """
    name = _check_toy(name)
    if name == "checkerboard":
        return math.log(32.0)
    if name in _MIXTURES:
        return _mixture_entropy(name)
    return None


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    data = np.asarray(bunch.data, dtype=np.float32)
    target = np.asarray(bunch.target, dtype=np.int64)
    data.setflags(write=False)
    target.setflags(write=False)
    return data, target


def _digits_indices(split: str, total: int) -> np.ndarray:
    if split == "all":
        return np.arange(total)
    perm = np.random.default_rng(0).permutation(total)
    a, b = _DIGITS_SPLIT
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}[split]


def dequantize(x: torch.Tensor, num_levels: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Uniform dequantization :math:`(v + u) / L` with :math:`u \sim U[0, 1)`.

    Args:
        x: Tensor of any shape holding integer levels ``v`` in ``0 .. num_levels - 1``.
        num_levels: Number of levels L >= 1.
        generator: Source of ``u``; ``None`` uses torch's default generator (as ``torch.rand`` does).

    Returns:
        Tensor shaped like ``x`` with values in :math:`[0, 1)` (float32 unless ``x`` is floating).

    Raises:
        DataError: ``num_levels < 1`` or values that are not integer levels in range.
    """
    if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or num_levels < 1:
        raise DataError(f"Expected num_levels to be an int >= 1, but found {num_levels!r}.")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    v = x.to(dtype)
    if v.numel() > 0:
        lo, hi = float(v.min()), float(v.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > num_levels - 1:
            raise DataError(
                f"Expected integer levels in [0, {num_levels - 1}], but found values in [{lo}, {hi}]."
            )
        if bool((v != v.round()).any()):
            raise DataError("Expected integer levels, but found non-integer values.")
    u = torch.rand(v.shape, generator=generator, dtype=dtype, device=v.device)
    y = (v + u) / num_levels
    # (v + u) / L can round up to exactly 1 in floating point: keep the interval half-open.
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    return y.clamp_(max=float(below_one))


def _apply_form(x: torch.Tensor, form: str, num_levels: int, seed: int | None) -> torch.Tensor:
    if form == "int":
        return x.to(torch.float32)
    y = dequantize(x, num_levels, generator=_torch_generator(seed)).to(torch.float32)
    return y if form == "dequantized" else 2.0 * y - 1.0


def load_digits(
    split: str = "train", *, form: str = "int", seed: int | None = 0, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""sklearn's bundled 8x8 digits (1797 images, 17 grey levels), with the project's fixed split.

    The split is a ``numpy.random.default_rng(0)`` permutation of the 1797 images: the first 1350
    train, the next 150 validate, the last 297 test; ``"all"`` returns every image in the original
    order.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        form: ``"int"`` (levels 0..16 as float32), ``"dequantized"`` (``(v + u) / 17`` in
            :math:`[0, 1)`), or ``"centered"`` (the dequantized value times 2 minus 1, in :math:`[-1, 1)`).
        seed: Seed of the generator for ``u``; ``None`` draws fresh entropy. Unused for ``"int"``.
        return_labels: Also return the digit labels.

    Returns:
        ``x`` of shape ``(N, 64)`` float32, or ``(x, y)`` with ``y`` of shape ``(N,)`` int64.

    Raises:
        DataError: Unknown split or form, or a bad seed.
    """
    _check_choice("split", split, _SPLITS + ("all",))
    _check_choice("form", form, _FORMS)
    seed = _check_seed(seed)
    data, target = _digits_arrays()
    idx = _digits_indices(split, len(data))
    x = _apply_form(torch.from_numpy(data[idx]), form, DIGITS_LEVELS, seed)
    if return_labels:
        return x, torch.from_numpy(target[idx])
    return x


# ----------------------------------------------------------------------------- local files


def _file_error(path: str | os.PathLike, problem: str) -> DataError:
    return DataError(f"{os.fspath(path)}: {problem}")


def _read_head(path: str | os.PathLike, size: int = -1) -> bytes:
    """The first ``size`` bytes of a file (all of it for ``size=-1``)."""
    if not os.path.isfile(path):
        raise _file_error(path, "Expected an existing file, but found none (file not found).")
    with open(path, "rb") as fh:
        return fh.read(size)


def _hex(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    r"""Reads an IDX file (the MNIST format), gzipped or not (detected by the magic bytes ``1f 8b``).

    Header: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64; big-endian), the number of dims, then one big-endian uint32 per dim.

    Args:
        path: Path to e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        Tensor of the file's shape and natural dtype (``torch.uint8`` for MNIST images).

    Raises:
        DataError: Missing file, corrupt gzip, wrong magic number, unknown dtype code, truncated data
            or trailing bytes; the message names the file.
    """
    raw = _read_head(path)
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise _file_error(
                path, f"Expected valid gzip data, but found a corrupt gzip stream ({err})."
            ) from err
    if len(raw) < 4:
        raise _file_error(
            path, f"Expected an IDX header of at least 4 bytes, but found {len(raw)} (truncated)."
        )
    if raw[0] != 0 or raw[1] != 0:
        raise _file_error(
            path,
            f"Expected IDX magic bytes '00 00 <dtype> <ndim>', but found '{_hex(raw[:4])}' (wrong magic).",
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise _file_error(
            path, f"Expected an IDX dtype code in ({known}), but found unknown code 0x{code:02X}."
        )
    if ndim == 0:
        raise _file_error(path, "Expected an IDX array with at least 1 dimension, but found 0.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _file_error(
            path, f"Expected an IDX header of {header} bytes, but found {len(raw)} (truncated)."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise _file_error(path, f"Expected {expected} bytes of data, but found {found} (truncated).")
    if found > expected:
        raise _file_error(path, f"Expected {expected} bytes of data, but found {found} (trailing bytes).")
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape))


def _to_torch(arr: np.ndarray, path: str | os.PathLike) -> torch.Tensor:
    if arr.dtype.kind not in "biuf":
        raise _file_error(path, f"Expected a numeric (bool/int/float) array, but found dtype {arr.dtype}.")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int64)  # torch's support for uint16/32/64 is partial
    return torch.from_numpy(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("="), copy=True))


def _check_examples(x: torch.Tensor, path: str | os.PathLike) -> None:
    if x.ndim < 2:
        raise _file_error(path, f"Expected an array of shape (N, ...), but found shape {tuple(x.shape)}.")
    if x.numel() == 0:
        raise _file_error(path, f"Expected a non-empty array, but found shape {tuple(x.shape)} (empty).")
    if x.is_floating_point():
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        if nan or inf:
            raise _file_error(path, f"Expected finite values, but found {nan} NaN and {inf} inf values.")


def _select_key(files: list[str], key: str | None, path: str | os.PathLike) -> str:
    if key is not None:
        if key not in files:
            raise _file_error(path, f"Expected key in {files}, but found {key!r}.")
        return key
    if len(files) == 1:
        return files[0]
    for name in ("x", "images", "arr_0"):
        if name in files:
            return name
    raise _file_error(path, f"Expected a single array or a key 'x'/'images'/'arr_0', but found keys {files}.")


def _load_numpy(path: str | os.PathLike, key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads an npy/npz array (and, for npz without an explicit key, a 'y'/'labels' companion)."""
    raw_head = _read_head(path, 8)
    is_zip = raw_head.startswith(_ZIP_MAGIC)
    if not (is_zip or raw_head.startswith(_NPY_MAGIC)):
        raise _file_error(
            path, f"Expected a valid .npy or .npz file, but found leading bytes '{_hex(raw_head)}' (corrupt)."
        )
    if key is not None and not is_zip:
        raise _file_error(path, f"Expected key=None for a .npy file, but found key={key!r}.")
    labels = None
    try:
        if not is_zip:
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            chosen = _select_key(files, key, path)
            arr = npz[chosen]
            if key is None:
                for name in ("y", "labels"):
                    if name in files and name != chosen:
                        labels = npz[name]
                        break
            return arr, labels
    except DataError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise _file_error(
                path,
                "Expected a numeric array, but found an object array: object arrays are not "
                "supported: loading would unpickle.",
            ) from err
        raise _file_error(
            path, f"Expected a valid .npy or .npz file, but found corrupt data ({err})."
        ) from err
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as err:
        raise _file_error(
            path, f"Expected a valid .npy or .npz file, but found corrupt data ({err})."
        ) from err


def read_array(path: str | os.PathLike, *, key: str | None = None) -> torch.Tensor:
    r"""Reads a ``.npy`` or ``.npz`` array of examples, never unpickling (``allow_pickle=False``).

    Args:
        path: Path to the file (recognised by its magic bytes, not its suffix).
        key: For a ``.npz`` with several arrays, which one; by default the only array, else
            ``"x"``, ``"images"`` or ``"arr_0"`` if present.

    Returns:
        ``(N, ...)`` tensor of the array's natural dtype (unsigned ints wider than 8 bits as int64).

    Raises:
        DataError: Missing or corrupt file, object arrays, ambiguous or unknown key, non-numeric
            dtype, fewer than 2 dims, an empty array, or NaN/inf values; the message names the file.
    """
    arr, _ = _load_numpy(path, key)
    x = _to_torch(arr, path)
    _check_examples(x, path)
    return x


def _sibling_labels(path: str) -> str | None:
    base = os.path.basename(path)
    for images, labels in (
        ("images-idx3-ubyte", "labels-idx1-ubyte"),
        ("images.idx3-ubyte", "labels.idx1-ubyte"),
    ):
        if images in base:
            candidate = os.path.join(os.path.dirname(path), base.replace(images, labels))
            if os.path.isfile(candidate):
                return candidate
    return None


def _read_local(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _read_head(path, 8)
    if path.lower().endswith((".npy", ".npz")) or head.startswith((_NPY_MAGIC, _ZIP_MAGIC)):
        arr, labels = _load_numpy(path, None)
        x = _to_torch(arr, path)
        y = None if labels is None else _to_torch(labels, path)
    else:
        x = read_idx(path)
        label_path = _sibling_labels(path)
        y = None if label_path is None else read_idx(label_path)
    _check_examples(x, path)
    if y is not None:
        if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise _file_error(
                path,
                f"Expected integer labels of shape ({x.shape[0]},), but found {y.dtype} {tuple(y.shape)}.",
            )
        y = y.to(torch.int64)
    return x, y


def _local_indices(total: int, split: str, path: str) -> np.ndarray:
    if split == "all":
        return np.arange(total)
    if total < 10:
        raise _file_error(path, f"Expected at least 10 examples for an 80/10/10 split, but found {total}.")
    perm = np.random.default_rng(0).permutation(total)
    a, b = total * 8 // 10, total * 9 // 10
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}[split]


def _looks_like_path(name: str) -> bool:
    return os.path.exists(name) or os.sep in name or "/" in name or name.lower().endswith(_FILE_SUFFIXES)


def _take(x: torch.Tensor, y: torch.Tensor | None, n: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if n is None:
        return x, y
    if n > x.shape[0]:
        raise DataError(f"Expected n <= {x.shape[0]} (the size of the split), but found {n}.")
    return x[:n], None if y is None else y[:n]


def load_dataset(
    name: str | os.PathLike, split: str = "train", *, n: int | None = None, form: str = "int", seed: int = 0
) -> Dataset:
    r"""Loads a toy, the digits, or a local IDX/NPY/NPZ file as a :class:`Dataset`.

    * Toys (:data:`TOYS`, plus ``"grid25"``): ``n`` points (default 20000 train, 5000 val/test)
      from seed ``3 * seed + {0, 1, 2}`` for train/val/test, so splits never coincide. ``form``
      has no effect (toys are continuous).
    * ``"digits"``: :func:`load_digits` with its fixed split; ``event_shape=(1, 8, 8)``,
      ``num_levels=17`` for ``form="int"``.
    * A path to a local file: ``x`` flattened to ``(N, D)`` float32; ``kind="image"`` for
      ``(N, H, W)`` (event shape ``(1, H, W)``) or channels-first ``(N, C, H, W)`` arrays, else
      ``"array"``. uint8 sources are treated as 256 levels (``"int"`` keeps 0..255, the other forms
      dequantize by 256; ``num_levels=256`` for ``"int"``). ``"all"`` returns every example;
      train/val/test take 80/10/10 percent of a ``default_rng(0)`` permutation. Labels come from a
      ``"y"``/``"labels"`` array in an ``.npz``, or an MNIST ``*-labels-idx1-ubyte`` file beside
      a ``*-images-idx3-ubyte`` file.

    Args:
        name: A toy name, ``"digits"``, or a file path.
        split: ``"train"``, ``"val"``, ``"test"`` (or ``"all"`` for digits and files).
        n: Number of examples; for digits and files the first ``n`` of the split.
        form: ``"int"``, ``"dequantized"`` or ``"centered"`` (see :func:`load_digits`).
        seed: Seed for toy sampling and dequantization noise.

    Returns:
        The :class:`Dataset`.

    Raises:
        DataError: Unknown name, split or form, bad ``n``/``seed``, or an unreadable file.
    """
    name = os.fspath(name)
    _check_choice("form", form, _FORMS)
    seed = _check_seed(seed)
    if seed is None:
        raise DataError("Expected seed to be a non-negative int, but found None.")
    if n is not None:
        n = _check_n(n)
    if name in _TOY_SAMPLERS:
        _check_choice(f"split for toy {name!r}", split, _SPLITS)
        x = sample_toy(name, n or _TOY_SPLIT_SIZES[split], seed=3 * seed + _SPLITS.index(split))
        return Dataset(name, x, None, (2,), None, "toy")
    if name == "digits":
        x, y = load_digits(split, form=form, seed=seed, return_labels=True)
        x, y = _take(x, y, n)
        levels = DIGITS_LEVELS if form == "int" else None
        return Dataset(name, x, y, DIGITS_SHAPE, levels, "image")
    if not _looks_like_path(name):
        raise DataError(f"Expected a name in {_SAMPLEABLE + ('digits',)} or a file path, but found {name!r}.")
    _check_choice("split", split, _SPLITS + ("all",))
    x, y = _read_local(name)
    idx = torch.from_numpy(_local_indices(x.shape[0], split, name))
    x, y = _take(x[idx], None if y is None else y[idx], n)
    event_shape = tuple(x.shape[1:])
    kind = "image" if x.ndim in (3, 4) else "array"
    if x.ndim == 3:
        event_shape = (1, *event_shape)
    flat = x.reshape(x.shape[0], -1)
    if x.dtype == torch.uint8:
        return Dataset(
            name, _apply_form(flat, form, 256, seed), y, event_shape, 256 if form == "int" else None, kind
        )
    if form != "int":
        raise _file_error(name, f"Expected uint8 data for form {form!r}, but found dtype {x.dtype}.")
    return Dataset(name, flat.to(torch.float32), y, event_shape, None, kind)
