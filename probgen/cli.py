"""``python -m probgen.cli`` and ``from probgen.cli import main``: the command line of
:mod:`probgen.apps.cli`, kept at this path so that both keep working."""

import sys

from probgen.apps.cli import UsageError, build_parser, main

__all__ = ["UsageError", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
