"""The backward kernels: ``dX`` and ``dW``/``db`` with the gradient quantities' statistics.

- ``bwd_dx_kernel``: ``dX = dZ W`` with ``dZ = dH * f'(H)`` (``dH * f'(Z)`` for the
  activations of :data:`~.activations.FROM_INPUT`) computed in the prologue of every step
  of the reduction (never stored).
- ``bwd_dw_kernel``: ``dW = dZ^T X`` with the same prologue; its programs of the first
  column block also reduce ``db = sum(dZ)``. The ``preactivation_grad`` statistics of each
  dZ tile are reduced by exactly one program of its feature block (chosen round-robin over
  the column blocks, to balance the work), and every program reduces the ``weight_grad``
  statistics of its output tile; the pass's last program runs the finalize stage.

The compile-time switches are the forward kernel's (:mod:`.forward`). ``M_BUCKET`` is
only the autotuner's key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activations import activation_backward
from .tiles import (
    F_ABS_SUM,
    F_NFIELDS,
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

__all__ = ["bwd_dw_kernel", "bwd_dx_kernel"]


@triton.jit
def bwd_dx_kernel(
    dh_ptr,
    h_ptr,
    w_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dhm,
    stride_dhn,
    stride_hm,
    stride_hn,
    stride_wn,
    stride_wk,
    stride_dxm,
    stride_dxk,
    M_BUCKET,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``dX[M, K] = (dH * f'(H)) @ W``; output tile [BLOCK_M, BLOCK_N] over (M, K), loop over N.

    (The output's column block is named ``BLOCK_N`` and the reduction block
    ``BLOCK_K`` so that the same autotuning configurations apply.)
    """
    # The host passes these divided by ALIGN: multiplied back here, the compiler knows
    # them to be multiples of ALIGN (vector loads along rows).
    stride_dhm = stride_dhm * ALIGN
    stride_hm = stride_hm * ALIGN
    stride_wn = stride_wn * ALIGN
    stride_dxm = stride_dxm * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_N)
    pid_m, pid_k = grouped_pid(pid, num_m, num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (features of x)
    offs_r = tl.arange(0, BLOCK_K)  # reduction over N
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_m64 = offs_m.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    dh_ptrs = dh_ptr + offs_m64[:, None] * stride_dhm + offs_r[None, :] * stride_dhn
    h_ptrs = h_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hn
    w_ptrs = w_ptr + offs_r[:, None] * stride_wn + offs_k64[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        nn = n0 + offs_r
        mk = mask_m[:, None] & (nn[None, :] < N)
        dh = tl.load(dh_ptrs, mask=mk, other=0.0).to(tl.float32)
        if ACT == 0:
            dz = dh
        else:
            hv = tl.load(h_ptrs, mask=mk, other=0.0).to(tl.float32)
            dz = activation_backward(dh, hv, ACT)
        w = tl.load(w_ptrs, mask=(nn[:, None] < N) & mask_k[None, :], other=0.0)
        acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=PRECISION)
        dh_ptrs += BLOCK_K * stride_dhn
        h_ptrs += BLOCK_K * stride_hn
        w_ptrs += BLOCK_K * stride_wn
    dx_ptrs = dx_ptr + offs_m64[:, None] * stride_dxm + offs_k64[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def bwd_dw_kernel(
    dh_ptr,
    h_ptr,
    x_ptr,
    dw_ptr,
    db_ptr,
    acc_ptr,
    shift_ptr,
    hist_ptr,
    range_ptr,
    exph_ptr,
    ext_ptr,
    part_ptr,
    ticket_ptr,
    M,
    N,
    K,
    stride_dhm,
    stride_dhn,
    stride_hm,
    stride_hn,
    stride_xm,
    stride_xk,
    stride_dwn,
    stride_dwk,
    part_stride,
    M_BUCKET,
    ACT: tl.constexpr,
    HAS_DB: tl.constexpr,
    STORE_DW: tl.constexpr,
    STATS: tl.constexpr,
    HIST: tl.constexpr,
    ZEROS: tl.constexpr,
    MOM4: tl.constexpr,
    EXPS: tl.constexpr,
    NEXP: tl.constexpr,
    HE: tl.constexpr,
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
    """``dW[N, K] = dZ^T @ X``; output tile [BLOCK_M, BLOCK_N] over (N, K), loop over M.

    (Output rows are features ``n`` in blocks of ``BLOCK_M``, output columns are
    input features ``k`` in blocks of ``BLOCK_N``, the reduction over the batch
    uses ``BLOCK_K``, so the GEMM configurations carry over.)
    """
    # The host passes these divided by ALIGN: multiplied back here, the compiler knows
    # them to be multiples of ALIGN (vector loads along rows).
    stride_dhm = stride_dhm * ALIGN
    stride_hm = stride_hm * ALIGN
    stride_xm = stride_xm * ALIGN
    stride_dwn = stride_dwn * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_N)
    pid_n, pid_k = grouped_pid(pid, num_n, num_k, GROUP_M)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)  # batch rows
    mask_n = offs_n < N
    mask_k = offs_k < K
    offs_n64 = offs_n.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    offs_r64 = offs_r.to(tl.int64)
    # dZ^T tile [BLOCK_M (n), BLOCK_K (m)]
    dh_ptrs = dh_ptr + offs_n64[:, None] * stride_dhn + offs_r64[None, :] * stride_dhm
    h_ptrs = h_ptr + offs_n64[:, None] * stride_hn + offs_r64[None, :] * stride_hm
    x_ptrs = x_ptr + offs_r64[:, None] * stride_xm + offs_k64[None, :] * stride_xk
    first_k = pid_k == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    g_shift = 0.0
    if STATS:
        g_shift = tl.load(shift_ptr + 2)
    g_lo = 0.0
    g_hi = 0.0
    if HIST:
        g_lo = tl.load(range_ptr + 4)
        g_hi = tl.load(range_ptr + 5)
    g_n = tl.zeros((), tl.float64)
    g_s1 = tl.zeros((), tl.float64)
    g_s2 = tl.zeros((), tl.float64)
    g_nf = tl.zeros((), tl.float64)
    g_zeros = tl.zeros((), tl.float64)
    g_s3 = tl.zeros((), tl.float64)
    g_s4 = tl.zeros((), tl.float64)
    g_sa = tl.zeros((), tl.float64)
    g_exp = tl.zeros((HE,), dtype=tl.int32)
    g_mn = tl.full((), float("inf"), tl.float32)
    g_mx = tl.full((), float("-inf"), tl.float32)
    g_hist = tl.zeros((HB,), dtype=tl.int64)
    for m0 in range(0, M, BLOCK_K):
        mm = m0 + offs_r
        mk = mask_n[:, None] & (mm[None, :] < M)
        dh = tl.load(dh_ptrs, mask=mk, other=0.0).to(tl.float32)
        if ACT == 0:
            dzt = dh
        else:
            hv = tl.load(h_ptrs, mask=mk, other=0.0).to(tl.float32)
            dzt = activation_backward(dh, hv, ACT)
        xv = tl.load(x_ptrs, mask=(mm[:, None] < M) & mask_k[None, :], other=0.0)
        acc = tl.dot(dzt.to(xv.dtype), xv, acc, input_precision=PRECISION)
        if HAS_DB:
            if first_k:
                db += tl.sum(dzt, axis=1)
        if STATS:
            # Each dZ tile (n block, m block) is reduced by exactly one program of this
            # n block: the one whose pid_k is the m block's index modulo num_k. This spreads
            # the statistics evenly over the K-column programs.
            if (m0 // BLOCK_K) % num_k == pid_k:
                fin, n, s1, s2, nf, mn, mx, s3, s4, sa = tile_moments(dzt, mk, g_shift, MOM4)
                g_n += n
                g_s1 += s1
                g_s2 += s2
                g_s3 += s3
                g_s4 += s4
                if DETERMINISTIC:  # the program's partial, added in order at the end
                    g_sa += sa
                else:  # committed per tile: one loop-carried float64 fewer (no spills)
                    tl.atomic_add(acc_ptr + 2 * F_NFIELDS + F_ABS_SUM, sa, sem="relaxed")
                g_nf += nf
                if ZEROS:
                    g_zeros += tile_zeros(dzt, fin)
                if EXPS:
                    g_exp += tile_exponents(dzt, fin, HE)
                g_mn = tl.minimum(g_mn, mn)
                g_mx = tl.maximum(g_mx, mx)
                if HIST:
                    g_hist += tile_histogram(dzt, fin, g_lo, g_hi, BINS, HB, False).to(tl.int64)
        dh_ptrs += BLOCK_K * stride_dhm
        h_ptrs += BLOCK_K * stride_hm
        x_ptrs += BLOCK_K * stride_xm
    valid = mask_n[:, None] & mask_k[None, :]
    if STORE_DW:
        dw_ptrs = dw_ptr + offs_n64[:, None] * stride_dwn + offs_k64[None, :] * stride_dwk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=valid)
    if HAS_DB:
        if first_k:
            tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=mask_n)
    if STATS:
        active = pid_k < tl.cdiv(M, BLOCK_K)  # programs that reduced at least one dZ tile
        if DETERMINISTIC:
            active = True  # every partial slot must be written
        if active:
            row_g = acc_ptr + 2 * F_NFIELDS
            commit_moments(
                row_g,
                part_ptr + NPART * pid,
                g_n,
                g_s1,
                g_s2,
                g_nf,
                g_mn,
                g_mx,
                g_s3,
                g_s4,
                g_sa,
                DETERMINISTIC,
                MOM4,
                DETERMINISTIC,  # abs_sum: else committed per tile above
            )
            if ZEROS:
                tl.atomic_add(row_g + F_ZEROS, g_zeros)
            if EXPS:
                commit_exponents(exph_ptr + 2 * NEXP, g_exp, NEXP, HE)
            if HIST:
                commit_histogram(hist_ptr + 2 * (BINS + 2), g_hist, BINS, HB)
                commit_extents(ext_ptr + 4, g_mn, g_mx)
    if STATS:
        row_w = acc_ptr + 3 * F_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4, sa = tile_moments(
            acc, valid, tl.load(shift_ptr + 3), MOM4
        )
        commit_moments(
            row_w,
            part_ptr + part_stride + NPART * pid,
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
            tl.atomic_add(row_w + F_ZEROS, tile_zeros(acc, fin))
        if EXPS:
            commit_exponents(exph_ptr + 3 * NEXP, tile_exponents(acc, fin, HE), NEXP, HE)
        if HIST:
            cnt = tile_histogram(
                acc, fin, tl.load(range_ptr + 6), tl.load(range_ptr + 7), BINS, HB, False
            )
            commit_histogram(hist_ptr + 3 * (BINS + 2), cnt, BINS, HB)
            commit_extents(ext_ptr + 6, mn, mx)
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
                    2,
                    F_NFIELDS,
                    DETERMINISTIC,
                    MOM4,
                    HIST,
                    HIST,
                    BINS,
                    HB,
                    256,
                )
