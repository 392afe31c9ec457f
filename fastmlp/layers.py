""":class:`InstrumentedLinear`: dense + bias + activation that records its own statistics."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as _dist
from torch import nn
from torch.nn.modules import module as _module

from fastmlp import tensor_parallel
from fastmlp.activations import Activation, get_activation
from fastmlp.init import initialize_
from fastmlp.op import BACKENDS, _eager, dense
from fastmlp.stats.buffers import LayerStats
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.layout import Buffers

__all__ = [
    "BACKENDS",
    "InstrumentedDense",
    "InstrumentedLinear",
    "chain_passes",
    "check_float_tensor",
    "instrumented_class",
    "is_hf_conv1d_class",
    "torchscript_refusal",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)  # (weights that are not DTensors, told apart cheaply)


def check_float_tensor(x: torch.Tensor, what: str = "input") -> None:
    """Raise ``TypeError`` unless ``x`` is a real floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )


def torchscript_refusal(what: str, how: str) -> RuntimeError:
    """The error refusing TorchScript (``how``: ``torch.jit.script`` or ``torch.jit.trace``)
    of ``what``, naming the supported alternatives."""
    return RuntimeError(
        f"{what} does not support TorchScript ({how}): fastmlp's layers record their "
        "statistics in Python and through custom ops that TorchScript cannot compile or "
        "trace (and TorchScript is deprecated). Use torch.compile(model), or "
        "torch.export.export(model, (x,)) for a graph to save or deploy"
    )


class InstrumentedDense(nn.Module):
    """What every instrumented dense layer is: ``h = f(x W^T + b)`` through fastmlp's op,
    recording per-layer statistics in its own forward and backward (``self.stats``, a
    :class:`~fastmlp.stats.LayerStats`).

    Its concrete classes keep the type of the layer they stand for, so code that checks
    ``isinstance`` keeps finding them: :class:`InstrumentedLinear` is an ``nn.Linear``, and
    :func:`instrumented_class` makes the one for Hugging Face's ``Conv1D`` (whose weight is
    stored ``[in, out]``: ``weight_transposed``).
    """

    #: The weight is stored ``[in_features, out_features]`` and used transposed.
    weight_transposed: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation = "tanh",
        init: str = "normalized",
        bias: bool = True,
        *,
        zero_bias: bool | None = None,
        bins: int | None = None,
        saturation_thresholds: tuple[float, float] | None = None,
        config: StatsConfig | None = None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        layer_index: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stats_in_state_dict: bool = True,
        stats_device: torch.device | str | None = None,
    ) -> None:
        # (nn.Module's own: the parameters are made here, not by nn.Linear's __init__)
        nn.Module.__init__(self)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = get_activation(activation)
        self.init = init
        self.zero_bias = zero_bias
        self.backend = backend
        self.layer_index = layer_index
        factory = {"device": device, "dtype": dtype}
        shape = (
            (in_features, out_features) if self.weight_transposed else (out_features, in_features)
        )
        self.weight = nn.Parameter(torch.empty(*shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._initialize(generator)
        overrides = {"bins": bins, "saturation_thresholds": saturation_thresholds}
        self.stats = LayerStats(
            self.activation,
            config,
            **{k: v for k, v in overrides.items() if v is not None},
            device=device if stats_device is None else stats_device,
            persistent=stats_in_state_dict,
            units=out_features,
        )

    def _initialize(self, generator: torch.Generator | None = None) -> None:
        weight = self.weight.t() if self.weight_transposed else self.weight
        with torch.no_grad():
            initialize_(weight, self.bias, self.init, zero_bias=self.zero_bias, generator=generator)

    def reset_parameters(self) -> None:
        """Initialize the weight and bias again, by the layer's ``init`` scheme."""
        self._initialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (is_compiling first: dynamo then never looks at the tracer's state, which would
        # break the graph)
        if not torch.compiler.is_compiling() and torch._C._is_tracing():
            raise torchscript_refusal(f"fastmlp's {type(self).__name__}", "torch.jit.trace")
        check_float_tensor(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input of shape [..., {self.in_features}], got {tuple(x.shape)}"
            )
        # The parameters and statistics directly from the module's dicts (nn.Module's
        # __getattr__ costs about half a microsecond a name); a parametrized weight or bias
        # is not in them and is read as the attribute it then is.
        params = self._parameters
        weight = params.get("weight")
        if weight is None:
            weight = self.weight
        if self.weight_transposed:
            weight = weight.t()  # a view: the gradient reaches the [in, out] parameter
        bias = params.get("bias")
        if bias is None:
            bias = self.bias
        if type(weight) not in _PLAIN and tensor_parallel.is_dtensor(weight):
            return tensor_parallel.forward(self, x, weight, bias)
        return self.local_pass(x, weight, bias, self._modules["stats"].buffers_tuple())

    def local_pass(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bufs: Buffers,
        op: Callable[..., torch.Tensor] = dense,
    ) -> torch.Tensor:
        """The layer's pass on plain tensors ``x [..., in]``, ``weight [out, in]`` and
        ``bias``, recording into ``bufs``: ``op`` (:func:`fastmlp.op.dense`'s arguments) on
        the input flattened to 2-D, in autocast's dtype where autocast is on. Tensor
        parallelism (:mod:`fastmlp.tensor_parallel`) runs it on a rank's shards."""
        flat = x.dim() == 2  # (no reshape, so no view nodes in the autograd graph)
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        # (autocast knows no meta device: meta tensors, e.g. for shape checks, run as is)
        autocast = (
            torch._C._is_any_autocast_enabled()
            and (device_type := x.device.type) != "meta"
            and torch.is_autocast_enabled(device_type)
        )
        if autocast:
            # Computed in the autocast dtype, the op itself outside autocast.
            dt = torch.get_autocast_dtype(device_type)
            x2, weight = x2.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        elif x2.dtype != weight.dtype:
            raise TypeError(
                f"input dtype {x2.dtype} does not match the layer's parameters ({weight.dtype}); "
                "cast the input or the model, or use torch.autocast"
            )
        stats = self._modules["stats"]
        args = (x2, weight, bias, bufs, self.activation, self.backend)
        if autocast:
            with torch.autocast(device_type, enabled=False):
                h = op(*args, stats.settings())
        else:
            h = op(*args, stats.settings())
        return h if flat else h.reshape(*x.shape[:-1], h.shape[-1])

    def __prepare_scriptable__(self) -> nn.Module:
        # (torch.jit.script calls this on every module before compiling any)
        raise torchscript_refusal(f"fastmlp's {type(self).__name__}", "torch.jit.script")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation.name}, "
            f"init={self.init}, backend={self.backend}, layer={self.layer_index}"
        )

    # The class's own repr, not the one a wrapped class (HF Conv1D) defines.
    __repr__ = nn.Module.__repr__


class InstrumentedLinear(InstrumentedDense, nn.Linear):
    """``h = f(x W^T + b)`` that records per-layer statistics in its own forward and backward.

    An ``nn.Linear`` (``isinstance`` holds: initialisation functions, parameter grouping and
    tensor-parallel plans treat it as one) followed by the activation: same shapes, same
    parameters ``weight [out, in]`` and ``bias [out]``. While it runs, it accumulates on the
    tensor's device the statistics of ``preactivation``, ``activation``,
    ``preactivation_grad`` and ``weight_grad`` (see :mod:`fastmlp.stats`); read them with
    ``layer.stats`` or the model's :class:`~fastmlp.ModelStats`.

    Args:
        activation: ``sigmoid``, ``tanh``, ``softsign``, ``relu``, ``identity``, ``gelu``,
            ``gelu_tanh`` or ``silu``.
        init: ``standard``, ``normalized`` or ``pytorch`` (see :mod:`fastmlp.init`); also
            what :meth:`reset_parameters` draws.
        bias: learn an additive bias.
        zero_bias: start biases at zero (default: yes, except for ``init="pytorch"``).
        config: what the layer records (:class:`~fastmlp.stats.config.StatsConfig`; default
            ``StatsConfig()``).
        bins, saturation_thresholds: override those fields of ``config``.
        backend: ``auto`` (Triton kernels for CUDA tensors, PyTorch otherwise),
            ``triton`` (always the kernels; on CPU under ``TRITON_INTERPRET=1``)
            or ``torch`` (always the PyTorch path).
        generator: ``torch.Generator`` for a reproducible initialization.
        layer_index: 1-based position reported in statistics rows.
        stats_in_state_dict: save the statistics buffers in ``state_dict`` (default); with
            ``False`` the ``state_dict`` holds only ``weight`` and ``bias``, like
            ``nn.Linear``'s (what :func:`fastmlp.instrument` uses).
        stats_device: device of the statistics buffers (default: ``device``).

    Inputs of any leading shape ``[*, in_features]`` are flattened to 2-D for the op.
    """


def instrumented_class(dense_class: type[nn.Module]) -> type[InstrumentedDense]:
    """The instrumented class standing for ``dense_class``: :class:`InstrumentedLinear` for
    ``nn.Linear``, :class:`InstrumentedConv1D` (a subclass of ``transformers``' ``Conv1D``,
    weight ``[in, out]``) for that ``Conv1D``."""
    if dense_class is nn.Linear:
        return InstrumentedLinear
    if is_hf_conv1d_class(dense_class):
        return _instrumented_conv1d()
    raise TypeError(f"no instrumented class for {dense_class.__name__}")


def is_hf_conv1d_class(cls: type) -> bool:
    """Whether ``cls`` is exactly Hugging Face's ``Conv1D`` (told by its name and module,
    without importing transformers)."""
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


@functools.cache
def _instrumented_conv1d() -> type[InstrumentedDense]:
    from transformers.pytorch_utils import Conv1D

    class InstrumentedConv1D(InstrumentedDense, Conv1D):
        """Hugging Face's ``Conv1D`` (``y = x @ W + b``, ``weight [in, out]``), instrumented:
        :class:`InstrumentedDense` with the weight used transposed (a view: no copy), so
        ``isinstance(m, Conv1D)`` and HF's ``nf``/``nx`` keep holding."""

        weight_transposed = True

        def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
            super().__init__(in_features, out_features, *args, **kwargs)
            self.nf, self.nx = out_features, in_features

    # Found by pickle as fastmlp.layers.InstrumentedConv1D (the module's __getattr__).
    InstrumentedConv1D.__module__ = __name__
    InstrumentedConv1D.__qualname__ = "InstrumentedConv1D"
    return InstrumentedConv1D


def __getattr__(name: str) -> type:
    # ``fastmlp.layers.InstrumentedConv1D`` (what pickle looks up) is made on first use,
    # importing transformers only then.
    if name == "InstrumentedConv1D":
        return _instrumented_conv1d()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_GLOBAL_HOOKS = tuple(
    getattr(_module, f"_global_{name}", None)
    for name in (
        "forward_hooks",
        "forward_pre_hooks",
        "backward_hooks",
        "backward_pre_hooks",
        "forward_hooks_always_called",
    )
)


def chain_passes(
    layers: nn.ModuleList, x: torch.Tensor
) -> tuple[list[torch.Tensor | None], tuple[tuple, ...]] | None:
    """The passes of ``layers`` applied in turn to ``x``, as :func:`fastmlp.op.dense_chain`
    takes them: ``(params, passes)``, each layer's weight and bias, and its ``(buffers,
    activation, backend, settings)``. ``None`` where a layer's own call must run: a layer
    that is not exactly an :class:`InstrumentedLinear` (a subclass, a parametrized weight,
    a patched ``forward``), any module hook, autocast, an input that is not a 2-D tensor of
    the layers' dtype and width (the layer's call checks and reports it), mismatched
    widths, outside plain eager mode (compile, export, functorch, torch modes: those see
    one op node a pass), or in a process of a ``torch.distributed`` group: there DDP's
    (or FSDP's) gradient hooks start each bucket's all-reduce as soon as its layers'
    backward is done, overlapping communication with the rest of the backward, which one
    node for the network (all gradients at its end) would serialise."""
    if (
        not _eager()
        or not isinstance(x, torch.Tensor)
        or x.dim() != 2
        or torch._C._is_any_autocast_enabled()
        or any(_GLOBAL_HOOKS)
        or (_dist.is_available() and _dist.is_initialized())
    ):
        return None
    params: list[torch.Tensor | None] = []
    passes = []
    width, dtype = x.shape[1], x.dtype
    # (the modules' dicts directly: nn.Module's __getattr__ costs about half a microsecond
    # a name, and this runs for every layer of every step)
    for layer in layers._modules.values():
        d = layer.__dict__
        if (
            type(layer) is not InstrumentedLinear
            or "forward" in d
            or d["_forward_hooks"]
            or d["_forward_pre_hooks"]
            or d["_backward_hooks"]
            or d["_backward_pre_hooks"]
        ):
            return None
        p = d["_parameters"]
        weight = p.get("weight")
        if weight is None or weight.dtype != dtype or d["in_features"] != width:
            return None
        stats = d["_modules"]["stats"]
        params += (weight, p.get("bias"))
        passes.append((stats.buffers_tuple(), d["activation"], d["backend"], stats.settings()))
        width = d["out_features"]
    return params, tuple(passes)
