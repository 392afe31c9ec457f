"""Multi-process training on ``torch.distributed``: set-up, DDP, launching, and exact statistics.

fastmlp runs on PyTorch's own distributed engine: processes are started by
torchrun's elastic agent (:func:`launch`, or ``torchrun ... -m fastmlp train``
across nodes), they join one process group (:func:`setup`: NCCL on GPUs, gloo
on CPUs), and the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap_model`).

Statistics stay rank-local during training; a snapshot combines every rank's exactly with
one collective (:mod:`fastmlp.stats.ranks`, which :meth:`fastmlp.ModelStats.snapshot` calls
when a process group with more than one rank is initialized: every rank must then call it;
``snapshot(local=True)`` reads this rank's statistics alone). :func:`consolidate_stats`
moves them into one rank's buffers before a checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import math
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from fastmlp.model_stats import ModelStats
from fastmlp.stats import ranks
from fastmlp.stats.algebra import LayerBuffers, merge_buffers
from fastmlp.stats.algebra import regroup_bins_host as regroup_bins
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.ranks import is_distributed, rank_world
from fastmlp.stats.snapshot import Snapshot

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "LayerBuffers",
    "all_reduce_sum_",
    "barrier",
    "cleanup",
    "consolidate_stats",
    "is_distributed",
    "describe_failure",
    "exit_rank",
    "launch",
    "launched",
    "merge_buffers",
    "rank_world",
    "regroup_bins",
    "run_recorded",
    "setup",
    "snapshot",
    "unwrap",
    "wrap_model",
]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective may wait for a peer before it fails (``FASTMLP_DIST_TIMEOUT``)."""


# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    """``"nccl"``, ``"gloo"``, or ``None`` when no process group was created (one process)."""
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise RuntimeError(
                f"environment variable {name} is not set: start the processes with "
                "torchrun (or `fastmlp train --nproc N`), which sets RANK, WORLD_SIZE, "
                "LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={text!r} is not an integer") from None


def _timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout is None:
        text = os.environ.get("FASTMLP_DIST_TIMEOUT")
        try:
            timeout = float(text) if text is not None else DEFAULT_TIMEOUT_S
        except ValueError:
            raise RuntimeError(
                f"FASTMLP_DIST_TIMEOUT={text!r} is not a number of seconds"
            ) from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def setup(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
    device: str | None = None,
) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
    ``MASTER_PORT`` through ``init_method="env://"``). Without ``WORLD_SIZE``,
    or with ``WORLD_SIZE=1``, no process group is created and this returns rank
    0 of 1. ``backend``: ``None`` picks NCCL when CUDA is available (and
    ``device`` is not ``"cpu"``), else gloo. ``timeout`` (seconds; default
    ``FASTMLP_DIST_TIMEOUT`` or 300) bounds every collective, so a dead peer
    raises an error instead of hanging; NCCL gets asynchronous error handling.
    On CUDA each process uses GPU ``LOCAL_RANK``. On CPU, unless
    ``OMP_NUM_THREADS`` is set, the cores are shared out between local ranks.
    Idempotent: an already initialized group is returned as is.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, which is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (--nproc / --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)
    if world_size == 1:
        return DistInfo(0, 1, 0, None, dev)
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {name} is not set: start the processes with torchrun"
            )
    if backend == "nccl":
        # Fail (rather than hang) when a peer dies in the middle of a collective.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=_timeout(timeout),
        **kwargs,
    )
    # Every rank arrived? (gloo names the ranks that did not.)
    barrier(timeout)
    return DistInfo(rank, world_size, local_rank, backend, dev)


def cleanup(wait: bool = False) -> None:
    """Leave the process group (no-op without one); with ``wait``, after every rank is done
    (tearing the group down while a peer still works on it can abort a rank)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_rank(status: int = 0) -> NoReturn:
    """End this rank's process with exit status ``status``, after :func:`cleanup`: Python's
    exit handlers run and the standard streams are flushed, but the interpreter's own
    teardown is skipped. In that teardown, gloo's threads can abort a rank that has finished
    its work ("terminate called without an active exception", SIGABRT, no Python frame
    left), turning a finished run into a failed one.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or gone: nothing left to flush
                pass
        os._exit(status)


def barrier(
    timeout: float | datetime.timedelta | None = None, group: dist.ProcessGroup | None = None
) -> None:
    """Wait for every rank; on gloo a monitored barrier that names the ranks missing after
    ``timeout`` (default: as in :func:`setup`). No-op in a single process."""
    if not is_distributed(group):
        return
    if dist.get_backend(group) == "gloo":
        dist.monitored_barrier(group=group, timeout=_timeout(timeout), wait_all_ranks=True)
    else:
        dist.barrier(group=group)


def wrap_model(
    model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any
) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel`, statistics kept local.

    DDP broadcasts rank 0's buffers to every rank (at construction, and by
    default at every forward): that would overwrite each rank's statistics with
    rank 0's. The statistics buffers (every :class:`~fastmlp.stats.LayerStats`
    buffer) are therefore excluded from all of DDP's synchronization, which is
    ``broadcast_buffers=False`` restricted to them (other buffers a model may
    have, e.g. batch-norm running statistics, keep DDP's default behaviour).
    Returns ``model`` itself in a single process.
    """
    if not is_distributed(ddp_kwargs.get("process_group")):
        return model
    ignore = [
        f"{name}.{buf}" if name else buf
        for name, mod in model.named_modules()
        if isinstance(mod, LayerStats)
        for buf, _ in mod.named_buffers(recurse=False)
    ]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    if device is None:
        device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op in a single process); returns it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ----------------------------------------------------------------------------- statistics


def snapshot(stats: ModelStats, group: dist.ProcessGroup | None = None) -> Snapshot:
    """Statistics of every rank combined exactly (one collective; every rank must call it).

    ``stats``: a :class:`~fastmlp.ModelStats` (``model.stats``). Every rank returns the same
    snapshot; in a single process this is the local snapshot.
    """
    return stats.snapshot(group=group)


def consolidate_stats(
    stats: ModelStats, dst: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Move every rank's statistics into rank ``dst``'s buffers (one collective); see
    :func:`fastmlp.stats.ranks.consolidate_stats`."""
    ranks.consolidate_stats(stats.layer_stats(), dst, group)


# ----------------------------------------------------------------------------- launching


def run_recorded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with an exception recorded for torchrun's agent (the error file
    its failure report reads; see ``torch.distributed.elastic.multiprocessing.errors.record``)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)(*args, **kwargs)


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    module: str = "fastmlp",
    max_restarts: int = 0,
    monitor_interval: float = 0.5,
) -> int:
    """Run ``python -m {module} *argv`` in ``nproc`` processes on this machine; the exit status.

    The processes are started and watched by torchrun's elastic agent, as
    ``torchrun --standalone --nproc-per-node {nproc} -m {module} ...`` does: a
    local c10d rendezvous on a free port, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT`` set for each process (which calls
    :func:`setup`, as ``fastmlp train`` does under torchrun). When any process
    fails, the agent stops the others; the failing rank (the one that failed
    first, not the peers that lost their connection to it), its exit code or
    signal and its error are printed, and 1 is returned.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=monitor_interval,
    )
    try:
        with warnings.catch_warnings(), _launched_env(), _quiet_shutdown():
            warnings.simplefilter("ignore", FutureWarning)
            elastic_launch(config, sys.executable)("-u", "-m", module, *[str(a) for a in argv])
    except ChildFailedError as e:
        print(f"{module}: error: {describe_failure(e.failures, nproc)}", file=sys.stderr)
        return 1
    return 0


#: Set in the environment of the processes :func:`launch` starts: their launcher reports an
#: interruption, so they need not (``fastmlp train --nproc`` says it once, not per rank).
LAUNCHED = "FASTMLP_LAUNCHED"


def launched() -> bool:
    """Whether this process is a rank that :func:`launch` started."""
    return os.environ.get(LAUNCHED) == "1"


@contextlib.contextmanager
def _launched_env() -> Any:
    saved = os.environ.get(LAUNCHED)
    os.environ[LAUNCHED] = "1"  # the agent starts the ranks with this process' environment
    try:
        yield
    finally:
        if saved is None:
            del os.environ[LAUNCHED]
        else:
            os.environ[LAUNCHED] = saved


class _ShutdownNotes(logging.Filter):
    """Drops the agent's warnings that it stops the ranks (on Ctrl-C, SIGTERM or a failed
    rank): the launching command says what happened in one line."""

    NOTES = ("Received %s death signal", "Sending process %s closing signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


@contextlib.contextmanager
def _quiet_shutdown() -> Any:
    loggers = [
        logging.getLogger("torch.distributed.elastic.agent.server.api"),
        logging.getLogger("torch.distributed.elastic.multiprocessing.api"),
    ]
    notes = _ShutdownNotes()
    for log in loggers:
        log.addFilter(notes)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(notes)


# Messages of processes that failed because a peer died, not by themselves.
_PEER_ERRORS = (
    "connection closed by peer",
    "connection reset by peer",
    "read error",
    "broken pipe",
    "timed out",
    "timeout",
    "communicator was aborted",
    "socket closed",
    "signal 15",
    "sigterm",
)


def _error_text(failure: Any) -> str:
    msg = getattr(failure, "message", "")
    if isinstance(msg, dict):
        msg = msg.get("message", "")
    return str(msg or "").strip()


def describe_failure(failures: dict[int, Any], nproc: int) -> str:
    """A clear account of a failed job from ``ChildFailedError.failures``
    (``{rank: ProcessFailure}``): the root cause first (a process killed by a signal, or one
    whose error is not a lost connection to a peer; else the earliest), then the others."""

    def peer_victim(f: Any) -> bool:
        text = _error_text(f).lower()
        return any(p in text for p in _PEER_ERRORS)

    def key(r: int) -> tuple:
        f = failures[r]
        killed = f.exitcode is not None and f.exitcode < 0 and f.signal_name() != "SIGTERM"
        return (not killed, peer_victim(f), f.timestamp, r)

    ranks = sorted(failures, key=key)
    rank = ranks[0]
    failure = failures[rank]
    if failure.exitcode is not None and failure.exitcode < 0:
        how = f"killed by signal {failure.signal_name()}"
    else:
        how = f"exit code {failure.exitcode}"
    msg = f"rank {rank} of {nproc} failed ({how}, pid {failure.pid}); the job was stopped"
    others = sorted(ranks[1:])
    if others:
        msg += f" (then also failed: ranks {others})"
    detail = _error_text(failure)
    if detail and not detail.startswith("To enable traceback") and not detail.startswith("Signal"):
        msg += f"\n  rank {rank}: {detail.splitlines()[-1]}"
    return msg
