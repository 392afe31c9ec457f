"""Read a snapshot's statistics for the user: the pathologies of Glorot & Bengio (2010).

``diagnose(snapshot)`` returns a list of :class:`Finding`, worst first. Each
finding names the layer and quantity it is about, says in one line what it
means, and carries the numbers it rests on (``evidence``). It only reads the
snapshot's public figures (moments, min/max, saturated fractions, histograms,
non-finite counts), so it works the same on a live :class:`~fastmlp.Snapshot`
and on one rebuilt from a run's ``stats.jsonl`` (:meth:`~fastmlp.Snapshot.from_rows`).

Codes and thresholds (every threshold is a keyword of :func:`diagnose`; the
defaults are :class:`Thresholds`, chosen from the regimes of Glorot & Bengio
(2010)):

``nonfinite`` (error)
    NaN or +-Inf in any quantity. The finding names the first place it appeared
    in the order the pass computes them: the forward quantities from layer 1
    upwards, then the backward ones from the top layer down (a NaN in the input
    is reported at layer 1's ``preactivation``; one born in the loss at the top
    layer's ``preactivation_grad``). ``evidence["affected"]`` lists every
    quantity with non-finite values.

``saturation`` (warning; info when milder)
    A layer's activations mostly at a bound of the activation's range. *Near a
    bound* means within ``saturation_band`` (10%) of the range from it: sigmoid
    ``h <= 0.1`` or ``h >= 0.9``, tanh/softsign ``|h| >= 0.8``; there the
    derivative is at most about a third of its peak (sigmoid'(z) <= 0.09 vs
    0.25, tanh'(z) <= 0.36 vs 1). Warning when at least ``saturation_fraction``
    (half) of the activations are near a bound, info from
    ``saturation_info_fraction`` (20%). This is the regime of the paper's Fig 2
    (a depth-5 sigmoid net with the standard init drives its top hidden layer's
    activations to ~0 within a few hundred updates) and of Fig 3 (tanh layers
    at +-1). The fraction is read off the activation histogram (bounded
    activations are histogrammed on their range, whose ends are the bounds).
    Without a histogram it is bounded from below by the strictly saturated
    fractions (``h <= 0.01`` etc.) and by Markov's inequality on the distance of
    the mean from the bound; the range is then inferred as [0, 1] when no
    activation is negative (sigmoid) and [-1, 1] otherwise (tanh, softsign).

``vanishing_gradient`` / ``exploding_gradient`` (warning)
    The back-propagated gradient's standard deviation (``preactivation_grad``)
    shrinking (growing) from the top hidden layer towards the input by more than
    ``gradient_ratio`` (1.5) per layer, as a geometric mean over the hidden
    layers. In the linear regime (eq. 6) each layer multiplies the gradient's
    variance by ``n Var[W]``: 1/3 under the standard init (a std factor of
    sqrt(3) = 1.73 per layer, Fig 7 top), 1 under the normalized init (Fig 7
    bottom). 1.5 separates the two regimes at initialization on Shapeset (5
    hidden layers of 1000): tanh, softsign and ReLU under the normalized init
    stay below it, tanh under the standard init and sigmoid under either init
    go above it (tests/test_diagnosis.py checks tanh on both sides). The output
    layer (identity, recognised by its activation statistics equalling its
    pre-activation's) is left out of the chain, as the paper's figures leave it out.

``collapse`` (warning)
    A layer's activation std below ``collapse_ratio`` (0.1) times the std of its
    input (the previous layer's activation). The standard init shrinks the
    activation std by about 1/sqrt(3) = 0.58 per layer in the linear regime
    (eq. 5, Fig 6); a tenth in a single layer is far outside both paper
    regimes: the layer passes on almost no signal. Layer 1 is not checked (the
    input is not in the snapshot).

``dead_units`` (warning)
    ReLU units that are never active. Statistics are per layer, not per unit, so
    what can be inferred is the fraction of (unit, example) pairs whose
    activation is exactly 0: 1 when the layer's activation max is 0 (every unit
    dead on every example seen), otherwise at least the fraction of negative
    pre-activations, read off the pre-activation histogram (its range is
    symmetric with an even number of bins, so 0 is a bin edge and the count is
    exact). Warning when that fraction is at least ``dead_fraction`` (99%):
    then at most 1% of the pairs carry signal, which for a layer of ``n``
    units seen on ``m`` examples means at least ``1 - m * 1%`` of its units
    are dead. A ReLU layer with zero biases at initialization sits near 50%.
    Applies to non-saturating layers whose activations are never negative and
    are exactly 0 somewhere (ReLU); not to the output layer.

A healthy network (tanh, normalized init, at initialization) yields no finding
at warning level or above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: the snapshot module imports this one
    from fastmlp.stats.snapshot import QuantityStats, Snapshot

__all__ = [
    "CODES",
    "SEVERITIES",
    "Finding",
    "Thresholds",
    "diagnose",
    "findings_json",
    "format_findings",
    "worst",
]

SEVERITIES = ("info", "warning", "error")
CODES = (
    "nonfinite",
    "saturation",
    "vanishing_gradient",
    "exploding_gradient",
    "collapse",
    "dead_units",
)
_FORWARD = ("preactivation", "activation")
_BACKWARD = ("preactivation_grad", "weight_grad")


@dataclass(frozen=True)
class Finding:
    """One thing the statistics say about one layer.

    Attributes:
        code: what was found (one of :data:`CODES`).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        layer: the layer number it is about (1-based, as in the snapshot).
        name: that layer's module path when the snapshot knows it, else ``None``.
        quantity: the quantity it rests on (``activation``, ``preactivation_grad``...).
        message: one line for a person.
        evidence: the numbers behind it (JSON-ready).
    """

    code: str
    severity: str
    layer: int | None
    name: str | None
    quantity: str | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error."""
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers in ``evidence`` become ``None``)."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __str__(self) -> str:
        where = "" if self.layer is None else f"layer {self.layer}"
        if self.name:
            where += f" ({self.name})"
        return f"{self.severity:<7} {self.code:<18} {where:<16} {self.message}"


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of :func:`diagnose` (the module docstring says where each comes from)."""

    saturation_band: float = 0.1
    """Near a bound: within this fraction of the activation's range from it."""
    saturation_fraction: float = 0.5
    """Warning when at least this fraction of a layer's activations is near a bound."""
    saturation_info_fraction: float = 0.2
    """Info when at least this fraction is near a bound."""
    gradient_ratio: float = 1.5
    """Per-layer factor (geometric mean) of back-propagated gradient std shrinking/growing."""
    collapse_ratio: float = 0.1
    """Activation std below this times the input's std."""
    dead_fraction: float = 0.99
    """Fraction of exactly-zero ReLU activations for ``dead_units``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"threshold {f.name} must be a positive number, got {v!r}")
        if self.gradient_ratio <= 1:
            raise ValueError(f"gradient_ratio must be > 1, got {self.gradient_ratio}")
        for name in ("saturation_band", "saturation_fraction", "saturation_info_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be at most 1, got {getattr(self, name)}")


def diagnose(snapshot: Snapshot, **thresholds: float) -> list[Finding]:
    """Findings about ``snapshot`` (see the module docstring), errors first, then by layer.

    Args:
        snapshot: a :class:`~fastmlp.Snapshot` (live, or rebuilt from rows with
            :meth:`~fastmlp.Snapshot.from_rows`).
        thresholds: overrides of :class:`Thresholds` fields, e.g. ``gradient_ratio=2``.
    """
    # (told by its layers dict: the snapshot module, above this one, cannot be imported)
    if not isinstance(getattr(snapshot, "layers", None), dict):
        raise TypeError(f"diagnose expects a fastmlp.Snapshot, got {_what_to_pass(snapshot)}")
    t = Thresholds(**thresholds)
    layers: dict[int, dict[str, QuantityStats]] = snapshot.layers
    order = sorted(layers)
    output = order[-1] if order and _is_identity(layers[order[-1]]) else None
    hidden = [i for i in order if i != output]
    found: list[Finding] = []
    found += _nonfinite(layers, order)
    for i in hidden:
        found += _saturation(layers[i], i, t)
        found += _dead_units(layers[i], i, t)
    found += _gradient_flow(layers, hidden, t)
    found += _collapse(layers, order, t)
    found.sort(key=lambda f: (-f.rank, f.layer if f.layer is not None else 0, f.code))
    return found


def _what_to_pass(obj: object) -> str:
    """``obj``'s type, and how to get a snapshot from it where that is known."""
    got = "None" if obj is None else type(obj).__name__
    if callable(getattr(obj, "snapshot", None)):  # a ModelStats
        return f"{got}: pass its .snapshot()"
    if callable(getattr(getattr(obj, "stats", None), "snapshot", None)):  # a model
        return f"{got}: pass model.stats.snapshot() (fastmlp.stats_of(model).snapshot())"
    return (
        f"{got}: take one with model.stats.snapshot() or fastmlp.stats_of(model).snapshot(), "
        "or rebuild one from a run's stats.jsonl rows with fastmlp.Snapshot.from_rows(rows)"
    )


def worst(findings: Sequence[Finding]) -> Finding | None:
    """The most severe finding (the first of the highest severity), ``None`` when there is none."""
    if not findings:
        return None
    return max(findings, key=lambda f: f.rank)  # max keeps the first of equal ranks


def format_findings(findings: Sequence[Finding], min_severity: str = "info") -> str:
    """One line per finding at ``min_severity`` or above; a line saying so when there is none."""
    if min_severity not in SEVERITIES:
        raise ValueError(f"min_severity must be one of {SEVERITIES}, got {min_severity!r}")
    floor = SEVERITIES.index(min_severity)
    shown = [f for f in findings if f.rank >= floor]
    if not shown:
        return f"no findings at {min_severity} level or above"
    return "\n".join(str(f) for f in shown)


def findings_json(findings: Sequence[Finding], **extra: Any) -> str:
    """``{"findings": [...], **extra}`` as indented JSON (what ``diagnosis.json`` holds)."""
    return json.dumps(_json_safe({**extra, "findings": [f.to_dict() for f in findings]}), indent=2)


# --------------------------------------------------------------------------- checks


def _name(layer: dict[str, QuantityStats]) -> str | None:
    for qs in layer.values():
        name = getattr(qs, "name", None)
        if name:
            return str(name)
    return None


def _has_data(qs: QuantityStats | None) -> bool:
    return qs is not None and qs.count > 0 and qs.mean is not None and qs.std is not None


def _is_identity(layer: dict[str, QuantityStats]) -> bool:
    """Activation statistics equal to the pre-activation's: an identity (output) layer."""
    a, z = layer.get("activation"), layer.get("preactivation")
    if not (_has_data(a) and _has_data(z)) or a.count != z.count:
        return False
    if a.saturated_low is not None:
        return False
    return all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)
        for x, y in ((a.mean, z.mean), (a.std, z.std), (a.min, z.min), (a.max, z.max))
        if x is not None and y is not None
    )


def _nonfinite(layers: dict[int, dict[str, QuantityStats]], order: list[int]) -> list[Finding]:
    # The order the pass computes them: forward from layer 1 up, backward from the top down.
    sequence = [(i, q) for i in order for q in _FORWARD]
    sequence += [(i, q) for i in reversed(order) for q in _BACKWARD]
    affected = []
    for i, q in sequence:
        qs = layers[i].get(q)
        if qs is not None and qs.nonfinite:
            fraction = qs.nonfinite / (qs.count + qs.nonfinite)
            affected.append(
                {"layer": i, "quantity": q, "nonfinite": qs.nonfinite, "fraction": fraction}
            )
    if not affected:
        return []
    first = affected[0]
    layer, q = first["layer"], first["quantity"]
    msg = (
        f"NaN/Inf first appear in {q} ({first['nonfinite']} values, "
        f"{100 * first['fraction']:.3g}%); {len(affected)} quantities affected"
    )
    if q == "preactivation" and layer == order[0]:
        msg += ": check the input data"
    evidence = {**first, "affected": affected}
    return [Finding("nonfinite", "error", layer, _name(layers[layer]), q, msg, evidence)]


def _cdf(qs: QuantityStats, v: float) -> float | None:
    """Fraction of values ``< v`` read off the histogram (linear inside a bin); ``None`` without."""
    edges, counts = qs.hist_edges, qs.hist_counts
    if not edges or counts is None or not qs.hist_total:
        return None
    below = float(qs.underflow or 0)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        if hi <= v:
            below += c
        elif lo < v:
            below += c * (v - lo) / (hi - lo)
    if v > edges[-1]:
        below += qs.overflow or 0
    return min(max(below / qs.hist_total, 0.0), 1.0)


def _bounds(a: QuantityStats) -> tuple[float, float, str]:
    if a.hist_edges:
        return float(a.hist_edges[0]), float(a.hist_edges[-1]), "histogram range"
    if a.min is not None and a.min >= 0:
        return 0.0, 1.0, "inferred (no negative activation: sigmoid)"
    return -1.0, 1.0, "inferred (tanh/softsign)"


def _saturation(layer: dict[str, QuantityStats], i: int, t: Thresholds) -> list[Finding]:
    a = layer.get("activation")
    if not _has_data(a) or a.saturated_low is None or a.saturated_high is None:
        return []  # not a saturating activation (or saturation counting is off)
    lo, hi, how = _bounds(a)
    band = t.saturation_band * (hi - lo)
    near_lo_at, near_hi_at = lo + band, hi - band
    cdf_lo = _cdf(a, near_lo_at)
    if cdf_lo is not None:
        near_lo = cdf_lo
        near_hi = 1.0 - _cdf(a, near_hi_at)
        method = "histogram"
    else:
        # Lower bounds: strictly saturated values are near the bound, and Markov's inequality on
        # the distance from the bound (P(d > band) <= E[d] / band).
        near_lo = max(a.saturated_low, 1.0 - (a.mean - lo) / band)
        near_hi = max(a.saturated_high, 1.0 - (hi - a.mean) / band)
        method = "lower bound (no histogram)"
    near_lo, near_hi = max(near_lo, 0.0), max(near_hi, 0.0)
    total = min(near_lo + near_hi, 1.0)
    if total >= t.saturation_fraction:
        severity = "warning"
    elif total >= t.saturation_info_fraction:
        severity = "info"
    else:
        return []
    lo_text, hi_text = f"h <= {near_lo_at:.3g}", f"h >= {near_hi_at:.3g}"
    if near_hi < 0.005 or near_lo < 0.005:
        desc = f"{100 * total:.0f}% at {lo_text if near_lo >= near_hi else hi_text}"
    else:
        desc = (
            f"{100 * total:.0f}% near the bounds ({100 * near_lo:.0f}% at {lo_text}, "
            f"{100 * near_hi:.0f}% at {hi_text})"
        )
    mostly = "mostly" if severity == "warning" else "partly"
    msg = f"activations {mostly} saturated: {desc}, mean {a.mean:.3g}; gradients through it damped"
    evidence = {
        "near_low": near_lo,
        "near_high": near_hi,
        "near_bound": total,
        "band": [near_lo_at, near_hi_at],
        "range": [lo, hi],
        "range_from": how,
        "method": method,
        "saturated_low": a.saturated_low,
        "saturated_high": a.saturated_high,
        "mean": a.mean,
        "std": a.std,
        "threshold": t.saturation_fraction if severity == "warning" else t.saturation_info_fraction,
    }
    return [Finding("saturation", severity, i, _name(layer), "activation", msg, evidence)]


def _dead_units(layer: dict[str, QuantityStats], i: int, t: Thresholds) -> list[Finding]:
    a, z = layer.get("activation"), layer.get("preactivation")
    if not _has_data(a) or a.saturated_low is not None or a.min is None or a.max is None:
        return []
    if a.min != 0.0:  # ReLU-like: never negative, exactly 0 somewhere
        return []
    if a.max <= 0.0:
        zero, how = 1.0, "activation max is 0"
    else:
        neg = _cdf(z, 0.0) if _has_data(z) else None
        if neg is None:
            return []  # without a pre-activation histogram only the all-dead case is visible
        zero, how = neg, "at least the fraction of negative pre-activations (histogram)"
    if zero < t.dead_fraction:
        return []
    if zero >= 1.0:
        msg = "every unit inactive on every example (activation max 0): the layer passes nothing"
    else:
        msg = f"units almost never active: at least {100 * zero:.1f}% of activations are exactly 0"
    evidence = {
        "zero_fraction": zero,
        "from": how,
        "activation_max": a.max,
        "activation_mean": a.mean,
        "preactivation_max": z.max if z is not None else None,
        "preactivation_mean": z.mean if z is not None else None,
        "threshold": t.dead_fraction,
    }
    return [Finding("dead_units", "warning", i, _name(layer), "activation", msg, evidence)]


def _gradient_flow(
    layers: dict[int, dict[str, QuantityStats]], hidden: list[int], t: Thresholds
) -> list[Finding]:
    chain = [(i, layers[i].get("preactivation_grad")) for i in hidden]
    chain = [(i, g.std) for i, g in chain if _has_data(g)]
    if len(chain) < 2:
        return []
    (bottom, s_bottom), (top, s_top) = chain[0], chain[-1]
    steps = top - bottom
    stds = {str(i): s for i, s in chain}
    if s_top > 0 and s_bottom > 0:
        total = s_top / s_bottom
        per_layer = total ** (1.0 / steps)
    elif s_top > 0:  # nothing reaches the bottom layer
        total = per_layer = math.inf
    else:
        return []  # no gradient at the top: nothing to compare (dead units report it)
    evidence = {
        "std": stds,
        "top_layer": top,
        "bottom_layer": bottom,
        "ratio": total,
        "per_layer": per_layer,
        "threshold": t.gradient_ratio,
    }
    if per_layer >= t.gradient_ratio:
        i_min = min(chain, key=lambda c: c[1])[0]
        msg = (
            f"back-propagated gradient std shrinks {total:.3g}x from layer {top} down to layer "
            f"{bottom} (x{per_layer:.2f} per layer, threshold {t.gradient_ratio}): lower layers "
            "learn slowly (paper Fig 7)"
        )
        code, layer = "vanishing_gradient", i_min
    elif per_layer <= 1.0 / t.gradient_ratio:
        i_max = max(chain, key=lambda c: c[1])[0]
        msg = (
            f"back-propagated gradient std grows {1 / total:.3g}x from layer {top} down to layer "
            f"{bottom} (x{1 / per_layer:.2f} per layer, threshold {t.gradient_ratio})"
        )
        code, layer = "exploding_gradient", i_max
    else:
        return []
    return [
        Finding(code, "warning", layer, _name(layers[layer]), "preactivation_grad", msg, evidence)
    ]


def _collapse(
    layers: dict[int, dict[str, QuantityStats]], order: list[int], t: Thresholds
) -> list[Finding]:
    out = []
    for prev, i in zip(order[:-1], order[1:], strict=True):
        if i != prev + 1:
            continue  # not known to be this layer's input
        a_in, a = layers[prev].get("activation"), layers[i].get("activation")
        if not (_has_data(a_in) and _has_data(a)) or a_in.std <= 0:
            continue
        ratio = a.std / a_in.std
        if ratio >= t.collapse_ratio:
            continue
        msg = (
            f"activation std {a.std:.3g} is {ratio:.3g}x its input's ({a_in.std:.3g}, layer "
            f"{prev}; threshold {t.collapse_ratio}x): the layer passes on almost no signal"
        )
        evidence = {
            "std": a.std,
            "input_std": a_in.std,
            "input_layer": prev,
            "ratio": ratio,
            "threshold": t.collapse_ratio,
        }
        out.append(Finding("collapse", "warning", i, _name(layers[i]), "activation", msg, evidence))
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
