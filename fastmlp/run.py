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
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fastmlp.errors import UsageError
from fastmlp.stats.snapshot import ROW_FIELDS, Snapshot
from fastmlp.writers.base import json_safe
from fastmlp.writers.tensorboard import add_histogram

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
    "RunWriter",
    "check_new",
    "hold",
    "read_jsonl",
    "read_log",
    "row_problem",
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a JSONL file (``[]`` when it does not exist).

    A last line without its newline is a row still being written (or cut short by a
    killed writer, and dropped on resume): it is left out. Any other line that is not
    JSON raises ``ValueError`` naming the file and line.
    """
    return [row for _, row in _numbered_rows(Path(path))]


def _numbered_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed row)`` of every complete, non-blank line of ``path``."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for k, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if not line.strip():
                continue
            try:
                yield k, json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path} line {k} is not a JSON row ({e})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_is_number(x) for x in v)


# What each field of a log row holds: (test, what was expected). Fields a row lacks are
# not checked here (the readers say what they need).
_INT = (_is_int, "an integer")
_INT_OR_NULL = (lambda v: v is None or _is_int(v), "an integer or null")
_NUMBER_OR_NULL = (lambda v: v is None or _is_number(v), "a number or null")
_TEXT = (lambda v: isinstance(v, str), "a string")
_TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
_NUMBERS_OR_NULL = (lambda v: v is None or _numbers(v), "a list of numbers or null")
# Row fields of stats.jsonl that are not figures (checked each as itself above).
_STATS_NOT_FIGURES = frozenset(
    {"layer", "name", "quantity", "count", "nonfinite", "underflow", "overflow", "hist_edges",
     "hist_counts", "formats"}
)  # fmt: skip
_SCHEMAS: dict[str, dict[str, tuple]] = {
    METRICS: {"step": _INT, "split": _TEXT, "loss": _NUMBER_OR_NULL, "error": _NUMBER_OR_NULL},
    STATS: {
        "step": _INT,
        "source": _TEXT,
        "layer": _INT,
        "name": _TEXT_OR_NULL,
        "quantity": _TEXT,
        "count": _INT,
        "nonfinite": _INT_OR_NULL,
        "underflow": _INT_OR_NULL,
        "overflow": _INT_OR_NULL,
        "hist_edges": _NUMBERS_OR_NULL,
        "hist_counts": _NUMBERS_OR_NULL,
        "formats": (lambda v: v is None or isinstance(v, dict), "an object or null"),
        # every other field of the snapshot's rows is a figure: a number or null
        **{k: _NUMBER_OR_NULL for k in ROW_FIELDS if k not in _STATS_NOT_FIGURES},
    },
    JACOBIAN: {
        "step": _INT,
        "layer": _INT,
        "examples": _INT,
        "nonfinite": _INT,
        **{k: _NUMBER_OR_NULL for k in ("mean", "std", "min", "max", "median")},
    },
}


def row_problem(name: str, row: Any) -> str | None:
    """What is wrong with ``row`` as a row of the log file ``name`` (``None``: nothing)."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, expected a JSON object"
    for field, (ok, expected) in _SCHEMAS.get(name, {}).items():
        if field in row and not ok(row[field]):
            return f"has {field} = {json.dumps(row[field])[:40]}, expected {expected}"
    if "step" in _SCHEMAS.get(name, {}) and "step" not in row:
        return "has no step"
    return None


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's log file (``metrics.jsonl``, ``stats.jsonl``, ``jacobian.jsonl``;
    ``[]`` when it does not exist), each checked against the file's row schema.

    Raises:
        UsageError: a line that is not JSON, or a row whose field holds the wrong type (the
            message names the file, the line, the field and what was expected).
    """
    path = Path(path)
    rows = []
    for k, row in _numbered_rows(path):
        problem = row_problem(path.name, row)
        if problem is not None:
            raise UsageError(f"{path} line {k} {problem}")
        rows.append(row)
    return rows


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` atomically: temporary file, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous checkpoint or the new
    one, never a partial file, whenever the writer is killed. Ctrl-C (or SIGTERM) during
    the write lets it finish and is raised after it.

    Raises:
        OSError: the file could not be written (a full disk, ...): its message names the
            checkpoint and the reason; the previous checkpoint is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with _interrupt_after():
        try:
            with tmp.open("wb") as f:
                writer = _RecordingWriter(f)
                try:
                    torch.save(state, writer)
                except RuntimeError:
                    # torch's C++ writer turns the OSError of a failed write into "unexpected
                    # pos": report the write's own error instead.
                    if writer.error is None:
                        raise
                    raise writer.error from None
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if e.errno is None or isinstance(e, BlockingIOError):
                raise
            raise OSError(
                e.errno, f"cannot write the checkpoint ({e.strerror or e})", str(path)
            ) from e
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)


class _RecordingWriter:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then raise what came.

    ``torch.save`` writes through a C++ writer that turns an exception raised in its
    Python write call into an unrelated ``RuntimeError`` ("unexpected pos"), so an
    interrupt in the middle of a write would read as a failure. Only in the main thread,
    for the signals whose handler raises (Python's SIGINT handler, the command line's
    SIGTERM handler); elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler) and (
            handler is signal.default_int_handler or getattr(handler, "raises", False)
        ):
            held[sig] = handler
    received: list[int] = []
    for sig in held:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    if received:
        held[received[0]](received[0], None)  # raises as the signal would have


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
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        text = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
        first = " ".join(text.split(".")[0].split())[:120]
        if isinstance(e, KeyError | IndexError) or not first:
            first = f"unreadable pickle data: {type(e).__name__} {first}".strip()
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupted and cannot be resumed from "
            f"({first}); expected a checkpoint.pt written by fastmlp train"
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


def _lock(path: Path, new: bool = False) -> int | None:
    """An open descriptor of ``path/.lock`` holding its exclusive ``flock`` (``None`` where the
    file system has no locks). Raises :class:`RunDirBusy` naming the process that holds it
    (``new``: the advice is for a new run, which must go elsewhere)."""
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
            if new:
                raise RunDirBusy(
                    f"{path} is in use by {who}, which is training a run there: choose "
                    "another --out for a new run (or wait for it to end)"
                ) from None
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
        fd = _lock(path, new)
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


def check_new(path: str | os.PathLike) -> None:
    """Refuse, as :func:`hold` would for a new run, without creating anything: ``path`` in use
    by another process (:class:`RunDirBusy`) or already holding a run (``FileExistsError``)."""
    path = Path(path)
    if fcntl is not None and (path / LOCK).is_file():
        try:
            fd = _lock(path, new=True)
        except RunDirBusy:
            raise
        except OSError:
            fd = None  # cannot be locked here: the ranks will say why
        if fd is not None:
            os.close(fd)
    if (path / CONFIG).exists():
        raise FileExistsError(
            f"{path} already holds a run; continue it with --resume {path} or choose another --out"
        )
    if path.is_dir():
        _refuse_foreign_logs(path)


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
        self._hashes: dict[str, Any] = {}  # SHA-256 of each file's bytes, kept as rows go
        self._verified: tuple[Any, list] | None = None  # the last verify(): (its inputs, plan)
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
        tmp.write_text(json.dumps(json_safe(config), indent=2, sort_keys=True) + "\n")
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

    def check_paths(self, *, figures: bool) -> None:
        """Refuse, before anything is written, a ``tb`` or ``figures`` path that is not a
        directory (the run would fail on it only at its end)."""
        wanted = (
            ("tb", self._tb_requested, "--no-tensorboard"),
            ("figures", figures, "--no-figures"),
        )
        for name, on, flag in wanted:
            p = self.path / name
            if on and p.exists() and not p.is_dir():
                raise UsageError(
                    f"{p} is a file, expected a directory (the run writes there): move it "
                    f"away, or train with {flag}"
                )

    def verify(
        self, positions: Mapping[str, Mapping[str, Any]] | None, step: int | None = None
    ) -> list[tuple[str, Path, dict, int, int, Any]]:
        """Check every log file against a checkpoint's ``positions`` (taken at ``step``),
        changing nothing; raises :class:`RunDirModified` naming the file and line.

        Up to the recorded offset each file must hold exactly the recorded lines, each a
        row of the file's schema at a step no later than ``step``, ending on a line
        boundary, and (checkpoints that record it) the same bytes (SHA-256) as when the
        checkpoint was taken. Returns what :meth:`open` needs.
        """
        plan = []
        sizes = [
            (self.path / n).stat().st_size if (self.path / n).exists() else 0 for n in LOG_FILES
        ]
        key = (json.dumps(positions, sort_keys=True, default=str), step, sizes)
        if self._verified is not None and self._verified[0] == key:
            return self._verified[1]  # checked just before (by check_resume), unchanged since
        for name in LOG_FILES:
            p = self.path / name
            pos = dict((positions or {}).get(name, {"bytes": 0, "lines": 0}))
            if step is not None and pos.get("step", step) != step:
                raise RunDirModified(
                    f"{self.path / CHECKPOINT} holds step {step}, but its log positions were "
                    f"taken at step {pos['step']}: the checkpoint was edited; restore it to "
                    "resume, or start a new run with another --out"
                )
            size = p.stat().st_size if p.exists() else 0
            if size < pos["bytes"]:
                raise RunDirModified(
                    f"{p} has {size} bytes but the checkpoint recorded {pos['bytes']}: rows "
                    "were removed after the checkpoint was taken; restore the file to resume, "
                    "or start a new run with another --out"
                )
            digest, dropped = _check_prefix(p, pos, step) if size else (hashlib.sha256(), 0)
            plan.append((name, p, pos, size, dropped, digest))
        self._verified = (key, plan)
        return plan

    def open(
        self,
        positions: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        tb_step: int = 0,
        step: int | None = None,
    ):
        """Open the log files for appending.

        Args:
            positions: ``{file: {"bytes": b, "lines": n, "sha256": h}}`` from a checkpoint;
                each file is checked (:meth:`verify`) and then truncated to ``b`` bytes (rows
                written after the checkpoint are dropped). ``None``: start empty logs; logs
                that already hold rows are refused (``FileExistsError``) unless
                :meth:`check_restart` allowed starting over.
            tb_step: first step this session will log; TensorBoard discards events
                at or after it left by an interrupted session (``purge_step``).
            step: the checkpoint's step: no row before its offsets may be later.
        """
        if not self.enabled:
            return self
        if positions is None and not self._restarting:  # a new run: never over others' rows
            _refuse_foreign_logs(self.path)
        # Check every file against the checkpoint before changing any.
        plan = self.verify(positions, step)
        for stale in self.path.glob(f".{CHECKPOINT}.tmp.*"):  # left by a writer killed mid-save
            stale.unlink()
        for _name, p, pos, size, dropped, _digest in plan:
            if positions is not None and size > pos["bytes"]:
                print(
                    f"fastmlp: note: {p}: dropping {dropped} row(s) ({size - pos['bytes']} bytes) "
                    "written after the last checkpoint; they are written again",
                    file=sys.stderr,
                )
        for name, p, pos, _size, _dropped, digest in plan:
            with p.open("ab") as f:
                f.truncate(pos["bytes"])
            self._files[name] = p.open("ab")
            self._lines[name] = pos["lines"]
            self._hashes[name] = digest
        if self._tb_requested:
            self.tb = _summary_writer(self.path / "tb", purge_step=tb_step if tb_step else None)
        return self

    def positions(self, step: int | None = None) -> dict[str, dict[str, Any]]:
        """Byte offset, line count and SHA-256 of every log file (flushed and fsynced first),
        and ``step``, the checkpoint's step they go with (checked on resume)."""
        out = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            out[name] = {
                "bytes": f.tell(),
                "lines": self._lines[name],
                "sha256": self._hashes[name].hexdigest(),
            }
            if step is not None:
                out[name]["step"] = step
        return out

    def _append(self, name: str, rows: Iterable[dict]) -> None:
        if not self.enabled:
            return
        f, digest = self._files[name], self._hashes[name]
        n = 0
        for row in rows:
            line = (json.dumps(json_safe(row), separators=(",", ":")) + "\n").encode()
            f.write(line)
            digest.update(line)
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
            if r.get("hist_counts") is not None and r.get("hist_edges") is not None:
                if r["min"] is not None and r["max"] is not None:
                    add_histogram(self.tb, tag, r, step)

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


class RunWriter:
    """A :class:`fastmlp.writers.Writer` into a run directory: each snapshot a
    :class:`fastmlp.Monitor` logs becomes ``stats.jsonl`` rows of ``source`` (and their
    TensorBoard scalars and histograms), covered like every other row by the checkpoint's
    log positions and their verification on resume.

    Args:
        run: the run directory (its owner opens and closes it).
        source: the rows' ``source`` (``"train"``: statistics of training steps).
    """

    def __init__(self, run: RunDir, *, source: str = "train") -> None:
        self.run, self.source = run, source

    def write(self, step: int, snapshot: Snapshot) -> None:
        self.run.log_stats(step, self.source, snapshot.rows())

    def close(self) -> None:
        """Flush the rows written (the run directory stays open: its owner closes it)."""
        self.run.flush()


def _check_prefix(path: Path, pos: Mapping[str, Any], step: int | None) -> tuple[Any, int]:
    """Verify ``path`` up to the checkpoint's offset (see :meth:`RunDir.verify`); returns the
    SHA-256 object of those bytes and the number of lines after them."""
    offset, lines = pos["bytes"], pos["lines"]
    digest = hashlib.sha256()
    restore = "restore the file (or the checkpoint) to resume, or start a new run (another --out)"
    k = 0
    with path.open("rb") as f:
        while f.tell() < offset:
            line = f.readline()
            k += 1
            before = f.tell() - len(line)
            whole = line.endswith(b"\n")
            part = line[: offset - before]
            digest.update(part)
            try:
                row = json.loads(line) if whole else None
            except ValueError:
                raise RunDirModified(
                    f"{path} line {k} is not a JSON row ({line[:40]!r}): the file was edited "
                    f"after the checkpoint was taken; {restore}"
                ) from None
            problem = row_problem(path.name, row) if whole else None
            if problem is not None:
                raise RunDirModified(f"{path} line {k} {problem}: {restore}")
            if len(part) < len(line) or not whole:
                raise RunDirModified(
                    f"{path}: the checkpoint's offset (byte {offset}) falls inside line {k}: "
                    f"the file was edited after the checkpoint was taken; {restore}"
                )
            if step is not None and row.get("step", 0) > step:
                raise RunDirModified(
                    f"{path} line {k} holds step {row['step']}, past the checkpoint's step "
                    f"{step}: the checkpoint or the file was edited (resuming would log those "
                    f"steps twice); {restore}"
                )
    if k != lines:
        raise RunDirModified(
            f"{path} holds {k} lines up to the checkpoint's offset, expected {lines}: the "
            f"file was edited after the checkpoint was taken; {restore}"
        )
    recorded = pos.get("sha256")
    if recorded is not None and digest.hexdigest() != recorded:
        raise RunDirModified(
            f"{path}: the first {lines} lines differ from those the checkpoint recorded "
            f"(SHA-256): rows were edited after the checkpoint was taken; {restore}"
        )
    return digest, _count_lines(path, offset)[1]


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
    for row in read_log(path):  # each row checked: a wrong type names its line and field
        missing = [k for k in ("step", "layer", "quantity", "count") if k not in row]
        if missing:
            raise ValueError(f"{path}: a row has no {', '.join(missing)}: {row!r:.80}")
        if row.get("source", "probe") == source:
            by_step.setdefault(row["step"], []).append(row)
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
