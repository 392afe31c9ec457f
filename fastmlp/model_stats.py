"""Model-level access to the statistics of every instrumented layer."""

from __future__ import annotations

from torch import nn
from torch.distributed import ProcessGroup

from fastmlp.layers import InstrumentedLinear
from fastmlp.stats import ranks
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.snapshot import Snapshot

__all__ = ["ModelStats", "instrumented_layers"]


def instrumented_layers(model: nn.Module) -> list[InstrumentedLinear]:
    """Every :class:`~fastmlp.InstrumentedLinear` in ``model``, in registration order."""
    return [m for _, m in _named_layers(model)]


def _named_layers(model: nn.Module) -> list[tuple[str, InstrumentedLinear]]:
    if isinstance(model, InstrumentedLinear):
        return [("", model)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, InstrumentedLinear)]


class ModelStats:
    """The statistics of all instrumented layers of a model.

    ``snapshot()`` copies everything to the host in one transfer; ``reset()``
    clears every accumulator; ``enabled``, ``histograms``, ``saturation``, ``zeros``,
    ``moments4``, ``per_unit`` and ``exponents`` switch recording for every layer
    (disabled statistics cost nothing).

    Layers are numbered by their ``layer_index``; where two layers share one (layers
    built separately, e.g. an ``nn.Sequential`` of ``InstrumentedLinear`` left at the
    default), all are numbered 1, 2, ... in registration order instead. Every row also
    carries the layer's module path (``name``).
    """

    def __init__(self, model: nn.Module) -> None:
        named = _named_layers(model)
        if not named:
            raise ValueError("model has no InstrumentedLinear layers")
        self._names = [n or None for n, _ in named]  # a lone layer has no path
        self._layers = [m for _, m in named]
        indices = [layer.layer_index for layer in self._layers]
        if len(set(indices)) != len(indices):
            indices = list(range(1, len(indices) + 1))
        self._indices = indices

    @property
    def names(self) -> list[str | None]:
        """Module path of every instrumented layer, in registration order."""
        return list(self._names)

    def layer_stats(self) -> list[tuple[int, LayerStats]]:
        """``(layer number, LayerStats)`` for every instrumented layer."""
        return [(i, layer.stats) for i, layer in zip(self._indices, self._layers, strict=True)]

    def snapshot(self, *, local: bool = False, group: ProcessGroup | None = None) -> Snapshot:
        """Statistics accumulated since the last reset, on the host.

        Under ``torch.distributed`` (an initialized process group of more than
        one rank) this combines every rank's statistics exactly with one packed
        collective (:func:`fastmlp.stats.ranks.snapshot`): every rank of
        ``group`` must call it, and all get the same snapshot. ``local=True``
        reads this process's statistics alone (no communication).
        """
        if local:
            return Snapshot.from_layers(self.layer_stats(), names=self._names)
        return ranks.snapshot(self.layer_stats(), group, names=self._names)

    def reset(self) -> None:
        """Clear every layer's accumulators."""
        for _, s in self.layer_stats():
            s.reset()

    def _get(self, name: str) -> bool:
        return all(getattr(s, name) for _, s in self.layer_stats())

    def _set(self, name: str, value: bool) -> None:
        for _, s in self.layer_stats():
            setattr(s, name, bool(value))

    @property
    def enabled(self) -> bool:
        """Record statistics at all (``False``: the layers run uninstrumented)."""
        return self._get("enabled")

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._set("enabled", value)

    @property
    def histograms(self) -> bool:
        """Record histograms."""
        return self._get("histograms")

    @histograms.setter
    def histograms(self, value: bool) -> None:
        self._set("histograms", value)

    @property
    def saturation(self) -> bool:
        """Record saturation counts."""
        return self._get("saturation")

    @saturation.setter
    def saturation(self, value: bool) -> None:
        self._set("saturation", value)

    @property
    def zeros(self) -> bool:
        """Count values exactly 0 (``zero_fraction`` in the rows; off by default)."""
        return self._get("zeros")

    @zeros.setter
    def zeros(self, value: bool) -> None:
        self._set("zeros", value)

    @property
    def moments4(self) -> bool:
        """Record third and fourth moments (``skewness``, ``kurtosis``; off by default)."""
        return self._get("moments4")

    @moments4.setter
    def moments4(self, value: bool) -> None:
        self._set("moments4", value)

    @property
    def per_unit(self) -> bool:
        """Record per-unit counts of activations (``dead_fraction``, ``unit_active``,
        ``unit_saturated``; off by default)."""
        return self._get("per_unit")

    @per_unit.setter
    def per_unit(self, value: bool) -> None:
        self._set("per_unit", value)

    @property
    def exponents(self) -> bool:
        """Record exponent histograms (``formats``, ``exponent_counts``; off by default)."""
        return self._get("exponents")

    @exponents.setter
    def exponents(self, value: bool) -> None:
        self._set("exponents", value)
