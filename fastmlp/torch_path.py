"""The pure-PyTorch path: dense + bias + activation with statistics, on any device.

It computes exactly what the Triton kernels compute, with ordinary PyTorch ops,
and is the reference the kernels are tested against. On the CPU, host reads are
free, so it takes cheap shortcuts (skipping the non-finite masks when a batch's
sum is finite, skipping range bookkeeping when nothing overflowed); on other
devices it never reads device values on the host.
"""

from __future__ import annotations

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
    pow2_at_or_above,
)

__all__ = ["accumulate", "linear_activation", "merge_moments_"]


@torch.no_grad()
def merge_moments_(
    acc: torch.Tensor,
    shift: torch.Tensor,
    count: torch.Tensor,
    mean: torch.Tensor,
    dev_sum: torch.Tensor,
    dev_sumsq: torch.Tensor,
) -> None:
    """Add a block's moments to ``acc`` (a row of ``LayerStats.acc``), in float64.

    The block has ``count`` finite values, a provisional ``mean`` and the sums
    of ``x - mean`` and ``(x - mean)**2``; they are re-expressed around ``shift``.
    """
    count, mean, s1, s2 = (t.to(torch.float64) for t in (count, mean, dev_sum, dev_sumsq))
    delta = mean - shift
    upd = torch.stack((count, s1 + count * delta, s2 + delta * (2 * s1 + count * delta)))
    acc[COUNT : SUMSQ + 1] += upd


@torch.no_grad()
def accumulate(stats: LayerStats, q: int, x: torch.Tensor) -> None:
    """Accumulate quantity ``q`` of ``x`` into ``stats`` (which must be calibrated for ``q``)."""
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        return
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    on_cpu = x.device.type == "cpu"
    acc = stats.acc[q]
    total = x.sum()
    # A finite sum means every element is finite (an overflowing sum just takes the masked path).
    all_finite = on_cpu and bool(torch.isfinite(total))
    if all_finite:
        fin = None
        n = torch.tensor(x.numel(), dtype=x.dtype)
        mean = total / x.numel()
        d = x - mean
        mn, mx = torch.aminmax(x)
    else:
        fin = torch.isfinite(x)
        n = fin.sum()
        mean = torch.where(fin, x, 0).sum() / n.clamp(min=1)
        d = torch.where(fin, x - mean, 0)
        mn = torch.where(fin, x, float("inf")).amin()
        mx = torch.where(fin, x, float("-inf")).amax()
        acc[NONFINITE] += x.numel() - n
    merge_moments_(acc, stats.shift[q], n, mean, d.sum(), torch.dot(d, d))
    torch.minimum(acc[MIN], mn.to(torch.float64), out=acc[MIN])
    torch.maximum(acc[MAX], mx.to(torch.float64), out=acc[MAX])

    if q == ACTIVATION and stats.saturation_active:
        lo, hi = stats.thresholds
        low, high = x <= lo, x >= hi
        if fin is not None:
            low, high = low & fin, high & fin
        acc[SAT_LOW] += low.sum()
        acc[SAT_HIGH] += high.sum()

    if stats.histograms:
        _histogram(stats, q, x, fin, mn, mx, on_cpu)


def _histogram(
    stats: LayerStats,
    q: int,
    x: torch.Tensor,
    fin: torch.Tensor | None,
    mn: torch.Tensor,
    mx: torch.Tensor,
    on_cpu: bool,
) -> None:
    bins = stats.bins
    row = stats.hist[q]
    rng = stats.hist_range[q]
    lo, hi = rng[0], rng[1]
    fixed = stats.fixed_range[q]
    if on_cpu:
        lo, hi = lo.item(), hi.item()
    if fin is not None:
        x = torch.where(fin, x, lo)  # placeholders land in bin 0 and are taken out below
    scale = bins / (hi - lo)
    t = (x - lo).mul_(scale).floor_().clamp_(0, bins - 1)
    row[1 : bins + 1] += torch.bincount(t.to(torch.int32), minlength=bins)
    if fin is not None:
        row[1] -= (~fin).sum()
    if fixed:
        return  # a bounded activation never leaves its range
    # Out-of-range values were clamped into the edge bins: move them to under/overflow.
    if not on_cpu or mn.item() < lo or mx.item() > hi:
        under, over = x < lo, x > hi
        if fin is not None:
            under, over = under & fin, over & fin
        nu, no = under.sum(), over.sum()
        row[0] += nu
        row[1] -= nu
        row[bins + 1] += no
        row[bins] -= no
        _grow_range(stats, q, torch.maximum(mn.abs(), mx.abs()))


def _grow_range(stats: LayerStats, q: int, maxabs: torch.Tensor) -> None:
    """Widen ``hist_range[q]`` by powers of two to cover ``maxabs``, merging bins exactly."""
    bins = stats.bins
    rng = stats.hist_range[q]
    r = rng[1]
    new_r = torch.maximum(r, pow2_at_or_above(maxabs))
    factor = new_r / r
    i = torch.arange(bins, device=rng.device, dtype=torch.float64)
    j = torch.floor((i - bins // 2) / factor).to(torch.int64) + bins // 2
    row = stats.hist[q]
    merged = torch.zeros(bins, dtype=row.dtype, device=row.device)
    merged.index_add_(0, j, row[1 : bins + 1])
    row[1 : bins + 1] = merged
    rng[0] = -new_r
    rng[1] = new_r


class LinearActivationFunction(torch.autograd.Function):
    """``h = f(x W^T + b)`` with statistics recorded in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: Activation, stats: LayerStats | None):
        z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
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
        dz = dh if activation.name == "identity" else dh * activation.grad_from_output(h)
        if stats is not None:
            stats.update(PREACTIVATION_GRAD, dz)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dz @ weight if need_x else None
        dw = None
        if need_w or stats is not None:
            dw = dz.t() @ x
            if stats is not None:
                stats.update(WEIGHT_GRAD, dw)
        db = dz.sum(0) if ctx.has_bias and need_b else None
        return dx, dw if need_w else None, db, None, None


def linear_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    stats: LayerStats | None,
) -> torch.Tensor:
    """``f(x W^T + b)`` for a 2-D ``x``, recording statistics into ``stats`` when given."""
    return LinearActivationFunction.apply(x, weight, bias, activation, stats)
