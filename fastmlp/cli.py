"""The ``fastmlp`` command line."""

from __future__ import annotations

import argparse
import sys

import fastmlp


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="fastmlp",
        description="Train deep MLPs while watching every layer (Glorot & Bengio, 2010).",
    )
    parser.add_argument("--version", action="version", version=f"fastmlp {fastmlp.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastmlp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
