"""What the benchmark commands share: argparse types, so that a bad value is an argparse
error (the usage and one line saying what was expected, exit status 2); :func:`entry`,
which reports Ctrl-C, unusable paths and unreadable files as one line, as ``fastmlp``
does (:mod:`fastmlp.errors`), never as a traceback; the timing options and the JSON
writer of the side-by-side benchmarks; and :func:`write_text_atomically`, so that a
killed command never leaves a half-written result or README."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from fastmlp.errors import describe, exit_status

__all__ = [
    "add_timing_options",
    "entry",
    "non_negative_float",
    "non_negative_int",
    "output_dir",
    "positive_int",
    "positive_ints",
    "write_result",
    "write_text_atomically",
]


def entry(prog: str, main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status; Ctrl-C (130), an ``OSError`` (2 for a path that
    cannot be used, else 1) and a ``ValueError`` (bad input such as a file that is not
    JSON: 2) are one line on stderr."""
    try:
        status = main()
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = exit_status(exc)
    except (OSError, ValueError) as exc:
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        status = exit_status(exc)
    sys.exit(status)


def output_dir(text: str) -> Path:
    """A directory the results can be written to, created if missing: checked before a
    run, so that a long measurement is not lost at the end for want of a place."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise argparse.ArgumentTypeError(f"cannot create directory {text!r}: {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a writable directory")
    return path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated integers >= 1, at least one."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_timing_options(parser: argparse.ArgumentParser, results: Path) -> None:
    """``--repeats``, ``--warmup``, ``--min-time``, ``--out`` (default ``results``) and
    ``--note``, as the side-by-side benchmarks take them."""
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument(
        "--min-time", type=non_negative_float, default=0.2, help="seconds per measurement"
    )
    parser.add_argument("--out", type=output_dir, default=results)
    parser.add_argument("--note", default="", help="free text stored in the JSON")


def write_result(
    out: Path, name: str, schema: str, prog: str, argv: list[str] | None, note: str, **body
) -> Path:
    """Write ``out/name`` as JSON: ``schema``, the time, the command (``prog`` and ``argv``,
    or this process's arguments), ``note``, then ``body``; returns the path."""
    doc = {
        "schema": schema,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([prog, *(sys.argv[1:] if argv is None else argv)]),
        "note": note,
        **body,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    write_text_atomically(path, json.dumps(doc, indent=2) + "\n")
    return path


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) through a temporary file beside it: a reader
    sees the old file or the new one, never a part, whenever the writer is killed."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
