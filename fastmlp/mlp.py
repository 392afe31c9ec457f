"""The paper's network: :class:`MLP`, instrumented hidden layers and an instrumented output."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fastmlp.activations import Activation, get_activation
from fastmlp.layers import InstrumentedLinear, chain_passes, torchscript_refusal
from fastmlp.model_stats import ModelStats
from fastmlp.op import dense_chain
from fastmlp.stats.config import StatsConfig

__all__ = ["MLP"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _size(name: str, value: object, least: int) -> int:
    """``value`` as an int of at least ``least``; else an error naming ``name`` and it."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(
            f"MLP: {name} must be an int >= {least}, got {value!r} ({type(value).__name__})"
        )
    if value < least:
        raise ValueError(f"MLP: {name} must be an int >= {least}, got {value!r}")
    return int(value)


def _widths(depth: object, width: object) -> list[int]:
    """The hidden widths: ``depth`` times ``width``, or the list ``width``."""
    if isinstance(width, numbers.Integral) and not isinstance(width, bool):
        return [_size("width", width, 1)] * _size("depth", depth, 0)
    if isinstance(width, (str, bytes)) or not isinstance(width, Iterable):
        raise TypeError(
            f"MLP: width must be an int (units in each hidden layer) or a list of ints "
            f"(one per hidden layer), got {width!r} ({type(width).__name__})"
        )
    try:
        items = list(width)
    except TypeError:  # (a 0-d tensor or array: iterable by type, not in fact)
        raise TypeError(
            f"MLP: width must be an int or a list of ints, got {width!r} ({type(width).__name__})"
        ) from None
    return [_size(f"width[{i}]", w, 1) for i, w in enumerate(items)]


def _check_options(bias: object, zero_bias: object, seed: object, dtype: object) -> None:
    """Raise naming the argument and the value unless each is of the kind expected."""
    if not isinstance(bias, bool):
        raise TypeError(f"MLP: bias must be True or False, got {bias!r}")
    if zero_bias is not None and not isinstance(zero_bias, bool):
        raise TypeError(f"MLP: zero_bias must be True, False or None, got {zero_bias!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"MLP: seed must be an int or None, got {seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # (what torch.Generator takes)
        raise ValueError(f"MLP: seed must lie in [-2**63, 2**64), got {seed!r}")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "MLP: dtype must be a floating torch.dtype (torch.float16, torch.bfloat16, "
            f"torch.float32, torch.float64) or None, got {dtype!r}"
        )


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
        in_features = _size("in_features", in_features, 1)
        out_features = _size("out_features", out_features, 1)
        widths = _widths(depth, width)
        _check_options(bias, zero_bias, seed, dtype)
        self.activation = get_activation(activation)
        self.widths = widths
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device or "cpu").manual_seed(int(seed))
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

    def __prepare_scriptable__(self) -> nn.Module:
        # (torch.jit.script calls this on every module before compiling any)
        raise torchscript_refusal("fastmlp.MLP", "torch.jit.script")

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.widths)

    @property
    def stats(self) -> ModelStats:
        """The statistics of every layer (snapshot, reset, switches)."""
        return ModelStats(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            hint = (
                " (torch.from_numpy(x) converts a NumPy array)" if hasattr(x, "__array__") else ""
            )
            raise TypeError(
                f"MLP input must be a torch.Tensor [n, {self.layers[0].in_features}], "
                f"got {type(x).__name__}{hint}"
            )
        # (is_compiling first: dynamo then never looks at the tracer's state, which would
        # break the graph)
        if not torch.compiler.is_compiling() and torch._C._is_tracing():
            raise torchscript_refusal("fastmlp.MLP", "torch.jit.trace")
        if x.dim() > 2:  # images [n, H, W] or [n, C, H, W]
            n_in = self.layers[0].in_features
            if math.prod(x.shape[1:]) != n_in:
                raise ValueError(
                    f"MLP expects inputs [n, {n_in}] or images [n, ...] of {n_in} values "
                    f"each, got shape {tuple(x.shape)}"
                )
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
