"""Fused Triton kernels and their launchers (installed as ``fastmlp.kernels``).

:func:`forward` and :func:`backward` compute dense + bias + activation and record the
layer statistics into the buffers of :mod:`fastmlp.stats.layout` inside the kernels;
:func:`supported` says which inputs they take. The op (:mod:`fastmlp.op`) decides when
they run. :func:`set_deterministic` switches to bitwise-reproducible statistics.
"""

from .linear_activation import MAX_BINS, backward, forward, supported
from .utils import ACT_IDS, GPU_DEVICE_TYPES, INTERPRET, is_deterministic, set_deterministic

__all__ = [
    "ACT_IDS",
    "GPU_DEVICE_TYPES",
    "INTERPRET",
    "MAX_BINS",
    "backward",
    "forward",
    "is_deterministic",
    "set_deterministic",
    "supported",
]
