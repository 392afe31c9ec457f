"""A training run's directory: config, JSONL logs, TensorBoard events and an atomic checkpoint.

Layout of ``RUN/``::

    config.json       the TrainConfig (JSON)
    metrics.jsonl     {"step", "split", "loss", "error"}          (error in %)
    stats.jsonl       DESIGN.md row schema + {"step", "source"}  (source: probe | train)
    jacobian.jsonl    {"step", "layer", "examples", "mean", "std", "min", "max", "median"}
    checkpoint.pt     model (with statistics buffers), optimizer, step (also the data position:
                      the stream regenerates batch k from it), RNG states, log positions
    tb/               TensorBoard events (a warning on stderr when tensorboard is not importable)
    figures/          PNGs written at the end of ``fastmlp train`` and by ``fastmlp plot``
    diagnosis.json    findings of fastmlp.diagnosis on the last probe (end of ``fastmlp train``)

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
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fastmlp.stats.snapshot import Snapshot

__all__ = [
    "LOG_FILES",
    "RunDir",
    "read_jsonl",
    "load_checkpoint",
    "load_run_snapshot",
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
        tensorboard: write TensorBoard events under ``tb/`` (when tensorboard cannot be
            imported, a line on stderr says so and no events are written).
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
            tag = f"{source}/{_layer_tag(r)}/{r['quantity']}"
            self.tb.add_scalar(f"{tag}/mean", r["mean"], step)
            self.tb.add_scalar(f"{tag}/std", r["std"], step)
            for extra in ("saturated", "absmax", "kurtosis", "zero_fraction"):
                if r.get(extra) is not None:
                    self.tb.add_scalar(f"{tag}/{extra}", r[extra], step)
            _add_histogram(self.tb, tag, r, step)

    def log_jacobian(self, step: int, rows: list[dict]) -> None:
        """``jacobian.jsonl`` rows (one per hidden layer) and their TensorBoard scalars."""
        self._append(JACOBIAN, ({"step": step, **r} for r in rows))
        if self.tb is not None:
            for r in rows:
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
    """A SummaryWriter, or ``None`` with one line on stderr saying why when tensorboard cannot
    be imported (it is a dependency of fastmlp, but an environment may lack it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        print(
            f"fastmlp: no TensorBoard events in {logdir}: {e} "
            "(pip install tensorboard, or --no-tensorboard to silence this)",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(log_dir=str(logdir), purge_step=purge_step)


def _layer_tag(row: dict) -> str:
    """TensorBoard tag of a row's layer: ``layerN`` for the paper's MLP (paths ``layers.i``)
    and rows without a path, else the module path (``mlp.c_fc``)."""
    name = row.get("name")
    if not name or name.startswith("layers."):
        return f"layer{row['layer']}"
    return str(name)


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


def load_run_snapshot(
    run_dir: str | os.PathLike, step: int | None = None, source: str = "probe"
) -> tuple[int, Snapshot]:
    """The snapshot logged in ``run_dir/stats.jsonl`` at ``step`` (default: the latest).

    Returns ``(step, snapshot)``. Rows with another ``source`` (``probe`` or
    ``train``) are ignored. A last line cut short (a run being written, or
    killed mid-line) is skipped; any other unreadable line is an error.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory or has no ``stats.jsonl``.
        ValueError: a line is not JSON, there is no ``source`` snapshot, or
            ``step`` was not logged (the message lists the steps that were).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a directory")
    path = run / STATS
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no {STATS})")
    by_step: dict[int, list[dict]] = {}
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines) and not line.endswith("\n"):
                break  # a row still being written
            raise ValueError(f"{path}:{n} is not a JSON row") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n} is not a statistics row (no step)")
        if row.get("source", "probe") == source:
            by_step.setdefault(int(row["step"]), []).append(row)
    if not by_step:
        raise ValueError(f"{path} holds no {source} statistics yet")
    if step is None:
        step = max(by_step)
    elif step not in by_step:
        steps = sorted(by_step)
        shown = (
            ", ".join(map(str, steps))
            if len(steps) <= 12
            else (f"{', '.join(map(str, steps[:5]))}, ..., {', '.join(map(str, steps[-5:]))}")
        )
        raise ValueError(f"no {source} statistics at step {step} in {path}; steps: {shown}")
    return step, Snapshot.from_rows(by_step[step])
