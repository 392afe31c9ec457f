"""Whether the backends must give the same numbers from run to run.

On (``FASTMLP_DETERMINISTIC=1`` at import, or :func:`set_deterministic`): the Triton
kernels add their float64 moment sums in a fixed order and use a fixed tile configuration
instead of autotuning, and the CPU backend multiplies with ``addmm`` (what ``nn.Linear``
runs) instead of choosing, by timing at first use, whichever of oneDNN and ``addmm`` is
faster (two processes may time them differently, and the two round differently). Off,
both take the faster way.
"""

from __future__ import annotations

import os

__all__ = ["is_deterministic", "set_deterministic"]

_on: bool = os.environ.get("FASTMLP_DETERMINISTIC", "0") == "1"


def set_deterministic(flag: bool = True) -> None:
    """Make every backend's numbers reproducible from run to run (``True``), or let them
    take the faster, timing- or atomics-dependent ways (``False``)."""
    global _on
    _on = bool(flag)


def is_deterministic() -> bool:
    """Whether deterministic mode is on (see :func:`set_deterministic`)."""
    return _on
