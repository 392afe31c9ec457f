"""The fused Triton backend: dense + bias + activation with its statistics in the kernels
of :mod:`fastmlp.kernels`, on CUDA (or on the CPU under ``TRITON_INTERPRET=1``).

:func:`supported` says which passes it takes; :func:`forward` and :func:`backward` run one
pass each (one kernel launch for the forward, one or two for the backward), recording
the pass's two quantities into the layer's buffers (:mod:`fastmlp.stats.layout`) on the
device, without reading anything back. The first pass after a reset runs elsewhere: it
calibrates the shift and histogram range that the kernels then use (``fastmlp.op.route``
decides).

Precision: float32 inputs use IEEE dots when ``torch.get_float32_matmul_precision() ==
"highest"``, TF32 otherwise; float16/bfloat16 inputs are multiplied with float32
accumulation. Statistics are computed in float32 from the accumulator and accumulated in
float64.

Tile configurations are autotuned on the GPU per batch bucket, shape and statistics
(:data:`_TUNE_KEY`), or fixed under the interpreter and in deterministic mode
(:func:`set_deterministic`: bitwise-reproducible statistics). Each kind of pass (shapes,
strides, dtypes, device, bias, activation, settings, histogram size, deterministic mode,
dot precision) is prepared once: its kernels compiled and their launches bound
(:mod:`fastmlp.backends.launch`); later passes of that kind allocate their outputs and
launch.
"""

from __future__ import annotations

import os

import torch
import triton

from fastmlp.activations import ACTIVATIONS, Activation
from fastmlp.backends import determinism
from fastmlp.backends.determinism import is_deterministic, set_deterministic
from fastmlp.backends.launch import Plan, prepare
from fastmlp.kernels import (
    ACT_IDS,
    FROM_INPUT,
    MAX_BINS,
    NPART,
    bwd_dw_kernel,
    bwd_dx_kernel,
    fwd_kernel,
)
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.layout import NEXP, Buffers, saturation_bounds

__all__ = [
    "INTERPRET",
    "MAX_BINS",
    "backward",
    "forward",
    "is_deterministic",
    "set_deterministic",
    "supported",
    "takes",
]

#: Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1`` when this module was
#: imported): the kernels then run on CPU tensors, as numpy code.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Deterministic mode (:mod:`fastmlp.backends.determinism`) replaces the float64 atomic
# additions of the moment sums by per-program partials that each pass's last program adds
# in program order, and uses a fixed tile configuration instead of autotuning (the
# partition of the work must not change between runs). It costs a serial reduction over
# the partials per pass and whatever the autotuner would have gained over the fixed tiles.
# Counts, min/max and histograms are exact in both modes.


# ----------------------------------------------------------------------------- inputs

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The built-in activations that the kernels implement, by name.
_KERNEL_ACTIVATIONS = {name: ACTIVATIONS[name] for name in ACT_IDS}


def takes(x: torch.Tensor, weight: torch.Tensor, activation: Activation, bins: int) -> bool:
    """Whether the kernels take these inputs, on whatever device: a non-empty 2-D ``x`` of
    float32, float16 or bfloat16, ``weight`` of the same dtype, a built-in activation, at
    most :data:`MAX_BINS` histogram bins."""
    dtype = x.dtype
    shape = x.shape
    return (
        dtype in _KERNEL_DTYPES
        and weight.dtype is dtype
        and bins <= MAX_BINS
        and _KERNEL_ACTIVATIONS.get(activation.name) is activation
        and len(shape) == 2
        and shape[0] > 0
    )


def supported(x: torch.Tensor, weight: torch.Tensor, activation: Activation, bins: int) -> bool:
    """Whether this backend runs a pass with these inputs: CUDA tensors (CPU tensors under
    the interpreter) that the kernels take (:func:`takes`); ``bins``: the histogram bins."""
    on_device = x.is_cuda or (INTERPRET and x.device.type == "cpu")
    return on_device and takes(x, weight, activation, bins)


# ----------------------------------------------------------------------------- statistics


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotuning bucket of the batch dimension: a power of two in [16, 8192]."""
    return min(max(next_pow2(m), 16), 8192)


def _stats_meta(settings: StatsConfig, bounded: bool, bins: int) -> dict[str, object]:
    """The kernels' compile-time statistics switches for ``settings`` (an activation with a
    fixed range where ``bounded``; ``bins`` histogram bins). The one place where a
    statistic group becomes a kernel switch: each kernel takes those it has, and the
    autotuning key is all of them (:data:`_TUNE_KEY`)."""
    on = settings.enabled
    exponents = on and settings.exponents
    return {
        "STATS": on,
        "HIST": on and settings.histograms,
        "SAT": on and settings.saturation,
        "ZEROS": on and settings.zeros,
        "MOM4": on and settings.moments4,
        "UNITS": on and settings.per_unit,
        "EXPS": exponents,
        "NEXP": NEXP,
        "HE": next_pow2(NEXP) if exponents else 2,
        "FIXED_ACT": on and bounded,
        "BINS": bins if on else 2,
        "HB": next_pow2(bins + 2) if on else 4,
    }


def _kernel_meta(kernel, meta: dict) -> dict:
    """The entries of ``meta`` that ``kernel`` takes."""
    names = set(kernel.arg_names)
    return {k: v for k, v in meta.items() if k in names}


# ----------------------------------------------------------------------------- tiles

# Under the interpreter (and in deterministic mode) a fixed configuration is used.
_INTERPRET_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
_FIXED_CFG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}
_FIXED_WARPS, _FIXED_STAGES = 8, 3  # (4 warps spill in float32)


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


# Candidates per batch bucket and kernel (few, to keep first-call tuning and compilation
# short). Every one compiles for sm_90 without register spills and fits in shared memory
# in float32 (IEEE and TF32) and bfloat16, with every statistic, which
# `python -m bench.compile_check --configs` checks (larger tiles, e.g. 128x128x64, spill
# with the statistics epilogue and are left out).
_FWD_BY_BUCKET = {
    "small": [_cfg(16, 64, 32, 4, 3), _cfg(16, 128, 32, 4, 3), _cfg(32, 64, 32, 4, 3)],
    "medium": [_cfg(32, 64, 32, 4, 3), _cfg(64, 64, 64, 8, 3), _cfg(64, 128, 32, 8, 3)],
    "large": [_cfg(64, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 64, 8, 3)],
}
_DX_BY_BUCKET = {
    # (16x128x32 spills in float32 for the 10-class output layer)
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


def _bucket_name(bucket: int) -> str:
    return "small" if bucket <= 64 else "medium" if bucket <= 1024 else "large"


def _pruner(by_bucket: dict):
    def prune(configs, named_args, **kwargs):
        """Keep the candidates of the batch bucket (the row dimension of the output)."""
        keep = {str(c) for c in by_bucket[_bucket_name(named_args["M_BUCKET"])]}
        return [c for c in configs if str(c) in keep] or configs[:1]

    return prune


#: What an autotuned choice depends on: the batch bucket, the shape, the activation, the
#: dot precision and every statistics switch (a kernel's tensors' dtypes are added by
#: Triton; switches a kernel does not take are left out of its key).
_TUNE_KEY = ("M_BUCKET", "N", "K", "ACT", "PRECISION", *_stats_meta(StatsConfig(), False, 2))


def _autotuned(kernel, restore: list[str], configs: list[triton.Config], prune):
    """``kernel`` autotuned over ``configs`` (keyed by :data:`_TUNE_KEY`); ``None`` under the
    interpreter. The buffers named in ``restore`` are saved before and restored after every
    benchmarking run, so tuning never counts statistics twice."""
    if INTERPRET:
        return None
    return triton.autotune(
        configs=configs,
        key=list(_TUNE_KEY),
        restore_value=restore,
        prune_configs_by={"early_config_prune": prune} if prune else None,
    )(kernel)


_STATS_BUFFERS = ["acc_ptr", "hist_ptr", "exph_ptr"]
_FWD_TUNED = _autotuned(
    fwd_kernel, [*_STATS_BUFFERS, "units_ptr"], _FWD_CONFIGS, _pruner(_FWD_BY_BUCKET)
)
_DX_TUNED = _autotuned(bwd_dx_kernel, [], _DX_CONFIGS, _pruner(_DX_BY_BUCKET))
_DW_TUNED = _autotuned(bwd_dw_kernel, _STATS_BUFFERS, _DW_CONFIGS, None)

# Kept per kind at most this many entries (shapes come and go; a full cache starts over).
_MAX_KINDS = 1024
# Autotuned choice per (kernel, shape bucket, variant): later first launches of that
# variant skip the autotuner.
_BEST: dict[tuple, tuple[dict, int, int]] = {}


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _MAX_KINDS:
        cache.clear()
    cache[key] = value


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
        best = (dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)
        _remember(_BEST, full_key, best)
        return best
    kw, warps, stages = best
    kernel[grid_fn(kw)](*args, **meta, **kw, num_warps=warps, num_stages=stages)
    return best


# Prepared launches by kernel and what its launch depends on (a backward's dX launch is
# shared by passes that differ only in what dX does not depend on).
_PLANS: dict[tuple, Plan] = {}


def _first_launch(plan_key, kernel, tuned, grid_fn, args, meta, det, key, n_head) -> Plan | None:
    """The first launch for ``plan_key``, through Triton's JIT path (tuning, compiling);
    returns the plan that later launches use (``None`` under the interpreter, which has no
    compiled kernels)."""
    cfg, warps, stages = _launch(kernel, tuned, grid_fn, args, meta, det, key)
    if INTERPRET:
        return None
    options = {} if warps is None else {"num_warps": warps, "num_stages": stages}
    plan = prepare(kernel, grid_fn(cfg)[0], args, {**meta, **cfg, **options}, n_head)
    _remember(_PLANS, plan_key, plan)
    return plan


# ``torch.get_float32_matmul_precision`` without its Python frame (read every pass): a
# float32 pass's ``tl.dot`` input precision is IEEE under "highest", else TF32.
_matmul_precision = getattr(
    torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision
)


def _align(*values: int) -> int:
    """8 if every value (row strides, N, K) is a multiple of 8, else 1: the kernels'
    ``ALIGN``. Those values are passed divided by it and multiplied back in the kernel,
    which tells the compiler their divisibility (16-byte vector loads along rows, and
    masks constant over a vector), where Triton's own specialisation only knows
    multiples of 16."""
    return 8 if all(v % 8 == 0 for v in values) else 1


# ----------------------------------------------------------------------------- work buffers

# Per-pass work buffers shared by every layer on a device (passes run in stream order):
# the finite extents ``[4, 2]`` (min, max) that the finalize stage consumes and resets to
# (inf, -inf), the tickets that elect a pass's last program, and the deterministic mode's
# per-program partials. Allocated on first use, so nothing is allocated once every kind of
# pass has run (CUDA-graph capture).
_EXTENTS: dict[torch.device, torch.Tensor] = {}
_TICKETS: dict[torch.device, torch.Tensor] = {}
_PARTIALS: dict[torch.device, torch.Tensor] = {}


def _extents(device: torch.device) -> torch.Tensor:
    buf = _EXTENTS.get(device)
    if buf is None:
        buf = torch.empty(4, 2, dtype=torch.float64, device=device)
        buf[:, 0] = float("inf")
        buf[:, 1] = float("-inf")
        _EXTENTS[device] = buf
    return buf


def _tickets(device: torch.device) -> torch.Tensor:
    """``[2]`` int32 (forward, dW); each pass leaves its ticket at 0."""
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


# ----------------------------------------------------------------------------- forward


def _template(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor viewed as ``shape``: ``torch.empty_like`` of it allocates a
    contiguous ``shape`` (with less argument parsing than ``torch.empty``)."""
    return torch.empty((), dtype=dtype, device=device).expand(*shape)


class _Forward:
    """A prepared kind of forward pass: its launch, a template of its output (see
    :func:`_template`), and the settings it was prepared for (kept, as their identity is
    in its key)."""

    __slots__ = ("launch", "out", "settings", "store_z", "units")

    def __init__(self, launch: Plan, out: torch.Tensor, store_z: bool, units: bool, settings):
        self.launch, self.out, self.store_z, self.units = launch, out, store_z, units
        self.settings = settings


_FORWARD: dict[tuple, _Forward] = {}


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h, z)``: ``h = f(x W^T + b)`` for ``x [M, K]`` and ``weight [N, K]``, and ``z`` for
    the activations whose backward needs it (GELU, SiLU; else ``None``); records
    ``preactivation`` and ``activation`` into ``bufs`` (calibrated) when
    ``settings.enabled``. No host reads."""
    dtype = x.dtype
    det = determinism._on and settings.enabled
    precision = "ieee"
    if dtype is torch.float32 and _matmul_precision() != "highest":
        precision = "tf32"
    # (``settings`` by identity: its entry holds it, so no other object can have its id)
    key = (
        x.shape,
        weight.shape,
        x.stride(),
        weight.stride(),
        dtype,
        x.device,
        bias is None,
        activation.name,
        id(settings),
        bufs.hist.shape,
        det,
        precision,
    )
    kind = _FORWARD.get(key)
    if kind is None:
        return _forward_first(key, x, weight, bias, activation, bufs, settings, det, precision)
    h = torch.empty_like(kind.out)
    z = torch.empty_like(kind.out) if kind.store_z else None
    kind.launch(
        (
            x,
            weight,
            x if bias is None else bias,
            h,
            h if z is None else z,
            bufs.acc,
            bufs.shift,
            bufs.hist,
            bufs.hist_range,
            bufs.units if kind.units else h,
            bufs.exp_hist,
        )
    )
    return h, z


def _forward_first(key, x, weight, bias, activation, bufs, settings, det, precision):
    """:func:`forward` for a kind of pass not yet prepared (every pass under the
    interpreter): through Triton's JIT path, then prepared for the next ones."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    act_id = ACT_IDS[activation.name]
    store_z = act_id in FROM_INPUT
    stats = _stats_meta(settings, activation.bounded, bufs.bins)
    h = torch.empty(M, N, dtype=dtype, device=device)
    z = torch.empty_like(h) if store_z else None
    units = stats["UNITS"]
    head = (x, weight, x if bias is None else bias, h, h if z is None else z, *bufs[:4])
    head += (bufs.units if units else h, bufs.exp_hist)
    plan_key = ("fwd", M, N, K, x.stride(), weight.stride(), dtype, device, bias is None)
    plan_key += (activation.name, settings, bufs.hist.shape, det, precision)
    plan = _PLANS.get(plan_key)
    if plan is not None:
        plan(head)
    else:

        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

        n_parts = grid(_INTERPRET_CFG if INTERPRET else _FIXED_CFG)[0] if det else 0
        part = _partials(device, n_parts, det)
        sat_lo = sat_hi = 0.0
        if stats["SAT"]:
            sat_lo, sat_hi = saturation_bounds(*settings.saturation_thresholds, torch.float32)
        a = 1
        if x.stride(1) == weight.stride(1) == 1:
            a = _align(x.stride(0), weight.stride(0), h.stride(0), N, K)
        args = (*head, _extents(device), part, _tickets(device)[0], M, N // a, K // a)
        args += (x.stride(0) // a, x.stride(1), weight.stride(0) // a, weight.stride(1))
        args += (h.stride(0) // a, h.stride(1), part.stride(0) if det else 0)
        args += (float(sat_lo), float(sat_hi), m_bucket(M))
        meta = {"ACT": act_id, "HAS_BIAS": bias is not None, "STORE_Z": store_z, **stats}
        meta.update(DETERMINISTIC=det, PRECISION=precision, ALIGN=a)
        meta = _kernel_meta(fwd_kernel, meta)
        tune = (m_bucket(M), N, K, dtype, device)
        plan = _first_launch(
            plan_key, fwd_kernel, _FWD_TUNED, grid, args, meta, det, tune, len(head)
        )
    if plan is not None:
        out = _template(M, N, dtype=dtype, device=device)
        _remember(_FORWARD, key, _Forward(plan, out, store_z, units, settings))
    return h, z


# ----------------------------------------------------------------------------- backward


class _Backward:
    """A prepared kind of backward pass: its dX and dW launches (``None`` where not run),
    templates of ``dx``, ``dW`` and ``db`` (see :func:`_template`), and the settings it was
    prepared for (as :class:`_Forward`)."""

    __slots__ = ("db", "dw", "dw_out", "dx", "dx_out", "settings")

    def __init__(self, dx: Plan | None, dw: Plan | None, outs: tuple, settings):
        self.dx, self.dw, self.settings = dx, dw, settings
        self.dx_out, self.dw_out, self.db = outs


_BACKWARD: dict[tuple, _Backward] = {}


def backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` from ``dh`` (``None`` where not needed); records
    ``preactivation_grad`` and ``weight_grad`` into ``bufs`` when ``settings.enabled``.
    ``saved`` is the forward's ``h``, or its ``z`` for the activations that need it."""
    dtype = x.dtype
    det = determinism._on and settings.enabled
    precision = "ieee"
    if dtype is torch.float32 and _matmul_precision() != "highest":
        precision = "tf32"
    # (``settings`` by identity, as in :func:`forward`)
    key = (
        x.shape,
        weight.shape,
        dh.stride(),
        saved.stride(),
        x.stride(),
        weight.stride(),
        dtype,
        x.device,
        activation.name,
        need_x,
        need_w,
        need_b,
        id(settings),
        bufs.hist.shape,
        det,
        precision,
    )
    kind = _BACKWARD.get(key)
    if kind is None:
        args = (dh, x, weight, saved, activation, bufs, settings, need_x, need_w, need_b)
        return _backward_first(key, *args, det, precision)
    dx = dw = db = None
    if kind.dx is not None:
        dx = torch.empty_like(kind.dx_out)
        kind.dx((dh, saved, weight, dx))
    if kind.dw is not None:
        if need_w:
            dw = torch.empty_like(kind.dw_out)
        if need_b:
            db = torch.empty_like(kind.db)
        kind.dw(
            (
                dh,
                saved,
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


def _backward_first(
    key, dh, x, weight, saved, activation, bufs, settings, need_x, need_w, need_b, det, precision
):
    """:func:`backward` for a kind of pass not yet prepared (every pass under the
    interpreter): through Triton's JIT path, then prepared for the next ones."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    act_id = ACT_IDS[activation.name]
    strides = (dh.stride(), saved.stride(), x.stride(), weight.stride())
    tune = (m_bucket(M), N, K, dtype, device)
    dx = dw = db = None
    dx_plan = dw_plan = None
    if need_x:
        dx = torch.empty(M, K, dtype=dtype, device=device)
        head = (dh, saved, weight, dx)
        plan_key = ("dx", M, N, K, strides, dtype, device, act_id, precision)
        dx_plan = _PLANS.get(plan_key)
        if dx_plan is not None:
            dx_plan(head)
        else:

            def grid_dx(cfg):
                return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)

            a = 1
            if dh.stride(1) == saved.stride(1) == weight.stride(1) == 1:
                a = _align(dh.stride(0), saved.stride(0), weight.stride(0), dx.stride(0), N, K)
            args = (*head, M, N // a, K // a, dh.stride(0) // a, dh.stride(1))
            args += (saved.stride(0) // a, saved.stride(1), weight.stride(0) // a)
            args += (weight.stride(1), dx.stride(0) // a, dx.stride(1), m_bucket(M))
            meta = {"ACT": act_id, "PRECISION": precision, "ALIGN": a}
            dx_plan = _first_launch(
                plan_key, bwd_dx_kernel, _DX_TUNED, grid_dx, args, meta, False, tune, len(head)
            )
    if need_w or need_b or settings.enabled:
        dw = torch.empty(N, K, dtype=dtype, device=device) if need_w else None
        db = torch.empty(N, dtype=dtype, device=device) if need_b else None
        head = (dh, saved, x, x if dw is None else dw, x if db is None else db, *bufs[:4])
        head += (bufs.exp_hist,)
        plan_key = ("dw", M, N, K, strides, dtype, device, act_id, need_w, need_b, settings)
        plan_key += (bufs.hist.shape, det, precision)
        dw_plan = _PLANS.get(plan_key)
        if dw_plan is not None:
            dw_plan(head)
        else:

            def grid_dw(cfg):
                return (triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)

            n_parts = grid_dw(_INTERPRET_CFG if INTERPRET else _FIXED_CFG)[0] if det else 0
            part = _partials(device, n_parts, det)
            a = 1  # (dW is allocated contiguous: its row stride is K)
            if dh.stride(1) == saved.stride(1) == x.stride(1) == 1:
                a = _align(dh.stride(0), saved.stride(0), x.stride(0), N, K)
            args = (*head, _extents(device), part, _tickets(device)[1], M, N // a, K // a)
            args += (dh.stride(0) // a, dh.stride(1), saved.stride(0) // a, saved.stride(1))
            args += (x.stride(0) // a, x.stride(1))
            args += (dw.stride(0) // a, dw.stride(1)) if dw is not None else (0, 0)
            args += (part.stride(0) if det else 0, m_bucket(M))
            stats = _stats_meta(settings, activation.bounded, bufs.bins)
            meta = {"ACT": act_id, "HAS_DB": need_b, "STORE_DW": need_w, **stats}
            meta.update(DETERMINISTIC=det, PRECISION=precision, ALIGN=a)
            meta = _kernel_meta(bwd_dw_kernel, meta)
            # (The dW kernel reduces over the batch: its "M_BUCKET" is the batch's as well.)
            dw_plan = _first_launch(
                plan_key, bwd_dw_kernel, _DW_TUNED, grid_dw, args, meta, det, tune, len(head)
            )
    if not INTERPRET:
        outs = (
            _template(M, K, dtype=dtype, device=device),
            _template(N, K, dtype=dtype, device=device),
            _template(N, dtype=dtype, device=device),
        )
        _remember(_BACKWARD, key, _Backward(dx_plan, dw_plan, outs, settings))
    return dx, dw, db
