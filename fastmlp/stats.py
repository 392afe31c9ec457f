"""On-device statistics accumulators, one set per instrumented layer.

Layout (shared with the Triton kernels in ``fastmlp.kernels``): for each of the
four quantities ``q`` (index into :data:`QUANTITIES`), a layer's
:class:`LayerStats` holds

- ``acc[q]``: float64 ``[NFIELDS]`` = ``count, sum, sumsq, min, max,
  nonfinite, sat_low, sat_high``, where ``sum`` and ``sumsq`` are
  ``sum(x - shift[q])`` and ``sum((x - shift[q])**2)`` over finite values;
- ``shift[q]``: float64, a value near the data's mean fixed at calibration, so
  the variance ``sumsq/count - (sum/count)**2`` keeps its precision in float64;
- ``hist[q]``: int64 ``[bins + 2]`` = ``underflow, bins..., overflow``;
- ``hist_range[q]``: float64 ``(low, high)``. Bins are ``[e_i, e_i+1)``, the
  last one closed; underflow is ``x < low``, overflow ``x > high``.

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

import operator
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fastmlp.activations import Activation

if TYPE_CHECKING:
    from fastmlp.snapshot import Snapshot

__all__ = [
    "QUANTITIES",
    "PREACTIVATION",
    "ACTIVATION",
    "PREACTIVATION_GRAD",
    "WEIGHT_GRAD",
    "FIELDS",
    "NFIELDS",
    "LayerStats",
]

QUANTITIES = ("preactivation", "activation", "preactivation_grad", "weight_grad")
PREACTIVATION, ACTIVATION, PREACTIVATION_GRAD, WEIGHT_GRAD = range(4)
FIELDS = ("count", "sum", "sumsq", "min", "max", "nonfinite", "sat_low", "sat_high")
COUNT, SUM, SUMSQ, MIN, MAX, NONFINITE, SAT_LOW, SAT_HIGH = range(len(FIELDS))
NFIELDS = len(FIELDS)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _empty_acc(device: torch.device | None = None) -> torch.Tensor:
    acc = torch.zeros(len(QUANTITIES), NFIELDS, dtype=torch.float64, device=device)
    acc[:, MIN] = float("inf")
    acc[:, MAX] = float("-inf")
    return acc


class LayerStats(nn.Module):
    """Statistics accumulators of one instrumented layer (buffers on the layer's device).

    Args:
        activation: the layer's activation; bounded activations are histogrammed
            on their fixed output range, and saturating ones get saturation counts.
        bins: number of histogram bins (even, >= 2).
        saturation_thresholds: ``(low, high)`` overriding the activation's default.
        histograms: record histograms.
        saturation: record saturation counts.
    """

    def __init__(
        self,
        activation: Activation,
        *,
        bins: int = 64,
        saturation_thresholds: tuple[float, float] | None = None,
        histograms: bool = True,
        saturation: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(bins, int) or bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even integer >= 2, got {bins!r}")
        thresholds = saturation_thresholds or activation.saturation
        if thresholds is not None:
            lo, hi = (float(t) for t in thresholds)
            if not lo < hi:
                raise ValueError(f"saturation thresholds must satisfy low < high, got {thresholds}")
            thresholds = (lo, hi)
        self.activation = activation
        self.bins = bins
        self.thresholds: tuple[float, float] | None = thresholds
        self.enabled = True
        self.histograms = histograms
        self.saturation = saturation
        # Quantities histogrammed on a fixed range (the activation of a bounded function).
        self.fixed_range = tuple(q == ACTIVATION and activation.bounded for q in range(4))
        self.calibrated = [False] * len(QUANTITIES)
        # Host-side guess of each quantity's current mean (CPU path: centering point), always
        # a float32 number.
        self.center_hint = [0.0] * len(QUANTITIES)
        self._saturation_bounds: dict[tuple, tuple[float, float]] = {}
        self._host: tuple[tuple[torch.Tensor, ...], tuple[np.ndarray, ...]] | None = None
        self.register_buffer("acc", _empty_acc(device))
        self.register_buffer(
            "shift", torch.zeros(len(QUANTITIES), dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "hist", torch.zeros(len(QUANTITIES), bins + 2, dtype=torch.int64, device=device)
        )
        self.register_buffer(
            "hist_range", torch.zeros(len(QUANTITIES), 2, dtype=torch.float64, device=device)
        )
        self._set_fixed_ranges()

    def _set_fixed_ranges(self) -> None:
        for q, fixed in enumerate(self.fixed_range):
            if fixed:
                self.hist_range[q, 0], self.hist_range[q, 1] = self.activation.output_range

    def saturation_bounds(self, dtype: torch.dtype) -> tuple[float, float]:
        """The thresholds as ``dtype`` numbers ``(lo, hi)`` such that, for ``x`` of that
        dtype, ``x <= lo`` and ``x >= hi`` hold exactly when they hold for the real
        thresholds (``lo`` rounded down, ``hi`` rounded up)."""
        if self.thresholds is None:
            raise ValueError(f"activation {self.activation.name!r} has no saturation thresholds")
        key = (self.thresholds, dtype)
        bounds = self._saturation_bounds.get(key)
        if bounds is None:
            bounds = self._saturation_bounds[key] = _bounds_in(self.thresholds, dtype)
        return bounds

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """NumPy views of the CPU buffers ``acc, shift, hist, hist_range`` (same memory).

        The CPU path updates its scalars through these, without a tensor op per field.
        """
        buffers = _HOST_BUFFERS(self._buffers)
        cached = self._host
        if cached is None or not all(map(operator.is_, cached[0], buffers)):
            cached = (buffers, tuple(b.detach().numpy() for b in buffers))
            self._host = cached
        return cached[1]  # type: ignore[return-value]

    def hint_centers_from_shift(self) -> None:
        """Restart the CPU path's centring hints from ``shift`` (after loading buffers)."""
        self.center_hint = [as_float32(v) for v in self.shift.tolist()]

    @property
    def saturation_active(self) -> bool:
        """Whether saturation counts are recorded (enabled and the activation saturates)."""
        return self.saturation and self.thresholds is not None

    def reset(self) -> None:
        """Forget everything accumulated since the last reset (in place, no reallocation)."""
        self.acc.copy_(_empty_acc(self.acc.device))
        self.shift.zero_()
        self.hist.zero_()
        self.hist_range.zero_()
        self._set_fixed_ranges()
        self.calibrated = [False] * len(QUANTITIES)

    def snapshot(self, layer: int = 1) -> Snapshot:
        """This layer's statistics on the host, reported as layer number ``layer``."""
        from fastmlp.snapshot import Snapshot

        return Snapshot.from_layers([(layer, self)])

    def fresh(self) -> LayerStats:
        """A new, empty accumulator set with the same configuration, on the same device."""
        new = LayerStats(
            self.activation,
            bins=self.bins,
            saturation_thresholds=self.thresholds,
            histograms=self.histograms,
            saturation=self.saturation,
            device=self.acc.device,
        )
        return new

    def update(
        self, q: int, x: torch.Tensor, total: Callable[[], torch.Tensor] | None = None
    ) -> None:
        """Accumulate the statistics of quantity ``q`` over all elements of ``x`` (PyTorch path).

        ``total``: returns the sum of ``x``'s elements, if the caller has a cheaper way to it.
        """
        from fastmlp.torch_path import accumulate

        if not self.calibrated[q]:
            self.calibrate(q, x)
        accumulate(self, q, x, total)

    def scratch(self, n: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """A 1-D work buffer of ``n`` elements on the statistics' device.

        Shared by every layer in this thread (so one set stays in cache): its contents
        do not survive the next statistics update, and distinct ``slot``s are distinct
        buffers.
        """
        return _scratch(n, dtype, self.acc.device, slot)

    @torch.no_grad()
    def calibrate(self, q: int, x: torch.Tensor) -> None:
        """Fix ``shift[q]`` and, for auto-ranged quantities, ``hist_range[q]`` from ``x``."""
        x = x.detach().reshape(-1)
        fin = torch.isfinite(x)
        n = fin.sum()
        xs = torch.where(fin, x, 0).to(torch.float64)
        self.shift[q] = xs.sum() / n.clamp(min=1)
        if x.device.type == "cpu":
            self.center_hint[q] = as_float32(self.shift[q].item())
        if not self.fixed_range[q]:
            r = pow2_above(xs.abs().amax() if x.numel() else xs.new_zeros(()))
            self.hist_range[q, 0] = -r
            self.hist_range[q, 1] = r
        self.calibrated[q] = True

    # nn.Module plumbing: statistics keep their dtypes when the model is cast
    # (``model.half()`` must not turn float64 sums into float16), only the device follows.
    def _apply(self, fn: Any, recurse: bool = True) -> LayerStats:  # type: ignore[override]
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf).device)
        self._host = None
        return self

    def __getstate__(self) -> dict:
        # Copies and pickles get their own buffers: the NumPy views must not travel along.
        state = super().__getstate__()
        return {**state, "_host": None}

    def get_extra_state(self) -> dict:
        return {"calibrated": list(self.calibrated), "bins": self.bins}

    def set_extra_state(self, state: dict) -> None:
        if state.get("bins", self.bins) != self.bins:
            raise ValueError(
                f"checkpoint has {state['bins']} histogram bins, this layer has {self.bins}"
            )
        self.calibrated = list(state["calibrated"])

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, enabled={self.enabled}, histograms={self.histograms}, "
            f"saturation={self.saturation_active}"
        )


def as_float32(value: float) -> float:
    """``value`` rounded to float32: a centre that ``x - c`` uses exactly in any float dtype."""
    return float(np.float32(value))


def _bounds_in(thresholds: tuple[float, float], dtype: torch.dtype) -> tuple[float, float]:
    lo, hi = thresholds
    if dtype == torch.float64:
        return lo, hi
    lo32, hi32 = np.float32(lo), np.float32(hi)
    # Compared as Python floats: NumPy would round the Python operand to float32 first.
    if float(lo32) > lo:
        lo32 = np.nextafter(lo32, np.float32(-np.inf))
    if float(hi32) < hi:
        hi32 = np.nextafter(hi32, np.float32(np.inf))
    return float(lo32), float(hi32)


_HOST_BUFFERS = operator.itemgetter("acc", "shift", "hist", "hist_range")
# Work buffers of the CPU path, per thread and shared by all layers: one set stays in cache.
_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    pool: dict | None = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    key = (slot, dtype, device)
    entry = pool.get(key)
    if entry is None or entry[0].numel() < n:
        # A normal tensor even when first asked for under torch.inference_mode(), so it
        # stays usable outside it.
        with torch.inference_mode(False):
            entry = (torch.empty(n, dtype=dtype, device=device), {})
        pool[key] = entry
    buf, views = entry
    view = views.get(n)
    if view is None:
        view = views[n] = buf[:n]
    return view


def pow2_above(m: torch.Tensor) -> torch.Tensor:
    """Smallest power of two strictly above ``m`` (float64, exact); 1 for 0 or non-finite ``m``."""
    m = m.to(torch.float64)
    ok = torch.isfinite(m) & (m > 0)
    _, exponent = torch.frexp(
        torch.where(ok, m, 1.0)
    )  # m = mantissa * 2**exponent, m < 2**exponent
    return torch.where(ok, torch.ldexp(torch.ones_like(m), exponent), 1.0)


def check_float_tensor(x: torch.Tensor, what: str = "input") -> None:
    """Raise ``TypeError`` unless ``x`` is a real floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
