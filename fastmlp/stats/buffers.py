""":class:`LayerStats`: the statistics buffers of one instrumented layer and its switches."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmlp.activations import Activation
from fastmlp.stats.config import FIELDS, GROUPS, MAX_BINS, SWITCHES, StatsConfig
from fastmlp.stats.layout import (
    ACTIVATION,
    CALIBRATED,
    CENTER,
    NEXP,
    NFIELDS,
    NQ,
    NUNIT_ROWS,
    SUM4,
    Buffers,
    empty_acc,
    pad_acc,
)

__all__ = ["MAX_BINS", "LayerStats", "calibration_flags"]


class LayerStats(nn.Module):
    """Statistics accumulators of one instrumented layer (layout: :mod:`fastmlp.stats.layout`).

    ``acc``, ``shift``, ``hist`` and ``hist_range`` live on the layer's device; ``state``
    (calibration flags, centring hints) stays on the host. The layer's op updates them in
    its forward and backward; :meth:`snapshot` reads them.

    What is recorded is :attr:`config` (a :class:`~fastmlp.stats.config.StatsConfig`);
    each of its fields also reads and sets as an attribute (``stats.zeros = True`` is
    ``stats.configure(zeros=True)``).

    Args:
        activation: the layer's activation; bounded activations are histogrammed
            on their fixed output range, and saturating ones get saturation counts.
        config: what to record (default: ``StatsConfig()``); ``**options``, any of its
            fields by name, override it. ``saturation_thresholds=None`` takes the
            activation's own, and :attr:`config` then holds those.
        units: number of output units (features) of the layer, for the per-unit counts
            (``per_unit`` needs it).
        persistent: save the buffers (and calibration flags) in ``state_dict``; with
            ``False`` they are left out of it entirely (no keys) and loading ignores them.
    """

    def __init__(
        self,
        activation: Activation,
        config: StatsConfig | None = None,
        *,
        units: int = 0,
        device: torch.device | str | None = None,
        persistent: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, StatsConfig):
            raise TypeError(f"config must be a StatsConfig, got {type(config).__name__}")
        config = (config or StatsConfig()).replace(**options)
        self.activation = activation
        self.units = int(units)
        self.persistent = persistent
        # groups switched during a window are incomplete until reset
        self._partial: set[str] = set()
        self.__dict__["config"] = self._resolved(config)
        bins = config.bins
        self.register_buffer("acc", empty_acc(device))
        self.register_buffer("shift", torch.zeros(NQ, dtype=torch.float64, device=device))
        self.register_buffer("hist", torch.zeros(NQ, bins + 2, dtype=torch.int64, device=device))
        self.register_buffer("hist_range", torch.zeros(NQ, 2, dtype=torch.float64, device=device))
        # Host-side: calibrated flags and centring hints (saved through get_extra_state).
        self.register_buffer("state", torch.zeros(2, NQ, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "unit_counts", torch.zeros(NUNIT_ROWS, self.units, dtype=torch.float64, device=device)
        )
        self.register_buffer("exp_hist", torch.zeros(NQ, NEXP, dtype=torch.int64, device=device))
        self._set_fixed_ranges()

    def _resolved(self, config: StatsConfig) -> StatsConfig:
        """``config`` checked against this layer, its thresholds the activation's own where
        it names none."""
        if config.per_unit and not self.units:
            raise ValueError("per-unit statistics need the layer's number of units")
        if config.saturation_thresholds is None and self.activation.saturation is not None:
            config = config.replace(saturation_thresholds=self.activation.saturation)
        return config

    def configure(self, **changes: Any) -> None:
        """Change what is recorded: any fields of :class:`StatsConfig` by name (``bins`` is
        fixed when the layer is built)."""
        old = self.config
        new = self._resolved(old.replace(**changes))
        if new.bins != old.bins:
            raise ValueError(
                f"bins is fixed when a layer is built ({old.bins}); build it with bins={new.bins}"
            )
        if bool(self.state[CALIBRATED].any()):
            # the window so far lacks (or has) these groups
            self._partial.update(g for g in GROUPS if getattr(new, g) != getattr(old, g))
        self.__dict__["config"] = new
        self.__dict__["_settings"] = None

    def __getattr__(self, name: str) -> Any:
        if name in FIELDS:
            return getattr(self.__dict__["config"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FIELDS:
            self.configure(**{name: bool(value) if name in SWITCHES else value})
        elif name == "config":
            if not isinstance(value, StatsConfig):
                raise TypeError(f"config must be a StatsConfig, got {type(value).__name__}")
            self.configure(**{f: getattr(value, f) for f in FIELDS})
        else:
            super().__setattr__(name, value)

    @property
    def thresholds(self) -> tuple[float, float] | None:
        """The saturation thresholds ``(low, high)`` in force, or ``None`` (set: as
        ``saturation_thresholds``)."""
        return self.config.saturation_thresholds

    @thresholds.setter
    def thresholds(self, value: tuple[float, float] | None) -> None:
        self.configure(saturation_thresholds=value)

    def recorded(self, group: str) -> bool:
        """Whether ``group`` (one of ``GROUPS``) was on for the whole window since reset."""
        return getattr(self.config, group) and group not in self._partial

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

    def settings(self) -> StatsConfig:
        """What a pass records now: :attr:`config` with ``saturation`` off where the
        activation has no thresholds."""
        # Made once and kept until the config changes (:meth:`configure`), as each layer
        # pass asks for it; not while compiling (the graph would guard on the cache, not on
        # the config).
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self.__dict__.get("_settings")
        if cached is not None:
            return cached
        config = self.config
        if config.saturation and config.saturation_thresholds is None:
            config = config.replace(saturation=False)
        if not compiling:
            self.__dict__["_settings"] = config
        return config

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):  # noqa: ANN001, ANN201
        # Hidden from torch.distributed.tensor's distribute_module (what tensor parallelism's
        # parallelize_module calls on each layer it shards): it partitions every submodule as
        # the layer (RowwiseParallel reads a `weight`) and makes every buffer a replicated
        # DTensor. The statistics are not a sharded part of the model: each rank keeps its own
        # plain buffers (fastmlp.tensor_parallel), merged at a snapshot like any rank's.
        if _called_by_distribute_module(sys._getframe(1)):
            return iter(())
        return super().named_modules(memo, prefix, remove_duplicate)

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
        return LayerStats(
            self.activation,
            self.config,
            units=self.units,
            device=self.acc.device,
            persistent=self.persistent,
        )

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
            # an older layout (fewer fields, e.g. 0.1.0's 8 or the 11 before abs_sum): the
            # new sums start at 0 and their groups read as not recorded until the next
            # reset; abs_sum starts at NaN (l1 unknown until the next reset)
            state_dict[prefix + "acc"] = pad_acc(acc)
            if acc.shape[1] <= SUM4:  # the groups' own fields are missing too
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
        return {
            "calibrated": self.calibrated,
            "bins": self.bins,
            "partial": sorted(self._partial),
            # the CPU path's centring hints: a window resumed from a checkpoint accumulates
            # as the uninterrupted one does (restarting them from shift rounds differently)
            "centers": self.state[CENTER].tolist(),
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("bins", self.bins) != self.bins:
            raise ValueError(
                f"checkpoint has {state['bins']} histogram bins, this layer has {self.bins}"
            )
        self.calibrated = list(state["calibrated"])
        self._partial.update(state.get("partial", ()))
        centers = state.get("centers")
        if centers is not None and len(centers) == self.state.shape[1]:
            self.state[CENTER] = torch.tensor([float(c) for c in centers], dtype=torch.float64)
        else:  # saved before the hints were
            self.hint_centers_from_shift()

    def extra_repr(self) -> str:
        return ", ".join(f"{f}={getattr(self.config, f)}" for f in FIELDS)


# id(state) -> (state, NumPy view of its calibration row): the view, made once per buffer
# (``Tensor.numpy()`` costs more than the rest of a route; every pass asks for the row).
# The entry holds the tensor, so its id is not reused while cached. Cleared when large
# (layers come and go with probes).
_CALIBRATION_VIEWS: dict[int, tuple[torch.Tensor, np.ndarray]] = {}


def calibration_flags(state: torch.Tensor) -> np.ndarray:
    """The calibration row of a layer's host-side ``state`` buffer, as a NumPy view (read
    without a tensor op, and without synchronising with a GPU)."""
    entry = _CALIBRATION_VIEWS.get(id(state))
    if entry is None or entry[0] is not state:
        if len(_CALIBRATION_VIEWS) >= 4096:
            _CALIBRATION_VIEWS.clear()
        entry = _CALIBRATION_VIEWS[id(state)] = (state, state.numpy()[CALIBRATED])
    return entry[1]


def _called_by_distribute_module(frame: FrameType | None) -> bool:
    """Whether ``frame`` (a caller of ``named_modules``) is, through the ``named_modules``
    of the modules above, ``torch.distributed.tensor``'s ``distribute_module``."""
    while frame is not None and frame.f_code.co_name == "named_modules":
        frame = frame.f_back
    return (
        frame is not None
        and frame.f_code.co_name == "distribute_module"
        and frame.f_globals.get("__name__", "").startswith("torch.distributed.tensor")
    )
