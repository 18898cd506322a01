"""Fault injection: training never loses a good state, resume is exact, a run directory cannot lie.

Every case is made to happen (divergence injected by a callback, SIGINT and SIGKILL at chosen steps
and in the middle of a checkpoint write, tampered JSON and weights, options changed on resume) and
the test checks that nothing is lost. The training cases run for every method of ``probgen list``
(:data:`tests.common.TINY`). Two-process (torchrun) resume is in ``test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probgen.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, read_json, save_checkpoint
from probgen.cli import main
from probgen.inference import TrainingError, fit
from probgen.models import available, load_method
from tests.common import TINY, tiny_method, toy_data

METHODS = sorted(TINY)
WORKER = Path(__file__).with_name("fault_worker.py")


def _fit(method, run_dir=None, **kw):
    opts = dict(batch_size=32, val_data=toy_data(64, seed=1), val_every=2, progress=False, seed=3)
    opts.update(kw)
    return fit(method, toy_data(), run_dir=run_dir, **opts)


def _assert_same_state(a, b, atol=1e-6):
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], atol=atol, rtol=0, msg=key)


def test_every_listed_method_has_a_tiny_instance():
    assert set(TINY) == set(available())


@pytest.mark.parametrize("name", METHODS)
def test_resume_equals_an_uninterrupted_run_with_ema_and_early_stopping(name, tmp_path):
    kw = dict(steps=10, ema_decay=0.9, patience=2, checkpoint_every=3)
    straight = tiny_method(name)
    full = _fit(straight, tmp_path / "a", **kw)

    def interrupt(step, loss):  # Ctrl-C after step 4: `last` is saved between steps
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_method(name), tmp_path / "b", callback=interrupt, **kw)
    assert load_checkpoint(tmp_path / "b", "last")[1]["metadata"]["step"] == 4
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint restores it
    resumed = tiny_method(name, seed=5)  # another initialization: the checkpoint replaces it
    again = _fit(resumed, tmp_path / "b", resume=True, **kw)
    assert (again.step, again.best_step, again.stopped_early) == (
        full.step,
        full.best_step,
        full.stopped_early,
    )
    assert again.history == full.history
    _assert_same_state(straight, resumed)


@pytest.mark.parametrize("name", METHODS)
def test_divergence_keeps_the_last_good_state_and_a_lower_lr_trains_on(name, tmp_path):
    method = tiny_method(name)

    def poison(step, loss):
        if step == 5:
            with torch.no_grad():
                for p in method.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 6.*keeps 'last' at step 4, the last good state"):
        _fit(method, tmp_path, steps=20, checkpoint_every=2, callback=poison)
    tensors, info = load_checkpoint(tmp_path, "last")
    assert info["metadata"]["step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    resumed = tiny_method(name)
    result = _fit(resumed, tmp_path, steps=8, checkpoint_every=2, resume=True, lr=1e-4)
    assert result.step == 8 and load_checkpoint(tmp_path, "last")[1]["metadata"]["lr_history"] == [
        [0, 1e-3],
        [4, 1e-4],
    ]


@pytest.mark.parametrize("name", ["vae", "gan", "consistency"])
def test_nonfinite_parameters_at_a_checkpoint_are_divergence(name, tmp_path):
    """Parameters poisoned after the step's losses: the guard in front of ``last`` catches them."""
    method = tiny_method(name)

    def poison(step, loss):
        if step == 4:
            with torch.no_grad():
                next(iter(method.parameters())).fill_(float("inf"))

    with pytest.raises(TrainingError, match=r"non-finite parameters.*at step 4.*keeps 'last' at step 2"):
        _fit(method, tmp_path, steps=20, checkpoint_every=2, val_data=None, callback=poison)
    assert load_checkpoint(tmp_path, "last")[1]["metadata"]["step"] == 2


def test_an_exploding_validation_score_is_divergence(tmp_path):
    scores = iter([1.0, 0.8, 1e6])
    with pytest.raises(TrainingError, match=r"Validation score 1e\+06 exploded.*at step 6.*'last' at step 4"):
        _fit(tiny_method("gan"), tmp_path, steps=20, val_fn=lambda m, v: next(scores))
    assert read_json(tmp_path / "best.json")["metadata"]["step"] == 4


def test_an_exploding_learning_rate_is_reported_as_a_failure_not_success(tmp_path):
    with pytest.raises(TrainingError):
        _fit(tiny_method("gan"), tmp_path, steps=200, lr=1e4, val_every=20)


def test_options_a_resume_cannot_honour_are_refused(tmp_path):
    _fit(tiny_method("vae"), tmp_path, steps=4)
    for change, value in (("batch_size", 16), ("seed", 4), ("ema_decay", 0.5)):
        with pytest.raises(ValueError, match=f"Expected {change}=.*the saved run's.*start a new run"):
            _fit(tiny_method("vae"), tmp_path, steps=8, resume=True, **{change: value})
    assert load_checkpoint(tmp_path, "last")[1]["metadata"]["step"] == 4


def _train(run_dir: Path, steps: int, resume: bool = False):
    """The worker's run, in this process (the reference runs and the resumptions)."""
    from tests.inference.fault_worker import train

    return train(run_dir, steps, resume=resume)


def _worker(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[2])  # the worker imports tests.common
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(WORKER), str(run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sigkill_mid_run_resumes_exactly(tmp_path):
    proc = _worker(tmp_path / "killed", "--steps", "12", "--kill-at-step", "7")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed", "last")[1]["metadata"]["step"] == 6
    resumed = _train(tmp_path / "killed", 12, resume=True)
    _assert_same_state(resumed, _train(tmp_path / "straight", 12))


@pytest.mark.parametrize("which", ["first", "later"])
def test_sigkill_during_a_checkpoint_write_leaves_a_resumable_directory(tmp_path, which):
    # "first": killed while writing the first 'last' (its weights are on disk, its JSON is not);
    # "later": killed while replacing 'last' at step 4, so the step-2 'last' must still load.
    kill = ["--kill-in-save", "1" if which == "first" else "2"]
    proc = _worker(tmp_path / "run", "--steps", "8", *kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(os.listdir(tmp_path / "run"))
    if which == "first":
        assert not has_checkpoint(tmp_path / "run", "last") and any(n.endswith(".safetensors") for n in left)
    else:
        assert load_checkpoint(tmp_path / "run", "last")[1]["metadata"]["step"] == 2
    # Resuming works in both cases (with nothing to resume, the run starts afresh) and cleans up.
    resumed = _train(tmp_path / "run", 8, resume=True)
    assert load_checkpoint(tmp_path / "run", "last")[1]["metadata"]["step"] == 8
    weights = [n for n in os.listdir(tmp_path / "run") if n.startswith("last-")]
    assert len(weights) == 1, weights
    _assert_same_state(resumed, _train(tmp_path / "straight", 8))


def test_sigint_saves_last_and_the_resumed_run_is_exact(tmp_path):
    proc = _worker(tmp_path / "run", "--steps", "12", "--sigint-at-step", "5")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "run", "last")[1]["metadata"]["step"] == 5
    resumed = _train(tmp_path / "run", 12, resume=True)
    _assert_same_state(resumed, _train(tmp_path / "straight", 12))


def test_tampered_weights_and_records_are_refused(tmp_path):
    _fit(tiny_method("ddpm"), tmp_path, steps=2)
    info = read_json(tmp_path / "last.json")
    info["metadata"]["config"]["T"] = 8  # an edited config would sample garbage
    (tmp_path / "last.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="record_sha256"):
        load_method(tmp_path, "last")
    weights = tmp_path / read_json(tmp_path / "best.json")["weights"]
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_method(tmp_path, "best")


def test_nonfinite_weights_with_a_valid_digest_are_refused(tmp_path):
    method = tiny_method("vae")
    _fit(method, tmp_path, steps=2)
    tensors, info = load_checkpoint(tmp_path, "last")
    tensors = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()
    }
    save_checkpoint(tmp_path, "best", tensors, info["metadata"])
    with pytest.raises(CheckpointError, match="not finite.*diverged"):
        load_method(tmp_path, "best")


def test_data_beyond_float32_is_refused():
    x = toy_data().double()
    x[3, 0] = 1e300
    with pytest.raises(ValueError, match="float32's range"):
        fit(tiny_method("score-sde"), x, steps=2, batch_size=32, progress=False)


def test_the_cli_round_trip_of_divergence(tmp_path, capsys):
    """The issue's reproduction: train, resume with an absurd --lr (a failure, exit 1, `last` kept),
    then resume with a sane one, which trains on."""
    run = tmp_path / "r"
    base = ["train", "ddpm", "--data", "moons", "--out", str(run), "--no-progress", "--val-every", "10"]
    base += ["--set", "hidden=[32]", "--set", "T=50"]
    assert main([*base, "--steps", "20"]) == 0
    capsys.readouterr()
    assert main([*base[:-4], "--steps", "400", "--resume", "--lr", "1e6"]) == 1
    note, *err = capsys.readouterr().err.strip().splitlines()
    assert "note: --lr 1000000.0 replaces the saved run's 0.001 from step 20 on" in note
    assert len(err) == 1 and "training failed" in err[0] and "the last good state" in err[0], err
    held = load_checkpoint(run, "last")[1]["metadata"]["step"]
    assert held >= 20
    assert main([*base[:-4], "--steps", str(held + 20), "--resume", "--lr", "1e-3"]) == 0
    assert load_checkpoint(run, "last")[1]["metadata"]["step"] == held + 20


def test_cli_refuses_huge_sizes_before_allocating(tmp_path, capsys):
    argv = ["train", "vae", "--data", "moons", "--out", str(tmp_path / "r"), "--steps", "1"]
    assert main([*argv, "--set", "latent_dim=1000000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size limit" in err[0], err
    assert main([*argv, "--set", "hidden=[60000,60000]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters" in err[0], err


def test_a_flow_at_an_absurd_learning_rate_is_a_training_failure(tmp_path, capsys):
    """Pyro's spline asserts on the parameters the first updates made: divergence, exit 1, one line."""
    argv = ["train", "flow", "--data", "moons", "--out", str(tmp_path / "r"), "--steps", "300"]
    assert main([*argv, "--lr", "1000", "--val-every", "20", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training failed" in err[0], err
