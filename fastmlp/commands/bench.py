"""``fastmlp bench``: the benchmark of :mod:`fastmlp.bench` (options of ``python -m bench``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    from fastmlp.bench.cli import add_arguments

    parser = subparsers.add_parser(
        "bench",
        help="time fastmlp vs hooks vs plain PyTorch (JSON + table + plots)",
        description="fastmlp vs hooks vs plain PyTorch: training-step speed, side by side.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    if "OMP_WAIT_POLICY" not in os.environ:
        # torch has already loaded OpenMP in this process; the bench needs the policy set
        # before that (see fastmlp.bench.__main__), so it runs in a fresh interpreter.
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", FASTMLP_BENCH_PROG="fastmlp bench")
        return subprocess.call([sys.executable, "-m", "fastmlp.bench", *argv], env=env)
    from fastmlp.bench.cli import run

    return run(args, argv, prog="fastmlp bench")
