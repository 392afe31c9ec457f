"""The reference backend: dense + bias + activation, and every statistic in float64.

Plain on purpose: ``addmm`` and the activation, then each quantity's statistics with
non-finite values masked out and every sum taken in float64, with no shortcut. It runs
on any device without reading device values on the host (calibration, once per quantity
after a reset, reads one count). The other backends are tested against it, and
:mod:`fastmlp.op` runs it where neither fast path applies (uncalibrated passes and
inputs the kernels do not take, on GPUs).

Interface, shared by every backend: :func:`forward` and :func:`backward`; ``settings`` is
the pass's :class:`~fastmlp.stats.config.StatsConfig` (``saturation`` already off where
the activation has no thresholds).
"""

from __future__ import annotations

import torch

from fastmlp.activations import Activation
from fastmlp.stats.algebra import grow_range_, merge_block_
from fastmlp.stats.buffers import calibration_flags
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.layout import (
    ACTIVATION,
    CALIBRATED,
    EXP_MAX,
    EXP_MIN,
    NEXP,
    NONFINITE,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    SAT_HIGH,
    SAT_LOW,
    WEIGHT_GRAD,
    ZEROS,
    Buffers,
    pow2_above,
    saturation_bounds,
)

__all__ = [
    "accumulate",
    "add_slot_counts_",
    "backward",
    "calibrate",
    "forward",
    "record",
    "record_exponents",
    "record_units",
]


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h, z)``: ``h = f(x W^T + b)`` for a 2-D ``x``, and ``z = x W^T + b`` where the
    activation's backward needs it (``activation.from_input``; else ``None``), recording
    ``preactivation`` and ``activation`` when ``settings.enabled``."""
    z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    h = activation.forward(z)
    if settings.enabled:
        fixed = activation.bounded
        record(bufs, settings, PREACTIVATION, z)
        record(bufs, settings, ACTIVATION, h, fixed=fixed)
        if settings.per_unit:
            record_units(bufs, settings, h)
    return h, (z if activation.from_input else None)


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
    """``(dx, dW, db)`` of ``h = f(x W^T + b)`` from ``dh`` (``None`` where not needed),
    recording ``preactivation_grad`` and ``weight_grad`` when ``settings.enabled``.
    ``saved`` is ``h``, or ``z`` for activations with ``from_input``."""
    dz = activation.backward(dh, saved)
    db = dz.sum(0) if need_b else None
    dw = dz.t() @ x if need_w or settings.enabled else None
    if settings.enabled:
        record(bufs, settings, PREACTIVATION_GRAD, dz)
        record(bufs, settings, WEIGHT_GRAD, dw)
    dx = dz @ weight if need_x else None
    return dx, dw if need_w else None, db


def record(
    bufs: Buffers, settings: StatsConfig, q: int, x: torch.Tensor, *, fixed: bool = False
) -> None:
    """Accumulate quantity ``q`` of ``x``, calibrating it first if it is not yet.
    ``fixed``: ``q`` is histogrammed on the fixed range already in ``bufs.hist_range``."""
    if calibration_flags(bufs.state)[q] or calibrate(bufs, q, x, fixed=fixed):
        accumulate(bufs, settings, q, x, fixed=fixed)


def calibrate(bufs: Buffers, q: int, x: torch.Tensor, *, fixed: bool = False) -> bool:
    """Fix ``shift[q]`` at the mean of ``x``'s finite values and, unless ``fixed``,
    ``hist_range[q]`` at ``+-R``, ``R`` the smallest power of two above their largest
    ``|x|``; marks ``q`` calibrated in the host-side ``state`` and returns ``True``. Where
    ``x`` has no finite value, ``q`` stays uncalibrated (for the next batch to calibrate),
    its values are counted as non-finite, and it returns ``False``."""
    x = x.detach().reshape(-1)
    fin = torch.isfinite(x)
    n = fin.sum()
    if not int(n):
        bufs.acc[q, NONFINITE] += x.numel()
        return False
    xs = torch.where(fin, x, 0).to(torch.float64)
    bufs.shift[q] = xs.sum() / n
    if not fixed:
        r = pow2_above(xs.abs().amax())
        bufs.hist_range[q, 0] = -r
        bufs.hist_range[q, 1] = r
    bufs.state[CALIBRATED, q] = 1.0
    return True


def accumulate(
    bufs: Buffers,
    settings: StatsConfig,
    q: int,
    x: torch.Tensor,
    *,
    fixed: bool = False,
    exponents: bool = True,
) -> None:
    """Accumulate quantity ``q`` of ``x`` into ``bufs`` (calibrated for ``q``): count,
    shifted float64 moment sums, the float64 sum of ``|x|``, extremes, non-finite count,
    saturation and zero counts, histogram (growing the range unless ``fixed``) and, when
    ``exponents``, the exponent histogram; each as ``settings`` asks."""
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        return
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if exponents and settings.exponents:
        record_exponents(bufs, q, x)
    fin = torch.isfinite(x)
    n = fin.sum()
    acc = bufs.acc[q]
    acc[NONFINITE] += x.numel() - n
    xd = torch.where(fin, x, 0).to(torch.float64)
    center = xd.sum() / n.clamp(min=1)
    d = torch.where(fin, xd - center, 0)
    mn = torch.where(fin, x, float("inf")).amin()
    mx = torch.where(fin, x, float("-inf")).amax()
    d3 = d4 = None
    if settings.moments4:
        sq = d * d
        d3, d4 = torch.dot(sq, d), torch.dot(sq, sq)
    merge_block_(
        acc, bufs.shift[q], n, center, d.sum(), torch.dot(d, d), mn, mx, d3, d4, xd.abs().sum()
    )
    if q == ACTIVATION and settings.saturation:
        lo, hi = saturation_bounds(*settings.saturation_thresholds, x.dtype)
        acc[SAT_LOW] += ((x <= lo) & fin).sum()
        acc[SAT_HIGH] += ((x >= hi) & fin).sum()
    if settings.zeros:
        acc[ZEROS] += (x == 0).sum()  # NaN is never 0
    if not settings.histograms:
        return
    bins = bufs.bins
    rng = bufs.hist_range[q]
    scale = bins / (rng[1] - rng[0])
    # Slot floor(x * scale) + offset, clamped to [0, bins]; slot bins holds x == high (the
    # last bin is closed); non-finite values go to slot bins + 1, which is dropped.
    t = torch.floor(x * scale.to(x.dtype)).add_((-rng[0] * scale).to(x.dtype)).clamp_(0, bins)
    idx = torch.where(fin, t, bins + 1).to(torch.int32)
    counts = torch.bincount(idx, minlength=bins + 2)
    under = ((x < rng[0].to(x.dtype)) & fin).sum()
    over = ((x > rng[1].to(x.dtype)) & fin).sum()
    add_slot_counts_(bufs.hist[q], counts, under, over)
    if not fixed:
        grow_range_(bufs, q, torch.maximum(mn.abs(), mx.abs()))


def add_slot_counts_(row, counts, under, over) -> None:
    """Add slot counts to a histogram row ``[underflow, bins..., overflow]`` in place.

    ``counts[i]`` counts slot ``i`` of ``floor(x * scale) + offset`` clamped to ``[0,
    bins]`` (slot ``bins``: ``x`` at the range's top, which the closed last bin holds), of
    which ``under`` values lay below the range (clamped into slot 0) and ``over`` above it
    (clamped into slot ``bins``): those move to the under/overflow counts. ``row`` and
    ``counts`` are both tensors or both NumPy arrays.
    """
    bins = row.shape[-1] - 2
    row[1 : bins + 1] += counts[:bins]
    row[bins] += counts[bins]
    row[0] += under
    row[1] -= under
    row[bins + 1] += over
    row[bins] -= over


def record_exponents(bufs: Buffers, q: int, x: torch.Tensor) -> None:
    """Exponent histogram of the finite values of the 1-D ``x`` into ``bufs.exp_hist[q]``
    (slot 0: zeros; slot ``e - EXP_MIN + 1``: frexp exponent ``e``)."""
    _, e = torch.frexp(x)
    slot = e.clamp_(EXP_MIN, EXP_MAX).sub_(EXP_MIN - 1)
    slot = torch.where(x == 0, 0, slot)
    slot = torch.where(torch.isfinite(x), slot, NEXP)  # non-finite: a dropped extra slot
    bufs.exp_hist[q] += torch.bincount(slot.reshape(-1), minlength=NEXP + 1)[:NEXP]


def record_units(bufs: Buffers, settings: StatsConfig, h: torch.Tensor) -> None:
    """Per-unit counts of the activation ``h [M, N]`` into ``bufs.units``."""
    h = h.detach()
    if h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    fin = torch.isfinite(h)
    rows = [fin.sum(0), (h > 0).sum(0)]
    if settings.saturation:
        lo, hi = saturation_bounds(*settings.saturation_thresholds, h.dtype)
        rows += [((h <= lo) & fin).sum(0), (h >= hi).sum(0)]  # h >= hi excludes NaN
    bufs.units[: len(rows)] += torch.stack(rows).to(bufs.units.dtype)
