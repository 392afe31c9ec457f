"""Multi-process training on ``torch.distributed``: set-up, DDP, launching, and exact statistics.

fastmlp runs on PyTorch's own distributed engine: processes are started by
torchrun's elastic agent (:func:`launch`, or ``torchrun ... -m fastmlp train``
across nodes), they join one process group (:func:`setup`: NCCL on GPUs, gloo
on CPUs), and the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap_model`).

Statistics stay rank-local during training: each rank accumulates into its own
:class:`~fastmlp.stats.LayerStats` buffers (its own ``shift``, its own
auto-ranged histogram ``+-R``) with no communication per step. Only a snapshot
combines them, with ONE packed collective: every rank's buffers for every layer
(``acc``, ``shift``, ``hist_range``, the calibrated flags and ``hist``) are
packed into a single float64 tensor and all-gathered; every rank then merges
the same data the same way, so every rank gets the same
:class:`~fastmlp.snapshot.Snapshot`. The merge is exact:

- counts and moments: each rank's shifted sums become ``(count, mean, M2)`` in
  float64 and are combined with Chan et al.'s parallel formula (never an
  average of means);
- ``min``/``max`` are the extremes over ranks; non-finite and saturation
  counts are summed;
- histograms: every rank's automatic range ``+-R_r`` (a power of two) is
  brought to the largest one, ``R``, by merging ``R / R_r`` adjacent bins (the
  exact power-of-two regrouping of :func:`fastmlp.torch_path._grow_range`);
  then bins and under/overflow counts are summed. Fixed ranges (bounded
  activations) are the same on every rank.

What the merged figures describe: forward quantities (``preactivation``,
``activation``) are those of the global batch (every rank's examples).
Gradient quantities are those each rank computes in its own backward pass,
before DDP averages the parameter gradients: ``preactivation_grad`` is the
gradient of each rank's own loss (the mean over its local batch), and
``weight_grad`` collects the elements of every rank's local ``dL/dW``. That is
exactly what a single process records when it runs the ranks' batches one after
another as micro-batches and accumulates their gradients.

:meth:`fastmlp.ModelStats.snapshot` calls :func:`snapshot` automatically when a
process group with more than one rank is initialized (every rank must then call
it); ``snapshot(local=True)`` reads this rank's statistics alone.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastmlp.snapshot import Snapshot, quantity_stats
from fastmlp.stats import (
    COUNT,
    MAX,
    MIN,
    NFIELDS,
    NONFINITE,
    QUANTITIES,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUMSQ,
    LayerStats,
)
from fastmlp.torch_path import regroup_bins as torch_regroup_bins

if TYPE_CHECKING:
    from fastmlp.model_stats import ModelStats

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "LayerBuffers",
    "all_reduce_sum_",
    "barrier",
    "cleanup",
    "consolidate_stats",
    "gather_layer_buffers",
    "is_distributed",
    "describe_failure",
    "launch",
    "merge_buffers",
    "rank_world",
    "reduce_layer_stats",
    "regroup_bins",
    "run_recorded",
    "setup",
    "snapshot",
    "unwrap",
    "wrap_model",
]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective may wait for a peer before it fails (``FASTMLP_DIST_TIMEOUT``)."""

_NQ = len(QUANTITIES)


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


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


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


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


# ----------------------------------------------------------------------------- statistics merge


@dataclass
class LayerBuffers:
    """The raw statistics buffers of one layer on the host (float64 / int64 numpy arrays).

    Same layout and meaning as :class:`~fastmlp.stats.LayerStats`: ``acc``
    ``[4, NFIELDS]`` with sums shifted by ``shift`` ``[4]``, ``hist``
    ``[4, bins + 2]`` (underflow, bins, overflow) on ``hist_range`` ``[4, 2]``,
    and ``calibrated`` ``[4]`` (bool).
    """

    acc: np.ndarray
    shift: np.ndarray
    hist: np.ndarray
    hist_range: np.ndarray
    calibrated: np.ndarray

    @classmethod
    def from_stats(cls, s: LayerStats) -> LayerBuffers:
        """Copy ``s``'s buffers to the host."""
        return cls(
            s.acc.detach().cpu().numpy().astype(np.float64),
            s.shift.detach().cpu().numpy().astype(np.float64),
            s.hist.detach().cpu().numpy().astype(np.int64),
            s.hist_range.detach().cpu().numpy().astype(np.float64),
            np.array(s.calibrated, dtype=bool),
        )

    def load_into(self, s: LayerStats) -> None:
        """Overwrite ``s``'s buffers (on their device) and calibrated flags with these."""
        with torch.no_grad():
            s.acc.copy_(torch.from_numpy(self.acc))
            s.shift.copy_(torch.from_numpy(self.shift))
            s.hist.copy_(torch.from_numpy(self.hist))
            s.hist_range.copy_(torch.from_numpy(self.hist_range))
        s.calibrated = [bool(c) for c in self.calibrated]
        s.hint_centers_from_shift()


def _pack(indexed: Sequence[tuple[int, LayerStats]]) -> torch.Tensor:
    """One float64 vector: a header (layer count, then index and bins of each layer), then
    per layer ``acc, shift, hist_range, calibrated, hist`` (counts are exact in float64
    up to 2**53)."""
    device = indexed[0][1].acc.device
    header = [float(len(indexed))]
    for index, s in indexed:
        header += [float(index), float(s.bins)]
    parts = [torch.tensor(header, dtype=torch.float64, device=device)]
    for _, s in indexed:
        parts += [
            s.acc.reshape(-1),
            s.shift.reshape(-1),
            s.hist_range.reshape(-1),
            torch.tensor(s.calibrated, dtype=torch.float64, device=device),
            s.hist.reshape(-1).to(torch.float64),
        ]
    return torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])


def _unpack(flat: np.ndarray, rank: int, expect_header: np.ndarray) -> list[LayerBuffers]:
    n_header = expect_header.size
    if flat.size < n_header or not np.array_equal(flat[:n_header], expect_header):
        raise RuntimeError(
            f"rank {rank} has different statistics layers than this rank "
            f"(layers/bins {flat[:n_header].tolist()} vs {expect_header.tolist()}): "
            "every rank must build the same model"
        )
    out = []
    pos = n_header
    n_layers = int(expect_header[0])
    for k in range(n_layers):
        bins = int(expect_header[2 + 2 * k])

        def take(n: int) -> np.ndarray:
            nonlocal pos
            chunk = flat[pos : pos + n]
            pos += n
            return chunk

        acc = take(_NQ * NFIELDS).reshape(_NQ, NFIELDS).copy()
        shift = take(_NQ).copy()
        rng = take(2 * _NQ).reshape(_NQ, 2).copy()
        calibrated = take(_NQ) != 0
        hist = take(_NQ * (bins + 2)).reshape(_NQ, bins + 2).astype(np.int64)
        out.append(LayerBuffers(acc, shift, hist, rng, calibrated))
    return out


def gather_layer_buffers(
    indexed: Sequence[tuple[int, LayerStats]], group: dist.ProcessGroup | None = None
) -> list[list[LayerBuffers]]:
    """Every rank's buffers, ``[rank][layer]``, with one ``all_gather`` of one float64 tensor.

    A collective: every rank of ``group`` must call it. In a single process,
    just this process's buffers.
    """
    if not indexed:
        return []
    if not is_distributed(group):
        return [[LayerBuffers.from_stats(s) for _, s in indexed]]
    flat = _pack(indexed)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    host = torch.stack(gathered).cpu().numpy()
    header = host[dist.get_rank(group), : 1 + 2 * len(indexed)]
    return [_unpack(host[r], r, header) for r in range(world)]


def regroup_bins(counts: np.ndarray, factor: float) -> np.ndarray:
    """Histogram ``counts`` on ``+-R`` re-binned onto ``+-R * factor`` (``factor`` a power of
    two >= 1), exactly: bin ``i`` (offset ``i - bins/2`` from the centre) falls into bin
    ``floor((i - bins/2) / factor) + bins/2`` (:func:`fastmlp.torch_path.regroup_bins`, which
    the single-process range growth uses too)."""
    counts = np.ascontiguousarray(counts)
    if factor < 1 or not math.isfinite(factor) or 2.0 ** round(math.log2(factor)) != factor:
        raise ValueError(f"factor must be a power of two >= 1, got {factor!r}")
    if factor == 1:
        return counts.copy()
    return torch_regroup_bins(torch.from_numpy(counts), factor).numpy()


def merge_buffers(
    parts: Sequence[LayerBuffers], fixed_range: Sequence[bool] | None = None
) -> LayerBuffers:
    """Combine one layer's buffers from several ranks exactly (see the module docstring).

    The result has the same meaning as one rank's buffers: for each quantity,
    ``shift`` is the merged mean, ``sum`` is 0 and ``sumsq`` is the merged
    ``M2`` (sum of squared deviations from the mean), so it can be read by a
    :class:`~fastmlp.snapshot.Snapshot` or loaded back into a
    :class:`~fastmlp.stats.LayerStats` and accumulated into further.
    ``fixed_range[q]``: quantity ``q`` has a fixed histogram range, which must
    then be the same on every rank (default: none fixed, every range automatic).
    """
    if not parts:
        raise ValueError("merge_buffers needs at least one rank's buffers")
    first = parts[0]
    nq, nb = first.hist.shape
    fixed = [False] * nq if fixed_range is None else [bool(f) for f in fixed_range]
    acc = np.zeros((nq, NFIELDS), dtype=np.float64)
    acc[:, MIN] = np.inf
    acc[:, MAX] = -np.inf
    shift = np.zeros(nq, dtype=np.float64)
    hist = np.zeros((nq, nb), dtype=np.int64)
    rng = first.hist_range.copy()
    calibrated = np.zeros(nq, dtype=bool)
    for p in parts:
        if p.hist.shape != (nq, nb):
            raise ValueError(f"histogram shapes differ between ranks: {p.hist.shape} vs {(nq, nb)}")
    for q in range(nq):
        # Counts and moments: (count, mean, M2) per rank, combined with Chan's formula.
        n, mean, m2 = 0.0, 0.0, 0.0
        for p in parts:
            nr = float(p.acc[q, COUNT])
            if nr > 0:
                s1, s2 = float(p.acc[q, SUM]), float(p.acc[q, SUMSQ])
                mean_r = float(p.shift[q]) + s1 / nr
                m2_r = max(s2 - s1 * s1 / nr, 0.0)
                total = n + nr
                delta = mean_r - mean
                mean = mean + delta * (nr / total)
                m2 = m2 + m2_r + delta * delta * (n * nr / total)
                n = total
            acc[q, NONFINITE] += p.acc[q, NONFINITE]
            acc[q, SAT_LOW] += p.acc[q, SAT_LOW]
            acc[q, SAT_HIGH] += p.acc[q, SAT_HIGH]
            acc[q, MIN] = min(acc[q, MIN], p.acc[q, MIN])
            acc[q, MAX] = max(acc[q, MAX], p.acc[q, MAX])
        acc[q, COUNT] = n
        acc[q, SUM] = 0.0
        acc[q, SUMSQ] = m2
        shift[q] = mean
        # Histograms: agree on the largest range, regroup, sum.
        cal = [p for p in parts if p.calibrated[q]]
        calibrated[q] = bool(cal)
        if not cal:
            continue
        if fixed[q]:
            for p in cal:
                if not np.array_equal(p.hist_range[q], cal[0].hist_range[q]):
                    raise ValueError(
                        f"quantity {QUANTITIES[q]!r} has a fixed histogram range, but ranks "
                        f"differ: {p.hist_range[q].tolist()} vs {cal[0].hist_range[q].tolist()}"
                    )
            rng[q] = cal[0].hist_range[q]
            for p in cal:
                hist[q] += p.hist[q]
            continue
        r = max(float(p.hist_range[q, 1]) for p in cal)
        for p in cal:
            lo, hi = float(p.hist_range[q, 0]), float(p.hist_range[q, 1])
            if not (hi > 0 and lo == -hi):
                raise ValueError(
                    f"quantity {QUANTITIES[q]!r}: automatic histogram range must be +-R, "
                    f"got ({lo}, {hi})"
                )
            hist[q, 0] += p.hist[q, 0]
            hist[q, -1] += p.hist[q, -1]
            hist[q, 1:-1] += regroup_bins(p.hist[q, 1:-1], r / hi)
        rng[q] = (-r, r)
    return LayerBuffers(acc, shift, hist, rng, calibrated)


def reduce_layer_stats(
    indexed: Sequence[tuple[int, LayerStats]], group: dist.ProcessGroup | None = None
) -> list[LayerBuffers]:
    """The buffers of every layer merged over all ranks (one collective; every rank calls it
    and gets the same result). In a single process: this process's buffers."""
    per_rank = gather_layer_buffers(indexed, group)
    if not per_rank:
        return []
    return [
        merge_buffers([ranks[k] for ranks in per_rank], s.fixed_range)
        for k, (_, s) in enumerate(indexed)
    ]


def snapshot_from_buffers(
    indexed: Sequence[tuple[int, LayerStats]], merged: Sequence[LayerBuffers]
) -> Snapshot:
    """A :class:`~fastmlp.snapshot.Snapshot` of ``merged`` buffers, configured like
    ``indexed`` (histograms on/off, saturation) — the counterpart of
    :meth:`Snapshot.from_layers` for buffers that are not in a ``LayerStats``."""
    layers = {}
    for (index, s), b in zip(indexed, merged, strict=True):
        layers[index] = {
            name: quantity_stats(
                index,
                q,
                b.acc[q],
                float(b.shift[q]),
                b.hist[q] if s.histograms and b.calibrated[q] else None,
                b.hist_range[q],
                s.saturation_active,
            )
            for q, name in enumerate(QUANTITIES)
        }
    return Snapshot(layers)


def _indexed(stats: ModelStats | Sequence[tuple[int, LayerStats]]) -> list[tuple[int, LayerStats]]:
    if hasattr(stats, "layer_stats"):
        return list(stats.layer_stats())  # type: ignore[union-attr]
    return list(stats)  # type: ignore[arg-type]


def snapshot(
    stats: ModelStats | Sequence[tuple[int, LayerStats]],
    group: dist.ProcessGroup | None = None,
) -> Snapshot:
    """Statistics of every rank combined exactly (one collective; every rank must call it).

    ``stats``: a :class:`~fastmlp.ModelStats` (``model.stats``) or ``(layer
    index, LayerStats)`` pairs. Every rank returns the same snapshot. In a
    single process this is the local snapshot.
    """
    indexed = _indexed(stats)
    if not is_distributed(group):
        return Snapshot.from_layers(indexed)
    return snapshot_from_buffers(indexed, reduce_layer_stats(indexed, group))


def consolidate_stats(
    stats: ModelStats | Sequence[tuple[int, LayerStats]],
    dst: int = 0,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Move every rank's accumulated statistics into rank ``dst``'s buffers (one collective).

    Afterwards rank ``dst`` holds the exact merge and the other ranks are reset,
    so later snapshots are unchanged, and a checkpoint of rank ``dst``'s
    ``state_dict`` carries the statistics of the whole job (used before the
    trainer checkpoints; on resume, ranks other than ``dst`` reset theirs).
    """
    indexed = _indexed(stats)
    if not is_distributed(group) or not indexed:
        return
    merged = reduce_layer_stats(indexed, group)
    if dist.get_rank(group) == dst:
        for (_, s), b in zip(indexed, merged, strict=True):
            b.load_into(s)
    else:
        for _, s in indexed:
            s.reset()


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            elastic_launch(config, sys.executable)("-u", "-m", module, *[str(a) for a in argv])
    except ChildFailedError as e:
        print(f"{module}: error: {describe_failure(e.failures, nproc)}", file=sys.stderr)
        return 1
    return 0


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
