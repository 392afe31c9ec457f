"""The statistics buffer layout shared by the PyTorch path, the Triton kernels and the snapshot.

For each of the four quantities ``q`` (index into :data:`QUANTITIES`), a layer's
buffers (:class:`Buffers`, held by :class:`~fastmlp.stats.LayerStats`) are

- ``acc[q]``: float64 ``[NFIELDS]`` = ``count, sum, sumsq, min, max,
  nonfinite, sat_low, sat_high, zeros, sum3, sum4, abs_sum``, where ``sum``, ``sumsq``,
  ``sum3`` and ``sum4`` are ``sum((x - shift[q])**p)`` for p = 1..4 over finite values
  (``sum3`` and ``sum4`` recorded when ``StatsConfig.moments4``: skewness and kurtosis),
  ``zeros`` counts the finite values exactly 0 (when ``StatsConfig.zeros``) and ``abs_sum``
  is ``sum(|x|)`` over finite values (always recorded: the ``l1`` figure, mean ``|x|``; not
  shifted, as ``|x|`` has no shift rule). Layouts before these had 8 or 11 fields and are
  padded on load: the padded groups then read as not recorded, and a padded ``abs_sum`` is
  NaN (:data:`PAD`), so ``l1`` reads as unknown until the next reset;
- ``shift[q]``: float64, a value near the data's mean fixed at calibration, so
  the variance ``sumsq/count - (sum/count)**2`` keeps its precision in float64;
- ``hist[q]``: int64 ``[bins + 2]`` = ``underflow, bins..., overflow``;
- ``hist_range[q]``: float64 ``(low, high)``. Bins are ``[e_i, e_i+1)``, the
  last one closed; underflow is ``x < low``, overflow ``x > high``;
- ``units``: float64 ``[4, units]`` per-unit counts of the ``activation`` quantity (each
  output feature of the layer; recorded when ``StatsConfig.per_unit``): rows
  :data:`UNIT_COUNT` (finite values), :data:`UNIT_ACTIVE` (values ``> 0``; a unit with none
  is dead), :data:`UNIT_SAT_LOW` and :data:`UNIT_SAT_HIGH` (saturated values, when
  saturation is recorded). Counts are summed across ranks. ``[4, 0]`` for layers built
  without a unit count;
- ``exp_hist[q]``: int64 ``[NEXP]`` exponent histogram (recorded when
  ``StatsConfig.exponents``): slot 0 counts exact zeros, slot ``e - EXP_MIN + 1`` the finite
  nonzero values with ``frexp`` exponent ``e`` (``|x|`` in ``[2**(e-1), 2**e)``), ``e``
  clamped to ``[EXP_MIN, EXP_MAX]`` (float32 values lie within). Summed across ranks.
  :data:`FORMATS` gives, per low-precision format, the binades it cannot represent;
- ``state``: float64 ``[2, 4]`` kept on the host (CPU) whatever the device of
  the others: row :data:`CALIBRATED` holds 1 for each calibrated quantity, row
  :data:`CENTER` the PyTorch path's centring hint (a float32 number). Host
  code reads it without synchronising with a GPU.

Calibration happens on the first update after a reset: ``shift`` becomes that
batch's mean, and quantities without a fixed range get the symmetric range
``+-R`` with ``R`` the smallest power of two strictly above the batch's largest
``|x|``. Afterwards, whenever a batch exceeds ``R`` (those values are counted as
under/overflow), ``R`` becomes the smallest power of two above that batch's
largest ``|x|`` and existing bins are merged exactly, so later batches are
covered. Bin indices are ``floor(x * scale) + offset`` in the input's precision.
One corner is not exact: a value exactly equal to the current ``+R`` sits in the
closed last bin, and a later growth merges it into the bin below ``R``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "QUANTITIES",
    "PREACTIVATION",
    "ACTIVATION",
    "PREACTIVATION_GRAD",
    "WEIGHT_GRAD",
    "FIELDS",
    "NFIELDS",
    "PAD",
    "pad_acc",
    "CALIBRATED",
    "CENTER",
    "Buffers",
    "empty_acc",
    "as_float32",
    "pow2_above",
    "saturation_bounds",
]

QUANTITIES = ("preactivation", "activation", "preactivation_grad", "weight_grad")
PREACTIVATION, ACTIVATION, PREACTIVATION_GRAD, WEIGHT_GRAD = range(4)
FIELDS = (
    "count",
    "sum",
    "sumsq",
    "min",
    "max",
    "nonfinite",
    "sat_low",
    "sat_high",
    "zeros",
    "sum3",
    "sum4",
    "abs_sum",
)
COUNT, SUM, SUMSQ, MIN, MAX, NONFINITE, SAT_LOW, SAT_HIGH, ZEROS, SUM3, SUM4, ABS_SUM = range(
    len(FIELDS)
)
#: What an older, shorter layout's missing fields are padded with on load, per field: 0
#: (a group that then reads as not recorded), NaN for ``abs_sum`` (always recorded, so
#: nothing else marks it unknown: NaN stays NaN through merges and accumulation).
PAD = tuple(float("nan") if f == "abs_sum" else 0.0 for f in FIELDS)
#: frexp exponents of the exponent histogram (float32: -148 .. 128), and its size.
EXP_MIN, EXP_MAX = -150, 129
NEXP = EXP_MAX - EXP_MIN + 2
#: Per format, in frexp exponents ``e`` (``|x|`` in ``[2**(e-1), 2**e)``): values with
#: ``e > overflow_e`` lie in binades above the format's largest (they overflow), ``e <=
#: underflow_e`` below its smallest subnormal (they flush to 0), ``e <= subnormal_e``
#: below its smallest normal (precision lost). Binade-exact: the top binade of e4m3
#: ([256, 512), max 448) and bf16/fp16's values that round up to infinity count as in range.
FORMATS = {
    "bf16": {"overflow_e": 128, "subnormal_e": -126, "underflow_e": -133},
    "fp16": {"overflow_e": 16, "subnormal_e": -14, "underflow_e": -24},
    "fp8_e4m3": {"overflow_e": 9, "subnormal_e": -6, "underflow_e": -9},
    "fp8_e5m2": {"overflow_e": 16, "subnormal_e": -14, "underflow_e": -16},
}
#: Rows of ``units``.
UNIT_COUNT, UNIT_ACTIVE, UNIT_SAT_LOW, UNIT_SAT_HIGH = range(4)
NUNIT_ROWS = 4
NFIELDS = len(FIELDS)
NQ = len(QUANTITIES)
#: Rows of ``state``.
CALIBRATED, CENTER = 0, 1


class Buffers(NamedTuple):
    """One layer's statistics buffers (layout above), as the op and the kernels take them."""

    acc: torch.Tensor
    shift: torch.Tensor
    hist: torch.Tensor
    hist_range: torch.Tensor
    state: torch.Tensor
    units: torch.Tensor
    exp_hist: torch.Tensor

    @property
    def bins(self) -> int:
        return self.hist.shape[-1] - 2


def empty_acc(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh ``acc`` buffer: zero counts and sums, extremes at +-inf."""
    acc = torch.zeros(NQ, NFIELDS, dtype=torch.float64, device=device)
    acc[:, MIN] = float("inf")
    acc[:, MAX] = float("-inf")
    return acc


def pad_acc(acc: torch.Tensor) -> torch.Tensor:
    """``acc`` ``[..., k]`` of an older layout (``k < NFIELDS`` fields) padded to
    ``[..., NFIELDS]`` with :data:`PAD`; ``acc`` itself when already complete."""
    k = acc.shape[-1]
    if k >= NFIELDS:
        return acc
    pad = torch.tensor(PAD[k:], dtype=acc.dtype, device=acc.device)
    return torch.cat([acc, pad.expand(*acc.shape[:-1], NFIELDS - k)], dim=-1)


def as_float32(value: float) -> float:
    """``value`` rounded to float32: a centre that ``x - c`` uses exactly in any float dtype
    (beyond float32's range, its largest finite number of that sign: a centre stays finite)."""
    return float(np.float32(min(max(value, -_F32_MAX), _F32_MAX)))


_F32_MAX = float(np.finfo(np.float32).max)


@functools.cache
def saturation_bounds(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """The thresholds as ``dtype`` numbers ``(lo, hi)`` such that, for ``x`` of that dtype,
    ``x <= lo`` and ``x >= hi`` hold exactly when they hold for the real thresholds
    (``lo`` rounded down, ``hi`` rounded up)."""
    if dtype == torch.float64:
        return lo, hi
    lo32, hi32 = np.float32(lo), np.float32(hi)
    # Compared as Python floats: NumPy would round the Python operand to float32 first.
    if float(lo32) > lo:
        lo32 = np.nextafter(lo32, np.float32(-np.inf))
    if float(hi32) < hi:
        hi32 = np.nextafter(hi32, np.float32(np.inf))
    return float(lo32), float(hi32)


def pow2_above(m: torch.Tensor) -> torch.Tensor:
    """Smallest power of two strictly above ``m`` (float64, exact); 1 for 0 or non-finite ``m``."""
    m = m.to(torch.float64)
    ok = torch.isfinite(m) & (m > 0)
    # m = mantissa * 2**exponent, m < 2**exponent
    _, exponent = torch.frexp(torch.where(ok, m, 1.0))
    return torch.where(ok, torch.ldexp(torch.ones_like(m), exponent), 1.0)
