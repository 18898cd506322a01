"""Tests for probgen.data: toys, digits, IDX/NPY/NPZ readers and load_dataset."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from probgen.data import (
    DIGITS_LEVELS,
    DIGITS_SHAPE,
    TOYS,
    DataError,
    Dataset,
    dequantize,
    load_dataset,
    load_digits,
    mixture_modes,
    read_array,
    read_idx,
    sample_toy,
    toy_entropy,
)
from tests.common import assert_close, mc_tolerance

# ----------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """Hand-written IDX encoder (big-endian), independent of the reader under test."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- toys


def test_constants():
    # The seven 2-D toys of DESIGN.md's evaluation protocol, in its order.
    assert " ".join(TOYS) == "swiss_roll moons eight_gaussians checkerboard circles pinwheel two_spirals"
    assert DIGITS_LEVELS == 17 and DIGITS_SHAPE == (1, 8, 8)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("name", TOYS + ("grid25",))
def test_toy_contract(name):
    x = sample_toy(name, 2001, seed=1)
    assert x.shape == (2001, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # "roughly within [-4, 4]^2": nearly all mass inside, nothing far out (grid25 has modes at +-4).
    box = 5.0 if name == "grid25" else 4.0
    inside = ((x.abs() <= box).all(dim=1)).float().mean()
    assert inside > 0.99, f"{name}: only {inside:.3f} inside [-{box}, {box}]^2"
    assert x.abs().max() < 6.0
    assert x.std(dim=0).min() > 0.3, f"{name} is degenerate"
    assert torch.equal(x, sample_toy(name, 2001, seed=1))
    assert not torch.equal(x, sample_toy(name, 2001, seed=2))
    assert sample_toy(name, 1, seed=0).shape == (1, 2)


def test_toy_fresh_entropy_differs():
    assert not torch.equal(sample_toy("moons", 100), sample_toy("moons", 100))


def test_toy_bad_inputs():
    with pytest.raises(DataError, match="swiss_roll.*two_spirals"):
        sample_toy("spiral", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DataError, match=r"Expected n >= 1, but found"):
            sample_toy("moons", bad)
    with pytest.raises(DataError, match="seed"):
        sample_toy("moons", 10, seed=-1)
    with pytest.raises(DataError):
        toy_entropy("nope")


def test_checkerboard_on_dark_cells_uniform():
    n = 16000
    x = sample_toy("checkerboard", n, seed=0).double()
    cells = torch.floor((x + 4.0) / 2.0).long()
    assert ((cells >= 0) & (cells <= 3)).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all(), "a sample fell on a light cell"
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    dark = [i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    assert counts.sum() == counts[dark].sum()
    # Multinomial counts: mean n/8, std sqrt(n * 1/8 * 7/8); 5 sigma.
    sd = math.sqrt(n * (1 / 8) * (7 / 8))
    assert (counts[dark].double() - n / 8).abs().max() < 5 * sd
    # Uniform inside the cells: the within-cell offset has mean 1 and variance 4/12.
    offset = x - (-4.0 + 2.0 * cells)
    assert_close(offset.mean(0), [1.0, 1.0], atol=mc_tolerance(math.sqrt(4 / 12), n))


def test_eight_gaussians_geometry():
    centres, std = mixture_modes("eight_gaussians")
    assert centres.shape == (8, 2)
    assert_close(centres.norm(dim=1), torch.full((8,), 4 / math.sqrt(2)), atol=1e-5)
    assert_close(std, 0.5 / math.sqrt(2))
    n = 20000
    x = sample_toy("eight_gaussians", n, seed=3).double()
    # r = |c + std * z|: E r ~= R + std^2 / (2 R); its spread is about std.
    radius = 4 / math.sqrt(2)
    assert_close(x.norm(dim=1).mean(), radius + std**2 / (2 * radius), atol=mc_tolerance(std, n))
    nearest = torch.cdist(x, centres.double()).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert (counts - n / 8).abs().max() < 5 * math.sqrt(n * (1 / 8) * (7 / 8))


def test_grid25_modes():
    centres, std = mixture_modes("grid25")
    assert centres.shape == (25, 2) and std == 0.2
    assert set(centres[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    with pytest.raises(DataError, match="eight_gaussians"):
        mixture_modes("moons")


def test_entropies():
    assert_close(toy_entropy("checkerboard"), math.log(32.0), atol=1e-12)
    assert toy_entropy("moons") is None and toy_entropy("swiss_roll") is None
    _, std = mixture_modes("eight_gaussians")
    h = toy_entropy("eight_gaussians")
    upper = math.log(8) + 1 + math.log(2 * math.pi * std**2)  # H(components) + H(weights)
    assert upper - 0.01 < h < upper
    assert h == toy_entropy("eight_gaussians")  # cached, deterministic
    # grid25 centres are 10 std apart: overlap is negligible.
    upper25 = math.log(25) + 1 + math.log(2 * math.pi * 0.2**2)
    assert_close(toy_entropy("grid25"), upper25, atol=1e-6)


def test_eight_gaussians_entropy_matches_monte_carlo():
    centres, std = mixture_modes("eight_gaussians")
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=torch.float64)),
        torch.distributions.Independent(
            torch.distributions.Normal(centres.double(), torch.full((8, 2), std, dtype=torch.float64)), 1
        ),
    )
    n = 200_000
    x = sample_toy("eight_gaussians", n, seed=12345).double()
    nll = -mix.log_prob(x)
    # -log p has std ~1 (chi^2_2 / 2); 0.01 is ~4.5 standard errors at n = 200k.
    assert nll.std() < 1.1
    assert abs(nll.mean().item() - toy_entropy("eight_gaussians")) < 0.01


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_disjoint():
    xs = {s: load_digits(s, return_labels=True) for s in ("train", "val", "test", "all")}
    assert [xs[s][0].shape[0] for s in ("train", "val", "test")] == [1350, 150, 297]
    x_all, y_all = xs["all"]
    assert x_all.shape == (1797, 64) and x_all.dtype == torch.float32
    assert y_all.dtype == torch.int64 and y_all.shape == (1797,)
    # Each split is the documented slice of the fixed default_rng(0) permutation.
    perm = np.random.default_rng(0).permutation(1797)
    parts = {"train": perm[:1350], "val": perm[1350:1500], "test": perm[1500:]}
    for s, idx in parts.items():
        assert torch.equal(xs[s][0], x_all[idx]) and torch.equal(xs[s][1], y_all[idx])
    assert len(set(perm[:1350]) | set(perm[1350:1500]) | set(perm[1500:])) == 1797
    # The splits differ as sets of images (not the same rows repeated).
    train_rows = {tuple(r) for r in xs["train"][0].int().tolist()}
    test_rows = {tuple(r) for r in xs["test"][0].int().tolist()}
    assert len(test_rows - train_rows) > 250
    # sklearn's own order for "all": first image is a 0.
    assert y_all[0] == 0 and set(y_all.tolist()) == set(range(10))


def test_digits_forms():
    v = load_digits("val")
    assert v.min() == 0 and v.max() == 16 and torch.equal(v, v.round())
    d = load_digits("val", form="dequantized", seed=5)
    assert d.dtype == torch.float32 and d.min() >= 0 and d.max() < 1
    assert torch.equal(torch.floor(d * 17), v), "dequantized values must stay in their level's bin"
    c = load_digits("val", form="centered", seed=5)
    assert c.min() >= -1 and c.max() < 1
    assert_close(c, 2 * d - 1, atol=1e-6)
    assert torch.equal(d, load_digits("val", form="dequantized", seed=5))
    assert not torch.equal(d, load_digits("val", form="dequantized", seed=6))
    assert not torch.equal(
        load_digits("val", form="dequantized", seed=None), load_digits("val", form="dequantized", seed=None)
    )
    # Mean of u is 1/2: mean(d * 17 - v) ~ 0.5 with std sqrt(1/12) / sqrt(N).
    u = d.double() * 17 - v.double()
    assert_close(u.mean(), 0.5, atol=mc_tolerance(math.sqrt(1 / 12), u.numel()))


def test_digits_bad_inputs():
    with pytest.raises(DataError, match=r"Expected split in .*, but found 'training'"):
        load_digits("training")
    with pytest.raises(DataError, match="form"):
        load_digits(form="float")


def test_dequantize():
    x = torch.tensor([[0, 3], [16, 7]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = dequantize(x, 17, generator=g)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(torch.floor(y * 17), x.float())
    assert torch.equal(y, dequantize(x, 17, generator=torch.Generator().manual_seed(0)))
    # Values just below a level boundary must not round up to 1.
    top = dequantize(torch.full((10000,), 16.0), 17, generator=g)
    assert top.max() < 1.0
    # In float16 (16 + u) / 17 rounds to exactly 1 for u > 1 - 2^-7 (~80 of 10000 draws).
    half = dequantize(torch.full((10000,), 16.0, dtype=torch.float16), 17, generator=g)
    assert half.dtype == torch.float16 and half.max() < 1.0 and half.min() >= 16 / 17 - 1e-3
    with pytest.raises(DataError, match=r"Expected integer levels in \[0, 16\], but found"):
        dequantize(torch.tensor([17.0]), 17)
    with pytest.raises(DataError, match="non-integer"):
        dequantize(torch.tensor([1.5]), 17)
    with pytest.raises(DataError, match="num_levels"):
        dequantize(x, 0)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    "code,dtype,torch_dtype",
    [
        (0x08, np.uint8, torch.uint8),
        (0x09, np.int8, torch.int8),
        (0x0B, np.int16, torch.int16),
        (0x0C, np.int32, torch.int32),
        (0x0D, np.float32, torch.float32),
        (0x0E, np.float64, torch.float64),
    ],
)
def test_read_idx_dtypes(tmp_path, code, dtype, torch_dtype):
    values = np.arange(24).reshape(2, 3, 4) * 10
    arr = (values if code == 0x08 else values - 100).astype(dtype)  # signed codes get negatives
    t = read_idx(write(tmp_path / "a.idx", idx_bytes(arr, code)))
    assert t.dtype == torch_dtype and t.shape == (2, 3, 4)
    assert np.array_equal(t.numpy(), arr)


def test_read_idx_gzip_by_magic(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    raw = idx_bytes(arr, 0x08)
    plain = read_idx(write(tmp_path / "train-images-idx3-ubyte", raw))
    gz = read_idx(write(tmp_path / "train-images-idx3-ubyte.gz", gzip.compress(raw)))
    no_ext = read_idx(write(tmp_path / "images.bin", gzip.compress(raw)))  # gzip without .gz
    for t in (plain, gz, no_ext):
        assert np.array_equal(t.numpy(), arr)
    labels = read_idx(write(tmp_path / "l.idx", idx_bytes(np.array([3, 1, 4], np.uint8), 0x08)))
    assert labels.shape == (3,)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda good: b"\x12\x34" + good[2:], r"found '12 34 08 03' \(wrong magic\)"),
        (lambda good: good[:2] + b"\x0a" + good[3:], r"unknown code 0x0A"),
        (lambda good: good[:-5], r"Expected 48 bytes of data, but found 43 \(truncated\)"),
        (lambda good: good + b"\x00\x00", r"Expected 48 bytes of data, but found 50 \(trailing"),
        (lambda good: good[:6], r"header of 16 bytes, but found 6"),
        (lambda good: b"\x00", r"at least 4 bytes"),
        (lambda good: gzip.compress(good)[:-12], r"corrupt gzip"),
        (lambda good: b"\x1f\x8b" + b"garbage-not-deflate", r"corrupt gzip"),
    ],
)
def test_read_idx_bad_files(tmp_path, make, pattern):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x08)
    path = write(tmp_path / "bad.idx", make(good))
    with pytest.raises(DataError, match=pattern) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_wrong_magic_shows_bytes(tmp_path):
    path = write(tmp_path / "x.idx", b"\xde\xad\xbe\xef" + b"\x00" * 8)
    with pytest.raises(DataError, match="de ad be ef"):
        read_idx(path)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_idx(tmp_path / "nope.idx")
    assert "nope.idx" in str(info.value)


# ----------------------------------------------------------------------------- NPY / NPZ


def test_read_array_npy_and_npz(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", a)
    assert torch.equal(read_array(tmp_path / "a.npy"), torch.from_numpy(a))
    np.savez(tmp_path / "one.npz", foo=a)
    assert torch.equal(read_array(tmp_path / "one.npz"), torch.from_numpy(a))
    b = np.ones((4, 2, 2), np.uint8)
    np.savez_compressed(tmp_path / "many.npz", images=b, y=np.arange(4), other=a)
    t = read_array(tmp_path / "many.npz")
    assert t.dtype == torch.uint8 and t.shape == (4, 2, 2)
    assert torch.equal(read_array(tmp_path / "many.npz", key="other"), torch.from_numpy(a))
    np.savez(tmp_path / "default.npz", a, b)  # arr_0, arr_1
    assert torch.equal(read_array(tmp_path / "default.npz"), torch.from_numpy(a))


def test_read_array_errors(tmp_path):
    a = np.ones((3, 2))
    np.savez(tmp_path / "amb.npz", p=a, q=a)
    with pytest.raises(DataError, match=r"keys \['p', 'q'\]"):
        read_array(tmp_path / "amb.npz")
    with pytest.raises(DataError, match=r"Expected key in \['p', 'q'\], but found 'r'"):
        read_array(tmp_path / "amb.npz", key="r")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="object arrays are not supported: loading would unpickle"):
        read_array(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([[1, "a"]], dtype=object))
    with pytest.raises(DataError, match="object arrays are not supported"):
        read_array(tmp_path / "obj.npz")
    bad = a.copy()
    bad[0, 0], bad[1, 1], bad[2, 0] = np.nan, np.inf, np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="found 2 NaN and 1 inf values"):
        read_array(tmp_path / "nan.npy")
    np.save(tmp_path / "vec.npy", np.ones(5))
    with pytest.raises(DataError, match=r"Expected an array of shape \(N, \.\.\.\), but found shape \(5,\)"):
        read_array(tmp_path / "vec.npy")
    np.save(tmp_path / "empty.npy", np.ones((0, 3)))
    with pytest.raises(DataError, match="empty"):
        read_array(tmp_path / "empty.npy")
    write(tmp_path / "junk.npy", b"this is not numpy at all")
    with pytest.raises(DataError, match="valid .npy or .npz") as info:
        read_array(tmp_path / "junk.npy")
    assert "junk.npy" in str(info.value)
    np.save(tmp_path / "trunc.npy", np.ones((100, 10)))
    raw = (tmp_path / "trunc.npy").read_bytes()
    write(tmp_path / "trunc.npy", raw[:-40])
    with pytest.raises(DataError, match="corrupt"):
        read_array(tmp_path / "trunc.npy")
    np.savez(tmp_path / "z.npz", x=a)
    write(tmp_path / "z.npz", (tmp_path / "z.npz").read_bytes()[:60])
    with pytest.raises(DataError, match="corrupt"):
        read_array(tmp_path / "z.npz")
    with pytest.raises(DataError, match="not found"):
        read_array(tmp_path / "missing.npz")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(DataError, match="numeric"):
        read_array(tmp_path / "s.npy")


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_toys():
    tr = load_dataset("moons")
    assert isinstance(tr, Dataset)
    assert (tr.kind, tr.event_shape, tr.num_levels, tr.y) == ("toy", (2,), None, None)
    assert tr.x.shape == (20000, 2) and len(tr) == 20000
    va, te = load_dataset("moons", "val"), load_dataset("moons", "test")
    assert va.x.shape == (5000, 2) and te.x.shape == (5000, 2)
    assert not torch.equal(va.x, te.x) and not torch.equal(tr.x[:5000], va.x)
    # Splits use sample_toy seeds 3 * seed + {0, 1, 2}, so no split of one seed is a split of another.
    assert torch.equal(load_dataset("moons", "val", n=50, seed=2).x, sample_toy("moons", 50, seed=7))
    assert not torch.equal(
        load_dataset("moons", "train", n=50, seed=1).x, load_dataset("moons", "val", n=50).x
    )
    assert not torch.equal(
        load_dataset("moons", "train", n=50, seed=1).x, load_dataset("moons", "test", n=50).x
    )
    assert torch.equal(
        load_dataset("moons", "val", n=7, seed=4).x, load_dataset("moons", "val", n=7, seed=4).x
    )
    with pytest.raises(DataError, match="split"):
        load_dataset("moons", "all")
    with pytest.raises(DataError, match=r"Expected n >= 1"):
        load_dataset("moons", n=0)


def test_load_dataset_digits():
    ds = load_dataset("digits", "test")
    assert (ds.kind, ds.event_shape, ds.num_levels) == ("image", (1, 8, 8), 17)
    assert ds.x.shape == (297, 64) and ds.y.shape == (297,)
    dq = load_dataset("digits", "train", form="dequantized", n=100, seed=3)
    assert dq.num_levels is None and dq.x.shape == (100, 64) and 0 <= dq.x.min() and dq.x.max() < 1
    assert torch.equal(dq.x, load_digits("train", form="dequantized", seed=3)[:100])
    with pytest.raises(DataError, match="n <= 150"):
        load_dataset("digits", "val", n=151)
    with pytest.raises(DataError, match="digits"):
        load_dataset("cifar10")


def test_load_dataset_mnist_like_idx(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(50, 6, 5)).astype(np.uint8)
    labels = rng.integers(0, 10, size=50).astype(np.uint8)
    img_path = write(tmp_path / "train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(imgs, 0x08)))
    write(tmp_path / "train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(labels, 0x08)))
    ds = load_dataset(str(img_path), "all")
    assert (ds.kind, ds.event_shape, ds.num_levels) == ("image", (1, 6, 5), 256)
    assert ds.x.dtype == torch.float32 and ds.x.shape == (50, 30)
    assert torch.equal(ds.x, torch.from_numpy(imgs.reshape(50, 30)).float())
    assert torch.equal(ds.y, torch.from_numpy(labels).long())
    sizes = [len(load_dataset(img_path, s)) for s in ("train", "val", "test")]
    assert sizes == [40, 5, 5]
    tr, va = load_dataset(img_path, "train"), load_dataset(img_path, "val")
    rows = {tuple(r) for r in tr.x.int().tolist()}
    assert not any(tuple(r) in rows for r in va.x.int().tolist())
    perm = np.random.default_rng(0).permutation(50)
    assert torch.equal(va.x, ds.x[perm[40:45]]) and torch.equal(va.y, ds.y[perm[40:45]])
    dq = load_dataset(img_path, "all", form="dequantized", seed=2)
    assert dq.num_levels is None and dq.x.min() >= 0 and dq.x.max() < 1
    assert torch.equal(torch.floor(dq.x * 256), ds.x)
    c = load_dataset(img_path, "all", form="centered", seed=2)
    assert_close(c.x, 2 * dq.x - 1, atol=1e-6)


def test_load_dataset_npz_array_and_images(tmp_path):
    feats = np.random.default_rng(2).standard_normal((30, 4)).astype(np.float64)
    np.savez(tmp_path / "feats.npz", x=feats, y=np.arange(30))
    ds = load_dataset(str(tmp_path / "feats.npz"), "all")
    assert (ds.kind, ds.event_shape, ds.num_levels) == ("array", (4,), None)
    assert ds.x.dtype == torch.float32 and torch.equal(ds.y, torch.arange(30))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(str(tmp_path / "feats.npz"), form="dequantized")
    np.save(tmp_path / "rgb.npy", np.zeros((12, 3, 4, 4), np.float32))
    im = load_dataset(str(tmp_path / "rgb.npy"), "test")
    assert (im.kind, im.event_shape) == ("image", (3, 4, 4)) and im.x.shape == (2, 48)
    np.save(tmp_path / "small.npy", np.zeros((5, 2), np.float32))
    with pytest.raises(DataError, match="at least 10"):
        load_dataset(str(tmp_path / "small.npy"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "absent.npz"))
