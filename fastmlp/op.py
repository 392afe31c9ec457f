"""The instrumented dense op: ``h = f(x W^T + b)`` that records per-layer statistics.

This is what PyTorch sees of fastmlp: two ``torch.library`` custom ops,
``fastmlp::dense_forward`` and ``fastmlp::dense_backward``, that mutate the layer's
statistics buffers (declared in ``mutates_args``, so ``torch.compile(fullgraph=True)``,
``torch.export`` and CUDA graphs see one node per pass and the statistics keep updating),
with fake implementations for tracing, and one ``autograd.Function``
(:class:`DenseFunction`) that calls them.

Which implementation runs is decided in one place, :func:`route`, for every pass:

- ``"triton"``: the fused kernels (:mod:`fastmlp.kernels`) — for ``backend="auto"`` on CUDA
  tensors and ``backend="triton"`` (on CPU tensors only under ``TRITON_INTERPRET=1``),
  when the kernels take the inputs (float32/float16/bfloat16, a built-in activation, a
  non-empty batch) and every quantity of the pass is calibrated;
- ``"torch"``: the PyTorch path (:mod:`fastmlp.torch_path`) otherwise. It calibrates a
  quantity's shift and histogram range on its first pass after a reset, so the first pass
  of a kernel layer runs here too. On the CPU it reads values on the host (inside the
  opaque op, which is allowed); on a GPU it does not.

Inside the op the calibration flags are read from the host-side ``state`` buffer, so no
pass synchronises with a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType

import torch

from fastmlp import torch_path
from fastmlp.activations import get_activation
from fastmlp.stats.layout import (
    ACTIVATION,
    CALIBRATED,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    WEIGHT_GRAD,
    Buffers,
    Settings,
)

__all__ = ["BACKENDS", "DenseFunction", "dense", "dense_chain", "route"]

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MUTATED = ("acc", "shift", "hist", "hist_range", "state")


@functools.cache
def _kernels() -> ModuleType | None:
    """The kernels package, or ``None`` where Triton cannot be imported."""
    try:
        from fastmlp import kernels
    except ImportError:
        return None
    return kernels


#: Device types routed like CUDA by ``backend="auto"``: empty, except while ``bench.host``
#: times the CUDA path's host work on CPU tensors with Triton's driver mocked.
MOCK_GPU_DEVICE_TYPES: set[str] = set()


def route(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    state: torch.Tensor,
    quantities: tuple[int, int],
    enabled: bool,
) -> str:
    """``"triton"`` or ``"torch"``: the implementation of one pass (see the module docstring).

    ``quantities``: the two quantities the pass records; a pass whose quantities are not all
    calibrated runs on the PyTorch path, which calibrates them.
    """
    if backend == "torch" or (
        backend == "auto" and not (x.is_cuda or x.device.type in MOCK_GPU_DEVICE_TYPES)
    ):
        return "torch"
    kernels = _kernels()
    if kernels is None or not kernels.supported(x, weight, activation):
        if backend == "triton" and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
            if kernels is None or not kernels.INTERPRET:
                raise RuntimeError(
                    "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 "
                    "before triton is imported, or use backend='torch'"
                )
        return "torch"
    if enabled:
        flags = state.numpy()[CALIBRATED]  # host-side buffer: no device read
        if not (flags[quantities[0]] and flags[quantities[1]]):
            return "torch"
    return "triton"


@functools.lru_cache(maxsize=1024)
def _settings(
    activation: str, enabled: bool, histograms: bool, saturation: bool, lo: float, hi: float
) -> Settings:
    return Settings(enabled, histograms, saturation, lo, hi, get_activation(activation).bounded)


# ----------------------------------------------------------------------------- the ops


def _dense_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    acc: torch.Tensor,
    shift: torch.Tensor,
    hist: torch.Tensor,
    hist_range: torch.Tensor,
    state: torch.Tensor,
    activation: str,
    backend: str,
    enabled: bool,
    histograms: bool,
    saturation: bool,
    sat_low: float,
    sat_high: float,
) -> torch.Tensor:
    """``f(x W^T + b)`` for ``x [M, K]``; records ``preactivation`` and ``activation``."""
    bufs = Buffers(acc, shift, hist, hist_range, state)
    settings = _settings(activation, enabled, histograms, saturation, sat_low, sat_high)
    return _forward_impl(x, weight, bias, bufs, activation, backend, settings)


_FWD = (PREACTIVATION, ACTIVATION)
_BWD = (PREACTIVATION_GRAD, WEIGHT_GRAD)


def _calibrated(state: torch.Tensor, s: Settings, q0: int) -> bool:
    """Whether quantities ``q0``, ``q0 + 1`` are calibrated (or statistics are off)."""
    if not s.enabled:
        return True
    flags = state.numpy()[CALIBRATED]
    return bool(flags[q0] and flags[q0 + 1])


def _forward_impl(x, weight, bias, bufs: Buffers, activation: str, backend: str, s: Settings):
    how = route(backend, x, weight, activation, bufs.state, (PREACTIVATION, ACTIVATION), s.enabled)
    if how == "triton":
        kernels = _kernels()
        return kernels.forward(x, weight, bias, kernels.ACT_IDS[activation], bufs, s)
    return torch_path.forward(x, weight, bias, get_activation(activation), bufs, s)


dense_forward = torch.library.custom_op("fastmlp::dense_forward", mutates_args=_MUTATED)(
    _dense_forward
)


@dense_forward.register_fake
def _(x, weight, bias, acc, shift, hist, hist_range, state, activation, backend, *flags):
    return x.new_empty(x.shape[0], weight.shape[0])


def _dense_backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    acc: torch.Tensor,
    shift: torch.Tensor,
    hist: torch.Tensor,
    hist_range: torch.Tensor,
    state: torch.Tensor,
    activation: str,
    backend: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    enabled: bool,
    histograms: bool,
    saturation: bool,
    sat_low: float,
    sat_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, db)`` (empty where not needed); records the two gradient quantities."""
    bufs = Buffers(acc, shift, hist, hist_range, state)
    settings = _settings(activation, enabled, histograms, saturation, sat_low, sat_high)
    grads = _backward_impl(
        dh, x, weight, h, bufs, activation, backend, need_x, need_w, need_b, settings
    )
    # Outputs must not alias each other: a fresh empty tensor for each one not needed.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


def _backward_impl(dh, x, weight, h, bufs, activation, backend, need_x, need_w, need_b, s):
    """``(dx, dW, db)``, ``None`` where not needed."""
    q = (PREACTIVATION_GRAD, WEIGHT_GRAD)
    if route(backend, x, weight, activation, bufs.state, q, s.enabled) == "triton":
        kernels = _kernels()
        act_id = kernels.ACT_IDS[activation]
        return kernels.backward(dh, x, weight, h, act_id, bufs, s, need_x, need_w, need_b)
    act = get_activation(activation)
    return torch_path.backward(dh, x, weight, h, act, bufs, s, need_x, need_w, need_b)


dense_backward = torch.library.custom_op("fastmlp::dense_backward", mutates_args=_MUTATED)(
    _dense_backward
)


@dense_backward.register_fake
def _(dh, x, weight, h, acc, shift, hist, hist_range, state, activation, backend, nx, nw, nb, *f):
    n = weight.shape[0]
    return (
        x.new_empty(x.shape) if nx else x.new_empty(0),
        weight.new_empty(weight.shape) if nw else x.new_empty(0),
        weight.new_empty(n) if nb else x.new_empty(0),
    )


# ----------------------------------------------------------------------------- autograd


class DenseFunction(torch.autograd.Function):
    """Autograd of the instrumented dense op: forward and backward are the two custom ops.

    Arguments as :func:`dense`. Double backward is not supported (the backward runs
    without recording a graph).
    """

    @staticmethod
    def forward(x, weight, bias, bufs, activation, backend, settings):  # type: ignore[override]
        fn = _dense_forward if _eager() else torch.ops.fastmlp.dense_forward
        return fn(x, weight, bias, *bufs, activation, backend, *_flags(settings))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, bufs, activation, backend, settings = inputs
        ctx.save_for_backward(x, weight, output)
        # The buffers are mutated by every pass: kept as attributes, not saved tensors
        # (whose version check would fail when a later pass has updated them).
        ctx.bufs = bufs
        ctx.activation = activation
        ctx.backend = backend
        ctx.settings = settings
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        x, weight, h = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        fn = _dense_backward if _eager() else torch.ops.fastmlp.dense_backward
        with torch.no_grad():
            dx, dw, db = fn(
                dh,
                x,
                weight,
                h,
                *ctx.bufs,
                ctx.activation,
                ctx.backend,
                need_x,
                need_w,
                need_b,
                *_flags(ctx.settings),
            )
        return (
            dx if need_x else None,
            dw if need_w else None,
            db if need_b else None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def vmap(info, in_dims, *args):  # type: ignore[override]
        raise NotImplementedError(
            "fastmlp's instrumented layers do not support torch.func.vmap: their statistics "
            "accumulate over the whole batch. Call the model on the batch directly, or switch "
            "statistics off (model.stats.enabled = False) and vmap a plain copy of the model."
        )


class _EagerDenseFunction(torch.autograd.Function):
    """:class:`DenseFunction` for plain eager mode, in the ``forward(ctx, ...)`` style: its
    ``apply`` skips the per-call binding of the arguments to ``forward``'s signature (with
    ``inspect``) that a separate ``setup_context`` costs. Same forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, bufs, activation, backend, settings):  # type: ignore[override]
        h = _dense_forward(x, weight, bias, *bufs, activation, backend, *_flags(settings))
        DenseFunction.setup_context(ctx, (x, weight, bias, bufs, activation, backend, settings), h)
        return h

    backward = DenseFunction.backward


def _eager() -> bool:
    """Whether to call the ops' implementations directly: in plain eager mode, where the
    dispatcher would only route to them (Python-level autograd, ADInplaceOrView and backend
    layers, a few tens of microseconds per call). Under ``torch.compile``/``export``, fake
    tensors, functorch transforms or any torch function/dispatch mode, the custom ops run,
    so that tracing and modes see one node per pass."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.maybe_current_level() is not None
    )


def _flags(s: Settings) -> tuple[bool, bool, bool, float, float]:
    return s.enabled, s.histograms, s.saturation, s.sat_low, s.sat_high


def dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bufs: Buffers,
    activation: str,
    backend: str,
    settings: Settings,
) -> torch.Tensor:
    """``f(x W^T + b)`` for a 2-D ``x``, recording statistics into ``bufs`` when
    ``settings.enabled``; differentiable in ``x``, ``weight`` and ``bias``."""
    fn = _EagerDenseFunction if _eager() else DenseFunction
    return fn.apply(x, weight, bias, bufs, activation, backend, settings)


class _ChainFunction(torch.autograd.Function):
    """A chain of dense layers as one autograd node, for plain eager mode (:func:`dense_chain`).

    The same op implementations as :class:`DenseFunction`, layer after layer; one node
    instead of one per layer saves the per-node cost of a Python ``autograd.Function``
    (context, saved tensors, the engine's call into Python), which on a GPU is host time
    per layer and per step.
    """

    @staticmethod
    def forward(ctx, x, specs, *params):  # type: ignore[override]
        xs = [x]
        kernels = _kernels()
        same: tuple | None = None  # (backend, activation, weight dtype) routed to the kernels
        for i, (bufs, activation, backend, settings) in enumerate(specs):
            w, b = params[2 * i], params[2 * i + 1]
            x_i = xs[-1]
            # A layer like the previous kernel-routed one (its input is that layer's output:
            # same device and dtype) only needs its calibration flags checked.
            if same == (backend, activation, w.dtype) and _calibrated(bufs.state, settings, 0):
                h = kernels.forward(x_i, w, b, kernels.ACT_IDS[activation], bufs, settings)
            elif (
                route(backend, x_i, w, activation, bufs.state, (0, 1), settings.enabled) == "triton"
            ):
                h = kernels.forward(x_i, w, b, kernels.ACT_IDS[activation], bufs, settings)
                same = (backend, activation, w.dtype)
            else:
                h = torch_path.forward(x_i, w, b, get_activation(activation), bufs, settings)
                same = None
            xs.append(h)
        ctx.specs = specs
        ctx.has_bias = [params[2 * i + 1] is not None for i in range(len(specs))]
        ctx.save_for_backward(*xs, *params[0::2])
        return xs[-1]

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        specs = ctx.specs
        n = len(specs)
        saved = ctx.saved_tensors
        xs, ws = saved[: n + 1], saved[n + 1 :]
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * (2 * n)
        # need_x[i]: layer i's input gradient is wanted, for x itself or an earlier parameter
        need_x = [needs[0]] * n
        for i in range(1, n):
            need_x[i] = need_x[i - 1] or needs[2 * i] or needs[2 * i + 1]
        dx = None
        kernels = _kernels()
        same: tuple | None = None  # as in forward
        # (the engine runs this without grad unless create_graph; the ops record nothing)
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            for i in range(n - 1, -1, -1):
                bufs, activation, backend, settings = specs[i]
                need_w = needs[2 + 2 * i]
                need_b = needs[3 + 2 * i] and ctx.has_bias[i]
                w = ws[i]
                if same == (backend, activation, w.dtype) and _calibrated(
                    bufs.state, settings, _BWD[0]
                ):
                    dx, dw, db = kernels.backward(
                        dh, xs[i], w, xs[i + 1], kernels.ACT_IDS[activation], bufs, settings,
                        need_x[i], need_w, need_b,
                    )  # fmt: skip
                else:
                    dx, dw, db = _backward_impl(
                        dh, xs[i], w, xs[i + 1], bufs, activation, backend,
                        need_x[i], need_w, need_b, settings,
                    )  # fmt: skip
                    routed = route(
                        backend, xs[i], w, activation, bufs.state, _BWD, settings.enabled
                    )
                    same = (backend, activation, w.dtype) if routed == "triton" else None
                grads[2 * i] = dw
                grads[2 * i + 1] = db
                if not need_x[i]:
                    break
                dh = dx
        return (dx if needs[0] else None, None, *grads)


def dense_chain(
    x: torch.Tensor,
    specs: tuple[tuple[Buffers, str, str, Settings], ...],
    params: tuple[torch.Tensor | None, ...],
) -> torch.Tensor:
    """``dense`` applied layer after layer (``specs[i] = (bufs, activation, backend,
    settings)``, ``params = (w0, b0, w1, b1, ...)``, a bias may be ``None``), as one autograd
    node in eager mode; the same as chaining :func:`dense` otherwise."""
    if not _eager():
        for i, (bufs, activation, backend, settings) in enumerate(specs):
            x = dense(x, params[2 * i], params[2 * i + 1], bufs, activation, backend, settings)
        return x
    return _ChainFunction.apply(x, specs, *params)
