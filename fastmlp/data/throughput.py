"""``shapeset_throughput()``: how fast Shapeset-3x2 images are generated, directly or through
the online training stream (imports flow one way: shapes <- splits <- throughput)."""

from __future__ import annotations

import math
import time

import torch

from fastmlp.data.shapes import _resolve_device, shapeset
from fastmlp.data.splits import ShapesetStream

__all__ = ["shapeset_throughput"]


def shapeset_throughput(
    n: int = 20000,
    device: torch.device | str | None = None,
    *,
    batch_size: int | None = None,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
) -> float:
    """Measure Shapeset generation speed in images per second (median of ``repeats``).

    Args:
        n: images generated per repeat.
        device: where to generate (default: ``torch.get_default_device()``).
        batch_size: if given, draw the images through the online training stream
            (``load("shapeset").train_batches(batch_size)``) as a trainer would;
            otherwise with one ``shapeset(n)`` call.
        repeats: timed repeats after one untimed warm-up.
        seed: random seed.
        threads: if given, ``torch.set_num_threads(threads)`` for the measurement (restored
            afterwards). On a CPU shared with other busy processes one thread can be much
            faster than several, whose parallel regions wait for descheduled peers.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = _resolve_device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(count: int, rep: int) -> None:
        if batch_size is None:
            shapeset(count, seed=seed + rep, device=dev)
            return
        batches = ShapesetStream(dev).batches(batch_size, seed=seed + rep)
        for _ in range(math.ceil(count / batch_size)):
            next(batches)

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        run(min(n, 1024), -1)
        sync()
        times = []
        for rep in range(repeats):
            t0 = time.perf_counter()
            run(n, rep)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    times.sort()
    return n / times[len(times) // 2]
