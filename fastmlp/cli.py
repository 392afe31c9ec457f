"""The ``fastmlp`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings

import fastmlp
from fastmlp import interrupts
from fastmlp.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    RunFailed,
    UsageError,
    describe,
    exit_status,
)

# Modules under fastmlp.commands, each with ``register(subparsers)`` adding its sub-command
# (a parser whose ``func(args) -> int`` runs it).
COMMANDS: tuple[str, ...] = ("train", "diagnose", "plot", "reproduce", "bench", "coordcheck")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="fastmlp",
        description="Train deep MLPs while watching every layer (Glorot & Bengio, 2010).",
    )
    parser.add_argument("--version", action="version", version=f"fastmlp {fastmlp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for name in COMMANDS:
        importlib.import_module(f"fastmlp.commands.{name}").register(sub)
    for command in sub.choices.values():  # also accepted after the command: fastmlp train --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)  # fmt: skip
    return parser


EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE
DEBUG_HELP = "on an error, show the Python traceback as well as the one-line message"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastmlp`` console script.

    Errors end in one line on stderr, ``fastmlp <command>: error: <what and what was
    expected>``, and the exit status of :mod:`fastmlp.errors` (2: bad input, 1: failure
    at run time, 130: interrupted, 143: SIGTERM); ``--debug`` shows the traceback too.
    Ctrl-C and SIGTERM are answered as :mod:`fastmlp.interrupts` says.
    """
    # The ranks of a torchrun job leave SIGTERM to torchrun's agent, which stops them with it.
    with interrupts.handling(sigterm="RANK" not in os.environ):
        try:
            return _main(argv)
        except KeyboardInterrupt as e:  # while parsing the flags
            return _stopped(e, "fastmlp")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    prog = f"fastmlp {args.command}"

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = one_line_warning
        return _run(args, prog)


def _run(args: argparse.Namespace, prog: str) -> int:
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout closed early (fastmlp diagnose RUN | head): end quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:
        if args.debug:
            traceback.print_exc()
        return _stopped(e, prog)
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        status = exit_status(e)
        hint = ""
        if status == EXIT_FAILURE and not isinstance(e, OSError | UsageError | RunFailed):
            hint = f" ({type(e).__name__}; run again with --debug for the traceback)"
        print(f"{prog}: error: {describe(e)}{hint}", file=sys.stderr)
        return status


def _stopped(e: KeyboardInterrupt, prog: str) -> int:
    """One line for Ctrl-C or SIGTERM; the exit status says which."""
    if isinstance(e, interrupts.Terminated):
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return interrupts.EXIT_TERMINATED
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
