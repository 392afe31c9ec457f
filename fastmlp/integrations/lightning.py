"""Lightning: :class:`StatsMonitor`, a ``Callback`` that records a ``LightningModule``'s
statistics on a cadence and logs them through every logger of the ``Trainer``.

::

    trainer = lightning.Trainer(callbacks=[StatsMonitor(every=50)], logger=TensorBoardLogger("tb"))

At setup it instruments the module where it holds no instrumented layer yet
(:class:`fastmlp.Monitor` does the recording). Optimizer steps ``0, every, 2 every, ...``
(``trainer.global_step`` when the step starts) are recorded and logged at that step: the
scalars ``fastmlp/<module path>/<quantity>/<figure>`` through each logger's ``log_metrics``
(values appear at the recorded steps only, never repeated), the histograms
``fastmlp/<module path>/<quantity>`` to the loggers that take them (TensorBoard, W&B). Steps
in between and validation passes run with statistics off. Under a distributed strategy
(DDP) the snapshot is merged across ranks and logged once, by rank 0. Its state (the
findings already warned of) is saved in checkpoints; the cadence follows
``trainer.global_step``, so a resumed run records the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as e:  # (the same error, saying which extra installs it)
    raise ModuleNotFoundError(
        f"fastmlp.integrations.lightning needs lightning ({e}): pip install 'fastmlp[lightning]'",
        name=e.name,
    ) from e

from fastmlp.monitor import Monitor
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import Writer, histograms, scalars

__all__ = ["LoggersWriter", "StatsMonitor"]


class LoggersWriter:
    """A :class:`~fastmlp.writers.Writer` onto every logger of a Lightning ``Trainer``:
    scalars through ``log_metrics``, histograms to ``TensorBoardLogger`` and ``WandbLogger``."""

    def __init__(self, trainer: pl.Trainer, *, histograms: bool = True) -> None:
        self.trainer = trainer
        self.histograms = histograms

    def write(self, step: int, snapshot: Snapshot) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        metrics = scalars(snapshot)
        hists = list(histograms(snapshot)) if self.histograms else []
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if not hists:
                continue
            if isinstance(logger, TensorBoardLogger):
                from fastmlp.writers.tensorboard import add_histogram

                for tag, row in hists:
                    add_histogram(logger.experiment, tag, row, step)
            elif isinstance(logger, WandbLogger):
                from fastmlp.writers.wandb import wandb_histogram

                data = {tag: wandb_histogram(row) for tag, row in hists}
                logger.experiment.log({**data, "trainer/global_step": step})

    def close(self) -> None:
        """Nothing to release: the loggers belong to the trainer."""


class StatsMonitor(pl.Callback):
    """Record and log the module's statistics every ``every`` optimizer steps.

    Args:
        every: record and log every ``every`` steps.
        window: consecutive steps recorded per log.
        groups: opt-in statistic groups (``zeros``, ``moments4``, ``per_unit``,
            ``exponents``).
        config: what the layers record (:class:`~fastmlp.StatsConfig`).
        histograms: also log histograms (to TensorBoard and W&B loggers).
        writers: more writers besides the trainer's loggers (rank 0 only).
        **monitor_options: the rest of :class:`fastmlp.Monitor`'s options (``diagnose``,
            ``min_severity``, ``thresholds``, ``on_nonfinite``).
    """

    def __init__(
        self,
        every: int = 100,
        *,
        window: int = 1,
        groups: Sequence[str] = (),
        config: StatsConfig | None = None,
        histograms: bool = True,
        writers: Sequence[Writer] = (),
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        self._options = dict(
            every=every, window=window, groups=tuple(groups), config=config, **monitor_options
        )
        self.histograms = histograms
        self.extra_writers = list(writers)
        self.monitor: Monitor | None = None
        #: The diagnosis' findings of the last fit (first occurrences, restored ones first).
        self.findings: list = []
        self._pending: dict[str, Any] | None = None
        # Checked now, not at setup: a bad option is an error where the callback is built.
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        writers = [LoggersWriter(trainer, histograms=self.histograms), *self.extra_writers]
        self.monitor = Monitor(pl_module, writers=writers, **self._options)
        self.monitor.pause()  # the sanity check's validation is not a training step
        if self._pending is not None:
            self.monitor.load_state_dict(self._pending)
            self.monitor.pause()
            self._pending = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self.monitor.arm(trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        m = self.monitor
        if m is None:
            return
        if trainer.global_step > m.global_step:  # the optimizer stepped (not accumulating)
            m.step()
            m.pause()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.pause()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.monitor is not None:
            self.findings = list(self.monitor.findings)
            self._pending = self.monitor.state_dict()  # a checkpoint saved after fit
            self.monitor.close()
            self.monitor = None

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.monitor is None:
            self._pending = dict(state_dict)
        else:
            self.monitor.load_state_dict(state_dict)
            self.monitor.pause()
