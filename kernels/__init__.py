"""The fused Triton kernels (installed as ``fastmlp.kernels``): ``@triton.jit`` code only.

- :mod:`.forward`: :func:`fwd_kernel`, ``h = f(x W^T + b)`` with the forward statistics;
- :mod:`.backward`: :func:`bwd_dx_kernel` (``dX``) and :func:`bwd_dw_kernel` (``dW``,
  ``db``) with the gradient statistics;
- :mod:`.tiles`: a tile's statistics and their commits to the buffers, the finalize stage;
- :mod:`.activations`: the activations' ids, ``f`` and ``f'``.

They know the statistics buffers (:mod:`fastmlp.stats.layout`) and nothing else of
fastmlp. How they are launched (tile configurations, autotuning, prepared launches, work
buffers, deterministic mode) is :mod:`fastmlp.backends.fused`.
"""

from .activations import ACT_IDS, FROM_INPUT, activation_backward, apply_activation
from .backward import bwd_dw_kernel, bwd_dx_kernel
from .forward import fwd_kernel
from .tiles import MAX_BINS, NPART

__all__ = [
    "ACT_IDS",
    "FROM_INPUT",
    "MAX_BINS",
    "NPART",
    "activation_backward",
    "apply_activation",
    "bwd_dw_kernel",
    "bwd_dx_kernel",
    "fwd_kernel",
]
