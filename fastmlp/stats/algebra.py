"""Exact merges of statistics: a block into the buffers, bins regrouped onto a wider range,
and the buffers of several ranks (or processes) into one.

Used alike by the PyTorch path (:func:`merge_block_`, :func:`grow_range_`), by the Triton
kernels' finalize (which implements :func:`regroup_bins` on the device) and by the cross-rank
merge (:func:`merge_buffers`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastmlp.stats.layout import (
    ABS_SUM,
    CALIBRATED,
    COUNT,
    MAX,
    MIN,
    NFIELDS,
    NONFINITE,
    PAD,
    QUANTITIES,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUM3,
    SUM4,
    SUMSQ,
    ZEROS,
    Buffers,
    pow2_above,
)

__all__ = ["LayerBuffers", "grow_range_", "merge_block_", "merge_buffers", "regroup_bins"]


@torch.no_grad()
def merge_block_(
    acc: torch.Tensor,
    shift: torch.Tensor,
    count: torch.Tensor,
    center: torch.Tensor,
    dev_sum: torch.Tensor,
    dev_sumsq: torch.Tensor,
    mn: torch.Tensor,
    mx: torch.Tensor,
    dev_sum3: torch.Tensor | None = None,
    dev_sum4: torch.Tensor | None = None,
    abs_sum: torch.Tensor | None = None,
) -> None:
    """Merge one block of values into ``acc`` (one quantity's row of ``acc``), device ops only.

    The block has ``count`` finite values with sums of ``x - center`` and
    ``(x - center)**2`` (and ``**3``, ``**4`` when given; ``center`` is any value near the
    block's mean), extremes ``mn``, ``mx`` and, when given, ``abs_sum = sum(|x|)``; the
    sums are re-expressed around ``shift`` in float64 (binomial expansion, :func:`reshift`).
    """
    count, center, s1, s2 = (t.to(torch.float64) for t in (count, center, dev_sum, dev_sumsq))
    delta = center - shift
    acc[COUNT : SUMSQ + 1] += torch.stack(
        (count, s1 + count * delta, s2 + delta * (2 * s1 + count * delta))
    )
    if dev_sum3 is not None:
        s3, s4 = dev_sum3.to(torch.float64), dev_sum4.to(torch.float64)
        acc[SUM3 : SUM4 + 1] += torch.stack(reshift(count, s1, s2, s3, s4, delta)[2:])
    if abs_sum is not None:
        acc[ABS_SUM] += abs_sum.to(torch.float64)
    torch.minimum(acc[MIN], mn.to(torch.float64), out=acc[MIN])
    torch.maximum(acc[MAX], mx.to(torch.float64), out=acc[MAX])


def reshift(n, s1, s2, s3, s4, delta):
    """Sums of ``(x - c)**p`` (p = 1..4) re-expressed around ``c - delta``: the sums of
    ``(x - c + delta)**p``, by the binomial expansion (exact in real arithmetic)."""
    d2 = delta * delta
    return (
        s1 + n * delta,
        s2 + delta * (2 * s1 + n * delta),
        s3 + 3 * delta * s2 + 3 * d2 * s1 + n * d2 * delta,
        s4 + 4 * delta * s3 + 6 * d2 * s2 + 4 * d2 * delta * s1 + n * d2 * d2,
    )


def central_moments(n: float, s1: float, s2: float, s3: float, s4: float):
    """``(mean offset, M2, M3, M4)``: the mean's offset from the shift and the central sums
    ``sum((x - mean)**p)`` from the shifted sums ``s_p = sum((x - shift)**p)``."""
    a = s1 / n
    m2 = max(s2 - n * a * a, 0.0)
    m3 = s3 - 3 * a * s2 + 2 * n * a**3
    m4 = max(s4 - 4 * a * s3 + 6 * a * a * s2 - 3 * n * a**4, 0.0)
    return a, m2, m3, m4


def merge_central(a, b):
    """Pebay's (2008) exact pairwise merge of ``(n, mean, M2, M3, M4)`` tuples."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    if nb == 0:
        return a
    if na == 0:
        return b
    d = mb - ma
    dn = d / n
    mean = ma + nb * dn
    m2 = m2a + m2b + d * dn * na * nb
    m3 = m3a + m3b + d * dn * dn * na * nb * (na - nb) + 3 * dn * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + d * dn**3 * na * nb * (na * na - na * nb + nb * nb)
        + 6 * dn * dn * (na * na * m2b + nb * nb * m2a)
        + 4 * dn * (na * m3b - nb * m3a)
    )
    return n, mean, m2, m3, m4


def regroup_bins(counts: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Counts of bins on ``+-R`` regrouped onto ``+-R * factor`` (a power of two >= 1), exactly.

    Bin ``i`` (offset ``i - bins/2`` from the centre, ``bins`` even) falls into bin
    ``floor((i - bins/2) / factor) + bins/2``; device ops only.
    """
    bins = counts.shape[-1]
    i = torch.arange(bins, device=counts.device, dtype=torch.float64)
    j = torch.floor((i - bins // 2) / factor).to(torch.int64) + bins // 2
    return torch.zeros_like(counts).index_add_(0, j, counts)


def grow_range_(bufs: Buffers, q: int, maxabs: torch.Tensor) -> None:
    """Widen ``hist_range[q]`` by powers of two to cover ``maxabs``, merging bins exactly."""
    bins = bufs.bins
    rng = bufs.hist_range[q]
    r = rng[1]
    maxabs = maxabs.to(rng.device, torch.float64)
    # A batch without finite values (maxabs = inf from empty extremes) leaves the range alone.
    new_r = torch.where(torch.isfinite(maxabs) & (maxabs > r), pow2_above(maxabs), r)
    row = bufs.hist[q]
    row[1 : bins + 1] = regroup_bins(row[1 : bins + 1], new_r / r)
    rng[0] = -new_r
    rng[1] = new_r


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
    units: np.ndarray | None = None
    """Per-unit counts ``[4, units]`` (``fastmlp.stats.layout``), or ``None``."""
    exp_hist: np.ndarray | None = None
    """Exponent histograms ``[4, NEXP]``, or ``None``."""

    def __post_init__(self) -> None:
        # an older layout's shorter acc (buffers saved before fields were added): padded
        # as LayerStats pads a checkpoint's (fastmlp.stats.layout.PAD)
        k = self.acc.shape[-1]
        if k < NFIELDS:
            pad = np.broadcast_to(np.array(PAD[k:]), (*self.acc.shape[:-1], NFIELDS - k))
            self.acc = np.concatenate([self.acc, pad], axis=-1)

    @classmethod
    def from_stats(cls, s: object) -> LayerBuffers:
        """Copy the buffers of ``s`` (a :class:`LayerStats`) to the host."""
        return cls(
            s.acc.detach().cpu().numpy().astype(np.float64),
            s.shift.detach().cpu().numpy().astype(np.float64),
            s.hist.detach().cpu().numpy().astype(np.int64),
            s.hist_range.detach().cpu().numpy().astype(np.float64),
            s.state[CALIBRATED].numpy() != 0,
            s.unit_counts.detach().cpu().numpy().astype(np.float64),
            s.exp_hist.detach().cpu().numpy().astype(np.int64),
        )

    def load_into(self, s: object) -> None:
        """Overwrite the buffers of ``s`` (a :class:`LayerStats`, on its device) with these."""
        with torch.no_grad():
            s.acc.copy_(torch.from_numpy(self.acc))
            s.shift.copy_(torch.from_numpy(self.shift))
            s.hist.copy_(torch.from_numpy(self.hist))
            s.hist_range.copy_(torch.from_numpy(self.hist_range))
            if self.units is not None:
                s.unit_counts.copy_(torch.from_numpy(self.units))
            if self.exp_hist is not None:
                s.exp_hist.copy_(torch.from_numpy(self.exp_hist))
        s.calibrated = [bool(c) for c in self.calibrated]
        s.hint_centers_from_shift()


def regroup_bins_host(counts: np.ndarray, factor: float) -> np.ndarray:
    """:func:`regroup_bins` for numpy counts; ``factor`` must be a power of two >= 1."""
    counts = np.ascontiguousarray(counts)
    if factor < 1 or not math.isfinite(factor) or 2.0 ** round(math.log2(factor)) != factor:
        raise ValueError(f"factor must be a power of two >= 1, got {factor!r}")
    if factor == 1:
        return counts.copy()
    return regroup_bins(torch.from_numpy(counts), factor).numpy()


def merge_buffers(
    parts: Sequence[LayerBuffers], fixed_range: Sequence[bool] | None = None
) -> LayerBuffers:
    """Combine one layer's buffers from several ranks exactly.

    Counts and moments: each part's shifted sums become ``(count, mean, M2, M3, M4)`` in
    float64 and are combined with Chan et al.'s parallel formula and its extension to the
    third and fourth moments (Pebay 2008; never an average of means); ``min`` and
    ``max`` are the extremes; non-finite, saturation and zero counts and ``abs_sum`` are
    summed. Histograms: every
    automatic range ``+-R_p`` (a power of two) is brought to the largest one by merging
    ``R / R_p`` adjacent bins (:func:`regroup_bins`), then bins and under/overflow are summed.

    The result has the same meaning as one rank's buffers: for each quantity,
    ``shift`` is the merged mean, ``sum`` is 0 and ``sumsq``, ``sum3``, ``sum4`` are the
    merged ``M2``, ``M3``, ``M4``, so it can be read by a :class:`~fastmlp.stats.Snapshot` or
    loaded back into a :class:`~fastmlp.stats.LayerStats` and accumulated into further.
    ``fixed_range[q]``: quantity ``q`` has a fixed histogram range, which must
    then be the same on every part (default: none fixed, every range automatic).
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
        n, mean, m2, m3, m4 = 0.0, 0.0, 0.0, 0.0, 0.0
        for p in parts:
            nr = float(p.acc[q, COUNT])
            if nr > 0:
                s = [float(p.acc[q, f]) for f in (SUM, SUMSQ, SUM3, SUM4)]
                a, m2_r, m3_r, m4_r = central_moments(nr, *s)
                mean_r = float(p.shift[q]) + a
                n, mean, m2, m3, m4 = merge_central(
                    (n, mean, m2, m3, m4), (nr, mean_r, m2_r, m3_r, m4_r)
                )
            acc[q, NONFINITE] += p.acc[q, NONFINITE]
            acc[q, SAT_LOW] += p.acc[q, SAT_LOW]
            acc[q, SAT_HIGH] += p.acc[q, SAT_HIGH]
            acc[q, ZEROS] += p.acc[q, ZEROS]
            acc[q, ABS_SUM] += p.acc[q, ABS_SUM]  # NaN (an old layout's) stays unknown
            acc[q, MIN] = min(acc[q, MIN], p.acc[q, MIN])
            acc[q, MAX] = max(acc[q, MAX], p.acc[q, MAX])
        acc[q, COUNT] = n
        acc[q, SUM] = 0.0
        acc[q, SUMSQ] = m2
        acc[q, SUM3] = m3
        acc[q, SUM4] = m4
        shift[q] = mean
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
            hist[q, 1:-1] += regroup_bins_host(p.hist[q, 1:-1], r / hi)
        rng[q] = (-r, r)
    units = None
    if all(p.units is not None for p in parts):
        if len({p.units.shape for p in parts}) != 1:
            raise ValueError("per-unit counts differ in shape between ranks")
        units = np.sum([p.units for p in parts], axis=0)  # counts: summed
    exp_hist = None
    if all(p.exp_hist is not None for p in parts):
        exp_hist = np.sum([p.exp_hist for p in parts], axis=0)  # counts: summed
    return LayerBuffers(acc, shift, hist, rng, calibrated, units, exp_hist)
