""":class:`LayerStats`: the statistics buffers of one instrumented layer and its switches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmlp.activations import Activation
from fastmlp.stats.layout import (
    ACTIVATION,
    CALIBRATED,
    CENTER,
    NQ,
    Buffers,
    Settings,
    empty_acc,
)

__all__ = ["LayerStats"]


class LayerStats(nn.Module):
    """Statistics accumulators of one instrumented layer (layout: :mod:`fastmlp.stats.layout`).

    ``acc``, ``shift``, ``hist`` and ``hist_range`` live on the layer's device; ``state``
    (calibration flags, centring hints) stays on the host. The layer's op updates them in
    its forward and backward; :meth:`snapshot` reads them.

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
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2 or bins % 2:
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
        self.register_buffer("acc", empty_acc(device))
        self.register_buffer("shift", torch.zeros(NQ, dtype=torch.float64, device=device))
        self.register_buffer("hist", torch.zeros(NQ, bins + 2, dtype=torch.int64, device=device))
        self.register_buffer("hist_range", torch.zeros(NQ, 2, dtype=torch.float64, device=device))
        # Host-side: calibrated flags and centring hints (saved through get_extra_state).
        self.register_buffer("state", torch.zeros(2, NQ, dtype=torch.float64), persistent=False)
        self._set_fixed_ranges()

    def _set_fixed_ranges(self) -> None:
        if self.activation.bounded:
            lo, hi = self.activation.output_range
            self.hist_range[ACTIVATION, 0] = lo
            self.hist_range[ACTIVATION, 1] = hi

    @property
    def fixed_range(self) -> tuple[bool, ...]:
        """Per quantity: histogrammed on a fixed range (the activation of a bounded function)."""
        return tuple(q == ACTIVATION and self.activation.bounded for q in range(NQ))

    @property
    def calibrated(self) -> list[bool]:
        """Per quantity: whether its shift and histogram range are fixed since the last reset."""
        return [bool(v) for v in self.state[CALIBRATED].tolist()]

    @calibrated.setter
    def calibrated(self, flags: list[bool]) -> None:
        self.state[CALIBRATED] = torch.tensor([float(bool(f)) for f in flags])

    @property
    def saturation_active(self) -> bool:
        """Whether saturation counts are recorded (enabled and the activation saturates)."""
        return self.saturation and self.thresholds is not None

    def buffers_tuple(self) -> Buffers:
        """The buffers, in the order the op takes them."""
        b = self._buffers  # (direct: nn.Module.__getattr__ costs about a microsecond a name)
        return Buffers(b["acc"], b["shift"], b["hist"], b["hist_range"], b["state"])

    def settings(self) -> Settings:
        """What a pass records now (switches and thresholds)."""
        lo, hi = self.thresholds if self.thresholds is not None else (0.0, 0.0)
        return Settings(
            bool(self.enabled),
            bool(self.histograms),
            self.saturation_active,
            lo,
            hi,
            self.activation.bounded,
        )

    def hint_centers_from_shift(self) -> None:
        """Restart the CPU path's centring hints from ``shift`` (after loading buffers)."""
        self.state[CENTER] = self.shift.detach().to("cpu", torch.float64).float().double()

    def reset(self) -> None:
        """Forget everything accumulated since the last reset (in place, no reallocation)."""
        self.acc.copy_(empty_acc(self.acc.device))
        self.shift.zero_()
        self.hist.zero_()
        self.hist_range.zero_()
        self.state.zero_()
        self._set_fixed_ranges()

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
        new.enabled = self.enabled
        return new

    # nn.Module plumbing: statistics keep their dtypes when the model is cast
    # (``model.half()`` must not turn float64 sums into float16), only the device follows;
    # ``state`` stays on the host.
    def _apply(self, fn: Any, recurse: bool = True) -> LayerStats:  # type: ignore[override]
        was_meta = self.acc.is_meta
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            if name == "state":
                if buf.is_meta:
                    self._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
                continue
            out = fn(buf)
            self._buffers[name] = out if out.dtype == buf.dtype else buf.to(out.device)
        if was_meta and not self.acc.is_meta:  # ``to_empty`` from the meta device
            self.reset()
        return self

    def get_extra_state(self) -> dict:
        return {"calibrated": self.calibrated, "bins": self.bins}

    def set_extra_state(self, state: dict) -> None:
        if state.get("bins", self.bins) != self.bins:
            raise ValueError(
                f"checkpoint has {state['bins']} histogram bins, this layer has {self.bins}"
            )
        self.calibrated = list(state["calibrated"])
        self.hint_centers_from_shift()

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, enabled={self.enabled}, histograms={self.histograms}, "
            f"saturation={self.saturation_active}"
        )
