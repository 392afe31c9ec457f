"""Model-level access to the statistics of every instrumented layer."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed import ProcessGroup

from fastmlp.layers import InstrumentedDense
from fastmlp.stats import ranks
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.config import SWITCHES, StatsConfig
from fastmlp.stats.snapshot import Snapshot

__all__ = ["ModelStats", "instrumented_layers"]


def instrumented_layers(model: nn.Module) -> list[InstrumentedDense]:
    """Every instrumented layer (:class:`~fastmlp.layers.InstrumentedDense`: an
    :class:`~fastmlp.InstrumentedLinear` or an instrumented HF ``Conv1D``) in ``model``, in
    registration order."""
    return [m for _, m in _named_layers(model)]


def _named_layers(model: nn.Module) -> list[tuple[str, InstrumentedDense]]:
    if isinstance(model, InstrumentedDense):
        return [("", model)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, InstrumentedDense)]


class ModelStats:
    """The statistics of all instrumented layers of a model.

    ``snapshot()`` copies everything to the host in one transfer; ``reset()``
    clears every accumulator; :meth:`configure` (or an attribute per switch of
    :class:`~fastmlp.stats.config.StatsConfig`: ``enabled``, ``histograms``,
    ``saturation``, ``zeros``, ``moments4``, ``per_unit``, ``exponents``) switches
    recording for every layer (disabled statistics cost nothing).

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

    @property
    def config(self) -> StatsConfig:
        """The layers' :class:`~fastmlp.stats.config.StatsConfig` where all share one (up to
        their own saturation thresholds, which are per activation: ``None`` there when they
        differ); ``ValueError`` where the layers record different things."""
        configs = [s.config for _, s in self.layer_stats()]
        thresholds = {c.saturation_thresholds for c in configs}
        shared = {c.replace(saturation_thresholds=None) for c in configs}
        if len(shared) != 1:
            raise ValueError(
                "the layers record different statistics; read each layer's "
                "layer_stats()[i][1].config"
            )
        config = shared.pop()
        if len(thresholds) == 1:
            config = config.replace(saturation_thresholds=thresholds.pop())
        return config

    def configure(self, **changes: Any) -> None:
        """Change what every layer records: fields of
        :class:`~fastmlp.stats.config.StatsConfig` by name (checked for every layer before
        any is changed)."""
        StatsConfig().replace(**changes)  # unknown names or bad values raise here
        layers = [s for _, s in self.layer_stats()]
        for s in layers:
            s._resolved(s.config.replace(**changes))
        for s in layers:
            s.configure(**changes)

    # Every switch of StatsConfig reads (true when on in every layer) and sets (in every
    # layer) as an attribute: ``model.stats.histograms = False``.
    def __getattr__(self, name: str) -> bool:
        if name in SWITCHES:
            return all(getattr(s.config, name) for _, s in self.layer_stats())
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SWITCHES:
            self.configure(**{name: bool(value)})
        else:
            super().__setattr__(name, value)
