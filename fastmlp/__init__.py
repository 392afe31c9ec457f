"""fastmlp: train deep MLPs while watching every layer (Glorot & Bengio, 2010)."""

from fastmlp.activations import ACTIVATIONS, Activation, get_activation
from fastmlp.init import INITS, initialize_
from fastmlp.instrument import InstrumentReport, instrument, stats_of
from fastmlp.layers import InstrumentedDense, InstrumentedLinear
from fastmlp.mlp import MLP
from fastmlp.model_stats import ModelStats, instrumented_layers
from fastmlp.op import is_deterministic, set_deterministic
from fastmlp.probe import probe
from fastmlp.stats import QUANTITIES, LayerStats, QuantityStats, Snapshot
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.diagnosis import Finding, Thresholds, diagnose

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MLP",
    "QUANTITIES",
    "Activation",
    "Finding",
    "InstrumentReport",
    "InstrumentedDense",
    "InstrumentedLinear",
    "LayerStats",
    "ModelStats",
    "QuantityStats",
    "Snapshot",
    "StatsConfig",
    "Thresholds",
    "__version__",
    "diagnose",
    "get_activation",
    "initialize_",
    "instrument",
    "instrumented_layers",
    "is_deterministic",
    "probe",
    "set_deterministic",
    "stats_of",
]
