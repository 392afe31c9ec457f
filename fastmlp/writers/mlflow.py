"""MLflow: scalars through batched ``log_batch`` calls with names within MLflow's rules,
and histograms as one JSON artifact per step (MLflow has no histogram type)."""

from __future__ import annotations

import posixpath
import re
import time
from typing import Any

from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import histograms, json_safe, scalars

__all__ = ["MLflow", "mlflow_name"]

# What MLflow accepts in a metric name (alphanumerics, _ - . space : /), its length
# limit, and the most metrics one batch takes.
_BAD = re.compile(r"[^\w\-. :/]", re.ASCII)
_MAX_KEY = 250
_MAX_BATCH = 1000


def mlflow_name(name: str) -> str:
    """``name`` within MLflow's metric-name rules: other characters become ``_``, the
    path is normalized (no ``//``, ``.``, ``..`` segments) and cut at 250 characters."""
    name = _BAD.sub("_", name)
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in name.split("/") if p]
    name = posixpath.normpath("/".join(parts) or "_")
    return name[:_MAX_KEY].rstrip("/")


class MLflow:
    """Write snapshots to an MLflow run.

    Scalars go in batches of at most 1000 metrics, at ``step``; histograms (when on) as
    the artifact ``<artifact_dir>/step_<step>.json``: per tag its ``edges``, ``counts``,
    ``underflow``, ``overflow``, ``min``, ``max`` and ``count``.

    Args:
        run_id: the run (default: ``mlflow.active_run()``, looked up at each write).
        histograms: also write the histograms.
        artifact_dir: the histograms' artifact folder.
    """

    def __init__(
        self, run_id: str | None = None, *, histograms: bool = True, artifact_dir: str = "fastmlp"
    ) -> None:
        self._run_id = run_id
        self.histograms = histograms
        self.artifact_dir = artifact_dir

    @staticmethod
    def _mlflow() -> Any:
        try:
            import mlflow
        except ImportError as e:
            raise ImportError(
                f"fastmlp.writers.MLflow needs mlflow ({e}): pip install 'fastmlp[mlflow]'"
            ) from None
        return mlflow

    @property
    def run_id(self) -> str:
        """The run written to; ``RuntimeError`` when none is given and none is active."""
        if self._run_id is not None:
            return self._run_id
        run = self._mlflow().active_run()
        if run is None:
            raise RuntimeError(
                "fastmlp.writers.MLflow: no active MLflow run; call mlflow.start_run() first "
                "or pass run_id="
            )
        return run.info.run_id

    def write(self, step: int, snapshot: Snapshot) -> None:
        mlflow = self._mlflow()
        from mlflow.entities import Metric

        run_id = self.run_id  # (first: without a run, no tracking store is opened)
        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), v, now, step) for k, v in scalars(snapshot).items()]
        for i in range(0, len(metrics), _MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_BATCH])
        if self.histograms:
            hists = {
                tag: {
                    "edges": row["hist_edges"],
                    "counts": row["hist_counts"],
                    "underflow": row["underflow"],
                    "overflow": row["overflow"],
                    "min": row["min"],
                    "max": row["max"],
                    "count": row["count"],
                }
                for tag, row in histograms(snapshot)
            }
            if hists:
                path = f"{self.artifact_dir}/step_{step:08d}.json"
                client.log_dict(run_id, json_safe({"step": step, "histograms": hists}), path)

    def close(self) -> None:
        """Nothing to release: the run belongs to whoever started it."""
