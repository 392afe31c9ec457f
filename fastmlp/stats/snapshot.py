"""Host-side views of accumulated statistics: :class:`Snapshot` and :class:`QuantityStats`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastmlp.stats.algebra import central_moments
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.diagnosis import Finding, diagnose
from fastmlp.stats.layout import (
    ABS_SUM,
    ACTIVATION,
    COUNT,
    EXP_MAX,
    EXP_MIN,
    FORMATS,
    MAX,
    MIN,
    NONFINITE,
    QUANTITIES,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUM3,
    SUM4,
    SUMSQ,
    UNIT_ACTIVE,
    UNIT_COUNT,
    UNIT_SAT_HIGH,
    UNIT_SAT_LOW,
    ZEROS,
)

__all__ = ["QuantityStats", "Snapshot", "ROW_FIELDS"]

ROW_FIELDS = (
    "layer",
    "name",
    "quantity",
    "count",
    "mean",
    "var",
    "std",
    "l1",
    "rms",
    "min",
    "max",
    "absmax",
    "skewness",
    "kurtosis",
    "zero_fraction",
    "dead_fraction",
    "formats",
    "nonfinite",
    "saturated_low",
    "saturated_high",
    "saturated",
    "hist_edges",
    "hist_counts",
    "underflow",
    "overflow",
)


@dataclass(frozen=True)
class QuantityStats:
    """Statistics of one quantity of one layer, accumulated since the last reset.

    Figures that have no data (``count == 0``, a disabled histogram, saturation
    of a non-saturating activation) are ``None``. ``var`` is the population
    variance. Saturated fractions are relative to ``count`` (finite values). ``l1`` and
    ``rms`` are the coordinate sizes of Tensor Programs' coordinate checks.
    """

    layer: int
    quantity: str
    count: int
    nonfinite: int
    mean: float | None = None
    var: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    saturated_low: float | None = None
    saturated_high: float | None = None
    hist_edges: list[float] | None = field(default=None, repr=False)
    hist_counts: list[int] | None = field(default=None, repr=False)
    underflow: int | None = None
    overflow: int | None = None
    name: str | None = None
    """The layer's module path (e.g. ``layers.2``), where known."""
    zero_fraction: float | None = None
    """Fraction of the finite values that are exactly 0 (when ``stats.zeros`` is on)."""
    skewness: float | None = None
    """``m3 / m2**1.5`` of the population central moments (when ``stats.moments4`` is on)."""
    kurtosis: float | None = None
    """``m4 / m2**2`` (Pearson's, 3 for a normal distribution; when ``stats.moments4``)."""
    dead_fraction: float | None = None
    """Activation rows, when ``stats.per_unit``: fraction of the units that were never
    above 0 (over the units that saw a finite value)."""
    unit_active: list[float] | None = field(default=None, repr=False)
    """Activation, ``stats.per_unit``: per unit, the fraction of its finite values ``> 0``."""
    formats: dict | None = field(default=None, repr=False)
    """When ``stats.exponents``: per low-precision format (``fastmlp.stats.layout.FORMATS``)
    the fractions of the finite values in binades that ``overflow``, ``underflow`` (below the
    smallest subnormal; zeros excluded) and ``subnormal`` (below the smallest normal,
    including underflow; zeros excluded)."""
    exponent_counts: dict[int, int] | None = field(default=None, repr=False)
    """When ``stats.exponents``: frexp exponent -> count (``|x|`` in ``[2**(e-1), 2**e)``),
    and ``"zero"`` -> count of exact zeros."""
    unit_saturated: list[float] | None = field(default=None, repr=False)
    """Activation, ``stats.per_unit`` and a saturating activation: per unit, the fraction of
    its finite values saturated at either end."""
    l1: float | None = None
    """Mean ``|x|`` of the finite values (``None`` for statistics restored from a layout
    that predates it, until the next reset)."""
    rms: float | None = None
    """Root mean square ``sqrt(mean(x**2))`` of the finite values."""

    @property
    def absmax(self) -> float | None:
        """Largest finite ``|x|``: ``max(-min, max)``, exact across merges like min and max."""
        if self.min is None or self.max is None:
            return None
        return max(-self.min, self.max)

    @property
    def saturated(self) -> float | None:
        """Fraction saturated at either end."""
        if self.saturated_low is None or self.saturated_high is None:
            return None
        return self.saturated_low + self.saturated_high

    @property
    def hist_total(self) -> int | None:
        """Values the histogram holds (bins, underflow and overflow); ``None`` without one.

        Equal to ``count`` unless histograms were switched on after the last reset: then
        the histogram covers the values recorded since, and so do the figures read off it
        (:meth:`percentile`).
        """
        if self.hist_counts is None:
            return None
        return int(sum(self.hist_counts) + (self.underflow or 0) + (self.overflow or 0))

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100) of the values in the histogram, by linear
        interpolation inside a bin.

        Values in the underflow (overflow) count are spread between ``min`` and
        the range's low edge (the high edge and ``max``). ``None`` without data.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        if self.count == 0 or self.hist_counts is None or not self.hist_total:
            return None
        edges = self.hist_edges
        counts = [self.underflow, *self.hist_counts, self.overflow]
        # Segments: [min, low edge], the bins, [high edge, max].
        lows = [self.min, *edges[:-1], edges[-1]]
        highs = [edges[0], *edges[1:], self.max]
        target = q / 100 * self.hist_total
        seen = 0.0
        for lo, hi, c in zip(lows, highs, counts, strict=True):
            if c and seen + c >= target:
                frac = (target - seen) / c
                value = lo + frac * (hi - lo)
                return float(min(max(value, self.min), self.max))
            seen += c
        return float(self.max)

    def row(self) -> dict:
        """This quantity as a flat dict: the row schema, keys :data:`ROW_FIELDS`."""
        out = {name: getattr(self, name) for name in ROW_FIELDS}
        return out


def _exponent_figures(exp_hist: np.ndarray, n: int) -> dict:
    """``formats`` and ``exponent_counts`` from one quantity's exponent histogram."""
    counts = np.asarray(exp_hist, dtype=np.int64)
    exps = np.arange(EXP_MIN, EXP_MAX + 1)
    nonzero = counts[1:]
    formats = {}
    for fmt, lim in FORMATS.items():
        formats[fmt] = {
            "overflow": float(nonzero[exps > lim["overflow_e"]].sum() / n),
            "underflow": float(nonzero[exps <= lim["underflow_e"]].sum() / n),
            "subnormal": float(nonzero[exps <= lim["subnormal_e"]].sum() / n),
        }
    ec: dict = {int(e): int(c) for e, c in zip(exps, nonzero, strict=True) if c}
    ec["zero"] = int(counts[0])
    return {"formats": formats, "exponent_counts": ec}


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def quantity_stats(
    layer: int,
    q: int,
    acc: np.ndarray,
    shift: float,
    hist: np.ndarray | None,
    hist_range: np.ndarray,
    saturation: bool,
    name: str | None = None,
    zeros: bool = False,
    moments4: bool = False,
    units: np.ndarray | None = None,
    exp_hist: np.ndarray | None = None,
) -> QuantityStats:
    """Turn one row of raw accumulator values into a :class:`QuantityStats`.

    ``units``: the layer's per-unit counts (``[4, units]``) when recorded; used for the
    activation quantity.
    """
    n = int(acc[COUNT])
    nonfinite = int(acc[NONFINITE])
    if n == 0:
        return QuantityStats(layer, QUANTITIES[q], 0, nonfinite, name=name)
    m1 = acc[SUM] / n
    var = max(acc[SUMSQ] / n - m1 * m1, 0.0)
    mean = float(shift + m1)
    kw: dict = {
        "mean": mean,
        "var": float(var),
        "std": math.sqrt(var),
        # mean(x**2) = var + mean**2: two non-negative terms (no cancellation), each as
        # precise as the shifted sums make it, unlike sumsq/n expanded around the shift
        "rms": math.hypot(math.sqrt(var), mean),
        "l1": _finite_or_none(acc[ABS_SUM] / n),
        "min": _finite_or_none(acc[MIN]),
        "max": _finite_or_none(acc[MAX]),
    }
    if zeros:
        kw["zero_fraction"] = float(acc[ZEROS] / n)
    if exp_hist is not None:
        kw.update(_exponent_figures(exp_hist, n))
    if units is not None and q == ACTIVATION and units.shape[1]:
        seen = units[UNIT_COUNT]
        with np.errstate(invalid="ignore", divide="ignore"):
            active = units[UNIT_ACTIVE] / seen
            sat = (units[UNIT_SAT_LOW] + units[UNIT_SAT_HIGH]) / seen
        some = seen > 0
        if some.any():
            kw["dead_fraction"] = float(np.mean(units[UNIT_ACTIVE][some] == 0))
        kw["unit_active"] = [float(v) if s else None for v, s in zip(active, some, strict=True)]
        if saturation:
            kw["unit_saturated"] = [float(v) if s else None for v, s in zip(sat, some, strict=True)]
    if moments4:
        _, m2, m3, m4 = central_moments(n, acc[SUM], acc[SUMSQ], acc[SUM3], acc[SUM4])
        if m2 > 0:
            kw["skewness"] = float(m3 / n / (m2 / n) ** 1.5)
            kw["kurtosis"] = float(m4 / n / (m2 / n) ** 2)
    if saturation and q == ACTIVATION:
        kw["saturated_low"] = float(acc[SAT_LOW] / n)
        kw["saturated_high"] = float(acc[SAT_HIGH] / n)
    if hist is not None:
        bins = hist.shape[0] - 2
        lo, hi = float(hist_range[0]), float(hist_range[1])
        kw["hist_edges"] = np.linspace(lo, hi, bins + 1).tolist()
        kw["hist_counts"] = hist[1:-1].astype(np.int64).tolist()
        kw["underflow"] = int(hist[0])
        kw["overflow"] = int(hist[-1])
    return QuantityStats(layer, QUANTITIES[q], n, nonfinite, name=name, **kw)


class Snapshot:
    """Statistics of every instrumented layer, copied to the host.

    Index as ``snapshot[layer][quantity]`` (layers are 1-based; the output
    layer of an :class:`~fastmlp.MLP` is ``depth + 1``) or by module path,
    ``snapshot["layers.2"][quantity]``.
    """

    def __init__(self, layers: dict[int, dict[str, QuantityStats]]) -> None:
        self.layers = layers

    @classmethod
    def from_layers(
        cls,
        indexed: Sequence[tuple[int, LayerStats]],
        names: Sequence[str | None] | None = None,
    ) -> Snapshot:
        """Copy the accumulators of ``(layer index, LayerStats)`` pairs to the host at once.

        ``names``: each layer's module path, reported in its rows.
        """
        names = list(names) if names is not None else [None] * len(indexed)
        if not indexed:
            return cls({})
        parts = []
        for _, s in indexed:
            parts += [s.acc.reshape(-1), s.shift, s.hist_range.reshape(-1)]
            parts.append(s.hist.reshape(-1).to(torch.float64))
            parts.append(s.unit_counts.reshape(-1))
            parts.append(s.exp_hist.reshape(-1).to(torch.float64))
        flat = torch.cat([p.to(indexed[0][1].acc.device) for p in parts]).cpu().numpy()
        layers: dict[int, dict[str, QuantityStats]] = {}
        pos = 0
        calibrated = [s.calibrated for _, s in indexed]
        for (index, s), name, cal in zip(indexed, names, calibrated, strict=True):
            nq, nf = s.acc.shape
            acc = flat[pos : pos + nq * nf].reshape(nq, nf)
            pos += nq * nf
            shift = flat[pos : pos + nq]
            pos += nq
            rng = flat[pos : pos + 2 * nq].reshape(nq, 2)
            pos += 2 * nq
            hist = flat[pos : pos + s.hist.numel()].reshape(s.hist.shape)
            pos += s.hist.numel()
            units = flat[pos : pos + s.unit_counts.numel()].reshape(s.unit_counts.shape)
            pos += s.unit_counts.numel()
            exp_hist = flat[pos : pos + s.exp_hist.numel()].reshape(s.exp_hist.shape)
            pos += s.exp_hist.numel()
            layers[index] = {
                qname: quantity_stats(
                    index,
                    q,
                    acc[q],
                    shift[q],
                    hist[q] if s.histograms and cal[q] else None,
                    rng[q],
                    s.saturation_active,
                    name,
                    s.recorded("zeros"),
                    s.recorded("moments4"),
                    units if s.recorded("per_unit") else None,
                    exp_hist[q] if s.recorded("exponents") else None,
                )
                for q, qname in enumerate(QUANTITIES)
            }
        return cls(layers)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Snapshot:
        """A :class:`~fastmlp.Snapshot` rebuilt from rows as :meth:`rows` gives them.

        ``rows`` are one snapshot's rows, e.g. the lines of a run's ``stats.jsonl``
        with one ``step`` and ``source`` (extra keys such as those are ignored).
        A ``(layer, quantity)`` pair given twice is an error: the rows of two
        snapshots were mixed.
        """
        known = set(QuantityStats.__dataclass_fields__)
        layers: dict[int, dict[str, QuantityStats]] = {}
        for r in rows:
            missing = [k for k in ("layer", "quantity", "count", "nonfinite") if k not in r]
            if missing:
                raise ValueError(f"statistics row without {missing}: {dict(r)!r:.120}")
            layer, quantity = int(r["layer"]), str(r["quantity"])
            per = layers.setdefault(layer, {})
            if quantity in per:
                raise ValueError(f"two rows for layer {layer} {quantity}: several snapshots mixed")
            per[quantity] = QuantityStats(**{k: v for k, v in r.items() if k in known})
        return cls(dict(sorted(layers.items())))

    def diagnose(self, **thresholds: float) -> list[Finding]:
        """What these statistics say about training, as findings (:mod:`fastmlp.stats.diagnosis`:
        codes, severities and the documented thresholds, which keyword arguments override)."""
        return diagnose(self, **thresholds)

    def __getitem__(self, layer: int | str) -> dict[str, QuantityStats]:
        """A layer's quantities, by layer number or by module path (``"layers.2"``)."""
        if isinstance(layer, str):
            for quantities in self.layers.values():
                if next(iter(quantities.values())).name == layer:
                    return quantities
            names = [next(iter(v.values())).name for _, v in sorted(self.layers.items())]
            raise KeyError(f"no layer named {layer!r}; layers are {names}")
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"no layer {layer}; layers are {sorted(self.layers)}") from None

    def __iter__(self) -> Iterator[QuantityStats]:
        for index in sorted(self.layers):
            yield from self.layers[index].values()

    def __len__(self) -> int:
        return len(self.layers)

    def rows(self) -> list[dict]:
        """One flat dict per layer x quantity (the row schema: keys :data:`ROW_FIELDS`)."""
        return [qs.row() for qs in self]

    def percentile(self, layer: int, quantity: str, q: float) -> float | None:
        """Shorthand for ``snapshot[layer][quantity].percentile(q)``."""
        return self[layer][quantity].percentile(q)

    def __repr__(self) -> str:
        return f"Snapshot(layers={sorted(self.layers)})"
