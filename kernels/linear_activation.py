"""Fused ``h = f(x W^T + b)`` with statistics, forward and backward (Triton).

Kernels:

- ``_fwd_kernel``: tiled GEMM ``Z = X W^T`` (float32 accumulation), bias and
  activation in the epilogue, stores ``H`` (and ``Z`` too for GELU and SiLU, whose
  derivative is not a function of ``H``: the backward reads ``Z`` instead), and reduces the
  ``preactivation`` (Z) and ``activation`` (H) statistics of its tile while it
  is in registers.
- ``_bwd_dx_kernel``: ``dX = dZ W`` with ``dZ = dH * f'(H)`` (``dH * f'(Z)`` for GELU and
  SiLU) computed in the prologue of every K step (never stored).
- ``_bwd_dw_kernel``: ``dW = dZ^T X`` with the same prologue; its programs of
  the first K column block also reduce ``db = sum(dZ)``; the ``preactivation_grad``
  statistics of each dZ tile are reduced by exactly one program of its feature
  block (chosen round-robin over the K column blocks, to balance the work), and
  every program reduces the ``weight_grad`` statistics of its output tile.
- ``finalize_pass`` (kernels/utils.py): run by the last program of a pass (a ticket),
  the deterministic reduction and the device-side growth of histogram ranges, so each
  pass is one launch.

Precision: float32 inputs use IEEE dots when
``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise;
float16/bfloat16 inputs are multiplied with float32 accumulation. Statistics are
computed in float32 from the accumulator (before rounding to the output dtype)
and accumulated in float64. Float64 inputs (and custom activations) take the
PyTorch path.

Calibration: a quantity's first update after a reset fixes its shift and
automatic histogram range from the data (``fastmlp.torch_path.calibrate``); a pass in
which any of its quantities is not yet calibrated runs through the PyTorch path
(``fastmlp.op.route`` decides), later passes run the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from fastmlp.stats.layout import (
    NEXP,
    NFIELDS,
    Buffers,
    Settings,
    saturation_bounds,
)

from .utils import (
    ACT_IDS,
    F_SAT_HIGH,
    F_SAT_LOW,
    F_ZEROS,
    FROM_INPUT,
    GPU_DEVICE_TYPES,
    INTERPRET,
    NPART,
    activation_backward,
    apply_activation,
    commit_exponents,
    commit_extents,
    commit_histogram,
    commit_moments,
    dot_precision,
    finalize_pass,
    is_deterministic,
    last_program,
    m_bucket,
    next_pow2,
    tile_exponents,
    tile_histogram,
    tile_moments,
    tile_zeros,
)

__all__ = ["MAX_BINS", "backward", "forward", "supported"]

#: Most histogram bins the kernels take: the finalize kernel regroups bins through a
#: ``[HB, HB]`` tile (``HB`` = the next power of two above ``bins + 2``) in one program.
MAX_BINS = 256

_GL_NFIELDS = tl.constexpr(NFIELDS)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tile configurations. Under the interpreter (and in deterministic mode) a fixed one is used.
_INTERPRET_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
_FIXED_CFG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}
_FIXED_WARPS, _FIXED_STAGES = 8, 3  # (4 warps spill in float32)


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


# Candidates per batch bucket and kernel (few, to keep first-call tuning and compilation short).
# Every one compiles for sm_90 without register spills and fits in shared memory in float32
# (IEEE and TF32) and bfloat16, with every statistic: `compile_check --configs` checks it
# (larger tiles, e.g. 128x128x64, spill hundreds to thousands of bytes with the statistics
# epilogue and are left out).
_FWD_BY_BUCKET = {
    "small": [_cfg(16, 64, 32, 4, 3), _cfg(16, 128, 32, 4, 3), _cfg(32, 64, 32, 4, 3)],
    "medium": [_cfg(32, 64, 32, 4, 3), _cfg(64, 64, 64, 8, 3), _cfg(64, 128, 32, 8, 3)],
    "large": [_cfg(64, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 64, 8, 3)],
}
_DX_BY_BUCKET = {
    # (16x128x32 spills 4 bytes in float32 for the 10-class output layer)
    "small": [_cfg(16, 64, 32, 4, 3), _cfg(32, 64, 32, 4, 3)],
    "medium": [_cfg(32, 64, 32, 4, 3), _cfg(64, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3)],
    "large": [_cfg(64, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3)],
}
# dW = dZ^T X has an [N, K] output whatever the batch; the batch is its reduction.
_DW_CONFIGS = [_cfg(64, 64, 32, 8, 3), _cfg(64, 128, 32, 8, 3), _cfg(32, 64, 32, 4, 3)]


def _unique(configs):
    seen: dict[str, triton.Config] = {}
    for c in configs:
        seen.setdefault(str(c), c)
    return list(seen.values())


_FWD_CONFIGS = _unique(c for cs in _FWD_BY_BUCKET.values() for c in cs)
_DX_CONFIGS = _unique(c for cs in _DX_BY_BUCKET.values() for c in cs)


def _bucket_name(m_bucket: int) -> str:
    return "small" if m_bucket <= 64 else "medium" if m_bucket <= 1024 else "large"


def _pruner(by_bucket: dict):
    def prune(configs, named_args, **kwargs):
        """Keep the candidates of the batch bucket (the row dimension of the output)."""
        keep = {str(c) for c in by_bucket[_bucket_name(named_args["M_BUCKET"])]}
        return [c for c in configs if str(c) in keep] or configs[:1]

    return prune


def _maybe_autotune(restore: list[str], configs: list[triton.Config], prune):
    """Autotune on GPU (keyed by batch bucket, shape and variant); ``None`` under the interpreter.

    Accumulators named in ``restore`` are saved before and restored after every
    benchmarking run, so tuning never double-counts statistics.
    """

    def wrap(fn):
        if INTERPRET:
            return None
        return triton.autotune(
            configs=configs,
            key=[
                "M_BUCKET",
                "N",
                "K",
                "ACT",
                "PRECISION",
                "STATS",
                "HIST",
                "SAT",
                "ZEROS",
                "MOM4",
                "UNITS",
                "EXPS",
            ],
            restore_value=restore,
            prune_configs_by={"early_config_prune": prune} if prune else None,
        )(fn)

    return wrap


# ----------------------------------------------------------------------------- forward


@triton.jit
def _grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a linear program id to (pid_a, pid_b) in groups of ``GROUP`` rows (L2 reuse)."""
    width = GROUP * num_b
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(num_a - first, GROUP)
    pid_a = first + ((pid % width) % size)
    pid_b = (pid % width) // size
    return pid_a, pid_b


@triton.jit
def _fwd_kernel(
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
    # The host passes these divided by ALIGN (see _align): multiplied back here, the
    # compiler knows them to be multiples of ALIGN (vector loads along rows).
    stride_xm = stride_xm * ALIGN
    stride_wn = stride_wn * ALIGN
    stride_hm = stride_hm * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_m, num_n, GROUP_M)
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
        row_z = acc_ptr + 0 * _GL_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4 = tile_moments(acc, valid, tl.load(shift_ptr + 0), MOM4)
        commit_moments(row_z, part_slot, n, s1, s2, nf, mn, mx, s3, s4, DETERMINISTIC, MOM4)
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
        row_h = acc_ptr + 1 * _GL_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4 = tile_moments(h, valid, tl.load(shift_ptr + 1), MOM4)
        commit_moments(
            row_h, part_slot + part_stride, n, s1, s2, nf, mn, mx, s3, s4, DETERMINISTIC, MOM4
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
                    _GL_NFIELDS,
                    DETERMINISTIC,
                    MOM4,
                    HIST,
                    HIST and not FIXED_ACT,
                    BINS,
                    HB,
                    256,
                )


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dx_kernel(
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
    STATS: tl.constexpr,
    HIST: tl.constexpr,
    SAT: tl.constexpr,
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
    # The host passes these divided by ALIGN (see _align): multiplied back here, the
    # compiler knows them to be multiples of ALIGN (vector loads along rows).
    stride_dhm = stride_dhm * ALIGN
    stride_hm = stride_hm * ALIGN
    stride_wn = stride_wn * ALIGN
    stride_dxm = stride_dxm * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_N)
    pid_m, pid_k = _grouped_pid(pid, num_m, num_k, GROUP_M)
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
def _bwd_dw_kernel(
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
    SAT: tl.constexpr,
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
    # The host passes these divided by ALIGN (see _align): multiplied back here, the
    # compiler knows them to be multiples of ALIGN (vector loads along rows).
    stride_dhm = stride_dhm * ALIGN
    stride_hm = stride_hm * ALIGN
    stride_xm = stride_xm * ALIGN
    stride_dwn = stride_dwn * ALIGN
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_N)
    pid_n, pid_k = _grouped_pid(pid, num_n, num_k, GROUP_M)
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
                fin, n, s1, s2, nf, mn, mx, s3, s4 = tile_moments(dzt, mk, g_shift, MOM4)
                g_n += n
                g_s1 += s1
                g_s2 += s2
                g_s3 += s3
                g_s4 += s4
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
            row_g = acc_ptr + 2 * _GL_NFIELDS
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
                DETERMINISTIC,
                MOM4,
            )
            if ZEROS:
                tl.atomic_add(row_g + F_ZEROS, g_zeros)
            if EXPS:
                commit_exponents(exph_ptr + 2 * NEXP, g_exp, NEXP, HE)
            if HIST:
                commit_histogram(hist_ptr + 2 * (BINS + 2), g_hist, BINS, HB)
                commit_extents(ext_ptr + 4, g_mn, g_mx)
    if STATS:
        row_w = acc_ptr + 3 * _GL_NFIELDS
        fin, n, s1, s2, nf, mn, mx, s3, s4 = tile_moments(acc, valid, tl.load(shift_ptr + 3), MOM4)
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
            DETERMINISTIC,
            MOM4,
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
                    _GL_NFIELDS,
                    DETERMINISTIC,
                    MOM4,
                    HIST,
                    HIST,
                    BINS,
                    HB,
                    256,
                )


_STATS_BUFFERS = ["acc_ptr", "hist_ptr", "exph_ptr"]
_fwd_tuned = _maybe_autotune([*_STATS_BUFFERS, "units_ptr"], _FWD_CONFIGS, _pruner(_FWD_BY_BUCKET))(
    _fwd_kernel
)
_dx_tuned = _maybe_autotune([], _DX_CONFIGS, _pruner(_DX_BY_BUCKET))(_bwd_dx_kernel)
_dw_tuned = _maybe_autotune(_STATS_BUFFERS, _DW_CONFIGS, None)(_bwd_dw_kernel)


# ----------------------------------------------------------------------------- host side


# Autotuned choice per (kernel, shape bucket, variant): later calls launch the kernel directly,
# skipping the autotuner's per-call bookkeeping (launch overhead matters at small batches).
_BEST: dict[tuple, tuple[dict, int, int]] = {}


def _launch(kernel, tuned, grid_fn, args: tuple, meta: dict, deterministic: bool, key: tuple):
    """Launch through Triton's JIT path with a fixed configuration (interpreter,
    deterministic mode) or the autotuned one; returns ``(config, warps, stages)``."""
    if INTERPRET:
        cfg = dict(_INTERPRET_CFG)
        kernel[grid_fn(cfg)](*args, **meta, **cfg)
        return cfg, None, None
    if deterministic or tuned is None:
        cfg = dict(_FIXED_CFG)
        kernel[grid_fn(cfg)](*args, **meta, **cfg, num_warps=_FIXED_WARPS, num_stages=_FIXED_STAGES)
        return cfg, _FIXED_WARPS, _FIXED_STAGES
    full_key = (kernel.__name__, *key, *meta.items())
    best = _BEST.get(full_key)
    if best is None:
        tuned[lambda m: grid_fn(m)](*args, **meta)
        cfg = tuned.best_config
        best = _BEST[full_key] = (dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)
        return best
    kw, warps, stages = best
    kernel[grid_fn(kw)](*args, **meta, **kw, num_warps=warps, num_stages=stages)
    return best


def _direct_launch(run) -> tuple | None:
    """The C launch function and its fixed arguments, where ``run`` (the kernel's launcher)
    is Triton 3.8's ``CudaLauncher`` and its ``__call__`` would only forward to it: no
    global or profiling scratch memory to allocate, no sanitizer. ``None`` otherwise (other
    Triton versions, other backends): the launcher is called as ``JITFunction.run`` does."""
    from triton.backends.nvidia.driver import CudaLauncher

    if not (triton.__version__.startswith("3.8.") and type(run) is CudaLauncher):
        return None
    if run.global_scratch_size or run.profile_scratch_size or run.gsan_enabled:
        return None
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    return run.launch, coop, pdl, run.arg_annotations, run.kernel_signature


class _Plan:
    """One kernel launch prepared once per shape and variant: the compiled kernel, its
    grid and every argument after the per-call tensors, in the kernel's order
    (constexprs included, as Triton's launcher takes them).

    :meth:`__call__` does what ``JITFunction.run`` does on a cache hit, minus the work
    that cannot change for this shape (binding and specialising the arguments, the cache
    key, re-checking the kernel's global constants, computing the grid). Under Triton 3.8
    it calls the launcher's C launch function itself with the arguments that
    ``CudaLauncher.__call__`` would pass it (:func:`_direct_launch`); profilers' launch
    hooks, when any are set, still get their launch metadata.
    """

    __slots__ = (
        "kernel",
        "run",
        "function",
        "packed",
        "grid",
        "tail",
        "device",
        "stream",
        "direct",
    )

    def __init__(self, jit_fn, grid: tuple, args: tuple, meta: dict, cfg, warps, stages, n_head):
        from triton.runtime.driver import driver

        opts = {} if warps is None else {"num_warps": warps, "num_stages": stages}
        kernel = jit_fn.warmup(*args, grid=grid, **meta, **cfg, **opts)
        run = kernel.run  # loads the binary, builds the launcher
        self.kernel, self.run, self.function = kernel, run, kernel.function
        self.packed = kernel.packed_metadata
        self.grid = (grid[0], 1, 1)
        names = jit_fn.arg_names
        bound = dict(zip(names, (*args, *[None] * (len(names) - len(args))), strict=True))
        bound.update(meta, **cfg)
        assert len(bound) == len(names), "every kernel argument is positional or in meta/cfg"
        self.tail = tuple(bound.values())[n_head:]
        self.device = driver.active.get_current_device()
        self.stream = driver.active.get_current_stream
        self.direct = _direct_launch(run)

    def __call__(self, head: tuple) -> None:
        """Launch with the per-call tensors ``head`` (the kernel's first arguments)."""
        stream = self.stream(self.device)
        args = head + self.tail
        hooks = knobs.runtime
        enter = hooks.launch_enter_hook
        # Launch metadata only for profilers' hooks (an empty hook chain reads none of it).
        calls = getattr(enter, "calls", True)
        meta = self.kernel.launch_metadata(self.grid, stream, *args) if calls else None
        direct = self.direct
        if direct is not None:
            launch, coop, pdl, annotations, signature = direct
            launch(
                self.grid[0],
                1,
                1,
                stream,
                self.function,
                coop,
                pdl,
                self.packed,
                meta,
                enter,
                hooks.launch_exit_hook,
                None,  # global scratch
                None,  # profiling scratch
                annotations,
                signature,
                args,
            )
            return
        self.run(
            self.grid[0],
            1,
            1,
            stream,
            self.function,
            self.packed,
            meta,
            enter,
            hooks.launch_exit_hook,
            *args,
        )


_PLANS: dict[tuple, _Plan] = {}


def _first_launch(plan_key, kernel, tuned, grid_fn, args, meta, det, key, n_head) -> _Plan | None:
    """The first launch for ``plan_key``: through Triton's JIT path (tuning, compiling); then
    prepares and caches the plan that later calls launch (``None`` under the interpreter)."""
    cfg, warps, stages = _launch(kernel, tuned, grid_fn, args, meta, det, key)
    if INTERPRET:
        return None
    plan = _PLANS[plan_key] = _Plan(kernel, grid_fn(cfg), args, meta, cfg, warps, stages, n_head)
    return plan


# Per-pass work buffers shared by every layer on a device (passes run in stream order):
# the finite extents ``[4, 2]`` (min, max) that the finalize kernel consumes and resets to
# (inf, -inf), and the deterministic mode's per-program partials. Allocated on first use,
# so nothing is allocated once every shape has run (CUDA-graph capture).
_EXTENTS: dict[torch.device, torch.Tensor] = {}
_PARTIALS: dict[torch.device, torch.Tensor] = {}


def _extents(device: torch.device) -> torch.Tensor:
    buf = _EXTENTS.get(device)
    if buf is None:
        buf = torch.empty(4, 2, dtype=torch.float64, device=device)
        buf[:, 0] = float("inf")
        buf[:, 1] = float("-inf")
        _EXTENTS[device] = buf
    return buf


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device) -> torch.Tensor:
    """Per-pass tickets ``[2]`` int32 (forward, dW) that elect a pass's last program; each
    pass leaves its ticket at 0."""
    buf = _TICKETS.get(device)
    if buf is None:
        buf = _TICKETS[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


def _partials(device: torch.device, n_parts: int, deterministic: bool) -> torch.Tensor:
    """``[2, n_parts, NPART]`` float64 partial sums (a view of a grow-only buffer) in
    deterministic mode; otherwise a stand-in that the kernels never write."""
    if not deterministic:
        return _extents(device)
    n = max(n_parts, 1)
    buf = _PARTIALS.get(device)
    if buf is None or buf.shape[1] < n:
        buf = _PARTIALS[device] = torch.empty(2, n, NPART.value, dtype=torch.float64, device=device)
    return buf[:, :n]


def _stats_meta(bufs: Buffers, settings: Settings) -> dict:
    if not settings.enabled:
        off = {"STATS": False, "HIST": False, "SAT": False, "ZEROS": False, "MOM4": False}
        return {**off, "EXPS": False, "NEXP": NEXP, "HE": 2, "BINS": 2, "HB": 4}
    bins = bufs.bins
    return {
        "STATS": True,
        "HIST": settings.histograms,
        "SAT": settings.saturation,
        "ZEROS": settings.zeros,
        "MOM4": settings.moments4,
        "EXPS": settings.exponents,
        "NEXP": NEXP,
        "HE": next_pow2(NEXP) if settings.exponents else 2,
        "BINS": bins,
        "HB": next_pow2(bins + 2),
    }


def _align(*values: int) -> int:
    """8 if every value (row strides, N, K) is a multiple of 8, else 1: the kernels'
    ``ALIGN``. Those values are passed divided by it and multiplied back in the kernel,
    which tells the compiler their divisibility (16-byte vector loads along rows, and
    masks constant over a vector), where Triton's own specialisation only knows
    multiples of 16 (and 1000 is not one)."""
    return 8 if all(v % 8 == 0 for v in values) else 1


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_id: int,
    bufs: Buffers,
    settings: Settings,
    cache: dict | None = None,
) -> torch.Tensor:
    """``(h, z)``: ``h = f(x W^T + b)`` for ``x [M, K]``, ``weight [N, K]``, and ``z`` for the
    activations that need it in the backward (:data:`FROM_INPUT`; else ``None``); records
    ``preactivation`` and ``activation`` into ``bufs`` (calibrated) when
    ``settings.enabled``. No host reads.

    The launch is prepared once per shape and variant (:class:`_Plan`); a call then
    allocates ``h`` (and ``z``) and launches the compiled kernel with the prepared arguments.
    ``cache``: a dict the caller keeps for one kind of pass, the same for every call whose
    ``x`` and ``weight`` have the same shapes, strides, dtypes and device and whose bias
    presence, ``act_id``, ``settings`` and histogram size are the same (the op's, see
    ``fastmlp.op``): the plan is kept there too (per deterministic mode and dot precision)
    and found without making the plan's own key.
    """
    M, K = x.shape
    N = weight.shape[0]
    stats = settings.enabled
    det = stats and is_deterministic()
    precision = dot_precision(x.dtype)
    device = x.device
    h = torch.empty(M, N, dtype=x.dtype, device=device)
    z = torch.empty_like(h) if act_id in FROM_INPUT else None
    # The arguments that change from call to call (the plan's head).
    head = (
        x,
        weight,
        x if bias is None else bias,
        h,
        h if z is None else z,
        bufs.acc,
        bufs.shift,
        bufs.hist,
        bufs.hist_range,
        bufs.units if stats and settings.per_unit else h,
        bufs.exp_hist,
    )
    variant = (det, precision)
    plan = None if cache is None else cache.get(variant)
    if plan is not None:
        plan(head)
        return h, z
    plan_key = (
        "fwd",
        M,
        N,
        K,
        x.stride(),
        weight.stride(),
        x.dtype,
        device,
        act_id,
        bias is None,
        settings,
        bufs.hist.shape[-1],
        det,
        precision,
    )
    plan = _PLANS.get(plan_key)
    if plan is not None:
        if cache is not None:
            cache[variant] = plan
        plan(head)
        return h, z
    store_z = z is not None
    smeta = _stats_meta(bufs, settings)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    n_parts = grid(_INTERPRET_CFG if INTERPRET else _FIXED_CFG)[0] if det else 0
    part = _partials(x.device, n_parts, det)
    sat_lo, sat_hi = (
        saturation_bounds(settings.sat_low, settings.sat_high, torch.float32)
        if stats and settings.saturation
        else (0.0, 0.0)
    )
    a = 1
    if x.stride(1) == weight.stride(1) == 1:
        a = _align(x.stride(0), weight.stride(0), h.stride(0), N, K)
    args = (
        *head,
        _extents(x.device),
        part,
        _tickets(x.device)[0],
        M,
        N // a,
        K // a,
        x.stride(0) // a,
        x.stride(1),
        weight.stride(0) // a,
        weight.stride(1),
        h.stride(0) // a,
        h.stride(1),
        part.stride(0) if det else 0,
        float(sat_lo),
        float(sat_hi),
        m_bucket(M),
    )
    meta = dict(
        ACT=act_id,
        HAS_BIAS=bias is not None,
        STORE_Z=store_z,
        UNITS=stats and settings.per_unit,
        FIXED_ACT=stats and settings.fixed_activation,
        DETERMINISTIC=det,
        PRECISION=precision,
        ALIGN=a,
        **smeta,
    )
    key = (m_bucket(M), N, K, x.dtype, x.device)
    plan = _first_launch(plan_key, _fwd_kernel, _fwd_tuned, grid, args, meta, det, key, len(head))
    if plan is not None and cache is not None:
        cache[variant] = plan
    return h, z


def backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    act_id: int,
    bufs: Buffers,
    settings: Settings,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    cache: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` from ``dh`` (``None`` where not needed); records
    ``preactivation_grad`` and ``weight_grad`` into ``bufs`` when ``settings.enabled``.
    ``h`` is the forward's output, or its ``z`` for the activations of :data:`FROM_INPUT`.
    ``cache``: as for :func:`forward`, for calls with the same ``dh`` and ``h`` strides and
    ``need_x``, ``need_w``, ``need_b`` as well (bias presence aside)."""
    M, K = x.shape
    N = weight.shape[0]
    stats = settings.enabled
    det = stats and is_deterministic()
    precision = dot_precision(x.dtype)
    device = x.device
    variant = (det, precision)
    entry = None if cache is None else cache.get(variant)
    if entry is None:
        strides = (dh.stride(), h.stride(), x.stride(), weight.stride())
        key = (M, N, K, strides, x.dtype, device, act_id, need_x, need_w, need_b, settings)
        key += (bufs.hist.shape[-1], det, precision)
        entry = _BWD_PLANS.get(key)
        if entry is not None and cache is not None:
            cache[variant] = entry
    if entry is None:
        grads = _backward_first(dh, x, weight, h, act_id, bufs, settings, need_x, need_w, need_b)
        if not INTERPRET:
            dx_key = ("dx", M, N, K, strides, x.dtype, device, act_id, precision)
            dw_key = ("dw", *key[:6], act_id, need_w, need_b, *key[10:])
            plans = (_PLANS.get(dx_key) if need_x else None, _PLANS.get(dw_key))
            # dX and dW are allocated contiguous; like x and W when these are contiguous
            # (``empty_like`` then gives the same layout, with less argument parsing).
            entry = (*plans, strides[2] == (K, 1), strides[3] == (K, 1))
            _BWD_PLANS[key] = entry
            if cache is not None:
                cache[variant] = entry
        return grads
    dx_plan, dw_plan, x_dense, w_dense = entry
    dx = dw = db = None
    if dx_plan is not None:
        if x_dense:
            dx = torch.empty_like(x)
        else:
            dx = torch.empty(M, K, dtype=x.dtype, device=device)
        dx_plan((dh, h, weight, dx))
    if dw_plan is not None:
        if need_w:
            if w_dense:
                dw = torch.empty_like(weight)
            else:
                dw = torch.empty(N, K, dtype=weight.dtype, device=device)
        db = torch.empty(N, dtype=weight.dtype, device=device) if need_b else None
        dw_plan(
            (
                dh,
                h,
                x,
                x if dw is None else dw,
                x if db is None else db,
                bufs.acc,
                bufs.shift,
                bufs.hist,
                bufs.hist_range,
                bufs.exp_hist,
            )
        )
    return dx, dw, db


# Per backward variant: its dX plan or None, dW plan or None, and whether x and W are
# contiguous, once both plans are prepared.
_BWD_PLANS: dict[tuple, tuple[_Plan | None, _Plan | None, bool, bool]] = {}


def _backward_first(dh, x, weight, h, act_id, bufs, settings, need_x, need_w, need_b):
    """:func:`backward` through the per-kernel plans (prepared on their first launch)."""
    M, K = x.shape
    N = weight.shape[0]
    precision = dot_precision(x.dtype)
    stats = settings.enabled
    dx = dw = db = None
    strides = (dh.stride(), h.stride(), x.stride(), weight.stride())
    if need_x:
        dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
        plan_key = ("dx", M, N, K, strides, x.dtype, x.device, act_id, precision)
        head = (dh, h, weight, dx)
        plan = _PLANS.get(plan_key)
        if plan is not None:
            plan(head)
        else:

            def grid_dx(cfg):
                return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)

            a = 1
            if dh.stride(1) == h.stride(1) == weight.stride(1) == 1:
                a = _align(dh.stride(0), h.stride(0), weight.stride(0), dx.stride(0), N, K)
            args = (
                *head,
                M,
                N // a,
                K // a,
                dh.stride(0) // a,
                dh.stride(1),
                h.stride(0) // a,
                h.stride(1),
                weight.stride(0) // a,
                weight.stride(1),
                dx.stride(0) // a,
                dx.stride(1),
                m_bucket(M),
            )
            meta = dict(
                ACT=act_id, STATS=False, HIST=False, SAT=False, PRECISION=precision, ALIGN=a
            )
            key = (m_bucket(M), N, K, x.dtype, x.device)
            _first_launch(
                plan_key, _bwd_dx_kernel, _dx_tuned, grid_dx, args, meta, False, key, len(head)
            )
    if not (need_w or need_b or stats):
        return dx, dw, db
    det = stats and is_deterministic()
    dw = torch.empty(N, K, dtype=weight.dtype, device=weight.device) if need_w else None
    db = torch.empty(N, dtype=weight.dtype, device=weight.device) if need_b else None
    plan_key = (
        "dw",
        M,
        N,
        K,
        strides,
        x.dtype,
        x.device,
        act_id,
        need_w,
        need_b,
        settings,
        bufs.hist.shape[-1],
        det,
        precision,
    )
    head = (dh, h, x, dw if dw is not None else x, db if db is not None else x, *bufs[:4])
    head += (bufs.exp_hist,)
    plan = _PLANS.get(plan_key)
    if plan is not None:
        plan(head)
        return dx, dw, db
    smeta = _stats_meta(bufs, settings)

    def grid_dw(cfg):
        return (triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)

    n_parts = grid_dw(_INTERPRET_CFG if INTERPRET else _FIXED_CFG)[0] if det else 0
    part = _partials(x.device, n_parts, det)
    a = 1  # (dW is allocated contiguous: its row stride is K)
    if dh.stride(1) == h.stride(1) == x.stride(1) == 1:
        a = _align(dh.stride(0), h.stride(0), x.stride(0), N, K)
    args = (
        *head,
        _extents(x.device),
        part,
        _tickets(x.device)[1],
        M,
        N // a,
        K // a,
        dh.stride(0) // a,
        dh.stride(1),
        h.stride(0) // a,
        h.stride(1),
        x.stride(0) // a,
        x.stride(1),
        dw.stride(0) // a if dw is not None else 0,
        dw.stride(1) if dw is not None else 0,
        part.stride(0) if det else 0,
        m_bucket(M),
    )
    meta = dict(
        ACT=act_id,
        HAS_DB=need_b,
        STORE_DW=need_w,
        DETERMINISTIC=det,
        PRECISION=precision,
        ALIGN=a,
        **smeta,
    )
    # The dW kernel reduces over the batch: its "M_BUCKET" key is the batch as well.
    key = (m_bucket(M), N, K, x.dtype, x.device)
    _first_launch(plan_key, _bwd_dw_kernel, _dw_tuned, grid_dw, args, meta, det, key, len(head))
    return dx, dw, db


def supported(x: torch.Tensor, weight: torch.Tensor, activation: str, bins: int) -> bool:
    """Whether the fused kernels handle these inputs (``activation`` by name, ``bins``
    histogram bins)."""
    return (
        bins <= MAX_BINS
        and x.dim() == 2
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype == x.dtype
        and activation in ACT_IDS
        and x.shape[0] > 0
        and (
            x.is_cuda or x.device.type in GPU_DEVICE_TYPES or (INTERPRET and x.device.type == "cpu")
        )
    )
