"""Shared helpers of the fused kernels: settings, activations and tile statistics.

The statistics helpers write into the buffers of ``fastmlp.stats.LayerStats``
(layout in that module's docstring): per quantity a float64 row ``acc[q]`` =
``count, sum, sumsq, min, max, nonfinite, sat_low, sat_high`` with ``sum`` and
``sumsq`` taken around ``shift[q]``, an int64 histogram row ``hist[q]`` =
``underflow, bins..., overflow`` and a float64 ``hist_range[q] = (low, high)``.

How a tile's statistics reach those buffers:

- Each program reduces its tile in registers: finite count, float32 tile mean,
  centred sums ``sum(x - mean_t)`` and ``sum((x - mean_t)**2)`` (exact enough
  because they are centred on the tile's own mean), min, max, non-finite
  count, saturation counts and a tile histogram (``tl.histogram``).
- The centred sums are re-expressed around ``shift[q]`` in float64 (Chan's
  merge), then added to ``acc[q]`` with float64 atomics. Integer-valued fields
  (counts, histogram bins) and min/max are order-independent, so atomics on
  them are exact and deterministic.
- Deterministic mode (:func:`set_deterministic`, or ``FASTMLP_DETERMINISTIC=1``):
  the two float sums are instead written as per-program partials and the pass's
  last program adds them in program order. Cost: one small scratch
  buffer per pass, a fixed (not autotuned) tile configuration, and a serial
  reduction over the per-program partials in the finalize stage (a few
  microseconds for the 5x1000 network); the statistics are then bitwise
  identical from run to run on the same GPU and software.
- The last program of each pass (a ticket, :func:`last_program`) runs the finalize
  stage (:func:`finalize_pass`) inside the same kernel, so a pass is one launch: it
  grows automatic histogram ranges by powers of two with exact bin merging, on the
  device (no host synchronisation), from the pass's finite extents that the
  programs gather in a small float64 buffer (reset by the finalize stage).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastmlp.stats.layout import (
    COUNT,
    EXP_MAX,
    EXP_MIN,
    MAX,
    MIN,
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
    "INTERPRET",
    "ACT_IDS",
    "FROM_INPUT",
    "set_deterministic",
    "is_deterministic",
    "dot_precision",
    "next_pow2",
    "m_bucket",
]

#: Whether Triton runs in interpreter mode (CPU, numpy-simulated).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Device types whose tensors the kernels launch on. ``bench.host`` adds ``"cpu"`` while it
#: times the CUDA path's host work on CPU tensors with Triton's driver mocked (and tells
#: the op, which keeps its routing verdicts, that it did).
GPU_DEVICE_TYPES: set[str] = {"cuda"}

#: Activation name -> constexpr id used by the kernels.
ACT_IDS = {
    "identity": 0,
    "sigmoid": 1,
    "tanh": 2,
    "softsign": 3,
    "relu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
    "silu": 7,
}
#: Ids of the activations whose derivative needs the pre-activation ``z``: the forward
#: kernel stores ``z`` beside ``h`` for them and the backward reads ``z`` instead of ``h``.
FROM_INPUT = (5, 6, 7)
# GELU's constants are written out inside the jitted functions: Triton 3.6 (the GPU
# image's) refuses plain float globals there, and the 3.8 interpreter mishandles constexpr
# ones: 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
# sqrt(2/pi) = 0.7978845608028654, and the tanh approximation's 0.044715.

_deterministic: bool = os.environ.get("FASTMLP_DETERMINISTIC", "0") == "1"

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
F_EXP_MIN = tl.constexpr(EXP_MIN)
F_EXP_MAX = tl.constexpr(EXP_MAX)
#: float64 slots per program in the deterministic partials: sum, sumsq, sum3, sum4.
NPART = tl.constexpr(4)


def set_deterministic(flag: bool = True) -> None:
    """Make the kernels' statistics bitwise reproducible (``True``) or use float atomics.

    Deterministic mode replaces the float64 atomic additions of the moment sums
    by per-program partials that the pass's last program adds in program order, and
    uses a fixed tile configuration instead of autotuning (the partition of the
    work must not change between runs). It costs one scratch allocation per pass,
    a serial reduction over the per-program partials (a few microseconds per
    layer pass), and whatever the autotuner would have gained over the fixed
    tiles. Counts, min/max and histograms are exact in both modes.
    The default comes from the environment variable ``FASTMLP_DETERMINISTIC=1``.
    """
    global _deterministic
    _deterministic = bool(flag)


def is_deterministic() -> bool:
    """Whether deterministic statistics are on (see :func:`set_deterministic`)."""
    return _deterministic


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE for float32 under "highest", else TF32 (float32 only)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotuning bucket of the batch dimension: a power of two in [16, 8192]."""
    return min(max(next_pow2(m), 16), 8192)


# --------------------------------------------------------------------------- device helpers


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """``h = f(z)`` in float32 for the activation id ``ACT`` (see :data:`ACT_IDS`)."""
    if ACT == 1:  # sigmoid
        h = 1.0 / (1.0 + tl.exp(-z))
    elif ACT == 2:  # tanh
        h = _tanh(z)
    elif ACT == 3:  # softsign; +-inf gives NaN, exactly like z / (1 + |z|) in PyTorch
        h = z / (1.0 + tl.abs(z))
    elif ACT == 4:  # relu (propagates NaN like torch.relu)
        h = tl.where(z > 0.0, z, tl.where(z != z, z, 0.0))
    elif ACT == 5:  # gelu, exact: z * Phi(z)
        h = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 6:  # gelu, tanh approximation (PyTorch's approximate="tanh")
        h = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 7:  # silu: z * sigmoid(z)
        h = z / (1.0 + tl.exp(-z))
    else:
        h = z
    return h


@triton.jit
def _tanh(z):
    """tanh in float32, odd; a Taylor polynomial near 0 avoids the 1 - t cancellation."""
    a = tl.abs(z)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    a2 = a * a
    small = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    r = tl.where(a < 0.0625, small, big)
    h = tl.where(z < 0.0, -r, r)
    return tl.where(z != z, z, h)  # keep NaN


@triton.jit
def activation_backward(dh, h, ACT: tl.constexpr):
    """``dL/dz`` from ``dL/dh`` and the saved tensor (float32), as ``Activation.backward``.

    The saved tensor is the output ``h``, or the pre-activation ``z`` for the ids in
    :data:`FROM_INPUT` (GELU, SiLU: their derivative is not a function of ``h``).
    ``dh * f'``, except relu: ``where(h <= 0, 0, dh)`` (PyTorch's threshold_backward, so
    an infinite ``dh`` on an inactive unit gives 0, and a NaN ``h`` passes ``dh``).
    """
    if ACT == 1:
        dz = dh * (h * (1.0 - h))
    elif ACT == 2:
        dz = dh * (1.0 - h * h)
    elif ACT == 3:
        t = 1.0 - tl.abs(h)
        dz = dh * (t * t)
    elif ACT == 4:
        dz = tl.where(h <= 0.0, 0.0, dh)
    elif ACT == 5:  # h is z here: Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        dz = dh * (cdf + h * (0.3989422804014327 * tl.exp(-0.5 * h * h)))
    elif ACT == 6:  # h is z here
        z2 = h * h
        t = _tanh(0.7978845608028654 * (h + 0.044715 * z2 * h))
        inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z2)
        dz = dh * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * inner)
    elif ACT == 7:  # h is z here: s * (1 + z * (1 - s))
        sg = 1.0 / (1.0 + tl.exp(-h))
        dz = dh * (sg * (1.0 + h * (1.0 - sg)))
    else:
        dz = dh
    return dz


@triton.jit
def tile_moments(v, valid, shift, MOM4: tl.constexpr):
    """Moments of the finite, valid elements of the float32 tile ``v``.

    Returns ``(fin, n, s1, s2, nonfinite, mn, mx, s3, s4)``: the finite mask, the finite
    count (float64), ``sum(x - shift)`` and ``sum((x - shift)**2)`` (float64,
    from float32 sums centred on the tile mean), the count of valid non-finite
    elements (float64), the finite min/max (float32; +inf/-inf if none) and, when
    ``MOM4``, ``sum((x - shift)**3)`` and ``**4`` (float64, from float32 sums centred on the
    tile mean, re-expressed around ``shift`` by the binomial expansion; else 0).
    """
    fin = valid & (tl.abs(v) < float("inf"))  # false for NaN and +-Inf
    n32 = tl.sum(fin.to(tl.int32))
    nonfinite = tl.sum((valid & (fin == 0)).to(tl.int32)).to(tl.float64)
    vz = tl.where(fin, v, 0.0)
    n = n32.to(tl.float64)
    mean_t = tl.sum(vz) / tl.maximum(n32, 1).to(tl.float32)
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
    return fin, n, s1, s2, nonfinite, mn, mx, s3, s4


@triton.jit
def tile_histogram(v, fin, lo, hi, BINS: tl.constexpr, HB: tl.constexpr, FIXED: tl.constexpr):
    """Histogram row (``HB`` >= ``BINS + 2`` int32 counts: underflow, bins, overflow) of a tile.

    ``lo``/``hi`` are float64 scalars. Binning follows ``fastmlp.torch_path``:
    ``floor(x * scale) + offset`` with ``scale = bins / (hi - lo)`` and
    ``offset = -lo * scale`` (an integer for the ranges used) in float32, clamped to the bins
    (last bin closed); on an automatic range ``x < lo`` and ``x > hi`` go to
    under/overflow, on a fixed range they stay in the edge bins.
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
    DETERMINISTIC: tl.constexpr,
    MOM4: tl.constexpr,
):
    """Add one program's moments to the float64 row ``acc_row`` (or its partial slots)."""
    # Relaxed: plain reductions, no fence per atomic (nothing reads them within the pass;
    # the next kernel on the stream sees them all).
    tl.atomic_add(acc_row + F_COUNT, n, sem="relaxed")
    tl.atomic_add(acc_row + F_NONFINITE, nonfinite, sem="relaxed")
    if DETERMINISTIC:
        tl.store(part_slot, s1)
        tl.store(part_slot + 1, s2)
        if MOM4:
            tl.store(part_slot + 2, s3)
            tl.store(part_slot + 3, s4)
    else:
        tl.atomic_add(acc_row + F_SUM, s1, sem="relaxed")
        tl.atomic_add(acc_row + F_SUMSQ, s2, sem="relaxed")
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
        offs = tl.arange(0, BLOCK_P)
        for start in range(0, n_parts, BLOCK_P):
            p = start + offs
            msk = p < n_parts
            s1 += tl.sum(tl.load(part_ptr + NPART * p, mask=msk, other=0.0, volatile=True))
            s2 += tl.sum(tl.load(part_ptr + NPART * p + 1, mask=msk, other=0.0, volatile=True))
            if MOM4:
                s3 += tl.sum(tl.load(part_ptr + NPART * p + 2, mask=msk, other=0.0, volatile=True))
                s4 += tl.sum(tl.load(part_ptr + NPART * p + 3, mask=msk, other=0.0, volatile=True))
        tl.store(acc_row + F_SUM, tl.load(acc_row + F_SUM, volatile=True) + s1)
        tl.store(acc_row + F_SUMSQ, tl.load(acc_row + F_SUMSQ, volatile=True) + s2)
        if MOM4:
            tl.store(acc_row + F_SUM3, tl.load(acc_row + F_SUM3, volatile=True) + s3)
            tl.store(acc_row + F_SUM4, tl.load(acc_row + F_SUM4, volatile=True) + s4)
    if GROW:
        # Widen +-r to cover this pass's extremes, merging bins exactly
        # (fastmlp.torch_path._grow_range): bin i -> floor((i - B/2) / factor) + B/2.
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
