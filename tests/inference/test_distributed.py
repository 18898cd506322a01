"""``fit`` under torchrun: 2 CPU processes (gloo) stay identical and match one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args, out, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, *args, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=240
    )
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
