"""Statistics of every rank of a ``torch.distributed`` job, combined exactly with one collective.

Statistics stay rank-local during training: each rank accumulates into its own
:class:`~fastmlp.stats.LayerStats` buffers (its own ``shift``, its own
auto-ranged histogram ``+-R``) with no communication per step. Only a snapshot
combines them, with ONE packed collective: every rank's buffers for every layer
(``acc``, ``shift``, ``hist_range``, the calibrated flags and ``hist``) are
packed into a single float64 tensor and all-gathered; every rank then merges
the same data the same way (:func:`fastmlp.stats.algebra.merge_buffers`), so every
rank gets the same :class:`~fastmlp.stats.Snapshot`.

What the merged figures describe: forward quantities (``preactivation``,
``activation``) are those of the global batch (every rank's examples).
Gradient quantities are those each rank computes in its own backward pass,
before DDP averages the parameter gradients: ``preactivation_grad`` is the
gradient of each rank's own loss (the mean over its local batch), and
``weight_grad`` collects the elements of every rank's local ``dL/dW``. That is
exactly what a single process records when it runs the ranks' batches one after
another as micro-batches and accumulates their gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from fastmlp.stats.algebra import LayerBuffers, merge_buffers
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.layout import CALIBRATED, NEXP, NFIELDS, NQ, NUNIT_ROWS, QUANTITIES
from fastmlp.stats.snapshot import Snapshot, quantity_stats

__all__ = [
    "consolidate_stats",
    "gather_layer_buffers",
    "is_distributed",
    "rank_world",
    "reduce_layer_stats",
    "snapshot",
    "snapshot_from_buffers",
]

Indexed = Sequence[tuple[int, LayerStats]]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _pack(indexed: Indexed) -> torch.Tensor:
    """One float64 vector: a header (layer count, then index and bins of each layer), then
    per layer ``acc, shift, hist_range, calibrated, hist, unit_counts`` (counts are exact in float64
    up to 2**53)."""
    device = indexed[0][1].acc.device
    header = [float(len(indexed))]
    for index, s in indexed:
        header += [float(index), float(s.bins), float(s.units)]
    parts = [torch.tensor(header, dtype=torch.float64, device=device)]
    for _, s in indexed:
        parts += [
            s.acc.reshape(-1),
            s.shift.reshape(-1),
            s.hist_range.reshape(-1),
            s.state[CALIBRATED],
            s.hist.reshape(-1).to(torch.float64),
            s.unit_counts.reshape(-1),
            s.exp_hist.reshape(-1).to(torch.float64),
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
        bins = int(expect_header[2 + 3 * k])
        n_units = int(expect_header[3 + 3 * k])

        def take(n: int) -> np.ndarray:
            nonlocal pos
            chunk = flat[pos : pos + n]
            pos += n
            return chunk

        acc = take(NQ * NFIELDS).reshape(NQ, NFIELDS).copy()
        shift = take(NQ).copy()
        rng = take(2 * NQ).reshape(NQ, 2).copy()
        calibrated = take(NQ) != 0
        hist = take(NQ * (bins + 2)).reshape(NQ, bins + 2).astype(np.int64)
        units = take(NUNIT_ROWS * n_units).reshape(NUNIT_ROWS, n_units).copy()
        exp_hist = take(NQ * NEXP).reshape(NQ, NEXP).astype(np.int64)
        out.append(LayerBuffers(acc, shift, hist, rng, calibrated, units, exp_hist))
    return out


def gather_layer_buffers(
    indexed: Indexed, group: dist.ProcessGroup | None = None
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
    header = host[dist.get_rank(group), : 1 + 3 * len(indexed)]
    return [_unpack(host[r], r, header) for r in range(world)]


def reduce_layer_stats(
    indexed: Indexed, group: dist.ProcessGroup | None = None
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
    indexed: Indexed, merged: Sequence[LayerBuffers], names: Sequence[str | None] | None = None
) -> Snapshot:
    """A :class:`~fastmlp.stats.Snapshot` of ``merged`` buffers, configured like
    ``indexed`` (histograms on/off, saturation) — the counterpart of
    :meth:`Snapshot.from_layers` for buffers that are not in a ``LayerStats``."""
    names = list(names) if names is not None else [None] * len(indexed)
    layers = {}
    for (index, s), b, name in zip(indexed, merged, names, strict=True):
        layers[index] = {
            qname: quantity_stats(
                index,
                q,
                b.acc[q],
                float(b.shift[q]),
                b.hist[q] if s.histograms and b.calibrated[q] else None,
                b.hist_range[q],
                s.saturation_active,
                name,
                s.recorded("zeros"),
                s.recorded("moments4"),
                b.units if s.recorded("per_unit") else None,
                b.exp_hist[q] if s.recorded("exponents") else None,
            )
            for q, qname in enumerate(QUANTITIES)
        }
    return Snapshot(layers)


def snapshot(
    indexed: Indexed,
    group: dist.ProcessGroup | None = None,
    names: Sequence[str | None] | None = None,
) -> Snapshot:
    """Statistics of every rank combined exactly (one collective; every rank must call it).

    ``indexed``: ``(layer index, LayerStats)`` pairs. Every rank returns the same snapshot.
    In a single process this is the local snapshot.
    """
    if not is_distributed(group):
        return Snapshot.from_layers(indexed, names=names)
    return snapshot_from_buffers(indexed, reduce_layer_stats(indexed, group), names)


def consolidate_stats(
    indexed: Indexed, dst: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Move every rank's accumulated statistics into rank ``dst``'s buffers (one collective).

    Afterwards rank ``dst`` holds the exact merge and the other ranks are reset,
    so later snapshots are unchanged, and a checkpoint of rank ``dst``'s
    ``state_dict`` carries the statistics of the whole job (used before the
    trainer checkpoints; on resume, ranks other than ``dst`` reset theirs).
    """
    if not is_distributed(group) or not indexed:
        return
    merged = reduce_layer_stats(indexed, group)
    if dist.get_rank(group) == dst:
        for (_, s), b in zip(indexed, merged, strict=True):
            b.load_into(s)
    else:
        for _, s in indexed:
            s.reset()
