"""The instrumented dense op: ``h = f(x W^T + b)`` that records per-layer statistics.

This is what PyTorch sees of fastmlp: two ``torch.library`` custom ops,
``fastmlp::dense_forward`` and ``fastmlp::dense_backward``, that mutate the layer's
statistics buffers (declared by their schemas' alias annotations, ``Tensor(b0!) acc``, so
``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs see one node per pass
and the statistics keep updating), with fake implementations for tracing, and one
``autograd.Function`` (:class:`DenseFunction`) that calls them. In plain eager mode (no
compile, export, fake tensors, functorch transform or torch mode: :func:`_eager`) the same
implementations are called directly, without the dispatcher's few microseconds per call,
and :func:`dense_chain` runs a whole network's passes as one autograd node
(:class:`_EagerChainFunction`, what :class:`fastmlp.MLP` uses).

Which implementation runs is decided in one place, :func:`route`, for every pass:

- ``"triton"``: the fused kernels (:mod:`fastmlp.kernels`) — for ``backend="auto"`` on CUDA
  tensors and ``backend="triton"`` (on CPU tensors only under ``TRITON_INTERPRET=1``),
  when the kernels take the inputs (float32/float16/bfloat16, a built-in activation, a
  non-empty batch, at most ``fastmlp.kernels.MAX_BINS`` histogram bins) and every quantity
  of the pass is calibrated;
- ``"torch"``: the PyTorch path (:mod:`fastmlp.torch_path`) otherwise. It calibrates a
  quantity's shift and histogram range on its first pass after a reset, so the first pass
  of a kernel layer runs here too. On the CPU it reads values on the host (inside the
  opaque op, which is allowed); on a GPU it does not.

Inside the op the calibration flags are read from the host-side ``state`` buffer, so no
pass synchronises with a GPU.

Host cost: a pass's kind (:func:`_pass_key`: the inputs' shapes, strides, dtypes and
device, bias, activation, backend, settings, histogram size) is looked up once per pass
and holds a :class:`_PassCache`: route's verdict on all but the calibration flags (which
are read every pass) and the kernels' launch plans; a backward's is found in its
forward's. Nothing is derived again for a pass like an earlier one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from fastmlp import torch_path
from fastmlp.activations import get_activation
from fastmlp.stats.layout import (
    ACTIVATION,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    WEIGHT_GRAD,
    Buffers,
    Settings,
)

__all__ = ["BACKENDS", "DenseFunction", "dense", "dense_chain", "route"]

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MUTATED = ("acc", "shift", "hist", "hist_range", "state", "units", "exp_hist")


@functools.cache
def _kernels() -> ModuleType | None:
    """The kernels package, or ``None`` where Triton cannot be imported."""
    try:
        from fastmlp import kernels
    except ImportError:
        return None
    return kernels


#: Device types routed like CUDA by ``backend="auto"``: empty, except while ``bench.host``
#: times the CUDA path's host work on CPU tensors with Triton's driver mocked (a change
#: must be followed by :func:`routes_changed`).
MOCK_GPU_DEVICE_TYPES: set[str] = set()


class _PassCache:
    """What is kept for one kind of pass (one key, see :func:`_pass_key`), so that a pass
    like an earlier one neither checks again what the kernels take nor looks its launch
    plan up again: route's verdict on all but the calibration flags (with the routing
    epoch it was made in), a dict for the kernels' prepared launches, and, for a forward
    pass, the caches of its backward passes (by the backward's own inputs)."""

    __slots__ = ("verdict", "epoch", "kernels", "backward")

    def __init__(self) -> None:
        self.verdict: str | None = None
        self.epoch = -1
        self.kernels: dict = {}
        self.backward: dict[tuple, _PassCache] = {}


_PASSES: dict[tuple, _PassCache] = {}
# The device types routed like CUDA (MOCK_GPU_DEVICE_TYPES, fastmlp.kernels.
# GPU_DEVICE_TYPES) enter route's verdicts: whoever changes them calls routes_changed(),
# which starts a new epoch (verdicts of an older one are made again).
_EPOCH = [0]


def routes_changed() -> None:
    """Forget the kept routing verdicts (after changing the device types routed like CUDA)."""
    _EPOCH[0] += 1


def _pass_cache(key: tuple) -> _PassCache:
    cache = _PASSES.get(key)
    if cache is None:
        if len(_PASSES) >= 4096:  # (shapes come and go: keep it bounded)
            _PASSES.clear()
        cache = _PASSES[key] = _PassCache()
    return cache


def route(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    bufs: Buffers,
    quantities: tuple[int, int],
    enabled: bool,
    cache: _PassCache | None = None,
) -> str:
    """``"triton"`` or ``"torch"``: the implementation of one pass (see the module docstring).

    ``quantities``: the two quantities the pass records; a pass whose quantities are not all
    calibrated runs on the PyTorch path, which calibrates them. ``cache``: the pass's kind
    (:class:`_PassCache`, whose key determines ``backend``, ``activation``, the histogram
    size and the shapes, dtypes and devices of ``x`` and ``weight``): the verdict on all but
    the calibration flags is kept there.
    """
    if cache is None:
        static = _route_inputs(backend, x, weight, activation, bufs)
    elif cache.epoch == _EPOCH[0]:
        static = cache.verdict
    else:
        static = cache.verdict = _route_inputs(backend, x, weight, activation, bufs)
        cache.epoch = _EPOCH[0]
    if static == "torch":
        return "torch"
    if enabled:
        flags = torch_path.calibration_flags(bufs.state)  # host-side: no device read
        if not (flags[quantities[0]] and flags[quantities[1]]):
            return "torch"
    return "triton"


def _route_inputs(
    backend: str, x: torch.Tensor, weight: torch.Tensor, activation: str, bufs: Buffers
) -> str:
    """:func:`route` without the calibration flags: ``"torch"``, or ``"triton"`` where the
    backend and device ask for the kernels and they take the inputs."""
    if backend == "torch" or (
        backend == "auto"
        and not (x.is_cuda or (MOCK_GPU_DEVICE_TYPES and x.device.type in MOCK_GPU_DEVICE_TYPES))
    ):
        return "torch"
    kernels = _kernels()
    if kernels is None or not kernels.supported(x, weight, activation, bufs.bins):
        if backend == "triton" and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
            if kernels is None or not kernels.INTERPRET:
                raise RuntimeError(
                    "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 "
                    "before triton is imported, or use backend='torch'"
                )
        return "torch"
    return "triton"


@functools.lru_cache(maxsize=1024)
def _settings(
    activation: str,
    enabled: bool,
    histograms: bool,
    saturation: bool,
    lo: float,
    hi: float,
    zeros: bool,
    moments4: bool,
    per_unit: bool,
    exponents: bool,
) -> Settings:
    bounded = get_activation(activation).bounded
    return Settings(
        enabled, histograms, saturation, lo, hi, bounded, zeros, moments4, per_unit, exponents
    )


# ----------------------------------------------------------------------------- the ops


def _pass_key(
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool | None,
    bufs: Buffers,
    activation: str,
    backend: str,
    settings: Settings,
) -> tuple:
    """What makes one forward pass like another, for :func:`route` and the kernels' launch
    plans (a backward's key adds its own; ``has_bias`` is ``None`` where unknown)."""
    return (
        activation,
        backend,
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        weight.shape,
        weight.stride(),
        weight.dtype,
        has_bias,
        settings,
        bufs.hist.shape,
    )


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bufs: Buffers,
    activation: str,
    backend: str,
    settings: Settings,
) -> tuple[torch.Tensor, torch.Tensor | None, _PassCache]:
    """The forward pass behind :func:`dense_forward` (and eager mode's direct call):
    ``(h, z, cache)``, ``z`` ``None`` where the activation's backward does not need it,
    ``cache`` the pass's kind (:class:`_PassCache`; its backward's is found there)."""
    cache = _pass_cache(_pass_key(x, weight, bias is not None, bufs, activation, backend, settings))
    enabled = settings.enabled
    how = route(backend, x, weight, activation, bufs, (PREACTIVATION, ACTIVATION), enabled, cache)
    if how == "triton":
        kernels = _kernels()
        act_id = kernels.ACT_IDS[activation]
        return (*kernels.forward(x, weight, bias, act_id, bufs, settings, cache.kernels), cache)
    act = get_activation(activation)
    return (*torch_path.forward(x, weight, bias, act, bufs, settings), cache)


def _backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor,
    bufs: Buffers,
    activation: str,
    backend: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    settings: Settings,
    forward: _PassCache | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass behind :func:`dense_backward` (and eager mode's direct call):
    ``(dx, dW, db)``, ``None`` where not needed. ``forward``: the kind of the forward pass
    whose ``x`` and ``weight`` these are, where known."""
    if forward is None:
        forward = _pass_cache(_pass_key(x, weight, None, bufs, activation, backend, settings))
    key = (dh.stride(), saved.stride(), need_x, need_w, need_b)
    cache = forward.backward.get(key)
    if cache is None:
        cache = forward.backward[key] = _PassCache()
    quantities = (PREACTIVATION_GRAD, WEIGHT_GRAD)
    how = route(backend, x, weight, activation, bufs, quantities, settings.enabled, cache)
    if how == "triton":
        kernels = _kernels()
        act_id = kernels.ACT_IDS[activation]
        return kernels.backward(
            dh, x, weight, saved, act_id, bufs, settings, need_x, need_w, need_b, cache.kernels
        )
    act = get_activation(activation)
    return torch_path.backward(dh, x, weight, saved, act, bufs, settings, need_x, need_w, need_b)


def _dense_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    acc: torch.Tensor,
    shift: torch.Tensor,
    hist: torch.Tensor,
    hist_range: torch.Tensor,
    state: torch.Tensor,
    units: torch.Tensor,
    exp_hist: torch.Tensor,
    activation: str,
    backend: str,
    enabled: bool,
    histograms: bool,
    saturation: bool,
    sat_low: float,
    sat_high: float,
    zeros: bool,
    moments4: bool,
    per_unit: bool,
    exponents: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, z)`` with ``h = f(x W^T + b)`` for ``x [M, K]``; records ``preactivation`` and
    ``activation``. ``z = x W^T + b`` is returned only for activations whose backward needs
    it (``Activation.from_input``: GELU, SiLU); otherwise ``z`` is an empty tensor."""
    bufs = Buffers(acc, shift, hist, hist_range, state, units, exp_hist)
    settings = _settings(
        activation,
        enabled,
        histograms,
        saturation,
        sat_low,
        sat_high,
        zeros,
        moments4,
        per_unit,
        exponents,
    )
    h, z, _ = _forward(x, weight, bias, bufs, activation, backend, settings)
    return h, x.new_empty(0) if z is None else z


# The ops are defined on torch.library's dispatcher directly, with the schema written out:
# its alias annotations (``Tensor(a!)``) declare the mutated buffers to tracing and
# functionalization as ``custom_op``'s ``mutates_args`` would, without the Python layers
# that ``custom_op`` adds to every call (an autograd kernel, version bumps of each mutated
# buffer, output alias checks: about 8 µs a call). Autograd is :class:`DenseFunction`'s.
_LIB = torch.library.Library("fastmlp", "DEF")
_BUFFERS = ", ".join(f"Tensor(b{i}!) {name}" for i, name in enumerate(_MUTATED))
_FLAGS = (
    "bool enabled, bool histograms, bool saturation, float sat_low, float sat_high, "
    "bool zeros, bool moments4, bool per_unit, bool exponents"
)
_LIB.define(
    f"dense_forward(Tensor x, Tensor weight, Tensor? bias, {_BUFFERS}, str activation, "
    f"str backend, {_FLAGS}) -> (Tensor, Tensor)"
)
_LIB.impl("dense_forward", _dense_forward, "CompositeExplicitAutograd")


@torch.library.register_fake("fastmlp::dense_forward", lib=_LIB)
def _(x, weight, bias, acc, shift, hist, hist_range, state, units, exp_h, activation, bk, *flags):
    h = x.new_empty(x.shape[0], weight.shape[0])
    return h, (x.new_empty(h.shape) if get_activation(activation).from_input else x.new_empty(0))


def _dense_backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor,
    acc: torch.Tensor,
    shift: torch.Tensor,
    hist: torch.Tensor,
    hist_range: torch.Tensor,
    state: torch.Tensor,
    units: torch.Tensor,
    exp_hist: torch.Tensor,
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
    zeros: bool,
    moments4: bool,
    per_unit: bool,
    exponents: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, db)`` (empty where not needed); records the two gradient quantities.

    ``saved``: what the activation's derivative is computed from: the output ``h``, or the
    pre-activation ``z`` for activations with ``from_input`` (GELU, SiLU)."""
    bufs = Buffers(acc, shift, hist, hist_range, state, units, exp_hist)
    settings = _settings(
        activation,
        enabled,
        histograms,
        saturation,
        sat_low,
        sat_high,
        zeros,
        moments4,
        per_unit,
        exponents,
    )
    grads = _backward(
        dh, x, weight, saved, bufs, activation, backend, need_x, need_w, need_b, settings
    )
    # Outputs must not alias each other: a fresh empty tensor for each one not needed.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


_LIB.define(
    f"dense_backward(Tensor dh, Tensor x, Tensor weight, Tensor saved, {_BUFFERS}, "
    f"str activation, str backend, bool need_x, bool need_w, bool need_b, {_FLAGS}) "
    "-> (Tensor, Tensor, Tensor)"
)
_LIB.impl("dense_backward", _dense_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("fastmlp::dense_backward", lib=_LIB)
def _(
    dh, x, weight, saved, acc, shift, hist, hist_range, state, units, exp_h, act, bk, nx, nw, nb, *f
):
    n = weight.shape[0]
    return (
        x.new_empty(x.shape) if nx else x.new_empty(0),
        weight.new_empty(weight.shape) if nw else x.new_empty(0),
        weight.new_empty(n) if nb else x.new_empty(0),
    )


# ----------------------------------------------------------------------------- autograd

#: The ops as the autograd function calls them (one overload each).
FORWARD_OP = torch.ops.fastmlp.dense_forward.default
BACKWARD_OP = torch.ops.fastmlp.dense_backward.default


class DenseFunction(torch.autograd.Function):
    """Autograd of the instrumented dense op: forward and backward are the two custom ops.

    Arguments as :func:`dense`; returns ``(h, z)`` (``z`` as :func:`dense_forward`, not
    differentiable). Double backward is not supported (the backward runs without recording
    a graph). It saves ``x``, ``weight`` and ``h``, or ``z`` instead of ``h`` for
    activations whose derivative needs the input (GELU, SiLU: the same memory).
    """

    @staticmethod
    def forward(x, weight, bias, bufs, activation, backend, settings):  # type: ignore[override]
        fn = _dense_forward if _eager() else FORWARD_OP
        return fn(x, weight, bias, *bufs, activation, backend, *_flags(settings))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, bufs, activation, backend, settings = inputs
        h, z = output
        ctx.mark_non_differentiable(z)
        # z gets no gradient: none is made up for it (a zeros kernel per backward). h always
        # has one when the backward runs (z is not differentiable).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, z if get_activation(activation).from_input else h)
        # The buffers are mutated by every pass: kept as an attribute, not saved tensors
        # (whose version check would fail when a later pass has updated them).
        ctx.pass_args = (bufs, activation, backend, settings, bias is not None, None)

    @staticmethod
    def backward(ctx, dh, dz_unused):  # type: ignore[override]
        return (*_backward_grads(ctx, dh), None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, *args):  # type: ignore[override]
        raise NotImplementedError(
            "fastmlp's instrumented layers do not support torch.func.vmap: their statistics "
            "accumulate over the whole batch. Call the model on the batch directly, or switch "
            "statistics off (model.stats.enabled = False) and vmap a plain copy of the model."
        )


def _backward_grads(ctx, dh: torch.Tensor) -> tuple:
    """``(dx, dW, db)`` (``None`` where not needed) of a :class:`DenseFunction` or
    :class:`_EagerDenseFunction` node, from the gradient ``dh`` of its output ``h``."""
    x, weight, saved = ctx.saved_tensors
    bufs, activation, backend, settings, has_bias, forward = ctx.pass_args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    args = (dh, x, weight, saved, bufs, activation, backend, need_x, need_w)
    args += (need_b and has_bias, settings, forward)
    return _without_graph(_backward_pass, *args)


def _without_graph(fn: Callable[..., tuple], *args) -> tuple:
    """``fn(*args)`` recording no autograd graph: backward passes support no double backward."""
    # Backward runs without grad mode unless create_graph: no no_grad() to enter then.
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


class _EagerDenseFunction(torch.autograd.Function):
    """:class:`DenseFunction` for plain eager mode, in the ``forward(ctx, ...)`` style: its
    ``apply`` skips the per-call binding of the arguments to ``forward``'s signature (with
    ``inspect``) that a separate ``setup_context`` costs. Same forward and backward, called
    directly (not through the custom ops, see :func:`_eager`), and ``h`` is its one output:
    ``z`` (GELU, SiLU) is saved for the backward, not returned, so autograd has no second
    output to wrap in the forward nor a zero gradient to make up for it in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, rest):  # type: ignore[override]
        # (``rest``: bufs, activation, backend, settings; one argument, as apply costs a
        # little per argument)
        bufs, activation, backend, settings = rest
        h, z, cache = _forward(x, weight, bias, bufs, activation, backend, settings)
        ctx.save_for_backward(x, weight, h if z is None else z)
        ctx.pass_args = (bufs, activation, backend, settings, bias is not None, cache)
        return h

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        return (*_backward_grads(ctx, dh), None)


def _backward_pass(
    dh, x, weight, saved, bufs, activation, backend, need_x, need_w, need_b, settings, forward
):
    """``(dx, dW, db)`` of one backward (``None`` where not needed): the implementation
    directly in eager mode (``forward``: the forward pass's kind, or ``None``), else the
    custom op."""
    if _eager():
        args = (bufs, activation, backend, need_x, need_w, need_b, settings, forward)
        return _backward(dh, x, weight, saved, *args)
    dx, dw, db = BACKWARD_OP(
        dh,
        x,
        weight,
        saved,
        *bufs,
        activation,
        backend,
        need_x,
        need_w,
        need_b,
        *_flags(settings),
    )
    return dx if need_x else None, dw if need_w else None, db if need_b else None


def _eager() -> bool:
    """Whether to call the ops' implementations directly: in plain eager mode, where the
    dispatcher and :class:`DenseFunction`'s argument binding would only route to them
    (about 37 us a pass on a 2-core EPYC, ``python -m bench.op_boundary``). Under
    ``torch.compile``/``export``, fake tensors, functorch transforms or any torch
    function/dispatch mode, the custom ops run, so that tracing and modes see one node per
    pass."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.maybe_current_level() is not None
    )


def _flags(s: Settings) -> tuple:
    return (
        s.enabled,
        s.histograms,
        s.saturation,
        s.sat_low,
        s.sat_high,
        s.zeros,
        s.moments4,
        s.per_unit,
        s.exponents,
    )


class _EagerChainFunction(torch.autograd.Function):
    """Several dense passes one after another (each pass's ``h`` the next one's ``x``) as
    one autograd node, in plain eager mode: the same forward and backward implementations
    as :class:`_EagerDenseFunction`, called in a loop, with one ``apply`` and one call from
    the autograd engine for the whole chain instead of one per pass (about 8 us a pass of
    host time, ``python -m bench.host``). Arguments: ``x``, the passes' ``(bufs,
    activation, backend, settings)``, then each pass's ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, x, passes, *params):  # type: ignore[override]
        saved: list[torch.Tensor] = []
        kinds = []
        for i, (bufs, activation, backend, settings) in enumerate(passes):
            weight, bias = params[2 * i], params[2 * i + 1]
            h, z, cache = _forward(x, weight, bias, bufs, activation, backend, settings)
            saved += (x, weight, h if z is None else z)
            kinds.append((bufs, activation, backend, settings, bias is not None, cache))
            x = h
        ctx.save_for_backward(*saved)
        ctx.pass_args = kinds
        return x

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        return _without_graph(_chain_backward, ctx, dh)


def _chain_backward(ctx, dh: torch.Tensor) -> tuple:
    """The gradients of an :class:`_EagerChainFunction` node's inputs, from ``dh``."""
    tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad  # (x, passes, weight 1, bias 1, weight 2, ...)
    kinds = ctx.pass_args
    # A pass's input needs a gradient where the chain's input or a parameter of an earlier
    # pass does; a pass runs its backward where that or its own parameters need one: what
    # separate nodes, one a pass, would do (records included).
    upstream = [needs[0]]
    for i in range(len(kinds) - 1):
        upstream.append(upstream[i] or needs[2 + 2 * i] or needs[3 + 2 * i])
    grads: list[torch.Tensor | None] = [None] * (2 * len(kinds))
    run = _backward if _eager() else _backward_pass  # (the same arguments)
    for i in reversed(range(len(kinds))):
        bufs, activation, backend, settings, has_bias, cache = kinds[i]
        need_x, need_w, need_b = upstream[i], needs[2 + 2 * i], needs[3 + 2 * i] and has_bias
        if not (need_x or need_w or need_b):
            break  # nor does any earlier pass need anything
        x, weight, saved = tensors[3 * i : 3 * i + 3]
        args = (dh, x, weight, saved, bufs, activation, backend, need_x, need_w, need_b)
        dh, grads[2 * i], grads[2 * i + 1] = run(*args, settings, cache)
    return (dh if needs[0] else None, None, *grads)


def dense_chain(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    passes: tuple[tuple[Buffers, str, str, Settings], ...],
) -> torch.Tensor:
    """:func:`dense` applied pass after pass to the 2-D ``x``: pass ``i`` with weight
    ``params[2 i]``, bias ``params[2 i + 1]`` and ``passes[i] = (bufs, activation, backend,
    settings)``; the same values, gradients and statistics. In plain eager mode it is one
    autograd node for the whole chain; otherwise one :func:`dense` a pass (what tracing and
    modes see is the same either way: one op node a pass)."""
    if not _eager():
        for i, (bufs, activation, backend, settings) in enumerate(passes):
            x = dense(x, params[2 * i], params[2 * i + 1], bufs, activation, backend, settings)
        return x
    return _EagerChainFunction.apply(x, passes, *params)


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
    if _eager():
        return _EagerDenseFunction.apply(x, weight, bias, (bufs, activation, backend, settings))
    return DenseFunction.apply(x, weight, bias, bufs, activation, backend, settings)[0]
