"""Per-layer statistics: the buffer layout, the buffers, their exact merges and host snapshots.

Modules, each importing only those before it: :mod:`~fastmlp.stats.layout` (what each
buffer holds), :mod:`~fastmlp.stats.config` (:class:`StatsConfig`, what a layer records),
:mod:`~fastmlp.stats.buffers` (:class:`LayerStats`),
:mod:`~fastmlp.stats.algebra` (exact merges), :mod:`~fastmlp.stats.snapshot`
(:class:`Snapshot`), :mod:`~fastmlp.stats.ranks` (the cross-rank merge).
"""

from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.layout import (
    ACTIVATION,
    COUNT,
    FIELDS,
    MAX,
    MIN,
    NFIELDS,
    NONFINITE,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    QUANTITIES,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUMSQ,
    WEIGHT_GRAD,
)
from fastmlp.stats.snapshot import ROW_FIELDS, QuantityStats, Snapshot

__all__ = [
    "ACTIVATION",
    "COUNT",
    "FIELDS",
    "MAX",
    "MIN",
    "NFIELDS",
    "NONFINITE",
    "PREACTIVATION",
    "PREACTIVATION_GRAD",
    "QUANTITIES",
    "ROW_FIELDS",
    "SAT_HIGH",
    "SAT_LOW",
    "SUM",
    "SUMSQ",
    "WEIGHT_GRAD",
    "LayerStats",
    "QuantityStats",
    "Snapshot",
    "StatsConfig",
]
