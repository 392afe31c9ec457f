"""Hugging Face Trainer: :class:`StatsCallback`, a ``TrainerCallback`` that records the
model's statistics on a cadence and logs them to the backends of ``args.report_to``.

::

    callback = StatsCallback(every=50)
    trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[callback])

At train begin it instruments ``kwargs["model"]`` where it holds no instrumented layer yet
(:class:`fastmlp.Monitor` does the recording). Optimizer steps ``0, every, 2 every, ...``
(``state.global_step`` when the step begins) are recorded and logged at that step, from the
main process only (the snapshot is merged across processes first), to each backend
``report_to`` enables:

- ``tensorboard``: the Trainer's own ``TensorBoardCallback`` writer (its event files),
  scalars and histograms;
- ``wandb``: the active run, scalars and histograms, against ``train/global_step`` (the
  step metric HF's ``WandbCallback`` defines);
- ``mlflow``: the active run, scalars, and histograms as JSON artifacts.

Other backends get nothing from it. Steps in between and evaluation passes run with
statistics off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as e:  # (the same error, saying which extra installs it)
    raise ModuleNotFoundError(
        f"fastmlp.integrations.transformers needs transformers ({e}): "
        f"pip install 'fastmlp[transformers]'",
        name=e.name,
    ) from e

from fastmlp.monitor import Monitor
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import Writer
from fastmlp.writers.mlflow import MLflow
from fastmlp.writers.tensorboard import TensorBoard
from fastmlp.writers.wandb import Wandb

__all__ = ["StatsCallback"]

#: The ``report_to`` backends StatsCallback writes to.
BACKENDS = ("tensorboard", "wandb", "mlflow")


def _callback_handler() -> Any:
    """The Trainer's ``CallbackHandler`` that is calling this callback (found up the stack:
    callbacks are not handed the Trainer), or ``None``."""
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, CallbackHandler):
            return obj
        frame = frame.f_back
    return None


class _TrainerTensorBoard:
    """Writes through the Trainer's ``TensorBoardCallback`` writer, found at the first write
    (it opens it at train begin); without one, into ``TENSORBOARD_LOGGING_DIR`` or
    ``<output_dir>/runs``."""

    def __init__(self, handler: Any, args: TrainingArguments, histograms: bool) -> None:
        self._handler, self._args, self._histograms = handler, args, histograms
        self._writer: TensorBoard | None = None

    def _resolve(self) -> TensorBoard:
        if self._writer is None:
            from transformers.integrations import TensorBoardCallback

            callbacks = getattr(self._handler, "callbacks", [])
            tbs = [c for c in callbacks if isinstance(c, TensorBoardCallback)]
            sw = next((c.tb_writer for c in tbs if c.tb_writer is not None), None)
            if sw is None:
                where = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                    self._args.output_dir, "runs"
                )
                self._writer = TensorBoard(where, histograms=self._histograms)
            else:
                self._writer = TensorBoard(sw, histograms=self._histograms)
        return self._writer

    def write(self, step: int, snapshot: Snapshot) -> None:
        self._resolve().write(step, snapshot)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _report_to(args: TrainingArguments) -> list[str]:
    report = args.report_to
    if report is None or report == "none":
        return []
    if isinstance(report, str):
        report = [report]
    if "all" in report:
        from transformers.integrations import get_available_reporting_integrations

        report = get_available_reporting_integrations()
    return [r for r in report if r in BACKENDS]


class StatsCallback(TrainerCallback):
    """Record and log the model's statistics every ``every`` optimizer steps.

    Args:
        every: record and log every ``every`` steps.
        window: consecutive steps recorded per log.
        groups: opt-in statistic groups (``zeros``, ``moments4``, ``per_unit``,
            ``exponents``).
        config: what the layers record (:class:`~fastmlp.StatsConfig`).
        histograms: also log histograms.
        writers: more writers besides the ``report_to`` backends (main process only).
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
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self._options = dict(
            every=every, window=window, groups=tuple(groups), config=config, **monitor_options
        )
        self.histograms = histograms
        self.extra_writers = list(writers)
        self.monitor: Monitor | None = None

    def _writers(self, args: TrainingArguments, main: bool) -> list[Writer]:
        if not main:
            return []
        out: list[Writer] = []
        for backend in _report_to(args):
            if backend == "tensorboard":
                out.append(_TrainerTensorBoard(_callback_handler(), args, self.histograms))
            elif backend == "wandb":
                out.append(Wandb(histograms=self.histograms, step_metric="train/global_step"))
            elif backend == "mlflow":
                out.append(MLflow(histograms=self.histograms))
        return out + self.extra_writers

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("StatsCallback needs the Trainer's model (kwargs['model'])")
        if self.monitor is not None:
            self.monitor.close()
        writers = self._writers(args, state.is_world_process_zero)
        self.monitor = Monitor(model, writers=writers, **self._options)
        self.monitor.pause()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.arm(state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        m = self.monitor
        if m is not None and state.global_step > m.global_step:
            m.step()
            m.pause()  # evaluation and saving may follow: not a training step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
