"""Fused Triton kernels (installed as ``fastmlp.kernels``).

``linear_activation(x, weight, bias, activation, stats)`` computes
``f(x W^T + b)`` and records the layer statistics inside the kernels; see
:mod:`fastmlp.kernels.linear_activation`. :func:`set_deterministic` switches to
bitwise-reproducible statistics.
"""

from .linear_activation import LinearActivationKernelFunction, linear_activation, supported
from .utils import INTERPRET, is_deterministic, set_deterministic

__all__ = [
    "linear_activation",
    "LinearActivationKernelFunction",
    "supported",
    "set_deterministic",
    "is_deterministic",
    "INTERPRET",
]
