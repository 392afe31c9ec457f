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
    GROUPS,
    NEXP,
    NFIELDS,
    NQ,
    NUNIT_ROWS,
    Buffers,
    Settings,
    empty_acc,
)

__all__ = ["MAX_BINS", "LayerStats"]

#: Most histogram bins a layer takes (the PyTorch path counts any number exactly; the
#: kernels take up to ``fastmlp.kernels.MAX_BINS`` and leave larger ones to it).
MAX_BINS = 2**16


class LayerStats(nn.Module):
    """Statistics accumulators of one instrumented layer (layout: :mod:`fastmlp.stats.layout`).

    ``acc``, ``shift``, ``hist`` and ``hist_range`` live on the layer's device; ``state``
    (calibration flags, centring hints) stays on the host. The layer's op updates them in
    its forward and backward; :meth:`snapshot` reads them.

    Args:
        activation: the layer's activation; bounded activations are histogrammed
            on their fixed output range, and saturating ones get saturation counts.
        bins: number of histogram bins (even, 2 to :data:`MAX_BINS`).
        saturation_thresholds: ``(low, high)`` overriding the activation's default.
        histograms: record histograms.
        saturation: record saturation counts.
        zeros: count values exactly 0 (off by default: an extra comparison per element).
        moments4: record third and fourth moment sums, for skewness and kurtosis (off by
            default). A group switched on or off while a window is being accumulated
            reads as not recorded (``None``) until the next :meth:`reset`.
        units: number of output units (features) of the layer, for the per-unit counts.
        per_unit: record per-unit counts of the activation (dead units, per-unit
            saturated fractions; off by default, needs ``units``).
        exponents: record exponent histograms (fractions outside bf16/fp16/fp8 ranges;
            off by default).
        persistent: save the buffers (and calibration flags) in ``state_dict``; with
            ``False`` they are left out of it entirely (no keys) and loading ignores them.
    """

    def __init__(
        self,
        activation: Activation,
        *,
        bins: int = 64,
        saturation_thresholds: tuple[float, float] | None = None,
        histograms: bool = True,
        saturation: bool = True,
        zeros: bool = False,
        moments4: bool = False,
        units: int = 0,
        per_unit: bool = False,
        exponents: bool = False,
        device: torch.device | str | None = None,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        if (
            not isinstance(bins, int)
            or isinstance(bins, bool)
            or not 2 <= bins <= MAX_BINS
            or bins % 2
        ):
            raise ValueError(f"bins must be an even integer in [2, {MAX_BINS}], got {bins!r}")
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
        self.persistent = persistent
        # opt-in groups; those switched during a window are incomplete until reset
        self._groups = {g: False for g in GROUPS}
        self._partial: set[str] = set()
        self.register_buffer("acc", empty_acc(device))
        self.register_buffer("shift", torch.zeros(NQ, dtype=torch.float64, device=device))
        self.register_buffer("hist", torch.zeros(NQ, bins + 2, dtype=torch.int64, device=device))
        self.register_buffer("hist_range", torch.zeros(NQ, 2, dtype=torch.float64, device=device))
        # Host-side: calibrated flags and centring hints (saved through get_extra_state).
        self.register_buffer("state", torch.zeros(2, NQ, dtype=torch.float64), persistent=False)
        self.units = int(units)
        self.register_buffer(
            "unit_counts", torch.zeros(NUNIT_ROWS, self.units, dtype=torch.float64, device=device)
        )
        self.register_buffer("exp_hist", torch.zeros(NQ, NEXP, dtype=torch.int64, device=device))
        self._set_fixed_ranges()
        self.zeros = zeros
        self.moments4 = moments4
        self.per_unit = per_unit
        self.exponents = exponents

    def _switch(self, group: str, value: bool) -> None:
        value = bool(value)
        if value != self._groups[group] and bool(self.state[CALIBRATED].any()):
            self._partial.add(group)  # the window so far lacks (or has) this group
        self._groups[group] = value

    @property
    def zeros(self) -> bool:
        """Count values exactly 0."""
        return self._groups["zeros"]

    @zeros.setter
    def zeros(self, value: bool) -> None:
        self._switch("zeros", value)

    @property
    def moments4(self) -> bool:
        """Record third and fourth moment sums (skewness, kurtosis)."""
        return self._groups["moments4"]

    @moments4.setter
    def moments4(self, value: bool) -> None:
        self._switch("moments4", value)

    @property
    def per_unit(self) -> bool:
        """Record per-unit counts of the activation (dead units, per-unit saturation)."""
        return self._groups["per_unit"]

    @per_unit.setter
    def per_unit(self, value: bool) -> None:
        if value and not self.units:
            raise ValueError("per-unit statistics need the layer's number of units")
        self._switch("per_unit", value)

    @property
    def exponents(self) -> bool:
        """Record exponent histograms (low-precision range)."""
        return self._groups["exponents"]

    @exponents.setter
    def exponents(self, value: bool) -> None:
        self._switch("exponents", value)

    def recorded(self, group: str) -> bool:
        """Whether ``group`` (one of ``GROUPS``) was on for the whole window since reset."""
        return self._groups[group] and group not in self._partial

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
        # (tuple.__new__: the NamedTuple without its Python-level __new__, once per pass)
        return tuple.__new__(
            Buffers,
            (
                b["acc"],
                b["shift"],
                b["hist"],
                b["hist_range"],
                b["state"],
                b["unit_counts"],
                b["exp_hist"],
            ),
        )

    def settings(self) -> Settings:
        """What a pass records now (switches and thresholds)."""
        # Made once and kept until an attribute is set (``__setattr__``: every switch and
        # threshold is an attribute or a property), as each layer pass asks for it; not
        # while compiling (the graph would guard on the cache, not on the switches).
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self.__dict__.get("_settings")
        if cached is not None:
            return cached
        lo, hi = self.thresholds if self.thresholds is not None else (0.0, 0.0)
        settings = Settings(
            bool(self.enabled),
            bool(self.histograms),
            self.saturation_active,
            lo,
            hi,
            self.activation.bounded,
            self.zeros,
            self.moments4,
            self.per_unit,
            self.exponents,
        )
        if not compiling:
            self.__dict__["_settings"] = settings
        return settings

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__["_settings"] = None  # (after a property's setter too)

    def hint_centers_from_shift(self) -> None:
        """Restart the CPU path's centring hints from ``shift`` (after loading buffers)."""
        self.state[CENTER] = self.shift.detach().to("cpu", torch.float64).float().double()

    def reset(self) -> None:
        """Forget everything accumulated since the last reset (in place, no reallocation)."""
        self.acc.copy_(empty_acc(self.acc.device))
        self.shift.zero_()
        self.hist.zero_()
        self.hist_range.zero_()
        self.unit_counts.zero_()
        self.exp_hist.zero_()
        self.state.zero_()
        self._partial.clear()
        self._set_fixed_ranges()

    def fresh(self) -> LayerStats:
        """A new, empty accumulator set with the same configuration, on the same device."""
        new = LayerStats(
            self.activation,
            bins=self.bins,
            saturation_thresholds=self.thresholds,
            histograms=self.histograms,
            saturation=self.saturation,
            zeros=self.zeros,
            moments4=self.moments4,
            units=self.units,
            per_unit=self.per_unit,
            exponents=self.exponents,
            device=self.acc.device,
            persistent=self.persistent,
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

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[override]
        if self.persistent:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        if not self.persistent:
            return
        acc = state_dict.get(prefix + "acc")
        if acc is not None and acc.dim() == 2 and acc.shape[1] < NFIELDS:
            # an older layout (fewer fields, e.g. 0.1.0's 8): the new sums start at 0 and
            # their groups read as not recorded until the next reset
            pad = acc.new_zeros(acc.shape[0], NFIELDS - acc.shape[1])
            state_dict[prefix + "acc"] = torch.cat([acc, pad], dim=1)
            self._partial.update(GROUPS)
        if prefix + "acc" in state_dict and prefix + "unit_counts" not in state_dict:
            # written before per-unit counts existed: they start at 0, not recorded
            state_dict[prefix + "unit_counts"] = torch.zeros_like(self.unit_counts)
            self._partial.add("per_unit")
        if prefix + "acc" in state_dict and prefix + "exp_hist" not in state_dict:
            state_dict[prefix + "exp_hist"] = torch.zeros_like(self.exp_hist)
            self._partial.add("exponents")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"calibrated": self.calibrated, "bins": self.bins, "partial": sorted(self._partial)}

    def set_extra_state(self, state: dict) -> None:
        if state.get("bins", self.bins) != self.bins:
            raise ValueError(
                f"checkpoint has {state['bins']} histogram bins, this layer has {self.bins}"
            )
        self.calibrated = list(state["calibrated"])
        self._partial.update(state.get("partial", ()))
        self.hint_centers_from_shift()

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, enabled={self.enabled}, histograms={self.histograms}, "
            f"saturation={self.saturation_active}, zeros={self.zeros}, moments4={self.moments4}, "
            f"per_unit={self.per_unit}, exponents={self.exponents}"
        )
