"""Every registered method on several data sets with one stated budget: ``probgen compare`` in a loop.

For each data set (default ``eight_gaussians``, ``checkerboard`` and ``digits``) this runs
:func:`probgen.apps.compare.compare` and writes ``OUT/DATA/compare.md``, ``compare.json``
and ``compare.png``; ``OUT/compare.md`` concatenates the tables with the command that made them.

    python benchmarks/compare.py --out out/compare                 # default budget, ~15 min on 2 cores
    python benchmarks/compare.py --quick --data eight_gaussians    # seconds; numbers mean nothing
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from probgen.apps.compare import BUDGETS, compare
from probgen.checkpoint import atomic_write_bytes

DATA = ("eight_gaussians", "checkerboard", "digits")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DATA), help="data sets (default: %(default)s)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--quick", action="store_true", help="the tiny budget of the test suite")
    parser.add_argument("--steps", type=int, default=None, help="training steps for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("out/compare"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    budget = "quick" if args.quick else "default"

    command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report, sections, total = {}, [f"Made by `{command.strip()}`.\n"], time.perf_counter()
    for data in args.data:
        start = time.perf_counter()
        result = compare(
            data,
            methods=methods,
            budget=BUDGETS[budget],
            steps=args.steps,
            out_dir=args.out / data,
            seed=args.seed,
            progress=not args.no_progress,
            log=lambda line: print(line, flush=True),
        )
        seconds = time.perf_counter() - start
        report[data] = {"seconds": seconds, "paths": result.paths, "failed": result.failed}
        sections.append(Path(result.paths["markdown"]).read_text())
        sections.append(f"Wall time for {data}: {seconds:.0f} s.\n")
        print(f"{data}: {seconds:.0f} s; wrote {', '.join(result.paths.values())}", flush=True)
    total = time.perf_counter() - total
    sections.append(f"Total wall time: {total:.0f} s ({args.threads} torch thread(s)).\n")
    atomic_write_bytes(args.out / "compare.md", "\n".join(sections).encode())
    report["total_seconds"] = total
    print(f"total {total:.0f} s; tables in {args.out / 'compare.md'}")
    return report


if __name__ == "__main__":
    main()
