"""The instrumented dense op: ``h = f(x W^T + b)`` that records per-layer statistics.

This is what PyTorch sees of fastmlp: two ``torch.library`` custom ops,
``fastmlp::dense_forward`` and ``fastmlp::dense_backward``, that mutate the layer's
statistics buffers (declared by their schemas' alias annotations, ``Tensor(b0!) acc``, so
``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs see one node per pass
and the statistics keep updating), with fake implementations for tracing;
:class:`DenseFunction`, the autograd of one pass; and :class:`ChainFunction`, several
passes as one autograd node (what :class:`fastmlp.MLP` uses in eager mode).

What runs for one pass:

1. :func:`dense` (a layer's call) applies :class:`DenseFunction`, whose forward calls the
   custom op, or in plain eager mode (:func:`_eager`) the op's implementation directly,
   without the dispatcher's cost per call;
2. :func:`_forward` (the op's implementation) asks :func:`route` which backend runs the
   pass;
3. that backend's ``forward`` (:mod:`fastmlp.backends`) computes ``h`` and records the
   statistics. The backward goes the same way through :func:`_backward`.

:func:`route` decides, for every pass and nowhere else:

- ``"triton"``: the fused kernels (:mod:`fastmlp.backends.fused`), for ``backend="auto"``
  on CUDA tensors and ``backend="triton"`` (on CPU tensors only under
  ``TRITON_INTERPRET=1``), when the kernels take the inputs (float32/float16/bfloat16, a
  built-in activation, a non-empty batch, a histogram size they handle) and both
  quantities of the pass are calibrated (or statistics are off);
- ``"cpu"``: otherwise, for CPU tensors (:mod:`fastmlp.backends.cpu`);
- ``"reference"``: otherwise (:mod:`fastmlp.backends.reference`): on a GPU, the first pass
  after a reset (which calibrates each quantity's shift and histogram range) and inputs
  the kernels do not take.

Calibration flags are read from the host-side ``state`` buffer, so routing never
synchronises with a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType

import torch

from fastmlp.activations import ACTIVATIONS, Activation, get_activation
from fastmlp.backends import cpu, reference
from fastmlp.backends.determinism import is_deterministic, set_deterministic
from fastmlp.stats.buffers import calibration_flags
from fastmlp.stats.config import FIELDS, StatsConfig
from fastmlp.stats.layout import (
    ACTIVATION,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    WEIGHT_GRAD,
    Buffers,
)

__all__ = [
    "BACKENDS",
    "ChainFunction",
    "DenseFunction",
    "EagerDenseFunction",
    "dense",
    "dense_chain",
    "dense_rowwise",
    "is_deterministic",
    "route",
    "set_deterministic",
]

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FORWARD_QUANTITIES = (PREACTIVATION, ACTIVATION)
_BACKWARD_QUANTITIES = (PREACTIVATION_GRAD, WEIGHT_GRAD)


@functools.cache
def _fused() -> ModuleType | None:
    """The Triton backend, or ``None`` where Triton cannot be imported."""
    try:
        from fastmlp.backends import fused
    except ImportError:
        return None
    return fused


def _backend(how: str) -> ModuleType:
    """The module that :func:`route`'s answer names."""
    if how == "cpu":
        return cpu
    if how == "reference":
        return reference
    return _fused()


def route(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
    quantities: tuple[int, int],
) -> str:
    """``"triton"``, ``"cpu"`` or ``"reference"``: the backend of one pass (see the module
    docstring); ``quantities`` are the two quantities the pass records."""
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        fused = _fused()
        if fused is not None and fused.supported(x, weight, activation, bufs.bins):
            if not settings.enabled:
                return "triton"
            flags = calibration_flags(bufs.state)  # host-side: no device read
            if flags[quantities[0]] and flags[quantities[1]]:
                return "triton"
        elif backend == "triton" and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
            if fused is None or not fused.INTERPRET:
                raise RuntimeError(
                    "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 "
                    "before triton is imported, or use backend='torch'"
                )
    return "cpu" if x.device.type == "cpu" else "reference"


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bufs: Buffers,
    activation: Activation,
    backend: str,
    settings: StatsConfig,
    *,
    differentiated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h, z)`` of one forward pass, by the backend :func:`route` picks; ``z`` is ``None``
    where the activation's backward does not need it. ``differentiated``: a backward of
    this pass will follow (the CPU backend then keeps to ``addmm``: see
    :func:`fastmlp.backends.cpu.forward`).

    A forward run while the autograd engine runs a backward is activation checkpointing's
    recomputation (``torch.utils.checkpoint``, reentrant or not, and what builds on it:
    Hugging Face's gradient checkpointing, compiled checkpoint regions): it records
    nothing, as the pass it recomputes was recorded when it first ran, and computes as
    that pass did (on the CPU, not with the activation fused into oneDNN's matmul, which
    rounds differently)."""
    if settings.enabled and torch._C._current_graph_task_id() != -1:
        settings = _recording_nothing(settings)
        how = route(backend, x, weight, activation, bufs, settings, _FORWARD_QUANTITIES)
        if how == "cpu":
            return cpu.forward(
                x, weight, bias, activation, bufs, settings, fuse_activation=False, onednn=False
            )
    else:
        how = route(backend, x, weight, activation, bufs, settings, _FORWARD_QUANTITIES)
    if how == "cpu":
        args = (x, weight, bias, activation, bufs, settings)
        return cpu.forward(*args, onednn=not differentiated)
    return _backend(how).forward(x, weight, bias, activation, bufs, settings)


@functools.lru_cache(maxsize=1024)
def _recording_nothing(settings: StatsConfig) -> StatsConfig:
    """``settings`` with statistics off (the same object for the same settings)."""
    return settings.replace(enabled=False)


def _backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor,
    bufs: Buffers,
    activation: Activation,
    backend: str,
    settings: StatsConfig,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` of one backward pass (``None`` where not needed), by the backend
    :func:`route` picks; ``saved`` is the forward's ``h``, or ``z`` for activations with
    ``from_input``."""
    how = route(backend, x, weight, activation, bufs, settings, _BACKWARD_QUANTITIES)
    impl = _backend(how)
    return impl.backward(dh, x, weight, saved, activation, bufs, settings, need_x, need_w, need_b)


# ----------------------------------------------------------------------------- the ops

# The ops' flags are the fields of StatsConfig, in order, typed from their annotations.
_SCHEMA_TYPES = {"bool": "bool", "int": "int", "tuple[float, float] | None": "float[]?"}
_FLAGS = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(StatsConfig))


def _flags(settings: StatsConfig) -> tuple:
    """``settings`` as the ops' flag arguments."""
    return tuple(getattr(settings, name) for name in FIELDS)


@functools.lru_cache(maxsize=1024)
def _settings(*flags) -> StatsConfig:
    """The :class:`StatsConfig` of the ops' flag arguments (lists made tuples)."""
    return StatsConfig(*flags)


def _settings_of(flags: tuple) -> StatsConfig:
    return _settings(*(tuple(f) if isinstance(f, list) else f for f in flags))


def _dense_forward(
    x,
    weight,
    bias,
    acc,
    shift,
    hist,
    hist_range,
    state,
    units,
    exp_hist,
    activation: str,
    backend: str,
    *flags,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastmlp::dense_forward``: ``(h, z)`` with ``h = f(x W^T + b)`` for ``x [M, K]``;
    records ``preactivation`` and ``activation``. ``z = x W^T + b`` is returned only for
    activations whose backward needs it (``Activation.from_input``: GELU, SiLU); otherwise
    ``z`` is an empty tensor."""
    bufs = Buffers(acc, shift, hist, hist_range, state, units, exp_hist)
    act = get_activation(activation)
    h, z = _forward(x, weight, bias, bufs, act, backend, _settings_of(flags))
    return h, x.new_empty(0) if z is None else z


def _dense_backward(
    dh,
    x,
    weight,
    saved,
    acc,
    shift,
    hist,
    hist_range,
    state,
    units,
    exp_hist,
    activation: str,
    backend: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    *flags,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastmlp::dense_backward``: ``(dx, dW, db)`` (empty where not needed); records the
    two gradient quantities."""
    bufs = Buffers(acc, shift, hist, hist_range, state, units, exp_hist)
    act = get_activation(activation)
    args = (bufs, act, backend, _settings_of(flags), need_x, need_w, need_b)
    grads = _backward(dh, x, weight, saved, *args)
    # Outputs must not alias each other: a fresh empty tensor for each one not needed.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


# The ops are defined on torch.library's dispatcher directly, with the schema written out:
# its alias annotations (``Tensor(a!)``) declare the mutated buffers to tracing and
# functionalization as ``custom_op``'s ``mutates_args`` would, without the Python layers
# that ``custom_op`` adds to every call (an autograd kernel, version bumps of each mutated
# buffer, output alias checks). Autograd is :class:`DenseFunction`'s.
_LIB = torch.library.Library("fastmlp", "DEF")
_BUFFERS = ", ".join(f"Tensor(b{i}!) {name}" for i, name in enumerate(Buffers._fields))
_LIB.define(
    f"dense_forward(Tensor x, Tensor weight, Tensor? bias, {_BUFFERS}, str activation, "
    f"str backend, {_FLAGS}) -> (Tensor, Tensor)"
)
_LIB.impl("dense_forward", _dense_forward, "CompositeExplicitAutograd")
_LIB.define(
    f"dense_backward(Tensor dh, Tensor x, Tensor weight, Tensor saved, {_BUFFERS}, "
    f"str activation, str backend, bool need_x, bool need_w, bool need_b, {_FLAGS}) "
    "-> (Tensor, Tensor, Tensor)"
)
_LIB.impl("dense_backward", _dense_backward, "CompositeExplicitAutograd")
_NBUF = len(Buffers._fields)


@torch.library.register_fake("fastmlp::dense_forward", lib=_LIB)
def _(x, weight, bias, *rest):
    activation = rest[_NBUF]
    h = x.new_empty(x.shape[0], weight.shape[0])
    return h, (x.new_empty(h.shape) if get_activation(activation).from_input else x.new_empty(0))


@torch.library.register_fake("fastmlp::dense_backward", lib=_LIB)
def _(dh, x, weight, saved, *rest):
    need_x, need_w, need_b = rest[_NBUF + 2 : _NBUF + 5]
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape) if need_w else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0),
    )


#: The ops as the autograd functions call them (one overload each).
FORWARD_OP = torch.ops.fastmlp.dense_forward.default
BACKWARD_OP = torch.ops.fastmlp.dense_backward.default


def _eager() -> bool:
    """Whether to call the ops' implementations directly: in plain eager mode, where the
    dispatcher would only route to them. Under ``torch.compile``/``export``, fake tensors,
    functorch transforms or any torch function/dispatch mode, the custom ops run, so that
    tracing and modes see one node per pass."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.maybe_current_level() is not None
    )


def _forward_pass(x, weight, bias, bufs, activation, backend, settings):
    """``(h, z)`` of one forward pass (``z`` ``None`` where not needed): the implementation
    directly in eager mode, else the custom op."""
    if _eager():
        return _forward(x, weight, bias, bufs, activation, backend, settings)
    h, z = FORWARD_OP(x, weight, bias, *bufs, activation.name, backend, *_flags(settings))
    return h, (z if activation.from_input else None)


def _backward_pass(
    dh, x, weight, saved, bufs, activation, backend, settings, need_x, need_w, need_b
):
    """``(dx, dW, db)`` of one backward pass (``None`` where not needed): the implementation
    directly in eager mode, else the custom op; recording no autograd graph (see
    :class:`DenseFunction`)."""
    args = (bufs, activation, backend, settings, need_x, need_w, need_b)
    if _eager():
        if torch.is_grad_enabled():  # the engine runs a backward in grad mode: create_graph
            raise RuntimeError(
                "fastmlp's instrumented layers do not support double backward "
                "(torch.autograd.grad(..., create_graph=True), as gradient penalties use): "
                "the gradient of their backward would be dropped. Compute the penalty on a "
                "plain copy of the model, or leave these layers out of it."
            )
        return _backward(dh, x, weight, saved, *args)
    dx, dw, db = _without_graph(
        BACKWARD_OP,
        dh,
        x,
        weight,
        saved,
        *bufs,
        activation.name,
        backend,
        need_x,
        need_w,
        need_b,
        *_flags(settings),
    )
    return dx if need_x else None, dw if need_w else None, db if need_b else None


def _without_graph(fn: Callable[..., tuple], *args) -> tuple:
    """``fn(*args)`` recording no autograd graph: backward passes support no double backward."""
    # Backward runs without grad mode unless create_graph: no no_grad() to enter then.
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


# ----------------------------------------------------------------------------- autograd


def _kept(activation: Activation, h: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor | None:
    """What a pass saves for its backward beside ``x`` and ``weight``: ``z`` where the
    activation's derivative is computed from it (GELU, SiLU), nothing for the identity
    (whose derivative needs no value: the output may then be modified in place, as
    ``y = fc(x); y += r`` does), else ``h``. The backward passes ``dh`` where nothing was
    kept (the same shape; its values go unused)."""
    if z is not None:
        return z
    return None if activation.name == "identity" else h


def _save_pass(ctx, x, weight, h, z, bufs, activation, backend, settings) -> None:  # noqa: ANN001
    """What one pass keeps for its backward (:func:`_backward_of`)."""
    # No gradient is made up for an output that got none (z, or h where unused).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, _kept(activation, h, z))
    # The buffers are mutated by every pass: kept as an attribute, not saved tensors
    # (whose version check would fail when a later pass has updated them).
    ctx.pass_args = (bufs, activation, backend, settings)


def _backward_of(ctx, dh: torch.Tensor | None) -> tuple:  # noqa: ANN001
    """The input gradients of one pass from what :func:`_save_pass` kept."""
    if dh is None:  # h got no gradient (grads are not materialised): nor do the inputs
        return None, None, None, None, None, None, None
    x, weight, saved = ctx.saved_tensors
    saved = dh if saved is None else saved
    need_x, need_w, need_b = ctx.needs_input_grad[:3]  # (need_b is False without a bias)
    args = (*ctx.pass_args, need_x, need_w, need_b)
    return (*_backward_pass(dh, x, weight, saved, *args), None, None, None, None)


class DenseFunction(torch.autograd.Function):
    """Autograd of one instrumented dense pass: ``h = f(x W^T + b)``, differentiable in
    ``x``, ``weight`` and ``bias``. Arguments as :func:`dense`. This form (``forward``
    without ``ctx``, then ``setup_context``) is what ``torch.compile``, ``torch.export``
    and functorch transforms need; in plain eager mode :class:`EagerDenseFunction` runs the
    same pass.

    Double backward is refused (:func:`_backward_pass`). It saves ``x``, ``weight`` and
    what the activation's derivative needs (:func:`_kept`).
    """

    @staticmethod
    def forward(x, weight, bias, bufs, activation, backend, settings):  # type: ignore[override]
        h, z = _forward_pass(x, weight, bias, bufs, activation, backend, settings)
        return h, z

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, bufs, activation, backend, settings = inputs
        h, z = output
        if z is not None:
            ctx.mark_non_differentiable(z)
        _save_pass(ctx, x, weight, h, z, bufs, activation, backend, settings)

    @staticmethod
    def backward(ctx, dh, dz_unused):  # type: ignore[override]
        return _backward_of(ctx, dh)

    @staticmethod
    def vmap(info, in_dims, *args):  # type: ignore[override]
        raise NotImplementedError(
            "fastmlp's instrumented layers do not support torch.func.vmap: their statistics "
            "accumulate over the whole batch. Call the model on the batch directly, or switch "
            "statistics off (model.stats.enabled = False) and vmap a plain copy of the model."
        )


class EagerDenseFunction(torch.autograd.Function):
    """:class:`DenseFunction` in plain eager mode (:func:`_eager`), in the combined
    ``forward(ctx, ...)`` form, returning ``h`` alone: the same pass, saved values and
    backward. ``apply`` of a function with a separate ``setup_context`` binds its arguments
    through ``inspect.signature`` on every call, which makes each call several times as
    costly as this form's on small layers (the measurement is in the commit that made it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bufs, activation, backend, settings):  # type: ignore[override]
        differentiated = any(ctx.needs_input_grad[:3])
        args = (x, weight, bias, bufs, activation, backend, settings)
        h, z = _forward(*args, differentiated=differentiated)
        _save_pass(ctx, x, weight, h, z, bufs, activation, backend, settings)
        return h

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        return _backward_of(ctx, dh)


class ChainFunction(torch.autograd.Function):
    """Several dense passes one after another (each pass's ``h`` the next one's ``x``) as
    one autograd node, in plain eager mode: the same forward and backward implementations
    as :class:`DenseFunction`, called in a loop, with one ``apply`` and one call from the
    autograd engine for the whole chain instead of one per pass. Arguments: ``x``, the
    passes' ``(bufs, activation, backend, settings)``, then each pass's ``weight`` and
    ``bias``."""

    @staticmethod
    def forward(ctx, x, passes, *params):  # type: ignore[override]
        saved: list[torch.Tensor] = []
        differentiated = any(ctx.needs_input_grad)
        for i, (bufs, activation, backend, settings) in enumerate(passes):
            weight, bias = params[2 * i], params[2 * i + 1]
            args = (x, weight, bias, bufs, activation, backend, settings)
            h, z = _forward(*args, differentiated=differentiated)
            saved += (x, weight, _kept(activation, h, z))
            x = h
        ctx.save_for_backward(*saved)
        ctx.passes = passes
        return x

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (x, passes, weight 1, bias 1, weight 2, ...)
        passes = ctx.passes
        # A pass's input needs a gradient where the chain's input or a parameter of an
        # earlier pass does; a pass runs its backward where that or its own parameters need
        # one: what separate nodes, one a pass, would do (records included).
        upstream = [needs[0]]
        for i in range(len(passes) - 1):
            upstream.append(upstream[i] or needs[2 + 2 * i] or needs[3 + 2 * i])
        grads: list[torch.Tensor | None] = [None] * (2 * len(passes))
        for i in reversed(range(len(passes))):
            need_x, need_w, need_b = upstream[i], needs[2 + 2 * i], needs[3 + 2 * i]
            if not (need_x or need_w or need_b):
                break  # nor does any earlier pass need anything
            x, weight, saved = tensors[3 * i : 3 * i + 3]
            saved = dh if saved is None else saved
            args = (*passes[i], need_x, need_w, need_b)
            dh, grads[2 * i], grads[2 * i + 1] = _backward_pass(dh, x, weight, saved, *args)
        return (dh if needs[0] else None, None, *grads)


def dense_chain(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    passes: tuple[tuple[Buffers, Activation, str, StatsConfig], ...],
) -> torch.Tensor:
    """:func:`dense` applied pass after pass to the 2-D ``x``: pass ``i`` with weight
    ``params[2 i]``, bias ``params[2 i + 1]`` and ``passes[i] = (bufs, activation, backend,
    settings)``; the same values, gradients and statistics. In plain eager mode it is one
    autograd node for the whole chain (:class:`ChainFunction`), or PyTorch's own nodes where
    every pass is plain (:func:`_plain`); otherwise one :func:`dense` a pass (what tracing
    and modes see is the same either way: one op node a pass)."""
    if not _eager():
        for i, (bufs, activation, backend, settings) in enumerate(passes):
            x = dense(x, params[2 * i], params[2 * i + 1], bufs, activation, backend, settings)
        return x
    # Each pass checked with the chain's input: a pass that passes then passes with its own
    # input too (which needs a gradient where the chain's input does), so it is checked once.
    if all(_plain(x, params[2 * i], params[2 * i + 1], *p[1:]) for i, p in enumerate(passes)):
        for i, (_, activation, _, _) in enumerate(passes):
            x = activation.forward(torch.nn.functional.linear(x, params[2 * i], params[2 * i + 1]))
        return x
    return ChainFunction.apply(x, passes, *params)


def dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bufs: Buffers,
    activation: Activation,
    backend: str,
    settings: StatsConfig,
) -> torch.Tensor:
    """``f(x W^T + b)`` for a 2-D ``x``, recording statistics into ``bufs`` when
    ``settings.enabled``; differentiable in ``x``, ``weight`` and ``bias``."""
    if _eager():
        if _plain(x, weight, bias, activation, backend, settings):
            return activation.forward(torch.nn.functional.linear(x, weight, bias))
        return EagerDenseFunction.apply(x, weight, bias, bufs, activation, backend, settings)
    return DenseFunction.apply(x, weight, bias, bufs, activation, backend, settings)[0]


# Activations that PyTorch differentiates with one node of its own (the registry's objects).
_NATIVE = frozenset(("identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"))


def _plain(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    backend: str,
    settings: StatsConfig,
) -> bool:
    """Whether an eager pass is plain PyTorch's ``linear`` and activation, with PyTorch's own
    autograd nodes: statistics off, on the CPU backend, where a gradient is taken (what
    :func:`fastmlp.backends.cpu.forward` computes there, ``addmm`` then the activation, but
    without a Python autograd node's cost a pass, forward and backward: the steps a
    :class:`fastmlp.Monitor` does not record cost what plain ``nn.Linear`` steps cost).
    Without gradients the CPU backend's own forward stays (oneDNN where it times faster)."""
    # (x.is_cpu, not x.device.type: creating the device object cost more than all the rest)
    return (
        not settings.enabled
        and x.is_cpu
        and backend != "triton"
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        and activation.name in _NATIVE
        and ACTIVATIONS.get(activation.name) is activation
    )


class RowwiseFunction(torch.autograd.Function):
    """Autograd of a row-sharded (tensor-parallel) dense pass: each rank holds the columns
    ``x[:, k]`` and ``W[:, k]`` of its share ``k`` of the inputs, so ``x W^T`` is a sum over
    ranks. The partial products are all-reduced over ``group`` before the bias, the
    activation and any statistic, which then see the full pre-activation: the same values
    on every rank of the group, recorded by the one where ``record_replicated`` (counted
    once, not once a rank). The weight gradient ``dz^T x[:, k]`` is this rank's own columns
    of the whole layer's: every rank records it. Statistics are recorded by the reference
    backend; the matmuls are PyTorch's. Arguments as :func:`dense_rowwise`."""

    @staticmethod
    def forward(ctx, x, weight, bias, bufs, activation, settings, group, record_replicated):  # type: ignore[override]
        z = x @ weight.t()
        torch.distributed.all_reduce(z, group=group)
        if bias is not None:
            z += bias
        h = activation.forward(z)
        # (activation checkpointing's recomputation records nothing: see _forward)
        recording = settings.enabled and torch._C._current_graph_task_id() == -1
        if recording and record_replicated:
            reference.record(bufs, settings, PREACTIVATION, z)
            reference.record(bufs, settings, ACTIVATION, h, fixed=activation.bounded)
            if settings.per_unit:
                reference.record_units(bufs, settings, h)
        ctx.save_for_backward(x, weight, z if activation.from_input else h)
        ctx.pass_args = (bufs, activation, settings, record_replicated, bias is not None)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):  # type: ignore[override]
        x, weight, saved = ctx.saved_tensors
        bufs, activation, settings, record_replicated, has_bias = ctx.pass_args
        dz = activation.backward(dh, saved)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dw = dz.t() @ x if need_w or settings.enabled else None
        if settings.enabled:
            if record_replicated:
                reference.record(bufs, settings, PREACTIVATION_GRAD, dz)
            reference.record(bufs, settings, WEIGHT_GRAD, dw)
        dx = dz @ weight if need_x else None
        db = dz.sum(0) if need_b and has_bias else None
        return dx, dw if need_w else None, db, None, None, None, None, None


def dense_rowwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bufs: Buffers,
    activation: Activation,
    backend: str,
    settings: StatsConfig,
    *,
    group: torch.distributed.ProcessGroup,
    record_replicated: bool,
) -> torch.Tensor:
    """``f(all_reduce(x W^T) + b)`` for this rank's input columns ``x [M, k]`` and weight
    columns ``weight [N, k]`` of a layer sharded by rows of ``W^T`` over ``group``
    (:class:`RowwiseFunction`); ``bias`` is the whole layer's. Differentiable in ``x``,
    ``weight`` and ``bias``; ``dx`` is this rank's columns of the input gradient. Arguments
    as :func:`dense`'s (``backend`` unused: the matmuls are PyTorch's, the statistics the
    reference backend's)."""
    return RowwiseFunction.apply(
        x, weight, bias, bufs, activation, settings, group, record_replicated
    )
