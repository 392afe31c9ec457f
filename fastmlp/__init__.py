"""fastmlp: train deep MLPs while watching every layer (Glorot & Bengio, 2010)."""

# First: Ctrl-C while the fastmlp command imports torch ends it with one line (exit 130).
from fastmlp import interrupts as _interrupts  # noqa: F401
from fastmlp.activations import ACTIVATIONS, Activation, get_activation
from fastmlp.coordcheck import coord_check
from fastmlp.init import INITS, initialize_
from fastmlp.instrument import InstrumentReport, instrument, stats_of
from fastmlp.layers import InstrumentedDense, InstrumentedLinear
from fastmlp.mlp import MLP
from fastmlp.model_stats import ModelStats, instrumented_layers
from fastmlp.monitor import Monitor, NonFiniteError
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
    "Monitor",
    "NonFiniteError",
    "QuantityStats",
    "Snapshot",
    "StatsConfig",
    "Thresholds",
    "__version__",
    "coord_check",
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
