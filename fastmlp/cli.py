"""The ``fastmlp`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

import fastmlp

# Modules under fastmlp.commands, each with ``register(subparsers)`` adding its sub-command
# (a parser whose ``func(args) -> int`` runs it).
COMMANDS: tuple[str, ...] = ("train", "diagnose", "plot", "reproduce", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="fastmlp",
        description="Train deep MLPs while watching every layer (Glorot & Bengio, 2010).",
    )
    parser.add_argument("--version", action="version", version=f"fastmlp {fastmlp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fastmlp.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastmlp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
