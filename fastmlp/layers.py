"""Instrumented layers: :class:`InstrumentedLinear` and the paper's :class:`MLP`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastmlp.activations import Activation, get_activation
from fastmlp.init import initialize_
from fastmlp.model_stats import ModelStats
from fastmlp.stats import LayerStats, check_float_tensor
from fastmlp.torch_path import linear_activation

__all__ = ["InstrumentedLinear", "MLP", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


class InstrumentedLinear(nn.Module):
    """``h = f(x W^T + b)`` that records per-layer statistics in its own forward and backward.

    It behaves like ``nn.Linear`` followed by the activation (same shapes, same
    parameters ``weight [out, in]`` and ``bias [out]``). While it runs, it
    accumulates on the tensor's device the statistics of ``preactivation``,
    ``activation``, ``preactivation_grad`` and ``weight_grad`` (see
    :mod:`fastmlp.stats`); read them with ``layer.stats`` or the model's
    :class:`~fastmlp.ModelStats`.

    Args:
        activation: ``sigmoid``, ``tanh``, ``softsign``, ``relu`` or ``identity``.
        init: ``standard``, ``normalized`` or ``pytorch`` (see :mod:`fastmlp.init`).
        bias: learn an additive bias.
        zero_bias: start biases at zero (default: yes, except for ``init="pytorch"``).
        bins: histogram bins (even).
        saturation_thresholds: ``(low, high)`` overriding the activation's default.
        backend: ``auto`` (Triton kernels for CUDA tensors, PyTorch otherwise),
            ``triton`` (always the kernels; on CPU under ``TRITON_INTERPRET=1``)
            or ``torch`` (always the PyTorch path).
        generator: ``torch.Generator`` for a reproducible initialization.
        layer_index: 1-based position reported in statistics rows.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation = "tanh",
        init: str = "normalized",
        bias: bool = True,
        *,
        zero_bias: bool | None = None,
        bins: int = 64,
        saturation_thresholds: tuple[float, float] | None = None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        layer_index: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = get_activation(activation)
        self.init = init
        self.backend = backend
        self.layer_index = layer_index
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        initialize_(self.weight, self.bias, init, zero_bias=zero_bias, generator=generator)
        self.stats = LayerStats(
            self.activation,
            bins=bins,
            saturation_thresholds=saturation_thresholds,
            device=device,
        )

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            return True
        return x.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input of shape [..., {self.in_features}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            x2, weight = x2.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        elif x2.dtype != weight.dtype:
            raise TypeError(
                f"input dtype {x2.dtype} does not match the layer's parameters ({weight.dtype}); "
                "cast the input or the model, or use torch.autocast"
            )
        stats = self.stats if self.stats.enabled else None
        with torch.autocast(device_type, enabled=False):
            if self._use_triton(x2):
                from fastmlp.kernels import linear_activation as triton_linear_activation

                h = triton_linear_activation(x2, weight, bias, self.activation, stats)
            else:
                h = linear_activation(x2, weight, bias, self.activation, stats)
        return h.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation.name}, init={self.init}, "
            f"bias={self.bias is not None}, backend={self.backend}, layer={self.layer_index}"
        )


class MLP(nn.Module):
    """The paper's network: instrumented hidden layers and an instrumented linear output layer.

    Args:
        in_features: input size (e.g. 1024 for 32x32 Shapeset images).
        out_features: number of classes (logits; apply a softmax loss outside).
        depth: number of hidden layers (ignored when ``width`` is a list).
        width: hidden width, or a list of hidden widths.
        activation, init, bias, zero_bias, bins, backend: as for :class:`InstrumentedLinear`.
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
        bins: int = 64,
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
        for layer in self.layers:
            x = layer(x)
        return x
