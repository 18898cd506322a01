"""Tests for probgen.plotting: valid PNGs with the expected aspect, validation, no global state."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from probgen.plotting import (
    save_image_grid,
    save_line_plot,
    save_loss_curves,
    save_scatter_2d,
    save_scatter_panel,
    save_trajectories,
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _read_png(path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == _PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def _no_temp_files_left(directory) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# --- image grid --------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, kwargs",
    [
        (_rand(10, 64) * 16, {}),  # square grey images inferred from D
        (_rand(10, 64) * 16, {"image_shape": (1, 8, 8)}),
        (_rand(10, 8, 8) * 16, {}),
        (_rand(10, 3, 8, 8), {"value_range": (0.0, 1.0)}),
    ],
)
def test_image_grid_writes_png_with_grid_aspect(tmp_path, images, kwargs):
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=5, **kwargs)
    img = _read_png(path)
    # 5 x 2 tiles of 8 px with 1 px gaps: 46 x 19 data pixels, scaled by one integer factor.
    assert img.shape[1] % 46 == 0 and img.shape[0] % 19 == 0
    assert img.shape[1] // 46 == img.shape[0] // 19
    _no_temp_files_left(path.parent)


def test_image_grid_is_pixel_exact_and_clipped(tmp_path):
    images = torch.tensor([[[0.0, 16.0], [8.0, 99.0]]])  # (1, 2, 2), 99 is clipped to white
    img = _read_png(save_image_grid(images, tmp_path / "one.png"))
    scale = img.shape[0] // 4  # 2 px + 2 gaps
    centre = lambda r, c: img[(1 + r) * scale + scale // 2, (1 + c) * scale + scale // 2, :3]  # noqa: E731
    np.testing.assert_allclose(centre(0, 0), 0.0, atol=1e-6)
    np.testing.assert_allclose(centre(0, 1), 1.0, atol=1e-6)
    np.testing.assert_allclose(centre(1, 0), 0.5, atol=0.01)
    np.testing.assert_allclose(centre(1, 1), 1.0, atol=1e-6)


def test_image_grid_title_adds_a_band(tmp_path):
    plain = _read_png(save_image_grid(_rand(4, 8, 8), tmp_path / "a.png", value_range=(0, 1)))
    titled = _read_png(save_image_grid(_rand(4, 8, 8), tmp_path / "b.png", value_range=(0, 1), title="t"))
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (_rand(4, 10), {}, "Expected image_shape"),
        (_rand(4, 64), {"image_shape": (7, 8)}, "Expected image_shape"),
        (_rand(4, 2, 8, 8), {}, r"Expected images of shape"),
        (_rand(4, 8, 8), {"image_shape": (1, 8, 8)}, r"Expected images of shape"),
        (_rand(8), {}, r"Expected images of shape"),
        (_rand(4, 8, 8), {"value_range": (1.0, 1.0)}, "Expected value_range"),
        (_rand(4, 8, 8), {"nrow": 0}, "Expected nrow"),
    ],
)
def test_image_grid_rejects_bad_input(tmp_path, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_image_grid(images, tmp_path / "bad.png", **kwargs)
    assert not (tmp_path / "bad.png").exists()


# --- scatters and trajectories ---------------------------------------------------------


def test_scatter_2d_square(tmp_path):
    path = save_scatter_2d(_randn(7000, 2), tmp_path / "s.png", data=_randn(300, 2, seed=1), title="samples")
    img = _read_png(path)
    assert img.shape[0] == img.shape[1]
    assert save_scatter_2d(_randn(10, 2), tmp_path / "s.png") == path  # overwriting is fine
    _no_temp_files_left(tmp_path)


def test_scatter_panel_layout(tmp_path):
    panels = {"data": _randn(200, 2), "model A": _randn(200, 2, seed=1), "model B": _randn(50, 2, seed=2)}
    wide = _read_png(save_scatter_panel(panels, tmp_path / "p.png", title="comparison"))
    assert 2.5 < wide.shape[1] / wide.shape[0] < 3.5
    grid = _read_png(save_scatter_panel(panels, tmp_path / "q.png", ncols=2))
    assert math.isclose(grid.shape[1] / grid.shape[0], 1.0, rel_tol=0.1)


def test_trajectories(tmp_path):
    traj = torch.cumsum(0.1 * _randn(50, 40, 2), dim=0)
    img = _read_png(save_trajectories(traj, tmp_path / "t.png", data=_randn(100, 2, seed=1), title="paths"))
    assert 1.0 < img.shape[1] / img.shape[0] < 1.3  # square axes plus a colour bar
    _read_png(save_trajectories(traj[:1], tmp_path / "t1.png"))  # a single step draws no lines


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: save_scatter_2d(torch.zeros(5, 3), p), r"Expected samples of shape \(N, 2\)"),
        (lambda p: save_scatter_2d(torch.zeros(5, 2), p, data=torch.zeros(5)), r"Expected data of shape"),
        (lambda p: save_scatter_2d(torch.zeros(5, 2), p, lim=0.0), "Expected lim"),
        (lambda p: save_scatter_panel({}, p), "Expected a non-empty mapping"),
        (lambda p: save_scatter_panel({"a": torch.zeros(3, 3)}, p), r"Expected panels\['a'\] of shape"),
        (lambda p: save_trajectories(torch.zeros(4, 2), p), r"Expected traj of shape \(N_steps, B, 2\)"),
        (lambda p: save_trajectories(torch.zeros(4, 3, 2), p, num_paths=0), "Expected num_paths"),
    ],
)
def test_scatter_validation(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "bad.png")


# --- curves ------------------------------------------------------------------------------


def test_loss_curves(tmp_path):
    history = {
        "train": [(s, 2.0 * math.exp(-s / 300) + 0.1) for s in range(0, 1000, 10)],
        "val": [(s, 2.1 * math.exp(-s / 300) + 0.15) for s in range(0, 1000, 100)],
    }
    img = _read_png(save_loss_curves(history, tmp_path / "loss.png", title="VAE", logy=True))
    assert img.shape[1] > img.shape[0]
    _read_png(save_loss_curves({"train": [(0, -1.0), (1, -2.0)], "empty": []}, tmp_path / "neg.png"))
    with pytest.raises(ValueError, match="Expected positive y values"):
        save_loss_curves({"train": [(0, -1.0)]}, tmp_path / "bad.png", logy=True)
    with pytest.raises(ValueError, match=r"Expected history\['train'\] as \(step, loss\) pairs"):
        save_loss_curves({"train": [1.0, 2.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="Expected a non-empty mapping"):
        save_loss_curves({}, tmp_path / "bad.png")


def test_line_plot(tmp_path):
    steps = [10, 20, 50, 100, 200, 1000]
    series = {
        "DDPM": (steps, [1 / s**0.5 for s in steps]),
        "DDIM": (torch.tensor(steps), _rand(6) + 0.1),
    }
    img = _read_png(
        save_line_plot(series, tmp_path / "l.png", xlabel="steps", ylabel="SW2", logx=True, logy=True)
    )
    assert img.shape[1] > img.shape[0]
    with pytest.raises(ValueError, match="Expected xs and ys of equal length"):
        save_line_plot({"a": ([1, 2], [1])}, tmp_path / "bad.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="Expected positive x values"):
        save_line_plot({"a": ([0, 2], [1, 1])}, tmp_path / "bad.png", xlabel="x", ylabel="y", logx=True)
    with pytest.raises(ValueError, match=r"Expected series\['a'\] to be a pair"):
        save_line_plot({"a": [1, 2, 3]}, tmp_path / "bad.png", xlabel="x", ylabel="y")


# --- no global state -----------------------------------------------------------------------


def test_import_and_plot_leave_pyplot_and_backend_alone(tmp_path):
    code = (
        "import sys, matplotlib, torch\n"
        "before = matplotlib.get_backend(), dict(matplotlib.rcParams)\n"
        "from probgen.plotting import save_scatter_2d\n"
        f"save_scatter_2d(torch.zeros(3, 2), {str(tmp_path / 'x.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert (matplotlib.get_backend(), dict(matplotlib.rcParams)) == before\n"
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}  # a fixed backend, so reading it resolves nothing
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert (tmp_path / "x.png").exists()


def test_concurrent_plots_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        return save_scatter_2d(_randn(500, 2, seed=i), tmp_path / f"c{i}.png", title=str(i))

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(work, range(8)))
    for p in paths:
        _read_png(p)
    _no_temp_files_left(tmp_path)
