"""A training run's directory: config, JSONL logs, TensorBoard events and an atomic checkpoint.

Layout of ``RUN/``::

    config.json       the TrainConfig (JSON)
    metrics.jsonl     {"step", "split", "loss", "error"}          (error in %)
    stats.jsonl       DESIGN.md row schema + {"step", "source"}  (source: probe | train)
    jacobian.jsonl    {"step", "layer", "examples", "nonfinite", "mean", "std", "min", "max",
                      "median"}  (nonfinite: examples left out; figures null when none is left)
    checkpoint.pt     model (with statistics buffers), optimizer, step (also the data position:
                      the stream regenerates batch k from it), RNG states, log positions
    tb/               TensorBoard events (only when tensorboard is importable)
    figures/          PNGs written by ``fastmlp plot``

Exactly-once logging: rows are appended as they are produced; each checkpoint
records, for every JSONL file, the byte offset and line count reached when it
was taken. Resuming truncates every file back to those offsets, so rows
written after the last checkpoint (by a run that was killed, possibly half-way
through a line) disappear and are produced again by the resumed run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LOG_FILES",
    "RunDir",
    "read_jsonl",
    "load_checkpoint",
    "save_checkpoint",
]

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
STATS = "stats.jsonl"
JACOBIAN = "jacobian.jsonl"
LOG_FILES = (METRICS, STATS, JACOBIAN)


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All rows of a JSONL file (``[]`` when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically: temporary file, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous checkpoint or the new
    one, never a partial file, whenever the writer is killed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class RunDir:
    """Writer for one run directory (see the module docstring for the layout).

    Args:
        path: the run directory (created if missing).
        enabled: write anything at all; ``False`` on non-zero ranks of a
            distributed job, so only rank 0 touches the directory.
        tensorboard: write TensorBoard events under ``tb/`` when tensorboard is importable.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._files: dict[str, Any] = {}
        self._lines: dict[str, int] = {}
        self._tb_requested = tensorboard
        self.tb: Any = None
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files
    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` (atomically)."""
        if not self.enabled:
            return
        tmp = self.config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(config), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.config_path)

    def read_config(self) -> dict:
        """The run's ``config.json``."""
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory (no {CONFIG})")
        return json.loads(self.config_path.read_text())

    def open(self, positions: Mapping[str, Mapping[str, int]] | None = None, *, tb_step: int = 0):
        """Open the log files for appending.

        Args:
            positions: ``{file: {"bytes": b, "lines": n}}`` from a checkpoint; each
                file is truncated to ``b`` bytes (rows written after the checkpoint
                are dropped) and must then hold exactly ``n`` lines. ``None``: start
                empty logs (existing ones are truncated to zero).
            tb_step: first step this session will log; TensorBoard discards events
                at or after it left by an interrupted session (``purge_step``).
        """
        if not self.enabled:
            return self
        for stale in self.path.glob(f".{CHECKPOINT}.tmp.*"):  # left by a writer killed mid-save
            stale.unlink()
        for name in LOG_FILES:
            p = self.path / name
            pos = (positions or {}).get(name, {"bytes": 0, "lines": 0})
            size = p.stat().st_size if p.exists() else 0
            if size < pos["bytes"]:
                raise RuntimeError(
                    f"{p} has {size} bytes but the checkpoint recorded {pos['bytes']}; "
                    "the run directory was modified after the checkpoint"
                )
            with p.open("ab") as f:
                f.truncate(pos["bytes"])
            with p.open("rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
            if lines != pos["lines"]:
                raise RuntimeError(
                    f"{p} holds {lines} lines at the checkpoint's offset, expected {pos['lines']}"
                )
            self._files[name] = p.open("a", encoding="utf-8")
            self._lines[name] = lines
        if self._tb_requested:
            self.tb = _summary_writer(self.path / "tb", purge_step=tb_step if tb_step else None)
        return self

    def positions(self) -> dict[str, dict[str, int]]:
        """Byte offset and line count of every log file (flushed and fsynced first)."""
        out = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            out[name] = {"bytes": f.tell(), "lines": self._lines[name]}
        return out

    def _append(self, name: str, rows: Iterable[dict]) -> None:
        if not self.enabled:
            return
        f = self._files[name]
        n = 0
        for row in rows:
            f.write(json.dumps(_clean(row), separators=(",", ":")) + "\n")
            n += 1
        self._lines[name] += n

    # ------------------------------------------------------------------- rows
    def log_metrics(self, step: int, split: str, loss: float, error: float) -> None:
        """One ``metrics.jsonl`` row (``error`` in %) and its TensorBoard scalars."""
        self._append(METRICS, [{"step": step, "split": split, "loss": loss, "error": error}])
        if self.tb is not None:
            self.tb.add_scalar(f"loss/{split}", loss, step)
            self.tb.add_scalar(f"error/{split}", error, step)

    def log_stats(self, step: int, source: str, rows: list[dict]) -> None:
        """``stats.jsonl`` rows of one snapshot, with TensorBoard scalars and histograms."""
        self._append(STATS, ({"step": step, "source": source, **r} for r in rows))
        if self.tb is None:
            return
        for r in rows:
            if not r["count"]:
                continue
            tag = f"{source}/layer{r['layer']}/{r['quantity']}"
            self.tb.add_scalar(f"{tag}/mean", r["mean"], step)
            self.tb.add_scalar(f"{tag}/std", r["std"], step)
            if r.get("saturated") is not None:
                self.tb.add_scalar(f"{tag}/saturated", r["saturated"], step)
            _add_histogram(self.tb, tag, r, step)

    def log_jacobian(self, step: int, rows: list[dict]) -> None:
        """``jacobian.jsonl`` rows (one per hidden layer) and their TensorBoard scalars."""
        self._append(JACOBIAN, ({"step": step, **r} for r in rows))
        if self.tb is not None:
            for r in rows:
                if r.get("mean") is None:  # every example's Jacobian was non-finite
                    continue
                self.tb.add_scalar(f"jacobian/layer{r['layer']}/mean_sv", r["mean"], step)
                self.tb.add_scalar(f"jacobian/layer{r['layer']}/std_sv", r["std"], step)

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Flush and close every file."""
        self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _summary_writer(logdir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(logdir), purge_step=purge_step)


def _add_histogram(tb: Any, tag: str, r: dict, step: int) -> None:
    """A real TensorBoard histogram from our bin counts (under/overflow as end buckets)."""
    counts, edges = r.get("hist_counts"), r.get("hist_edges")
    if counts is None or edges is None or r["min"] is None or r["max"] is None:
        return
    limits = list(edges[1:])
    bucket_counts = list(counts)
    if r["underflow"]:
        limits.insert(0, edges[0])
        bucket_counts.insert(0, r["underflow"])
    if r["overflow"]:
        limits.append(max(r["max"], edges[-1]))
        bucket_counts.append(r["overflow"])
    n = r["count"]
    tb.add_histogram_raw(
        tag,
        min=r["min"],
        max=r["max"],
        num=n,
        sum=r["mean"] * n,
        sum_squares=(r["var"] + r["mean"] ** 2) * n,
        bucket_limits=limits,
        bucket_counts=bucket_counts,
        global_step=step,
    )
