"""Run by test_faults.py: a tiny VAE run that is killed or interrupted at a chosen point.

``fault_worker.py RUN_DIR --steps N [--resume] [--kill-at-step K] [--sigint-at-step K]
[--kill-in-save J]``: fits with ``checkpoint_every=2``; ``--kill-at-step`` sends itself SIGKILL after
step K, ``--sigint-at-step`` SIGINT (exit 130 once ``last`` is saved), ``--kill-in-save`` SIGKILL
inside the J-th write of ``last``, after its weights file and before its JSON commit point.
"""

import argparse
import os
import signal
import sys

import torch

import probgen.checkpoint
from probgen.inference import fit
from tests.common import tiny_method, toy_data


def train(run_dir, steps: int, *, resume: bool = False, callback=None):
    """The run every case makes (also called in-process by the tests for the reference runs)."""
    method = tiny_method("vae")
    fit(method, toy_data(), steps=steps, batch_size=32, checkpoint_every=2, seed=3,
        run_dir=run_dir, resume=resume, progress=False, callback=callback)  # fmt: skip
    return method


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--sigint-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kill_in_save:
        real_write, seen = probgen.checkpoint.atomic_write_bytes, []

        def write(path, data):
            if os.path.basename(path) == "last.json":
                seen.append(path)
                if len(seen) == args.kill_in_save:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, data)

        probgen.checkpoint.atomic_write_bytes = write

    def callback(step, loss):
        if step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        train(args.run_dir, args.steps, resume=args.resume, callback=callback)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
