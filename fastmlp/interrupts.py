"""How the ``fastmlp`` command answers Ctrl-C (SIGINT) and SIGTERM.

- While the command is still importing (torch takes a second or more), Ctrl-C ends it at
  once with one line, ``fastmlp: interrupted``, and exit status 130, and SIGTERM with
  ``fastmlp: terminated (SIGTERM)`` and 143 (:func:`install_early`, called first thing by
  ``fastmlp/__init__.py``, only when the process is the ``fastmlp`` command; SIGTERM not
  in a torchrun rank, which leaves it to torchrun's agent).
- Once it runs (:func:`handling`): the first Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM
  raises :class:`Terminated`, so the command stops where it is and says where the run stands;
  further signals while it is stopping are ignored (a third Ctrl-C ends it at once,
  still with exit status 130 and one line), and so are those that come once the command
  has returned (while the interpreter shuts down).

Nothing here imports the rest of fastmlp: it must be importable before torch is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["EXIT_TERMINATED", "Terminated", "handling", "install_early"]

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM received: stop as for Ctrl-C (exit status :data:`EXIT_TERMINATED`)."""


def _is_command() -> bool:
    """This process is the ``fastmlp`` command (console script or ``python -m fastmlp``)."""
    argv = getattr(sys, "orig_argv", None) or []
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "fastmlp":
        return True
    return bool(sys.argv) and Path(sys.argv[0]).name == "fastmlp"


def _early(signum: int, frame: object) -> None:
    if signum == signal.SIGTERM:
        os.write(2, b"fastmlp: terminated (SIGTERM)\n")
        os._exit(EXIT_TERMINATED)
    os.write(2, b"fastmlp: interrupted\n")
    os._exit(128 + signal.SIGINT)


def install_early() -> None:
    """Ctrl-C or SIGTERM during the imports of the ``fastmlp`` command: one line, exit status
    130 or 143.

    Does nothing in any other process (a program that imports fastmlp keeps its own
    handlers) or outside the main thread; leaves a signal alone where its handler is not
    Python's default (SIGINT ignored by a shell's background job, or a handler the program
    set), and SIGTERM in a torchrun rank (``RANK`` set: torchrun's agent stops its ranks
    with it)."""
    if threading.current_thread() is not threading.main_thread() or not _is_command():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _early)
    if "RANK" not in os.environ and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _early)


class _Handler:
    """The command's SIGINT / SIGTERM handler: raises on the first signal, ignores the next,
    ends the process at the third."""

    raises = True  # fastmlp.run holds it (raising after) while a checkpoint is written

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.received == 1:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if self.received >= 3:
            os.write(2, b"fastmlp: interrupted again: exiting now\n")
            os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else 128 + signal.SIGINT)


@contextlib.contextmanager
def handling(*, sigterm: bool = True) -> Iterator[None]:
    """Answer SIGINT (and SIGTERM when ``sigterm``) as the module docstring says while the
    block runs; the previous handlers are put back after it. Only in the main thread, and
    only for a SIGINT that is not ignored (a shell's background job ignores it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    signals = [signal.SIGTERM] if sigterm else []
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _early):
        signals.append(signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        ending = _is_command()  # the process ends after the block: its teardown is not cut
        for s, h in saved.items():
            if ending:
                signal.signal(s, signal.SIG_IGN)
            elif h is _early:
                signal.signal(
                    s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler
                )
            else:
                signal.signal(s, h)


install_early()  # on import: fastmlp/__init__.py imports this module before anything heavy
