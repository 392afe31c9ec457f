"""Weights & Biases: scalars and histograms (``wandb.Histogram(np_histogram=...)`` from
fastmlp's own bins) in the active run or a given one."""

from __future__ import annotations

from typing import Any

from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import histogram_buckets, histograms, scalars

__all__ = ["Wandb", "wandb_histogram"]

# wandb.Histogram takes at most this many bins.
_MAX_BINS = 512


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            f"fastmlp.writers.Wandb needs wandb ({e}): pip install 'fastmlp[wandb]'"
        ) from None
    return wandb


def wandb_histogram(row: dict[str, Any]) -> Any:
    """A ``wandb.Histogram`` of a row's bins (underflow and overflow as end bins); more
    than wandb's 512 bins are merged in adjacent groups."""
    wandb = _import_wandb()
    edges, counts = histogram_buckets(row)
    group = -(-len(counts) // _MAX_BINS)
    if group > 1:
        counts = [sum(counts[i : i + group]) for i in range(0, len(counts), group)]
        edges = edges[::group] + ([edges[-1]] if (len(edges) - 1) % group else [])
    return wandb.Histogram(np_histogram=(counts, edges))


class Wandb:
    """Write snapshots to a W&B run: scalars and histograms in one ``run.log`` per step.

    Args:
        run: the run (default: ``wandb.run``, the active one, looked up at each write).
        histograms: also write the histograms.
        step_metric: log the step as this metric instead of as W&B's own ``step`` (as
            Hugging Face's ``WandbCallback`` does with ``"train/global_step"``, and
            Lightning's ``WandbLogger`` with ``"trainer/global_step"``).
    """

    def __init__(
        self, run: Any = None, *, histograms: bool = True, step_metric: str | None = None
    ) -> None:
        self._run = run
        self.histograms = histograms
        self.step_metric = step_metric

    @property
    def run(self) -> Any:
        """The run written to; ``RuntimeError`` when none is given and none is active."""
        if self._run is not None:
            return self._run
        run = _import_wandb().run
        if run is None:
            raise RuntimeError(
                "fastmlp.writers.Wandb: no active W&B run; call wandb.init() first or pass run="
            )
        return run

    def write(self, step: int, snapshot: Snapshot) -> None:
        data: dict[str, Any] = dict(scalars(snapshot))
        if self.histograms:
            data.update((tag, wandb_histogram(row)) for tag, row in histograms(snapshot))
        if self.step_metric is None:
            self.run.log(data, step=step)
        else:
            self.run.log({**data, self.step_metric: step})

    def close(self) -> None:
        """Nothing to release: the run belongs to whoever started it."""
