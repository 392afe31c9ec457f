"""A training run's directory: config, JSONL logs, TensorBoard events and an atomic checkpoint.

Layout of ``RUN/``::

    config.json       the TrainConfig (JSON)
    metrics.jsonl     {"step", "split", "loss", "error"}          (error in %)
    stats.jsonl       Snapshot.rows() (ROW_FIELDS) + {"step", "source"}  (source: probe | train)
    jacobian.jsonl    {"step", "layer", "examples", "nonfinite", "mean", "std", "min", "max",
                      "median"}  (nonfinite: examples left out; figures null when none is left)
    checkpoint.pt     model (with statistics buffers), optimizer, step (also the data position:
                      the stream regenerates batch k from it), RNG states, log positions
    .lock             held (``flock``) by the one process writing the run; see :func:`hold`
    tb/               TensorBoard events (a warning on stderr when tensorboard is not importable)
    figures/          PNGs written at the end of ``fastmlp train`` and by ``fastmlp plot``
    diagnosis.json    findings (fastmlp.stats.diagnosis) on the last probe, end of ``fastmlp train``

Exactly-once logging: rows are appended as they are produced; each checkpoint
records, for every JSONL file, the byte offset and line count reached when it
was taken. Resuming truncates every file back to those offsets, so rows
written after the last checkpoint (by a run that was killed, possibly half-way
through a line) disappear and are produced again by the resumed run; a note on
stderr says how many.

One writer: :func:`hold` takes an exclusive ``flock`` on ``RUN/.lock`` for the
whole run (the operating system releases it when the process ends, however it
ends); a second process on the same directory is refused with
:class:`RunDirBusy`. A run with no checkpoint is started over only while its logs
hold nothing past step 0 (:meth:`RunDir.check_restart`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fastmlp.errors import UsageError
from fastmlp.stats.snapshot import Snapshot

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOG_FILES",
    "CheckpointError",
    "RunDir",
    "RunDirBusy",
    "RunDirModified",
    "hold",
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
LOCK = ".lock"


class RunDirBusy(UsageError):
    """Another process is writing this run directory."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be read (empty, truncated, corrupted, not ours)."""


class RunDirModified(UsageError, RuntimeError):
    """A run directory whose logs no longer match its checkpoint (edited or truncated)."""


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
    """All complete rows of a JSONL file (``[]`` when it does not exist).

    A last line without its newline is a row still being written (or cut short by a
    killed writer, and dropped on resume): it is left out. Any other line that is not
    JSON raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open("rb") as f:
        for k, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UsageError(f"{path} line {k} is not a JSON row ({e})") from None
    return rows


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically: temporary file, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous checkpoint or the new
    one, never a partial file, whenever the writer is killed. Ctrl-C during the write
    lets it finish and is raised (``KeyboardInterrupt``) after it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with _interrupt_after():
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


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise ``KeyboardInterrupt``.

    ``torch.save`` writes through a C++ writer that turns an exception raised in its
    Python write call into an unrelated ``RuntimeError`` ("unexpected pos"), so an
    interrupt in the middle of a write would read as a failure. Only in the main thread
    with Python's own SIGINT handler installed; elsewhere the block runs as is.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated or corrupted, or holds anything
            but tensors, numbers, strings and containers of them (nothing in it is run).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): it cannot be resumed from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        first = " ".join(str(e).split(".")[0].split()) or type(e).__name__
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupted and cannot be resumed from ({first})"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a fastmlp checkpoint (it holds {type(state)})")
    return state


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


def _refuse_foreign_logs(path: Path) -> None:
    """Raise ``FileExistsError`` if ``path`` holds non-empty logs (a new run would erase them)."""
    found = [n for n in LOG_FILES if (path / n).is_file() and (path / n).stat().st_size]
    if found:
        raise FileExistsError(
            f"{path} already holds {', '.join(found)} (rows of another run, no {CONFIG}): "
            "refusing to overwrite them; choose another --out or move them away"
        )


def _pid_in(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _lock(path: Path) -> int | None:
    """An open descriptor of ``path/.lock`` holding its exclusive ``flock`` (``None`` where the
    file system has no locks). Raises :class:`RunDirBusy` when another process holds it."""
    lock = path / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            for _ in range(20):  # the holder writes its pid just after taking the lock
                if pid:
                    break
                time.sleep(0.01)
                pid = _pid_in(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another process"
            raise RunDirBusy(
                f"{path} is in use by {who}: one process writes a run directory at a time; "
                f"wait for it to end (or stop it), then continue with --resume {path}"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                print(f"fastmlp: note: {path} cannot be locked ({e.strerror})", file=sys.stderr)
                return None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the file was replaced while we waited for it: lock the new one


@contextlib.contextmanager
def hold(path: str | os.PathLike, *, new: bool, enabled: bool = True) -> Iterator[Path]:
    """Own the run directory ``path`` while the block runs: one writer at a time.

    An exclusive ``flock`` on ``path/.lock`` is taken (not waited for) and held until
    the block ends; the operating system drops it when the process dies, so a killed
    run never leaves its directory locked.

    Args:
        path: the run directory.
        new: a new run: ``path`` is created if missing and, once locked, must not hold
            a run already (``config.json``). Otherwise (resume) ``path`` must be a run
            directory.
        enabled: take the lock at all; ``False`` on the ranks of a distributed job
            that do not write the directory (only rank 0 locks it).

    Raises:
        RunDirBusy: another process holds the directory.
        FileExistsError: ``new`` and ``path`` already holds a run.
        FileNotFoundError: not ``new`` and ``path`` is not a run directory.
    """
    path = Path(path)
    if not enabled or fcntl is None:
        yield path
        return
    if not new and not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no {CONFIG})")
    created = [d for d in (path, *path.parents) if not d.exists()] if new else []
    try:
        if new:
            path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path)
    except OSError as e:
        if isinstance(e, BlockingIOError) or e.errno is None:
            raise
        what = "create" if new else "lock"
        raise OSError(e.errno, f"cannot {what} the run directory ({e.strerror})", str(path)) from e
    ok = False
    try:
        if new and (path / CONFIG).exists():
            raise FileExistsError(
                f"{path} already holds a run; continue it with --resume {path} "
                "or choose another --out"
            )
        if new:
            _refuse_foreign_logs(path)
        yield path
        ok = True
    finally:
        if created and not ok and fd is not None:
            with contextlib.suppress(OSError):  # failed before writing anything: leave no trace
                if [p.name for p in path.iterdir()] == [LOCK]:
                    (path / LOCK).unlink()
                    for d in created:  # this directory, then the parents made for it
                        d.rmdir()
        if fd is not None:
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
        self._restarting = False  # check_restart() allowed starting over from step 0
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
        try:
            config = json.loads(self.config_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{self.config_path} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UsageError(
                f"{self.config_path} must hold a JSON object of TrainConfig fields, "
                f"not {type(config).__name__}"
            )
        return config

    def check_restart(self) -> None:
        """Allow a run without a checkpoint to start over from step 0, or refuse.

        A run killed during its step-0 monitoring has no checkpoint yet; its logs
        hold at most step-0 rows, which the new start produces again. Logs that go
        past step 0 mean the checkpoint was lost: retraining would replace them, so
        this raises :class:`CheckpointError` saying so.
        """
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory (no {CONFIG})")
        last, rows = 0, 0
        for name in LOG_FILES:
            p = self.path / name
            if not p.exists():
                continue
            for line in p.read_bytes().splitlines():
                try:
                    step = json.loads(line).get("step", 0)
                except (ValueError, AttributeError):
                    continue  # a half-written last line
                rows += 1
                last = max(last, step if isinstance(step, int) else 0)
        if last > 0:
            raise CheckpointError(
                f"{self.checkpoint_path} is missing but the logs of {self.path} reach step "
                f"{last}: refusing to train again from step 0 over them; put the checkpoint "
                "back, or start a new run with another --out"
            )
        self._restarting = True
        if self.enabled and rows:
            print(
                f"fastmlp: note: {self.path} stopped before its first checkpoint: starting it "
                f"over from step 0 (its {rows} step-0 rows are written again)",
                file=sys.stderr,
            )

    def open(self, positions: Mapping[str, Mapping[str, int]] | None = None, *, tb_step: int = 0):
        """Open the log files for appending.

        Args:
            positions: ``{file: {"bytes": b, "lines": n}}`` from a checkpoint; each
                file is truncated to ``b`` bytes (rows written after the checkpoint
                are dropped) and must then hold exactly ``n`` lines. ``None``: start
                empty logs; logs that already hold rows are refused
                (``FileExistsError``) unless :meth:`check_restart` allowed starting over.
            tb_step: first step this session will log; TensorBoard discards events
                at or after it left by an interrupted session (``purge_step``).
        """
        if not self.enabled:
            return self
        for stale in self.path.glob(f".{CHECKPOINT}.tmp.*"):  # left by a writer killed mid-save
            stale.unlink()
        if positions is None and not self._restarting:  # a new run: never over others' rows
            _refuse_foreign_logs(self.path)
        # Check every file against the checkpoint before changing any.
        plan = []
        for name in LOG_FILES:
            p = self.path / name
            pos = (positions or {}).get(name, {"bytes": 0, "lines": 0})
            size = p.stat().st_size if p.exists() else 0
            if size < pos["bytes"]:
                raise RunDirModified(
                    f"{p} has {size} bytes but the checkpoint recorded {pos['bytes']}: rows "
                    "were removed after the checkpoint was taken; restore the file to resume, "
                    "or start a new run with another --out"
                )
            kept, dropped = _count_lines(p, pos["bytes"]) if size else (0, 0)
            if kept != pos["lines"]:
                raise RunDirModified(
                    f"{p} holds {kept} lines up to the checkpoint's offset, expected "
                    f"{pos['lines']}: the file was edited after the checkpoint; restore it to "
                    "resume, or start a new run with another --out"
                )
            plan.append((name, p, pos, size, dropped))
        for name, p, pos, size, dropped in plan:
            if positions is not None and size > pos["bytes"]:
                print(
                    f"fastmlp: note: {p}: dropping {dropped} row(s) ({size - pos['bytes']} bytes) "
                    "written after the last checkpoint; they are written again",
                    file=sys.stderr,
                )
            with p.open("ab") as f:
                f.truncate(pos["bytes"])
            self._files[name] = p.open("a", encoding="utf-8")
            self._lines[name] = pos["lines"]
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


def _count_lines(path: Path, offset: int) -> tuple[int, int]:
    """Newlines in ``path`` before byte ``offset`` and from it on."""
    before = after = 0
    with path.open("rb") as f:
        pos = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            cut = min(max(offset - pos, 0), len(chunk))
            before += chunk.count(b"\n", 0, cut)
            after += chunk.count(b"\n", cut)
            pos += len(chunk)
    return before, after


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
