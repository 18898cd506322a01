r"""Figures for samples and training: image grids, 2-D scatters, trajectories, curves.

Every function builds its own :class:`matplotlib.figure.Figure` on an Agg
canvas (no ``pyplot``, no ``matplotlib.use``, no change to ``rcParams``), so it
works headless and from several threads, writes a PNG atomically (a temporary
file in the target directory, then :func:`os.replace`), creating parent
directories, and returns the path.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import Tensor

__all__ = [
    "save_image_grid",
    "save_image_panel",
    "save_line_plot",
    "save_loss_curves",
    "save_scatter_2d",
    "save_scatter_panel",
    "save_trajectories",
]

_DPI = 100
_GAP_RGB = (0.55, 0.6, 0.7)  # tile separators: neither black nor white, so both backgrounds read
_DATA_COLOUR = "0.6"
_SAMPLE_COLOUR = "tab:blue"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a figure is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _to_numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"Expected {name} to be a Tensor or array, but found {type(x).__name__}.") from err


def _points_2d(x: object, name: str, max_points: int | None = None) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"Expected {name} of shape (N, 2), but found {tuple(arr.shape)}.")
    if max_points is not None and arr.shape[0] > max_points:
        # Evenly strided subset: deterministic, and unbiased for data stored in any order.
        arr = arr[np.linspace(0, arr.shape[0] - 1, max_points).round().astype(int)]
    return arr


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"Expected {name} to be a positive finite number, but found {value!r}.")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but found {value!r}.")


def _marker_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 1.0, 12.0))


def _square_axes(ax, lim: float) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=8)


# --- image grids ------------------------------------------------------------------


def _as_bchw(images: object, image_shape: tuple[int, ...] | None) -> np.ndarray:
    arr = _to_numpy(images, "images")
    if arr.ndim == 2:
        if image_shape is None:
            side = math.isqrt(arr.shape[1])
            if side * side != arr.shape[1]:
                raise ValueError(
                    f"Expected image_shape for flat images of non-square size, but found D = {arr.shape[1]}."
                )
            image_shape = (side, side)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) not in (2, 3) or math.prod(image_shape) != arr.shape[1]:
            raise ValueError(
                f"Expected image_shape (H, W) or (C, H, W) with {arr.shape[1]} entries, "
                f"but found {image_shape}."
            )
        arr = arr.reshape(arr.shape[0], *image_shape)
    elif image_shape is not None and tuple(arr.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"Expected images of shape (B, *{tuple(image_shape)}), but found {tuple(arr.shape)}."
        )
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] < 1 or arr.shape[1] not in (1, 3):
        raise ValueError(
            "Expected images of shape (B, D), (B, H, W) or (B, C, H, W) with C in {1, 3} and B >= 1, "
            f"but found {tuple(arr.shape)}."
        )
    return arr


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, ...] | None = None,
    nrow: int | None = None,
    value_range: tuple[float, float] = (0.0, 16.0),
    title: str | None = None,
) -> Path:
    r"""Saves a grid of images as a PNG, pixel-exact (nearest neighbour, no smoothing).

    Values are clipped to ``value_range`` and shown in grey (black = low) for one
    channel, as RGB for three. Tiles are separated by a one-pixel grey-blue gap.

    Args:
        images: (B, D) flat images (with ``image_shape``; square grey images if it is
            ``None`` and D is a perfect square), (B, H, W) or (B, C, H, W), C in {1, 3}.
        path: where to write the PNG.
        image_shape: (H, W) or (C, H, W) of one image.
        nrow: images per row; default ``ceil(sqrt(B))``.
        value_range: (low, high) mapped to black and white; default the digits' 0..16.
        title: optional title above the grid.

    Returns:
        The path written.
    """
    arr = _as_bchw(images, image_shape)
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"Expected value_range (low, high) with high > low, but found {value_range}.")
    b, c, h, w = arr.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(b))
    _check_positive_int("nrow", nrow)
    ncol_tiles, nrow_tiles = min(nrow, b), math.ceil(b / nrow)
    arr = np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    if c == 1:
        arr = np.repeat(arr, 3, axis=1)
    mosaic = np.empty((nrow_tiles * (h + 1) + 1, ncol_tiles * (w + 1) + 1, 3))
    mosaic[:] = _GAP_RGB
    for i in range(b):
        r, col = divmod(i, nrow)
        mosaic[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + col * (w + 1) : (col + 1) * (w + 1)] = arr[
            i
        ].transpose(1, 2, 0)
    # Upscale by an integer factor so every data pixel is a square block of screen pixels.
    scale = max(1, min(round(640 / max(mosaic.shape[:2])), 32))
    mosaic = mosaic.repeat(scale, axis=0).repeat(scale, axis=1)
    height_px, width_px = mosaic.shape[:2]
    title_px = 30 if title else 0
    fig = Figure(figsize=(width_px / _DPI, (height_px + title_px) / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, height_px / (height_px + title_px)))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1.0 - 0.5 * title_px / (height_px + title_px), title, ha="center", va="center")
    return _save(fig, path)


def save_image_panel(
    panels: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, ...] | None = None,
    nrow: int = 6,
    value_range: tuple[float, float] = (0.0, 16.0),
    ncols: int | None = None,
    title: str | None = None,
) -> Path:
    r"""Saves several named image sets side by side, each as a small grid with its name above.

    Args:
        panels: name -> images, each (B_i, D) flat (with ``image_shape``, or square grey), (B_i, H, W)
            or (B_i, C, H, W) with C in {1, 3}; the first ``nrow * nrow`` of each are shown.
        path: where to write the PNG.
        image_shape: (H, W) or (C, H, W) of one image, for flat images.
        nrow: images per row (and rows) of each panel's grid.
        value_range: (low, high) mapped to black and white, for every panel.
        ncols: panels per row; default ``min(len(panels), 4)``.
        title: optional title over all panels.

    Returns:
        The path written.
    """
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"Expected a non-empty mapping of name -> images, but found {panels!r}.")
    _check_positive_int("nrow", nrow)
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"Expected value_range (low, high) with high > low, but found {value_range}.")
    ncols = min(len(panels), 4) if ncols is None else ncols
    _check_positive_int("ncols", ncols)
    mosaics = {}
    for name, images in panels.items():
        arr = _as_bchw(images, image_shape)[: nrow * nrow]
        arr = np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
        if arr.shape[1] == 1:
            arr = np.repeat(arr, 3, axis=1)
        b, _, h, w = arr.shape
        rows = math.ceil(b / nrow)
        mosaic = np.empty((rows * (h + 1) + 1, nrow * (w + 1) + 1, 3))
        mosaic[:] = _GAP_RGB
        for i in range(b):
            r, col = divmod(i, nrow)
            mosaic[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + col * (w + 1) : (col + 1) * (w + 1)] = arr[
                i
            ].transpose(1, 2, 0)
        mosaics[str(name)] = mosaic
    nrows = math.ceil(len(mosaics) / ncols)
    fig = _new_figure(2.6 * ncols, 2.8 * nrows + (0.3 if title else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, mosaic) in zip(axes.flat, mosaics.items()):
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- 2-D scatters and trajectories --------------------------------------------------


def save_scatter_2d(
    samples: Tensor,
    path: str | os.PathLike,
    *,
    data: Tensor | None = None,
    title: str | None = None,
    lim: float = 4.5,
    max_points: int = 5000,
) -> Path:
    r"""Saves a square scatter of 2-D samples, with the data in grey behind them.

    Args:
        samples: (N, 2) model samples, drawn in blue.
        path: where to write the PNG.
        data: optional (M, 2) data points, drawn in grey underneath.
        title: optional title.
        lim: axes span ``[-lim, lim]`` in both directions, equal aspect.
        max_points: at most this many points of each set are drawn (evenly strided subset).

    Returns:
        The path written.
    """
    _check_positive("lim", lim)
    _check_positive_int("max_points", max_points)
    pts = _points_2d(samples, "samples", max_points)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    if data is not None:
        ref = _points_2d(data, "data", max_points)
        ax.scatter(
            ref[:, 0], ref[:, 1], s=_marker_size(len(ref)), c=_DATA_COLOUR, alpha=0.5, lw=0, label="data"
        )
    ax.scatter(
        pts[:, 0], pts[:, 1], s=_marker_size(len(pts)), c=_SAMPLE_COLOUR, alpha=0.6, lw=0, label="samples"
    )
    _square_axes(ax, lim)
    if data is not None:
        ax.legend(loc="upper right", fontsize=8, markerscale=8 / math.sqrt(_marker_size(len(pts))))
    if title:
        ax.set_title(title)
    return _save(fig, path)


def save_scatter_panel(
    panels: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    lim: float = 4.5,
    ncols: int | None = None,
    title: str | None = None,
    max_points: int = 5000,
) -> Path:
    r"""Saves several named 2-D sample sets side by side, on the same square axes.

    Args:
        panels: name -> (N_i, 2) points, one panel each, in order.
        path: where to write the PNG.
        lim: every panel spans ``[-lim, lim]^2``, equal aspect.
        ncols: panels per row; default ``min(len(panels), 4)``.
        title: optional title over all panels.
        max_points: at most this many points per panel (evenly strided subset).

    Returns:
        The path written.
    """
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"Expected a non-empty mapping of name -> (N, 2) points, but found {panels!r}.")
    _check_positive("lim", lim)
    _check_positive_int("max_points", max_points)
    points = {str(k): _points_2d(v, f"panels[{k!r}]", max_points) for k, v in panels.items()}
    ncols = min(len(points), 4) if ncols is None else ncols
    _check_positive_int("ncols", ncols)
    nrows = math.ceil(len(points) / ncols)
    fig = _new_figure(3.0 * ncols, 3.0 * nrows + (0.3 if title else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(points) :]:
        ax.set_axis_off()
    for ax, (name, pts) in zip(axes.flat, points.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=_marker_size(len(pts)), c=_SAMPLE_COLOUR, alpha=0.6, lw=0)
        _square_axes(ax, lim)
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def save_trajectories(
    traj: Tensor,
    path: str | os.PathLike,
    *,
    data: Tensor | None = None,
    num_paths: int = 16,
    lim: float = 4.5,
    title: str | None = None,
) -> Path:
    r"""Saves sampling paths in the plane, coloured by step, over the final points and the data.

    Draws the data (grey), the end points of every chain (blue), and ``num_paths``
    evenly chosen chains as lines whose colour runs from dark (first step) to
    yellow (last step), with a ring at each start.

    Args:
        traj: (N_steps, B, 2) states of B chains over N_steps steps (first = start).
        path: where to write the PNG.
        data: optional (M, 2) data points drawn underneath.
        num_paths: number of chains drawn as lines.
        lim: axes span ``[-lim, lim]^2``, equal aspect.
        title: optional title.

    Returns:
        The path written.
    """
    arr = _to_numpy(traj, "traj")
    if arr.ndim != 3 or arr.shape[2] != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"Expected traj of shape (N_steps, B, 2), but found {tuple(arr.shape)}.")
    _check_positive_int("num_paths", num_paths)
    _check_positive("lim", lim)
    steps, b = arr.shape[:2]
    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot()
    if data is not None:
        ref = _points_2d(data, "data", 5000)
        ax.scatter(ref[:, 0], ref[:, 1], s=_marker_size(len(ref)), c=_DATA_COLOUR, alpha=0.4, lw=0, zorder=1)
    ends = _points_2d(arr[-1], "traj[-1]", 5000)
    ax.scatter(ends[:, 0], ends[:, 1], s=_marker_size(len(ends)), c=_SAMPLE_COLOUR, alpha=0.5, lw=0, zorder=2)
    chosen = np.unique(np.linspace(0, b - 1, min(num_paths, b)).round().astype(int))
    t = np.linspace(0.0, 1.0, max(steps - 1, 1))
    lines = None
    for j in chosen:
        xy = arr[:, j]
        if steps > 1:
            segs = np.stack([xy[:-1], xy[1:]], axis=1)
            lines = LineCollection(segs, cmap="viridis", linewidths=1.2, zorder=3)
            lines.set_array(t)
            lines.set_clim(0.0, 1.0)
            ax.add_collection(lines)
        ax.scatter(xy[0, 0], xy[0, 1], s=18, facecolors="none", edgecolors="k", lw=0.8, zorder=4)
    if lines is not None:
        cbar = fig.colorbar(lines, ax=ax, shrink=0.8, pad=0.02)
        cbar.set_label("fraction of steps", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    _square_axes(ax, lim)
    if title:
        ax.set_title(title)
    return _save(fig, path)


# --- curves -------------------------------------------------------------------------


def _check_log(values: np.ndarray, axis: str, name: str) -> None:
    finite = values[np.isfinite(values)]
    if (finite <= 0).any():
        raise ValueError(
            f"Expected positive {axis} values with log{axis}=True, but found {finite.min():g} in {name!r}."
        )


def save_loss_curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    logy: bool = False,
) -> Path:
    r"""Saves training curves, one line per named series.

    Args:
        history: name -> sequence of (step, loss) pairs, e.g. ``{"train": [...], "val": [...]}``.
        path: where to write the PNG.
        title: optional title.
        logy: logarithmic loss axis (every finite loss must then be positive).

    Returns:
        The path written.
    """
    if not isinstance(history, Mapping) or not history:
        raise ValueError(
            f"Expected a non-empty mapping of name -> [(step, loss), ...], but found {history!r}."
        )
    curves = {}
    for name, pairs in history.items():
        arr = _to_numpy(list(pairs), f"history[{name!r}]")
        if arr.size == 0:
            arr = arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(
                f"Expected history[{name!r}] as (step, loss) pairs of shape (N, 2), "
                f"but found {tuple(arr.shape)}."
            )
        if logy:
            _check_log(arr[:, 1], "y", name)
        curves[str(name)] = arr
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, arr in curves.items():
        ax.plot(arr[:, 0], arr[:, 1], lw=1.3, label=name, marker="o" if len(arr) <= 20 else None, ms=3)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def save_line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
) -> Path:
    r"""Saves generic named curves (e.g. sample quality against the number of steps).

    Args:
        series: name -> (xs, ys), two sequences of equal length N_i.
        path: where to write the PNG.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: optional title.
        logx: logarithmic x axis (finite x values must be positive).
        logy: logarithmic y axis (finite y values must be positive).

    Returns:
        The path written.
    """
    if not isinstance(series, Mapping) or not series:
        raise ValueError(f"Expected a non-empty mapping of name -> (xs, ys), but found {series!r}.")
    curves = {}
    for name, pair in series.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"Expected series[{name!r}] to be a pair (xs, ys), but found {type(pair).__name__}."
            )
        xs, ys = (_to_numpy(v, f"series[{name!r}]").reshape(-1) for v in pair)
        if xs.shape != ys.shape:
            raise ValueError(
                f"Expected xs and ys of equal length in series[{name!r}], but found {len(xs)} and {len(ys)}."
            )
        if logx:
            _check_log(xs, "x", name)
        if logy:
            _check_log(ys, "y", name)
        curves[str(name)] = (xs, ys)
    # Names "group: curve" share a line style per group and a colour per curve, so one method keeps
    # its colour across data sets; many curves move the legend outside the axes.
    groups = list(dict.fromkeys(n.split(": ", 1)[0] for n in curves if ": " in n))
    kinds = list(dict.fromkeys(n.split(": ", 1)[-1] for n in curves))
    palette = matplotlib.colormaps["tab10" if len(kinds) <= 10 else "tab20"]
    styles = ("-", "--", ":", "-.")
    outside = len(curves) > 6
    fig = _new_figure(9.0 if outside else 6.0, 4.5 if outside else 4.0)
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        group, kind = name.split(": ", 1) if ": " in name else ("", name)
        style = styles[groups.index(group) % len(styles)] if group else "-"
        color = palette(kinds.index(kind) % palette.N)
        ax.plot(xs, ys, lw=1.3, ls=style, color=color, marker="o", ms=4, label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if (logx or logy) else "major")
    if outside:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=9)
    if title:
        ax.set_title(title)
    return _save(fig, path)
