"""Helpers shared by the tests that feed values to a layer's statistics directly."""

from __future__ import annotations

import torch

from fastmlp.backends import cpu
from fastmlp.stats import LayerStats
from fastmlp.stats.layout import ACTIVATION


def update(stats: LayerStats, q: int, x: torch.Tensor) -> None:
    """Accumulate the CPU tensor ``x`` as quantity ``q`` of ``stats``, as a layer's pass on
    the CPU backend records it."""
    fixed = q == ACTIVATION and stats.activation.bounded
    cpu.record(stats.buffers_tuple(), stats.settings(), q, x, fixed=fixed)
