"""The paper's network: :class:`MLP`, instrumented hidden layers and an instrumented output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastmlp.activations import Activation, get_activation
from fastmlp.layers import InstrumentedLinear, chain_passes
from fastmlp.model_stats import ModelStats
from fastmlp.op import dense_chain
from fastmlp.stats.config import StatsConfig

__all__ = ["MLP"]


class MLP(nn.Module):
    """The paper's network: instrumented hidden layers and an instrumented linear output layer.

    Args:
        in_features: input size (e.g. 1024 for 32x32 Shapeset images).
        out_features: number of classes (logits; apply a softmax loss outside).
        depth: number of hidden layers (ignored when ``width`` is a list).
        width: hidden width, or a list of hidden widths.
        activation, init, bias, zero_bias, bins, backend: as for :class:`InstrumentedLinear`.
        config: what every layer records (:class:`~fastmlp.stats.config.StatsConfig`).
        seed: seed for a reproducible initialization.

    Layers are numbered from 1; the output layer (identity activation) is
    ``depth + 1``. Statistics: ``model.stats``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int = 5,
        width: int | Sequence[int] = 1000,
        activation: str | Activation = "tanh",
        init: str = "normalized",
        *,
        bias: bool = True,
        zero_bias: bool | None = None,
        bins: int | None = None,
        config: StatsConfig | None = None,
        backend: str = "auto",
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(width, int):
            if not isinstance(depth, int) or depth < 0:
                raise ValueError(f"depth must be a non-negative int, got {depth!r}")
            widths = [width] * depth
        else:
            widths = list(width)
        self.activation = get_activation(activation)
        self.widths = widths
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        sizes = [in_features, *widths, out_features]
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            layers.append(
                InstrumentedLinear(
                    n_in,
                    n_out,
                    "identity" if last else self.activation,
                    init,
                    bias,
                    zero_bias=zero_bias,
                    bins=bins,
                    config=config,
                    backend=backend,
                    generator=generator,
                    layer_index=i + 1,
                    device=device,
                    dtype=dtype,
                )
            )
        self.layers = nn.ModuleList(layers)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.widths)

    @property
    def stats(self) -> ModelStats:
        """The statistics of every layer (snapshot, reset, switches)."""
        return ModelStats(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:  # images [n, H, W] or [n, C, H, W]
            x = x.flatten(1)
        # One autograd node for the whole network where nothing needs each layer's own
        # call (hooks, autocast, ...): the same values, gradients and statistics, with
        # less host work a step.
        chain = chain_passes(self._modules["layers"], x)
        if chain is not None:
            return dense_chain(x, *chain)
        for layer in self.layers:
            x = layer(x)
        return x
