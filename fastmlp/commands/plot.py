"""``fastmlp plot RUN [RUN...]``: draw the paper's figures from run directories."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fastmlp plot``."""
    p = subparsers.add_parser(
        "plot",
        help="draw the paper's figures (PNG) from run directories",
        description="Draw Fig 2/3/4/6/7/8/9/10/11 of Glorot & Bengio (2010) and the Jacobian "
        "singular values as PNGs under RUN/figures/ (or all under --out DIR, which leaves "
        "the runs untouched). With several runs the test-error curves are also overlaid in "
        "one figure.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write every figure here instead of RUN/figures/ (several runs: DIR/<run name>/, "
        "and the overlaid test errors in DIR); the run directories are only read",
    )
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp plot``."""
    from fastmlp.errors import UsageError, describe
    from fastmlp.plot import plot_runs

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        args._parser.error(f"not a directory: {', '.join(missing)}")
    try:
        paths = plot_runs(args.runs, out=args.out)
    except FileNotFoundError as e:
        args._parser.error(describe(e))
    except OSError as e:  # a read-only run directory: --out draws elsewhere
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        hint = "" if args.out is not None else ": give --out DIR to draw the figures elsewhere"
        raise UsageError(f"cannot write figures into {e.filename} ({e.strerror}){hint}") from e
    for p in paths:
        print(p)
    return 0
