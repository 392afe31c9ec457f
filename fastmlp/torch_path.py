"""The pure-PyTorch path: dense + bias + activation with statistics, on any device.

It computes what the Triton kernels compute (up to float rounding), with ordinary
PyTorch ops, and is the reference the kernels are tested against. On the CPU, host
reads are free, so it takes cheap shortcuts: no non-finite masks when a batch's min
and max are finite, float32 sums centred where they stay accurate (float64 merges),
scalars updated through NumPy views of the buffers, histogram slots counted in pairs by
one ``bincount``, no range bookkeeping when nothing left the histogram range; float32
matmuls run in oneDNN with the activation fused when nothing needs the pre-activation.
On other devices it never reads device values on the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from fastmlp.activations import Activation
from fastmlp.stats import (
    ACTIVATION,
    COUNT,
    MAX,
    MIN,
    NONFINITE,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUMSQ,
    WEIGHT_GRAD,
    LayerStats,
    as_float32,
    pow2_above,
)

__all__ = ["accumulate", "linear_activation", "merge_block_", "regroup_bins"]


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
) -> None:
    """Merge one block of values into ``acc`` (a row of ``LayerStats.acc``) with device ops.

    The block has ``count`` finite values with sums of ``x - center`` and
    ``(x - center)**2`` (``center`` is any value near the block's mean) and
    extremes ``mn``, ``mx``; the sums are re-expressed around ``shift`` in float64.
    """
    count, center, s1, s2 = (t.to(torch.float64) for t in (count, center, dev_sum, dev_sumsq))
    delta = center - shift
    acc[COUNT : SUMSQ + 1] += torch.stack(
        (count, s1 + count * delta, s2 + delta * (2 * s1 + count * delta))
    )
    torch.minimum(acc[MIN], mn.to(torch.float64), out=acc[MIN])
    torch.maximum(acc[MAX], mx.to(torch.float64), out=acc[MAX])


def accumulate(
    stats: LayerStats, q: int, x: torch.Tensor, total: Callable[[], torch.Tensor] | None = None
) -> None:
    """Accumulate quantity ``q`` of ``x`` into ``stats`` (which must be calibrated for ``q``).

    ``total``, when the caller has a cheaper way to it, returns the sum of ``x``'s elements
    (in ``x``'s precision); the CPU path calls it instead of its own summing pass, and
    nothing else calls it. ``x`` is detached first, so no autograd graph is recorded (no
    ``no_grad`` context needed on this hot path).
    """
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        return
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.device.type == "cpu":
        mn, mx = (float(v) for v in torch.aminmax(x))
        # aminmax propagates NaN and returns an infinity if there is one: finite extremes
        # mean every element is finite.
        if math.isfinite(mn) and math.isfinite(mx):
            _accumulate_finite_on_host(stats, q, x, mn, mx, total)
            return
    _accumulate_masked(stats, q, x)


def _accumulate_finite_on_host(
    stats: LayerStats,
    q: int,
    x: torch.Tensor,
    mn: float,
    mx: float,
    total: Callable[[], torch.Tensor] | None,
) -> None:
    """CPU fast path for an all-finite ``x``: few passes, scratch buffers, host-side scalars."""
    n = x.numel()
    d = stats.scratch(n, x.dtype)
    acc, shift, _, _ = stats.host_arrays()
    # Sums of x - c and (x - c)**2 in the input precision are accurate when the offset of
    # the batch mean from c is at most the batch's spread (the error is relative to
    # var + offset**2). c is the previous batch's hint (a float32 number, so x - c is
    # computed against exactly c): 0 when that batch was centred enough (no subtraction
    # pass at all), else its mean. If this batch is off, recentre.
    c = stats.center_hint[q]
    if c == 0:
        s1 = float(x.sum() if total is None else total())
        s2 = float(torch.dot(x, x))
    else:
        s1 = float(torch.sub(x, c, out=d).sum())
        s2 = float(torch.dot(d, d))
    offset = s1 / n
    if offset * offset > s2 / n - offset * offset:
        c = as_float32(c + offset)
        s1 = float(torch.sub(x, c, out=d).sum())
        s2 = float(torch.dot(d, d))
    if not (math.isfinite(s1) and math.isfinite(s2)):
        # Huge finite values overflowed float32 sums: take the float64 path instead.
        _accumulate_masked(stats, q, x)
        return
    mean = c + s1 / n
    var = max(s2 / n - (s1 / n) ** 2, 0.0)
    stats.center_hint[q] = 0.0 if mean * mean <= var else as_float32(mean)
    row = acc[q]
    delta = c - float(shift[q])
    row[COUNT] += n
    row[SUM] += s1 + n * delta
    row[SUMSQ] += s2 + delta * (2 * s1 + n * delta)
    row[MIN] = min(row[MIN], mn)
    row[MAX] = max(row[MAX], mx)
    if q == ACTIVATION and stats.saturation_active:
        lo, hi = stats.saturation_bounds(x.dtype)
        row[SAT_LOW] += _count(torch.le(x, lo, out=d))
        row[SAT_HIGH] += _count(torch.ge(x, hi, out=d))
    if stats.histograms:
        _histogram_on_host(stats, q, x, mn, mx)


def _histogram_on_host(stats: LayerStats, q: int, x: torch.Tensor, mn: float, mx: float) -> None:
    bins = stats.bins
    _, _, hist, hist_range = stats.host_arrays()
    lo, hi = hist_range[q].tolist()
    # bin = floor(x * scale) + offset with scale = bins / (hi - lo), offset = -lo * scale (an
    # integer for every range used here, and x * scale is exact for power-of-two scales):
    # unlike floor((x - lo) * scale), values near an edge far from lo keep their side of it.
    scale = bins / (hi - lo)
    offset = int(-lo * scale)
    inside = mn >= lo and mx <= hi
    # Slot ``bins`` holds x == hi (or values rounding just below it): the last bin is closed.
    counts = _slot_counts(stats, x, scale, offset, bins + 1, clamp=not inside)
    row = hist[q]
    row[1 : bins + 1] += counts[:bins]
    row[bins] += counts[bins]
    if not inside:
        work = stats.scratch(x.numel(), x.dtype)
        nu = _count(torch.lt(x, lo, out=work))  # range edges are powers of two: exact
        no = _count(torch.gt(x, hi, out=work))
        row[0] += nu
        row[1] -= nu
        row[bins + 1] += no
        row[bins] -= no
        _grow_range(stats, q, torch.tensor(max(abs(mn), abs(mx)), dtype=torch.float64))


def _slot_counts(
    stats: LayerStats, x: torch.Tensor, scale: float, offset: int, slots: int, clamp: bool
) -> np.ndarray:
    """Counts of the slots ``floor(x * scale) + offset`` (clamped to ``[0, slots)`` when
    ``clamp``), as int64 numpy.

    Consecutive pairs are counted as one value ``a * slots + b`` of a ``slots**2`` table,
    then folded back: half the serial ``bincount`` work of counting each value.
    """
    n = x.numel()
    m = n // 2
    t = torch.mul(x if n == 2 * m else x[: 2 * m], scale, out=stats.scratch(2 * m, x.dtype))
    t.floor_()
    if clamp:
        t.clamp_(-offset, slots - 1 - offset)
    pairs = torch.add(t[1::2], t[0::2], alpha=slots, out=stats.scratch(m, x.dtype, slot=1))
    pairs.add_(offset * (slots + 1))
    # Converted in place (an integer type of the same width): one buffer stays in cache.
    idx = pairs.view(torch.int64 if pairs.dtype == torch.float64 else torch.int32)
    idx.copy_(pairs)
    table = torch.bincount(idx, minlength=slots * slots).numpy().reshape(slots, slots)
    counts = table.sum(0) + table.sum(1)
    if n % 2:
        last = int(torch.mul(x[-1:], scale).floor_()) + offset  # rounded as t above
        counts[min(max(last, 0), slots - 1)] += 1
    return counts


def _count(flags: torch.Tensor) -> int:
    """Number of ones in a 0/1 float tensor, exact (float64 sums past float32's 2**24)."""
    return int(flags.sum(dtype=torch.float64 if flags.numel() > 2**24 else None))


def _accumulate_masked(stats: LayerStats, q: int, x: torch.Tensor) -> None:
    """Any device, any values: non-finite elements are masked out; no host reads.

    Moments are summed in float64, so finite values near the float32 limit cannot
    overflow them.
    """
    fin = torch.isfinite(x)
    n = fin.sum()
    acc = stats.acc[q]
    acc[NONFINITE] += x.numel() - n
    xd = torch.where(fin, x, 0).to(torch.float64)
    center = xd.sum() / n.clamp(min=1)
    d = torch.where(fin, xd - center, 0)
    mn = torch.where(fin, x, float("inf")).amin()
    mx = torch.where(fin, x, float("-inf")).amax()
    merge_block_(acc, stats.shift[q], n, center, d.sum(), torch.dot(d, d), mn, mx)
    if q == ACTIVATION and stats.saturation_active:
        lo, hi = stats.saturation_bounds(x.dtype)
        acc[SAT_LOW] += ((x <= lo) & fin).sum()
        acc[SAT_HIGH] += ((x >= hi) & fin).sum()
    if not stats.histograms:
        return
    bins = stats.bins
    rng = stats.hist_range[q]
    lo, hi = rng[0].to(x.dtype), rng[1].to(x.dtype)
    scale = bins / (rng[1] - rng[0])
    t = torch.floor(x * scale.to(x.dtype)).add_((-rng[0] * scale).to(x.dtype)).clamp_(0, bins)
    # Non-finite elements go to an extra slot that is dropped.
    idx = torch.where(fin, t, bins + 1).to(torch.int32)
    counts = torch.bincount(idx, minlength=bins + 2)
    nu = ((x < lo) & fin).sum()
    no = ((x > hi) & fin).sum()
    row = stats.hist[q]
    row[1 : bins + 1] += counts[:bins]
    row[bins] += counts[bins]
    row[0] += nu
    row[1] -= nu
    row[bins + 1] += no
    row[bins] -= no
    if not stats.fixed_range[q]:
        _grow_range(stats, q, torch.maximum(mn.abs(), mx.abs()))


def regroup_bins(counts: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Counts of bins on ``+-R`` regrouped onto ``+-R * factor`` (a power of two >= 1), exactly.

    Bin ``i`` (offset ``i - bins/2`` from the centre, ``bins`` even) falls into bin
    ``floor((i - bins/2) / factor) + bins/2``; device ops only.
    """
    bins = counts.shape[-1]
    i = torch.arange(bins, device=counts.device, dtype=torch.float64)
    j = torch.floor((i - bins // 2) / factor).to(torch.int64) + bins // 2
    return torch.zeros_like(counts).index_add_(0, j, counts)


def _grow_range(stats: LayerStats, q: int, maxabs: torch.Tensor) -> None:
    """Widen ``hist_range[q]`` by powers of two to cover ``maxabs``, merging bins exactly."""
    bins = stats.bins
    rng = stats.hist_range[q]
    r = rng[1]
    maxabs = maxabs.to(rng.device, torch.float64)
    # A batch without finite values (maxabs = inf from empty extremes) leaves the range alone.
    new_r = torch.where(torch.isfinite(maxabs) & (maxabs > r), pow2_above(maxabs), r)
    row = stats.hist[q]
    row[1 : bins + 1] = regroup_bins(row[1 : bins + 1], new_r / r)
    rng[0] = -new_r
    rng[1] = new_r


# oneDNN's matmul with the bias and activation fused into its epilogue: the CPU kernel
# PyTorch's own compiler uses for linear layers. On the x86 CPU measured here it is faster
# than MKL's sgemm plus a separate activation pass (bench/: ``fastmlp-off`` vs ``plain``),
# except on tiny products, where its fixed cost (~15 us) dominates.
_ONEDNN_POST = {"identity": "none", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ONEDNN_MIN_MACS = 2**18


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.shape[0] * x.shape[1] * weight.shape[0] >= _ONEDNN_MIN_MACS
        and torch.backends.mkldnn.enabled
        and _onednn_works()
    )


@functools.cache
def _onednn_works() -> bool:
    """Whether this PyTorch build runs oneDNN's fused linear (checked once, on a tiny case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, w, torch.zeros(4), "tanh", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, torch.tanh(torch.full((2, 4), 3.0))))


def _dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then ``activation`` if given (one of ``_ONEDNN_POST``'s);
    oneDNN, with the activation fused, on float32 CPU tensors, cuBLAS/MKL otherwise."""
    if _onednn_usable(x, weight):
        post = "none" if activation is None else _ONEDNN_POST[activation.name]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "")
    z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return z if activation is None else activation.forward(z)


class LinearActivationFunction(torch.autograd.Function):
    """``h = f(x W^T + b)`` with statistics recorded in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: Activation, stats: LayerStats | None):
        if stats is None and activation.name in _ONEDNN_POST:
            h = _dense(x, weight, bias, activation)
        else:
            z = _dense(x, weight, bias)
            h = activation.forward(z)
            if stats is not None:
                stats.update(PREACTIVATION, z)
                stats.update(ACTIVATION, h)
        ctx.save_for_backward(x, weight, h)
        ctx.activation = activation
        ctx.stats = stats
        ctx.has_bias = bias is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        x, weight, h = ctx.saved_tensors
        activation: Activation = ctx.activation
        stats: LayerStats | None = ctx.stats
        dz = activation.backward(dh, h)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        db = dz.sum(0) if ctx.has_bias and need_b else None
        if stats is not None:
            stats.update(PREACTIVATION_GRAD, dz, total=None if db is None else db.sum)
        dw = None
        if need_w or stats is not None:
            dw = dz.t() @ x
            if stats is not None:
                # sum(dz.T @ x) from the row sums of the small operands, not a pass over dW.
                stats.update(WEIGHT_GRAD, dw, total=lambda: torch.dot(dz.sum(1), x.sum(1)))
        # dx last: it is the next layer's first input, still in cache when that one starts.
        dx = _dense(dz, weight.t(), None) if need_x else None
        return dx, dw if need_w else None, db, None, None


@torch.compiler.disable
def linear_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    stats: LayerStats | None,
) -> torch.Tensor:
    """``f(x W^T + b)`` for a 2-D ``x``, recording statistics into ``stats`` when given.

    Kept out of ``torch.compile`` graphs (it reads statistics on the host on the CPU):
    a compiled model runs this layer eagerly and compiles the rest.
    """
    return LinearActivationFunction.apply(x, weight, bias, activation, stats)
