"""``fit`` under torchrun: 2 CPU processes (gloo) stay identical and match one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, *args, str(WORKER), str(out), *extra], env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_data_parallel_matches_single_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir(), single.mkdir()
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], ddp)
    _run([], single)
    r0, r1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    ref = torch.load(single / "rank0.pt")
    assert (r0["world"], r0["rows"], r1["rows"]) == (2, 16, 16)
    assert (ref["world"], ref["rows"]) == (1, 32)
    r0, r1, ref = r0["state"], r1["state"], ref["state"]
    assert r0.keys() == r1.keys() == ref.keys()
    for name in ref:
        # DDP all-reduces gradients, so both ranks apply bitwise identical updates.
        assert torch.equal(r0[name], r1[name]), name
        # The mean of two half-batch losses has the gradient of the full-batch loss; only the
        # summation order differs (float32 rounding, ~1e-7 relative per step over 25 steps).
        torch.testing.assert_close(r0[name], ref[name], atol=1e-5, rtol=1e-4)
    assert not torch.equal(ref["log_scale"], torch.zeros(()))


def info_history(run_dir):
    from probgen.checkpoint import load_checkpoint

    return load_checkpoint(run_dir, "last")[1]["metadata"]["history"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_every_objective_trains_data_parallel_with_ranks_in_step(tmp_path):
    from probgen.checkpoint import load_checkpoint
    from probgen.models import load_method

    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path, "methods")
    for name in ("vae", "gan", "cd"):
        saved = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        r0, r1 = (s["state"] for s in saved)
        assert [s["stopped_at"] for s in saved] == [4, 4]  # both ranks stopped together, `last` at 4
        for key in r0:  # every player's gradients are all-reduced: the ranks stay bitwise equal
            assert torch.equal(r0[key], r1[key]), (name, key)
            # Interrupted after step 3 on both ranks and resumed: the run continues exactly.
            for s in saved:
                torch.testing.assert_close(s["resumed"][key], r0[key], atol=1e-6, rtol=0, msg=(name, key))
        split = load_checkpoint(tmp_path / f"{name}-split", "last")[1]["metadata"]
        assert split["step"] == 6 and split["history"] == info_history(tmp_path / name)
        tensors, info = load_checkpoint(tmp_path / name, "last")
        assert info["metadata"]["step"] == 6 and info["metadata"]["fit"]["world_size"] == 2
        # Every rank's RNG state is saved, and the ranks were seeded apart.
        assert not torch.equal(tensors["rng.0"], tensors["rng.1"])
        loaded, _ = load_method(tmp_path / name)  # best: what fit leaves in the method
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, r0[key]), (name, key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("method", ["gan", "consistency"])
def test_torchrun_of_the_cli_trains_and_only_rank_0_writes(tmp_path, method):
    from probgen.checkpoint import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    run = tmp_path / method
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += ["-m", "probgen.cli", "train", method, "--data", "eight_gaussians", "--out", str(run)]
    argv += ["--steps", "8", "--val-every", "4", "--batch-size", "32", "--no-progress"]
    argv += ["--set", "hidden=[16]"] if method == "consistency" else ["--set", "generator_hidden=[16]"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1  # rank 0 reports, rank 1 stays quiet
    meta = load_checkpoint(run, "last")[1]["metadata"]
    assert meta["step"] == 8 and meta["fit"]["world_size"] == 2
