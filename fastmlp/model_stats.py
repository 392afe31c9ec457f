"""Model-level access to the statistics of every instrumented layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fastmlp.snapshot import Snapshot
from fastmlp.stats import LayerStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from fastmlp.layers import InstrumentedLinear

__all__ = ["ModelStats", "instrumented_layers"]


def instrumented_layers(model: nn.Module) -> list[InstrumentedLinear]:
    """Every :class:`~fastmlp.InstrumentedLinear` in ``model``, in registration order."""
    from fastmlp.layers import InstrumentedLinear

    if isinstance(model, InstrumentedLinear):
        return [model]
    return [m for m in model.modules() if isinstance(m, InstrumentedLinear)]


class ModelStats:
    """The statistics of all instrumented layers of a model.

    ``snapshot()`` copies everything to the host in one transfer; ``reset()``
    clears every accumulator; ``enabled``, ``histograms`` and ``saturation``
    switch recording for every layer (disabled statistics cost nothing).
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = instrumented_layers(model)
        if not self._layers:
            raise ValueError("model has no InstrumentedLinear layers")
        indices = [layer.layer_index for layer in self._layers]
        if len(set(indices)) != len(indices):
            raise ValueError(f"instrumented layers have duplicate layer_index values: {indices}")

    def layer_stats(self) -> list[tuple[int, LayerStats]]:
        """``(layer index, LayerStats)`` for every instrumented layer."""
        return [(layer.layer_index, layer.stats) for layer in self._layers]

    def snapshot(self, *, local: bool = False, group: ProcessGroup | None = None) -> Snapshot:
        """Statistics accumulated since the last reset, on the host.

        Under ``torch.distributed`` (an initialized process group of more than
        one rank) this combines every rank's statistics exactly with one packed
        collective (:func:`fastmlp.distributed.snapshot`): every rank of
        ``group`` must call it, and all get the same snapshot. ``local=True``
        reads this process's statistics alone (no communication).
        """
        if not local:
            from fastmlp import distributed

            if distributed.is_distributed(group):
                return distributed.snapshot(self.layer_stats(), group)
        return Snapshot.from_layers(self.layer_stats())

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
