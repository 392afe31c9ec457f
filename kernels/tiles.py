"""Tile statistics of the fused kernels: a tile's moments, histogram, zeros and exponents,
their commits to the layer's buffers, and the pass's finalize stage.

The helpers write into the buffers of :mod:`fastmlp.stats.layout`: per quantity a float64
row ``acc[q]`` (``count, sum, sumsq, min, max, nonfinite, sat_low, sat_high, zeros, sum3,
sum4, abs_sum``, the moment sums taken around ``shift[q]``, ``abs_sum = sum(|x|)`` not), an
int64 histogram row ``hist[q]`` = ``underflow, bins..., overflow``, a float64
``hist_range[q] = (low, high)`` and an int64 exponent histogram ``exp_hist[q]``.

How a tile's statistics reach those buffers:

- Each program reduces its tile in registers: finite count, float32 tile mean,
  centred sums ``sum(x - mean_t)`` and ``sum((x - mean_t)**2)`` (exact enough
  because they are centred on the tile's own mean), ``sum(|x|)``, min, max, non-finite
  count, saturation counts and a tile histogram (``tl.histogram``).
- The centred sums are re-expressed around ``shift[q]`` in float64 (Chan's
  merge), then added to ``acc[q]`` with float64 atomics. Integer-valued fields
  (counts, histogram bins) and min/max are order-independent, so atomics on
  them are exact and deterministic.
- Deterministic mode (``DETERMINISTIC``): the float sums are instead written as
  per-program partials (:data:`NPART` slots a program) that the pass's last program adds
  in program order, so the statistics are bitwise identical from run to run on the same
  GPU and software.
- The last program of each pass (a ticket, :func:`last_program`) runs the finalize
  stage (:func:`finalize_pass`) inside the same kernel, so a pass is one launch: it
  grows automatic histogram ranges by powers of two with exact bin merging, on the
  device (no host synchronisation), from the pass's finite extents that the
  programs gather in a small float64 buffer (reset by the finalize stage).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastmlp.stats.layout import (
    ABS_SUM,
    COUNT,
    EXP_MAX,
    EXP_MIN,
    MAX,
    MIN,
    NFIELDS,
    NONFINITE,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUM3,
    SUM4,
    SUMSQ,
    ZEROS,
)

__all__ = [
    "MAX_BINS",
    "NPART",
    "commit_exponents",
    "commit_extents",
    "commit_histogram",
    "commit_moments",
    "finalize_pass",
    "grouped_pid",
    "last_program",
    "tile_exponents",
    "tile_histogram",
    "tile_moments",
    "tile_zeros",
]

#: Most histogram bins the kernels take: a histogram row is one ``HB``-wide tile (``HB``
#: the next power of two above ``bins + 2``) in every program and in the finalize stage.
MAX_BINS = 256

# Field offsets inside a row of LayerStats.acc, as compile-time constants.
F_COUNT = tl.constexpr(COUNT)
F_SUM = tl.constexpr(SUM)
F_SUMSQ = tl.constexpr(SUMSQ)
F_MIN = tl.constexpr(MIN)
F_MAX = tl.constexpr(MAX)
F_NONFINITE = tl.constexpr(NONFINITE)
F_SAT_LOW = tl.constexpr(SAT_LOW)
F_SAT_HIGH = tl.constexpr(SAT_HIGH)
F_ZEROS = tl.constexpr(ZEROS)
F_SUM3 = tl.constexpr(SUM3)
F_SUM4 = tl.constexpr(SUM4)
F_ABS_SUM = tl.constexpr(ABS_SUM)
F_EXP_MIN = tl.constexpr(EXP_MIN)
F_EXP_MAX = tl.constexpr(EXP_MAX)
#: float64 slots per program in the deterministic partials: sum, sumsq, sum3, sum4, abs_sum.
NPART = tl.constexpr(5)
#: Fields of a row of ``acc``, as a compile-time constant.
F_NFIELDS = tl.constexpr(NFIELDS)


@triton.jit
def grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a linear program id to (pid_a, pid_b) in groups of ``GROUP`` rows (L2 reuse)."""
    width = GROUP * num_b
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(num_a - first, GROUP)
    pid_a = first + ((pid % width) % size)
    pid_b = (pid % width) // size
    return pid_a, pid_b


@triton.jit
def tile_moments(v, valid, shift, MOM4: tl.constexpr):
    """Moments of the finite, valid elements of the float32 tile ``v``.

    Returns ``(fin, n, s1, s2, nonfinite, mn, mx, s3, s4, sa)``: the finite mask, the finite
    count (float64), ``sum(x - shift)`` and ``sum((x - shift)**2)`` (float64,
    from float32 sums centred on the tile mean), the count of valid non-finite
    elements (float64), the finite min/max (float32; +inf/-inf if none) and, when
    ``MOM4``, ``sum((x - shift)**3)`` and ``**4`` (float64, from float32 sums centred on the
    tile mean, re-expressed around ``shift`` by the binomial expansion; else 0) and
    ``sum(|x|)`` (float64, from a float32 tile sum).
    """
    fin = valid & (tl.abs(v) < float("inf"))  # false for NaN and +-Inf
    n32 = tl.sum(fin.to(tl.int32))
    nonfinite = tl.sum((valid & (fin == 0)).to(tl.int32)).to(tl.float64)
    vz = tl.where(fin, v, 0.0)
    n = n32.to(tl.float64)
    mean_t = tl.sum(vz) / tl.maximum(n32, 1).to(tl.float32)
    # here, while vz is live anyway (later it would hold registers beside d: spills)
    sa = tl.sum(tl.abs(vz)).to(tl.float64)
    d = tl.where(fin, v - mean_t, 0.0)
    d1 = tl.sum(d).to(tl.float64)
    d2 = tl.sum(d * d).to(tl.float64)
    delta = mean_t.to(tl.float64) - shift
    s1 = d1 + n * delta
    s2 = d2 + delta * (2.0 * d1 + n * delta)
    mn = tl.min(tl.where(fin, v, float("inf")))
    mx = tl.max(tl.where(fin, v, float("-inf")))
    s3 = tl.zeros((), tl.float64)
    s4 = tl.zeros((), tl.float64)
    if MOM4:
        dd = d * d
        d3 = tl.sum(dd * d).to(tl.float64)
        d4 = tl.sum(dd * dd).to(tl.float64)
        e2 = delta * delta
        s3 = d3 + 3.0 * delta * d2 + 3.0 * e2 * d1 + n * e2 * delta
        s4 = d4 + 4.0 * delta * d3 + 6.0 * e2 * d2 + 4.0 * e2 * delta * d1 + n * e2 * e2
    return fin, n, s1, s2, nonfinite, mn, mx, s3, s4, sa


@triton.jit
def tile_histogram(v, fin, lo, hi, BINS: tl.constexpr, HB: tl.constexpr, FIXED: tl.constexpr):
    """Histogram row (``HB`` >= ``BINS + 2`` int32 counts: underflow, bins, overflow) of a tile.

    ``lo``/``hi`` are float64 scalars. Binning follows the PyTorch path
    (``fastmlp.backends.reference``): ``floor(x * scale) + offset`` with
    ``scale = bins / (hi - lo)`` and ``offset = -lo * scale`` (an integer for the ranges
    used) in float32, clamped to the bins (last bin closed); on an automatic range
    ``x < lo`` and ``x > hi`` go to under/overflow, on a fixed range they stay in the edge
    bins.
    """
    scale64 = BINS / (hi - lo)
    scale = scale64.to(tl.float32)
    offset = (-lo * scale64).to(tl.float32)
    lo32 = lo.to(tl.float32)
    hi32 = hi.to(tl.float32)
    vs = tl.where(fin, v, lo32)
    t = tl.floor(vs * scale) + offset
    t = tl.minimum(tl.maximum(t, 0.0), BINS - 1.0)
    idx = t.to(tl.int32) + 1
    if not FIXED:
        idx = tl.where(vs < lo32, 0, tl.where(vs > hi32, BINS + 1, idx))
    flat_idx = tl.reshape(idx, (idx.numel,))
    flat_fin = tl.reshape(fin, (fin.numel,))
    return tl.histogram(flat_idx, HB, mask=flat_fin)


@triton.jit
def commit_moments(
    acc_row,
    part_slot,
    n,
    s1,
    s2,
    nonfinite,
    mn,
    mx,
    s3,
    s4,
    sa,
    DETERMINISTIC: tl.constexpr,
    MOM4: tl.constexpr,
    ABS: tl.constexpr,
):
    """Add one program's moments and, when ``ABS``, ``sum(|x|)`` to the float64 row
    ``acc_row`` (or its partial slots)."""
    # Relaxed: plain reductions, no fence per atomic (nothing reads them within the pass;
    # the next kernel on the stream sees them all).
    tl.atomic_add(acc_row + F_COUNT, n, sem="relaxed")
    tl.atomic_add(acc_row + F_NONFINITE, nonfinite, sem="relaxed")
    if DETERMINISTIC:
        tl.store(part_slot, s1)
        tl.store(part_slot + 1, s2)
        if ABS:
            tl.store(part_slot + 4, sa)
        if MOM4:
            tl.store(part_slot + 2, s3)
            tl.store(part_slot + 3, s4)
    else:
        tl.atomic_add(acc_row + F_SUM, s1, sem="relaxed")
        tl.atomic_add(acc_row + F_SUMSQ, s2, sem="relaxed")
        if ABS:
            tl.atomic_add(acc_row + F_ABS_SUM, sa, sem="relaxed")
        if MOM4:
            tl.atomic_add(acc_row + F_SUM3, s3, sem="relaxed")
            tl.atomic_add(acc_row + F_SUM4, s4, sem="relaxed")
    tl.atomic_min(acc_row + F_MIN, mn.to(tl.float64), sem="relaxed")
    tl.atomic_max(acc_row + F_MAX, mx.to(tl.float64), sem="relaxed")


@triton.jit
def tile_zeros(v, fin):
    """Count (float64) of the finite, valid elements of the tile ``v`` that are exactly 0."""
    return tl.sum((fin & (v == 0.0)).to(tl.int32)).to(tl.float64)


@triton.jit
def tile_exponents(v, fin, HE: tl.constexpr):
    """Exponent histogram (``HE`` int32 counts) of the finite elements of the float32 tile
    ``v``: slot 0 for zeros, ``e - EXP_MIN + 1`` for frexp exponent ``e``, from the bits
    (subnormals: ``e = -149 + bit length of the mantissa``), as ``torch.frexp``."""
    bits = v.to(tl.int32, bitcast=True)
    bexp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # bit length of a subnormal's mantissa: the exponent of the (exact) float of it
    mexp = (mant.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.where(bexp == 0, mexp - 275, bexp - 126)
    slot = tl.minimum(tl.maximum(e, F_EXP_MIN), F_EXP_MAX) - (F_EXP_MIN - 1)
    slot = tl.where(v == 0.0, 0, slot)
    flat = tl.reshape(slot, (slot.numel,))
    flat_fin = tl.reshape(fin, (fin.numel,))
    return tl.histogram(flat, HE, mask=flat_fin)


@triton.jit
def commit_exponents(row, counts, NEXP: tl.constexpr, HE: tl.constexpr):
    """Add a tile's exponent histogram (``HE`` entries) to the int64 row ``row``."""
    offs = tl.arange(0, HE)
    tl.atomic_add(row + offs, counts.to(tl.int64), mask=offs < NEXP, sem="relaxed")


@triton.jit
def commit_histogram(hist_row, counts, BINS: tl.constexpr, HB: tl.constexpr):
    """Add a tile histogram (int32, ``HB`` entries) to the int64 row ``hist_row``."""
    offs = tl.arange(0, HB)
    tl.atomic_add(hist_row + offs, counts.to(tl.int64), mask=offs < BINS + 2, sem="relaxed")


@triton.jit
def commit_extents(ext_row, mn, mx):
    """Fold a tile's finite min/max into this pass's extents ``ext_row = (min, max)``."""
    tl.atomic_min(ext_row, mn.to(tl.float64), sem="relaxed")
    tl.atomic_max(ext_row + 1, mx.to(tl.float64), sem="relaxed")


@triton.jit
def _pow2_above(m):
    """Smallest power of two > ``m`` (float64, exact, from the exponent bits); 1 if 0/inf/NaN.

    Matches ``fastmlp.stats.pow2_above`` (normal numbers: 2 ** (exponent + 1)).
    """
    ok = (m > 0.0) & (m < float("inf"))
    safe = tl.where(ok, m, 1.0)
    bits = safe.to(tl.int64, bitcast=True)
    expo = (bits >> 52) & 0x7FF
    up = ((expo + 1) << 52).to(tl.float64, bitcast=True)
    return tl.where(ok, up, 1.0)


@triton.jit
def _finalize_one(
    acc_row,
    hist_row,
    range_row,
    ext_row,
    part_ptr,
    n_parts,
    DETERMINISTIC: tl.constexpr,
    MOM4: tl.constexpr,
    GROW: tl.constexpr,
    BINS: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    if DETERMINISTIC:
        s1 = tl.zeros((), tl.float64)
        s2 = tl.zeros((), tl.float64)
        s3 = tl.zeros((), tl.float64)
        s4 = tl.zeros((), tl.float64)
        sa = tl.zeros((), tl.float64)
        offs = tl.arange(0, BLOCK_P)
        for start in range(0, n_parts, BLOCK_P):
            p = start + offs
            msk = p < n_parts
            s1 += tl.sum(tl.load(part_ptr + NPART * p, mask=msk, other=0.0, volatile=True))
            s2 += tl.sum(tl.load(part_ptr + NPART * p + 1, mask=msk, other=0.0, volatile=True))
            sa += tl.sum(tl.load(part_ptr + NPART * p + 4, mask=msk, other=0.0, volatile=True))
            if MOM4:
                s3 += tl.sum(tl.load(part_ptr + NPART * p + 2, mask=msk, other=0.0, volatile=True))
                s4 += tl.sum(tl.load(part_ptr + NPART * p + 3, mask=msk, other=0.0, volatile=True))
        tl.store(acc_row + F_SUM, tl.load(acc_row + F_SUM, volatile=True) + s1)
        tl.store(acc_row + F_SUMSQ, tl.load(acc_row + F_SUMSQ, volatile=True) + s2)
        tl.store(acc_row + F_ABS_SUM, tl.load(acc_row + F_ABS_SUM, volatile=True) + sa)
        if MOM4:
            tl.store(acc_row + F_SUM3, tl.load(acc_row + F_SUM3, volatile=True) + s3)
            tl.store(acc_row + F_SUM4, tl.load(acc_row + F_SUM4, volatile=True) + s4)
    if GROW:
        # Widen +-r to cover this pass's extremes, merging bins exactly
        # (fastmlp.stats.algebra.grow_range_): bin i -> floor((i - B/2) / factor) + B/2.
        # The extents are reset to (inf, -inf) for the next pass.
        mn = tl.load(ext_row, volatile=True)
        mx = tl.load(ext_row + 1, volatile=True)
        tl.store(ext_row, float("inf"))
        tl.store(ext_row + 1, float("-inf"))
        maxabs = tl.maximum(tl.abs(mn), tl.abs(mx))
        r = tl.load(range_row + 1)
        # No finite value in this pass (extents inf): nothing to cover, the range stays.
        new_r = tl.where((maxabs < float("inf")) & (maxabs > r), _pow2_above(maxabs), r)
        factor = new_r / r
        src = tl.arange(0, HB)
        inside = src < BINS
        row = tl.load(hist_row + 1 + src, mask=inside, other=0, volatile=True)
        j = tl.floor((src.to(tl.float64) - BINS // 2) / factor).to(tl.int32) + BINS // 2
        # Merge in place: zero the row, then add each old bin to its new one (a scatter-add,
        # cheap in registers; the barriers order the block's loads, stores and atomics).
        tl.debug_barrier()
        tl.store(hist_row + 1 + src, tl.zeros_like(row), mask=inside)
        tl.debug_barrier()
        tl.atomic_add(hist_row + 1 + j, row, mask=inside, sem="relaxed")
        tl.store(range_row, -new_r)
        tl.store(range_row + 1, new_r)


@triton.jit
def last_program(ticket_ptr):
    """Whether this program is the last of the grid to finish its commits (a ticket).

    Every thread's statistics atomics and stores are issued before the barrier; the
    acquire-release ticket orders them before the last program's reads (the
    "threadFenceReduction" pattern). The last program resets the ticket to 0.
    """
    tl.debug_barrier()
    t = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = t == tl.num_programs(0) - 1
    return last


@triton.jit
def finalize_pass(
    acc_ptr,
    hist_ptr,
    range_ptr,
    ext_ptr,
    part_ptr,
    ticket_ptr,
    n_parts,
    part_stride,
    Q0: tl.constexpr,
    NFIELDS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    MOM4: tl.constexpr,
    GROW0: tl.constexpr,
    GROW1: tl.constexpr,
    BINS: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Second stage of one pass over quantities ``Q0`` and ``Q0 + 1``, run by the pass's
    last program (:func:`last_program`) inside the main kernel, so a pass is one launch.

    Adds the deterministic partials of the ``n_parts`` programs in program order (when
    ``DETERMINISTIC``) and grows automatic histogram ranges (``GROW0``/``GROW1``).
    """
    _finalize_one(
        acc_ptr + Q0 * NFIELDS,
        hist_ptr + Q0 * (BINS + 2),
        range_ptr + Q0 * 2,
        ext_ptr + Q0 * 2,
        part_ptr,
        n_parts,
        DETERMINISTIC,
        MOM4,
        GROW0,
        BINS,
        HB,
        BLOCK_P,
    )
    _finalize_one(
        acc_ptr + (Q0 + 1) * NFIELDS,
        hist_ptr + (Q0 + 1) * (BINS + 2),
        range_ptr + (Q0 + 1) * 2,
        ext_ptr + (Q0 + 1) * 2,
        part_ptr + part_stride,
        n_parts,
        DETERMINISTIC,
        MOM4,
        GROW1,
        BINS,
        HB,
        BLOCK_P,
    )
    tl.store(ticket_ptr, 0)
