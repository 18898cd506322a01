"""Tests for probgen.checkpoint: round trips, exact resumption, crash safety, corruption."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import probgen
from probgen.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    _record_digest,  # noqa: I001 (private: the tests forge records)
    atomic_write_bytes,
    flatten_state,
    has_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_json,
    save_checkpoint,
    unflatten_state,
    write_json_atomic,
)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(4, 3, generator=g),
        "net.0.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "count": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "bytes": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
    }


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and actual[k].shape == v.shape, k
        assert torch.equal(actual[k], v), k


def _weights_files(run_dir: Path, tag: str) -> list[str]:
    return sorted(p.name for p in run_dir.glob(f"{tag}-*.safetensors"))


def _temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_tensors_and_metadata(tmp_path):
    run = tmp_path / "runs" / "x"
    tensors = _tensors(0)
    meta = {"method": "vae", "args": {"latent": 2, "hidden": [64, 64]}, "step": 12, "best": math.inf}
    json_path = save_checkpoint(run, "last", tensors, meta)
    assert json_path == run / "last.json"
    loaded, info = load_checkpoint(run, "last", device=torch.device("cpu"))
    _assert_same(loaded, tensors)
    assert info["metadata"] == meta
    assert info["format_version"] == FORMAT_VERSION
    assert info["probgen_version"] == probgen.__version__
    assert info["weights"].startswith("last-12-") and info["weights"].endswith(".safetensors")
    digest = hashlib.sha256((run / info["weights"]).read_bytes()).hexdigest()
    assert info["sha256"] == digest
    assert info["saved_at"].endswith("+00:00")
    assert has_checkpoint(run) and not has_checkpoint(run, "best")


def test_views_shared_storage_and_grad_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    lin = torch.nn.Linear(2, 2)
    tensors = {"a": base, "b": base.t(), "c": base[1], "w": lin.weight, "tied": lin.weight}
    save_checkpoint(tmp_path, "last", tensors, {})
    loaded, _ = load_checkpoint(tmp_path)
    _assert_same(loaded, {k: v.detach() for k, v in tensors.items()})


def test_optimizer_state_round_trip_resumes_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.Adam(model.parameters(), lr=0.05)

    def step(model, opt, x):
        opt.zero_grad()
        ((model(x) - 1.0) ** 2).mean().backward()
        opt.step()

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model, opt = make()
    for _ in range(3):
        step(model, opt, x)
    opt_tensors, skeleton = flatten_state(opt.state_dict(), "optim")
    assert "optim.state.0.exp_avg" in opt_tensors
    save_checkpoint(tmp_path, "last", {**model.state_dict(), **opt_tensors}, {"optim": skeleton})

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    tensors, info = load_checkpoint(tmp_path)
    model2.load_state_dict({k: tensors[k] for k in ("weight", "bias")})
    restored = unflatten_state(tensors, info["metadata"]["optim"], "optim")
    assert restored["state"][0]["step"].dim() == 0
    opt2.load_state_dict(restored)
    step(model, opt, x)
    step(model2, opt2, x)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rng_states_round_trip_reproduce_next_draws(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.rand(5, generator=gen)
    np_rng, py_rng = np.random.RandomState(4), random.Random(5)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        torch.rand(3)
        state = {
            "torch": torch.get_rng_state(),
            "gen": gen.get_state(),
            "numpy": np_rng.get_state(),
            "python": py_rng.getstate(),
        }
        tensors, skeleton = flatten_state(state, "rng")
        save_checkpoint(tmp_path, "last", tensors, {"rng": skeleton})
        expected = (torch.rand(4), torch.randn(4, generator=gen), np_rng.rand(4), py_rng.random())

        loaded, info = load_checkpoint(tmp_path)
        restored = unflatten_state(loaded, info["metadata"]["rng"], "rng")
        torch.set_rng_state(restored["torch"])
        gen2 = torch.Generator()
        gen2.set_state(restored["gen"])
        np_rng2, py_rng2 = np.random.RandomState(), random.Random()
        np_rng2.set_state(restored["numpy"])
        py_rng2.setstate(restored["python"])
        actual = (torch.rand(4), torch.randn(4, generator=gen2), np_rng2.rand(4), py_rng2.random())
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    assert np.array_equal(actual[2], expected[2]) and actual[3] == expected[3]


def test_flatten_state_is_exact_through_strict_json():
    shared = torch.tensor([1.0, 2.0])
    state = {
        0: {"x.y": torch.zeros(2, 3, dtype=torch.float64), "n": torch.tensor(7)},
        "0": (1, 2.0, True, None, "s", [torch.tensor(True), torch.arange(3, dtype=torch.uint8)]),
        None: [math.inf, -math.inf, -0.0, 1e-300],
        "nan": math.nan,
        "a": shared,
        "b": shared,
        1.5: np.arange(4, dtype=np.uint32),
    }
    tensors, skeleton = flatten_state(state, "p")
    assert len(tensors) == 6 and all(k.startswith("p.") for k in tensors)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    out = unflatten_state(tensors, skeleton, "p")
    assert list(out) == list(state) and type(out["0"]) is tuple and type(out[None]) is list
    assert torch.equal(out[0]["x.y"], state[0]["x.y"]) and out[0]["x.y"].dtype == torch.float64
    assert out[0]["n"].dim() == 0 and out[0]["n"].dtype == torch.int64
    assert out["0"][:5] == (1, 2.0, True, None, "s") and type(out["0"][0]) is int
    assert type(out["0"][2]) is bool and type(out["0"][1]) is float
    assert out["0"][5][0].dtype == torch.bool and out["0"][5][1].dtype == torch.uint8
    assert out[None][:2] == [math.inf, -math.inf] and math.copysign(1.0, out[None][2]) == -1.0
    assert math.isnan(out["nan"]) and out["a"] is out["b"]
    assert out[1.5].dtype == np.uint32 and np.array_equal(out[1.5], state[1.5])
    # A different prefix addresses renamed tensors.
    renamed = {"q" + k[1:]: v for k, v in tensors.items()}
    assert torch.equal(unflatten_state(renamed, skeleton, "q")["a"], shared)


def test_flatten_state_root_tensor_and_errors():
    rng = torch.get_rng_state()
    tensors, skeleton = flatten_state(rng, "rng")
    assert list(tensors) == ["rng"] and torch.equal(unflatten_state(tensors, skeleton, "rng"), rng)
    with pytest.raises(ValueError, match=r"Expected .* but found .*object at s\['k'\]"):
        flatten_state({"k": object()}, "s")
    with pytest.raises(CheckpointError, match="Expected tensor 's.k'"):
        unflatten_state({}, {"__dict__": [["k", {"__tensor__": ".k"}]]}, "s")
    with pytest.raises(CheckpointError, match="malformed"):
        unflatten_state({}, {"k": 1}, "s")


def test_only_one_weights_file_per_tag_remains(tmp_path):
    for i in range(4):
        save_checkpoint(tmp_path, "last", _tensors(i), {"step": i})
        save_checkpoint(tmp_path, "best", _tensors(10 + i), {})
    write_json_atomic(tmp_path / "config.json", {"lr": 0.1})
    assert len(_weights_files(tmp_path, "last")) == 1
    assert len(_weights_files(tmp_path, "best")) == 1
    assert _temp_files(tmp_path) == []
    assert list_checkpoints(tmp_path) == ["best", "last"]
    assert list_checkpoints(tmp_path / "missing") == []
    _assert_same(load_checkpoint(tmp_path, "last")[0], _tensors(3))
    _assert_same(load_checkpoint(tmp_path, "best")[0], _tensors(13))


def test_crash_between_weights_and_json_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", _tensors(0), {"step": 1})
    old_json = (tmp_path / "last.json").read_bytes()
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the weights file is in place; the JSON commit is interrupted
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "last", _tensors(1), {"step": 2})
    monkeypatch.undo()
    assert Path(calls[1]).name == "last.json"
    assert (tmp_path / "last.json").read_bytes() == old_json
    assert _temp_files(tmp_path) == []
    tensors, info = load_checkpoint(tmp_path)
    _assert_same(tensors, _tensors(0))
    assert info["metadata"] == {"step": 1}
    save_checkpoint(tmp_path, "last", _tensors(2), {"step": 3})
    assert len(_weights_files(tmp_path, "last")) == 1


def test_interrupt_at_every_file_operation_leaves_a_consistent_checkpoint(tmp_path, monkeypatch):
    names = ("write", "fsync", "close", "replace", "unlink")
    real = {name: getattr(os, name) for name in names}
    fault = {"at": 0, "count": 0}  # interrupt the fault["at"]-th file operation of a save

    def make(name):
        def op(*args):
            fault["count"] += 1
            if fault["count"] == fault["at"]:
                raise KeyboardInterrupt
            return real[name](*args)

        return op

    finished = False
    while not finished:
        fault["at"] += 1
        run = tmp_path / f"k{fault['at']}"
        save_checkpoint(run, "last", _tensors(0), {"step": 1})
        fault["count"] = 0
        for name in names:
            monkeypatch.setattr(os, name, make(name))
        try:
            save_checkpoint(run, "last", _tensors(1), {"step": 2})
            finished = True
        except KeyboardInterrupt:
            pass
        finally:
            monkeypatch.undo()
        tensors, info = load_checkpoint(run)
        step = info["metadata"]["step"]
        _assert_same(tensors, _tensors(step - 1))
        assert list_checkpoints(run) == ["last"]
        save_checkpoint(run, "last", _tensors(5), {"step": 6})
        assert len(_weights_files(run, "last")) == 1 and _temp_files(run) == []
    assert fault["at"] > 8  # every operation of a save was interrupted once


def test_stale_files_of_a_hard_crash_are_ignored_then_removed(tmp_path):
    save_checkpoint(tmp_path, "last", _tensors(0), {"step": 1})
    (tmp_path / ".last.json.0123456789abcdef.tmp").write_bytes(b'{"format_ver')
    (tmp_path / "last-9-0123456789abcdef.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / ".last-9-fedcba9876543210.safetensors.0123456789abcdef.tmp").write_bytes(b"x")
    _assert_same(load_checkpoint(tmp_path)[0], _tensors(0))
    save_checkpoint(tmp_path, "last", _tensors(1), {"step": 2})
    assert _temp_files(tmp_path) == [] and len(_weights_files(tmp_path, "last")) == 1


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3:] = bytes(255 - b for b in data[-3:])
    path.write_bytes(bytes(data))


def test_corrupted_or_truncated_weights_raise(tmp_path):
    save_checkpoint(tmp_path, "last", _tensors(0), {})
    weights = tmp_path / read_json(tmp_path / "last.json")["weights"]
    _flip_bytes(weights)
    with pytest.raises(CheckpointError, match=r"corrupt.*sha256") as err:
        load_checkpoint(tmp_path)
    assert weights.name in str(err.value)
    # A truncated file whose hash was (re)recorded still fails cleanly, naming the file.
    weights.write_bytes(weights.read_bytes()[:-20])
    info = read_json(tmp_path / "last.json")
    info["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    info["record_sha256"] = _record_digest(info)  # a forger who also reseals the record
    write_json_atomic(tmp_path / "last.json", info)
    with pytest.raises(CheckpointError, match="corrupt weights file") as err:
        load_checkpoint(tmp_path)
    assert weights.name in str(err.value)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def test_truncated_or_incompatible_json_raises(tmp_path):
    save_checkpoint(tmp_path, "last", _tensors(0), {})
    json_path = tmp_path / "last.json"
    info = read_json(json_path)
    json_path.write_bytes(json_path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="invalid JSON") as err:
        load_checkpoint(tmp_path)
    assert str(json_path) in str(err.value)
    write_json_atomic(json_path, {**info, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(tmp_path)
    write_json_atomic(json_path, {**info, "weights": "../outside.safetensors"})
    with pytest.raises(CheckpointError, match="weights file name"):
        load_checkpoint(tmp_path)


def test_missing_run_dir_raises(tmp_path):
    run = tmp_path / "runs" / "x"
    with pytest.raises(CheckpointError, match=r"no checkpoint 'last' in .*x.*last\.json"):
        load_checkpoint(run)
    assert not has_checkpoint(run) and not run.exists()
    with pytest.raises(CheckpointError, match="missing file"):
        read_json(run / "config.json")


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"w": torch.zeros(2)}, r"metadata\['args'\]\['w'\]"),
        ({"net": torch.nn.Linear(1, 1)}, r"metadata\['args'\]\['net'\]"),
        ({"s": {1, 2}}, r"metadata\['args'\]\['s'\]"),
        ({0: "int key"}, r"int key 0 at metadata\['args'\]"),
    ],
)
def test_non_json_metadata_raises_and_writes_nothing(tmp_path, bad, where):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=where):
        save_checkpoint(run, "last", _tensors(0), {"args": bad})
    assert not run.exists()


def test_loading_never_unpickles(tmp_path, monkeypatch):
    rng = torch.get_rng_state()
    rng_tensors, skeleton = flatten_state({"torch": rng}, "rng")
    save_checkpoint(tmp_path, "last", {**_tensors(0), **rng_tensors}, {"rng": skeleton})

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    tensors, info = load_checkpoint(tmp_path)
    _assert_same(tensors, {**_tensors(0), "rng.torch": rng})
    assert torch.equal(unflatten_state(tensors, info["metadata"]["rng"], "rng")["torch"], rng)


def test_json_and_bytes_helpers(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "b.bin", b"123")
    assert path.read_bytes() == b"123"
    write_json_atomic(tmp_path / "m.json", {"x": [1, 2.5, None], "y": "é"})
    assert read_json(tmp_path / "m.json") == {"x": [1, 2.5, None], "y": "é"}
    with pytest.raises(CheckpointError, match=r"value\['x'\]"):
        write_json_atomic(tmp_path / "n.json", {"x": object()})
    assert not (tmp_path / "n.json").exists() and _temp_files(tmp_path) == []
    with pytest.raises(ValueError, match="Expected tag"):
        save_checkpoint(tmp_path, "../up", {}, {})


def test_save_fsyncs_weights_before_committing_json(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", _tensors(0), {"step": 1})
    real_fsync, real_replace, events = os.fsync, os.replace, []

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(dst).name.split('-')[0]}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path, "last", _tensors(1), {"step": 2})
    monkeypatch.undo()
    # file data synced, renamed, directory synced; only then the JSON commit, likewise synced.
    assert events == ["fsync", "replace last", "fsync", "fsync", "replace last.json", "fsync"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda info: info["metadata"].__setitem__("step", 999),
        lambda info: info["metadata"].__setitem__("config", {"T": 10}),
        lambda info: info.__setitem__("saved_at", "2020-01-01"),
        lambda info: info["metadata"].__setitem__("extra", 1),
    ],
    ids=["step", "config", "saved_at", "new-key"],
)
def test_an_edited_record_is_refused(tmp_path, edit):
    save_checkpoint(tmp_path, "last", _tensors(0), {"step": 3, "config": {"T": 1000}})
    info = read_json(tmp_path / "last.json")
    assert info["format_version"] == 2 and len(info["record_sha256"]) == 64
    edit(info)
    write_json_atomic(tmp_path / "last.json", info)
    with pytest.raises(CheckpointError, match="does not match its record_sha256"):
        load_checkpoint(tmp_path)


def test_format_version_1_still_loads(tmp_path):
    """A run directory of format version 1 (digest of the weights only) is read as before."""
    save_checkpoint(tmp_path, "last", _tensors(0), {"step": 3})
    info = read_json(tmp_path / "last.json")
    del info["record_sha256"]
    write_json_atomic(tmp_path / "last.json", {**info, "format_version": 1})
    tensors, loaded = load_checkpoint(tmp_path)
    assert loaded["metadata"]["step"] == 3 and torch.equal(tensors["count"], _tensors(0)["count"])
