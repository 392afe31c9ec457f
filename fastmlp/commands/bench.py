"""``fastmlp bench``: the benchmark of :mod:`fastmlp.bench` (options of ``python -m bench``)."""

from __future__ import annotations

import argparse
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
    from fastmlp.bench.cli import run

    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    return run(args, argv, prog="fastmlp bench")
