"""Errors a user can cause, and how the command line reports them.

Every error of ``fastmlp`` is one line on stderr: ``fastmlp <command>: error: <what was
wrong and what was expected>``. The exit status says whose side it is on:
:data:`EXIT_USAGE` (2) for bad input (flags, files, run directories, datasets),
:data:`EXIT_FAILURE` (1) for a failure at run time (disk full, a device error),
:data:`EXIT_INTERRUPTED` (130) for Ctrl-C.
"""

from __future__ import annotations

import errno

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "RunFailed",
    "UsageError",
    "describe",
    "exit_status",
]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad input the user can fix (exit status 2); the message says what was expected."""


class RunFailed(RuntimeError):
    """A run that failed at run time after writing a checkpoint (exit status 1); the message
    says how to continue it."""


# OSErrors that mean "the path you gave cannot be used" (bad input), as opposed to the
# machine failing under a valid request (ENOSPC, EIO, ...: runtime failures).
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_PATH_ERRNOS = {errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}


def exit_status(exc: BaseException) -> int:
    """:data:`EXIT_USAGE` for bad input, :data:`EXIT_INTERRUPTED` for Ctrl-C, else
    :data:`EXIT_FAILURE`."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        bad_path = isinstance(exc, _PATH_ERRORS) or exc.errno in _PATH_ERRNOS
        return EXIT_USAGE if bad_path else EXIT_FAILURE
    if isinstance(exc, ValueError):  # UsageError, json.JSONDecodeError, validation errors
        return EXIT_USAGE
    return EXIT_FAILURE


def describe(exc: BaseException) -> str:
    """``exc`` as one line: an ``OSError`` as ``<reason>: <path>``, anything else by its
    message (the exception's type name is added when the message alone would be empty)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the message held
