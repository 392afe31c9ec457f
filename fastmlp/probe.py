"""Statistics on a fixed probe batch, as the paper monitors training (300 test examples)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fastmlp.model_stats import ModelStats, instrumented_layers
from fastmlp.stats.snapshot import Snapshot

__all__ = ["probe"]


def probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Snapshot:
    """Run forward and backward on ``(x, y)`` and return the statistics of that pass alone.

    Parameters, their ``.grad`` and the training accumulators are left exactly
    as they were: the pass records into fresh accumulators and takes gradients
    with ``torch.autograd.grad`` instead of ``backward()``.
    """
    layers = instrumented_layers(model)
    if not layers:
        raise ValueError("model has no InstrumentedLinear layers")
    saved = [layer.stats for layer in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for layer, s in zip(layers, saved, strict=True):
            fresh = s.fresh()
            fresh.enabled = True
            layer.stats = fresh
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            if params:
                torch.autograd.grad(loss, params, allow_unused=True)
        # This process's pass alone, also under torch.distributed (no collective).
        return ModelStats(model).snapshot(local=True)
    finally:
        for layer, s in zip(layers, saved, strict=True):
            layer.stats = s
