"""The forward kernel: ``h = f(x W^T + b)`` with the forward quantities' statistics.

``fwd_kernel`` is a tiled GEMM ``Z = X W^T`` (float32 accumulation) with bias and
activation in the epilogue. It stores ``H``, and ``Z`` too for the activations of
:data:`~.activations.FROM_INPUT` (GELU, SiLU: their derivative is not a function of ``H``,
so the backward reads ``Z`` instead), and reduces the ``preactivation`` (Z) and
``activation`` (H) statistics of its tile while it is in registers. The pass's last program
runs the finalize stage (:func:`~.tiles.finalize_pass`), so a pass is one launch.

Statistics are computed in float32 from the accumulator (before rounding to the output
dtype) and accumulated in float64. Every switch is a compile-time constant: ``STATS`` (any
statistics), ``HIST``, ``SAT``, ``ZEROS``, ``MOM4``, ``UNITS``, ``EXPS`` (the groups of
:class:`fastmlp.stats.config.StatsConfig`), ``FIXED_ACT`` (the activation's histogram range
is fixed), ``DETERMINISTIC``, ``PRECISION`` (``tl.dot``'s input precision) and ``ALIGN``
(8 where row strides, ``N`` and ``K`` are multiples of 8, passed divided by it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import (
    F_NFIELDS,
    F_SAT_HIGH,
    F_SAT_LOW,
    F_ZEROS,
    NPART,
    commit_exponents,
    commit_extents,
    commit_histogram,
    commit_moments,
    finalize_pass,
    grouped_pid,
    last_program,
    tile_exponents,
    tile_histogram,
    tile_moments,
    tile_zeros,
)

__all__ = ["fwd_kernel"]


@triton.jit
def fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    z_ptr,
    acc_ptr,
    shift_ptr,
    hist_ptr,
    range_ptr,
    units_ptr,
    exph_ptr,
    ext_ptr,
    part_ptr,
    ticket_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_hn,
    part_stride,
    sat_lo,
    sat_hi,
    M_BUCKET,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    STATS: tl.constexpr,
    SAT: tl.constexpr,
    HIST: tl.constexpr,
    ZEROS: tl.constexpr,
    MOM4: tl.constexpr,
    UNITS: tl.constexpr,
    EXPS: tl.constexpr,
    NEXP: tl.constexpr,
    HE: tl.constexpr,
    FIXED_ACT: tl.constexpr,
    BINS: tl.constexpr,
    HB: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The host passes these divided by ALIGN: multiplied back here, the compiler knows
    # them to be multiples of ALIGN (vector loads along rows). M_BUCKET (the batch's
    # power-of-two bucket) is only the autotuner's key.
    stride_xm = stride_xm * ALIGN
    stride_wn = stride_wn * ALIGN
    stride_hm = stride_hm * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n64[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptrs, mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    h = apply_activation(acc, ACT)
    h_ptrs = h_ptr + offs_m64[:, None] * stride_hm + offs_n64[None, :] * stride_hn
    valid = mask_m[:, None] & mask_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid)
    if STORE_Z:  # the backward of this activation needs z (same strides as h)
        z_ptrs = z_ptr + offs_m64[:, None] * stride_hm + offs_n64[None, :] * stride_hn
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=valid)

    if STATS:
        part_slot = part_ptr + NPART * pid
        # preactivation (automatic histogram range)
        row_z = acc_ptr + 0 * F_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4, sa = tile_moments(
            acc, valid, tl.load(shift_ptr + 0), MOM4
        )
        commit_moments(
            row_z, part_slot, n, s1, s2, nf, mn, mx, s3, s4, sa, DETERMINISTIC, MOM4, True
        )
        if ZEROS:
            tl.atomic_add(row_z + F_ZEROS, tile_zeros(acc, fin))
        if EXPS:
            commit_exponents(exph_ptr, tile_exponents(acc, fin, HE), NEXP, HE)
        if HIST:
            cnt = tile_histogram(
                acc, fin, tl.load(range_ptr + 0), tl.load(range_ptr + 1), BINS, HB, False
            )
            commit_histogram(hist_ptr, cnt, BINS, HB)
            commit_extents(ext_ptr, mn, mx)
        # activation
        row_h = acc_ptr + 1 * F_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4, sa = tile_moments(
            h, valid, tl.load(shift_ptr + 1), MOM4
        )
        commit_moments(
            row_h,
            part_slot + part_stride,
            n,
            s1,
            s2,
            nf,
            mn,
            mx,
            s3,
            s4,
            sa,
            DETERMINISTIC,
            MOM4,
            True,
        )
        if ZEROS:
            tl.atomic_add(row_h + F_ZEROS, tile_zeros(h, fin))
        if EXPS:
            commit_exponents(exph_ptr + NEXP, tile_exponents(h, fin, HE), NEXP, HE)
        if SAT:
            low = tl.sum((fin & (h <= sat_lo)).to(tl.int32)).to(tl.float64)
            high = tl.sum((fin & (h >= sat_hi)).to(tl.int32)).to(tl.float64)
            tl.atomic_add(row_h + F_SAT_LOW, low, sem="relaxed")
            tl.atomic_add(row_h + F_SAT_HIGH, high, sem="relaxed")
        if UNITS:
            # per-unit counts (fastmlp.stats.layout: rows count, active, sat_low, sat_high
            # of N columns): this tile's column sums
            u_fin = tl.sum(fin.to(tl.int32), axis=0).to(tl.float64)
            u_act = tl.sum((fin & (h > 0.0)).to(tl.int32), axis=0).to(tl.float64)
            tl.atomic_add(units_ptr + offs_n, u_fin, mask=mask_n, sem="relaxed")
            tl.atomic_add(units_ptr + N + offs_n, u_act, mask=mask_n, sem="relaxed")
            if SAT:
                u_lo = tl.sum((fin & (h <= sat_lo)).to(tl.int32), axis=0).to(tl.float64)
                u_hi = tl.sum((fin & (h >= sat_hi)).to(tl.int32), axis=0).to(tl.float64)
                tl.atomic_add(units_ptr + 2 * N + offs_n, u_lo, mask=mask_n, sem="relaxed")
                tl.atomic_add(units_ptr + 3 * N + offs_n, u_hi, mask=mask_n, sem="relaxed")
        if HIST:
            cnt = tile_histogram(
                h, fin, tl.load(range_ptr + 2), tl.load(range_ptr + 3), BINS, HB, FIXED_ACT
            )
            commit_histogram(hist_ptr + (BINS + 2), cnt, BINS, HB)
            if not FIXED_ACT:
                commit_extents(ext_ptr + 2, mn, mx)
        if DETERMINISTIC or HIST:
            if last_program(ticket_ptr):
                finalize_pass(
                    acc_ptr,
                    hist_ptr,
                    range_ptr,
                    ext_ptr,
                    part_ptr,
                    ticket_ptr,
                    tl.num_programs(0),
                    part_stride,
                    0,
                    F_NFIELDS,
                    DETERMINISTIC,
                    MOM4,
                    HIST,
                    HIST and not FIXED_ACT,
                    BINS,
                    HB,
                    256,
                )
