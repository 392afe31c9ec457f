""":class:`StatsConfig`: which statistics an instrumented layer records.

The one place where the statistics switches and their defaults are declared. A layer's
:class:`~fastmlp.stats.LayerStats` holds one; the op's flags, the PyTorch path's branches,
the kernels' compile-time meta and their autotune key are all read off it, and
:class:`~fastmlp.ModelStats`, :func:`fastmlp.instrument` and :class:`fastmlp.MLP` take
it (or its fields by name).

A new statistic group is a new ``bool`` field defaulting to ``False`` (an opt-in group,
listed by :data:`GROUPS`); docs/ARCHITECTURE.md says what else it touches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["FIELDS", "GROUPS", "MAX_BINS", "SWITCHES", "StatsConfig"]

#: Most histogram bins a layer takes (the PyTorch path counts any number exactly; the
#: kernels take up to ``fastmlp.kernels.MAX_BINS`` and leave larger ones to it).
MAX_BINS = 2**16


@dataclass(frozen=True, slots=True)
class StatsConfig:
    """What an instrumented layer records (frozen: change it with :meth:`replace`).

    Args:
        enabled: record statistics at all (``False``: the layer runs uninstrumented).
        histograms: record histograms.
        saturation: record saturation counts (for activations that saturate).
        zeros: count values exactly 0 (``zero_fraction``; one more comparison an element).
        moments4: third and fourth moment sums (``skewness``, ``kurtosis``).
        per_unit: per-unit counts of the activation (``dead_fraction``, ``unit_active``,
            ``unit_saturated``).
        exponents: exponent histograms (``formats``, ``exponent_counts``).
        bins: histogram bins, even, 2 to :data:`MAX_BINS`; fixed when a layer is built.
        saturation_thresholds: ``(low, high)``: an activation value ``h <= low`` or
            ``h >= high`` is saturated; ``None``: the activation's own (sigmoid 0.01 and
            0.99, tanh and softsign -0.99 and 0.99, none for the others).
    """

    enabled: bool = True
    histograms: bool = True
    saturation: bool = True
    zeros: bool = False
    moments4: bool = False
    per_unit: bool = False
    exponents: bool = False
    bins: int = 64
    saturation_thresholds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in SWITCHES:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"StatsConfig.{name} must be a bool, got {value!r}")
        bins = self.bins
        if not isinstance(bins, int) or isinstance(bins, bool) or not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be an even integer in [2, {MAX_BINS}], got {bins!r}")
        if bins % 2:
            raise ValueError(f"bins must be an even integer in [2, {MAX_BINS}], got {bins!r}")
        thresholds = self.saturation_thresholds
        if thresholds is not None:
            try:
                lo, hi = (float(t) for t in thresholds)
            except (TypeError, ValueError):
                raise ValueError(
                    f"saturation_thresholds must be two numbers (low, high), got {thresholds!r}"
                ) from None
            if not lo < hi:
                raise ValueError(f"saturation thresholds must satisfy low < high, got {thresholds}")
            object.__setattr__(self, "saturation_thresholds", (lo, hi))

    def replace(self, **changes: object) -> StatsConfig:
        """A copy with ``changes`` (field names) applied; unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown statistics options {unknown}; expected some of {FIELDS}")
        return dataclasses.replace(self, **changes)


#: Every field of :class:`StatsConfig`, in order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StatsConfig))
#: The on/off switches (the ``bool`` fields).
SWITCHES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(StatsConfig) if f.type in ("bool", bool)
)
#: Opt-in statistic groups: the switches that are off by default. A group switched on or
#: off while a window is being accumulated reads as not recorded until the next reset.
GROUPS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(StatsConfig) if f.name in SWITCHES and f.default is False
)
