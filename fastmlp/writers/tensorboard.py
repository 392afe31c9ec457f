"""TensorBoard: scalars, and the exact histograms (fastmlp's own bins, sums and sums of
squares through ``add_histogram_raw``)."""

from __future__ import annotations

import os
from typing import Any

from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import histogram_buckets, histograms, scalars

__all__ = ["TensorBoard", "add_histogram"]


def add_histogram(writer: Any, tag: str, row: dict[str, Any], step: int) -> None:
    """One row's histogram in a ``SummaryWriter``, exactly: its bins, with the underflow and
    overflow as end buckets, and its count, sum and sum of squares."""
    edges, counts = histogram_buckets(row)
    n, mean, var = row["count"], row["mean"], row["var"]
    writer.add_histogram_raw(
        tag,
        min=row["min"],
        max=row["max"],
        num=n,
        sum=mean * n,
        sum_squares=(var + mean * mean) * n,
        bucket_limits=edges[1:],
        bucket_counts=counts,
        global_step=step,
    )


class TensorBoard:
    """Write snapshots as TensorBoard scalars and histograms.

    Args:
        log_dir: a directory for the event files, or a
            ``torch.utils.tensorboard.SummaryWriter`` to write through (left open by
            :meth:`close`: its owner closes it).
        histograms: also write the histograms.
    """

    def __init__(self, log_dir: str | os.PathLike | Any, *, histograms: bool = True) -> None:
        if isinstance(log_dir, str | os.PathLike):
            self._dir: str | None = os.fspath(log_dir)
            self._writer: Any = None
        elif callable(getattr(log_dir, "add_scalar", None)):
            self._dir, self._writer = None, log_dir
        else:
            raise TypeError(
                "TensorBoard takes a log directory or a SummaryWriter, "
                f"got {type(log_dir).__name__}"
            )
        self._owned = self._writer is None
        self.histograms = histograms

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (opened at the first use when given a directory)."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"fastmlp.writers.TensorBoard needs tensorboard ({e}): "
                    "pip install 'fastmlp[tensorboard]'"
                ) from None
            self._writer = SummaryWriter(log_dir=self._dir)
        return self._writer

    def write(self, step: int, snapshot: Snapshot) -> None:
        tb = self.writer
        for name, value in scalars(snapshot).items():
            tb.add_scalar(name, value, step)
        if self.histograms:
            for tag, row in histograms(snapshot):
                add_histogram(tb, tag, row, step)
        tb.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            if self._owned:
                self._writer.close()
                self._writer = None
