"""Interleaved timing: every repeat runs every variant once, so drift hits all of them alike.

On CPU each measurement is ``time.perf_counter`` around ``inner`` calls; on CUDA it
is a pair of CUDA events around ``inner`` calls, read after the end event has
completed. Warm-up calls are never timed. Summaries are medians with the
inter-quartile range; ratios against the reference are computed both as a ratio
of medians and per repeat (paired), whose quartiles show the spread.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = [
    "Measurement",
    "CompileTimeout",
    "time_limit",
    "quantiles",
    "measure_once",
    "interleaved",
    "error_text",
]


class CompileTimeout(BaseException):
    """Raised inside a :func:`time_limit` block that ran past its limit.

    A ``BaseException`` on purpose: library code that catches ``Exception`` or
    ``TimeoutError`` (torch's compile workers do) must not swallow or rename it.
    """


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CompileTimeout` in the block after ``seconds`` (main thread, POSIX only).

    Elsewhere (another thread, no ``SIGALRM``) the block runs without a limit.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise CompileTimeout(f"did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """``(q25, median, q75)`` of ``values`` (linear interpolation; all equal for one value)."""
    if not values:
        return (math.nan, math.nan, math.nan)
    if len(values) == 1:
        return (values[0], values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], statistics.median(values), q[2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


@dataclass
class Measurement:
    """Per-call times of one variant (seconds), or why it could not be measured."""

    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    min_time: float = 0.0,
    max_inner: int = 1000,
    recompiles: Callable[[], int] | None = None,
    compiled: frozenset[str] = frozenset(),
    apart: frozenset[str] = frozenset(),
    settle: float = 0.0,
) -> tuple[dict[str, Measurement], int]:
    """Time every function in ``fns``, round-robin, ``repeats`` times after ``warmup`` rounds.

    The order of the variants rotates every repeat. ``inner`` (calls per
    measurement) is chosen once from the fastest variant so that one measurement
    lasts about ``min_time`` seconds; it is the same for every variant. A variant
    that raises is dropped from later rounds and reported with its error.

    ``recompiles`` counts compilations so far (e.g. torch._dynamo's graph count):
    a variant in ``compiled`` that compiles again during a timed measurement is
    not in a steady state; it is dropped and reported as such.

    ``apart`` names variants that disturb what runs right after them (on a CPU, the OpenMP
    threads of ``torch.compile``'d kernels spin on after each call): every round runs them
    after the others, then idles ``settle`` seconds, so each repeat still times every
    variant within the same stretch of the machine's time (paired ratios stay paired).

    Returns the measurements by name and the ``inner`` count used.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    results = {name: Measurement() for name in fns}
    live = list(fns)

    def run(name: str, inner: int, timed: bool = True) -> float | None:
        watch = timed and recompiles is not None and name in compiled
        before = recompiles() if watch else 0
        try:
            t = measure_once(fns[name], inner, device)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, not fatal
            _sync_quietly(device)
            results[name].error = error_text(exc)
            live.remove(name)
            return None
        if watch and (n := recompiles() - before) > 0:
            results[name].error = (
                f"recompiled {n} graph(s) while being timed (not a steady state; "
                f"one call took {t:.3g} s)"
            )
            live.remove(name)
            return None
        return t

    def round_order(r: int) -> list[str]:
        """This round's order: the others, then ``apart``, each group rotated by ``r``."""
        order = []
        for group in ([n for n in live if n not in apart], [n for n in live if n in apart]):
            k = r % len(group) if group else 0
            order += group[k:] + group[:k]
        return order

    def one_round(r: int, inner: int, watch: bool, record: bool) -> list[float]:
        """Run round ``r`` (``watch``: for recompiles; ``record``: into ``results``), then
        settle after ``apart``; the times measured."""
        order, times = round_order(r), []
        for name in order:
            if (t := run(name, inner, timed=watch)) is not None:
                times.append(t)
                if record:
                    results[name].times.append(t)
        if settle > 0 and any(n in apart for n in order):
            time.sleep(settle)
        return times

    for r in range(max(warmup, 1)):  # at least one untimed call: lazy init, autotuning
        one_round(r, 1, watch=False, record=False)
    _sync(device)

    inner = 1
    if min_time > 0 and live:
        if probes := one_round(0, 1, watch=True, record=False):
            inner = max(1, min(max_inner, math.ceil(min_time / max(min(probes), 1e-9))))

    for r in range(repeats):
        one_round(r, inner, watch=True, record=True)
    return results, inner


def _sync_quietly(device: torch.device) -> None:
    try:
        _sync(device)
    except Exception:  # noqa: BLE001 - the device may already be in an error state
        pass
