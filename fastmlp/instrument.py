"""``fastmlp.instrument(model)``: watch any model's dense layers, in place.

Every ``nn.Linear`` of the model becomes an :class:`~fastmlp.InstrumentedLinear` (itself an
``nn.Linear``), and every Hugging Face ``Conv1D`` (GPT-2's dense layers, weight ``[in,
out]``) an instrumented ``Conv1D``; each holds the *same* ``Parameter`` objects (an
optimizer built before the call keeps training the model) at the same module path, so
``state_dict`` keys and values are unchanged. Its statistics buffers are left out of the
``state_dict`` by default (``stats_in_state_dict=False``), so checkpoints of the untouched
model load with ``strict=True`` and the model's checkpoints load into an untouched one.

An activation *module* directly following a dense layer is fused into it (the activation
module is replaced by ``nn.Identity``, which has no state either):

- in an ``nn.Sequential`` (and subclasses that keep its ``forward``, e.g.
  ``torchvision.ops.MLP``): the next child;
- elsewhere, where ``torch.fx`` traces the parent module the same way in training and in
  eval mode: the dense layer's output feeds exactly one call of an activation module of
  the same parent, which is called nowhere else and takes nothing else (a transformer
  block's ``c_fc -> gelu -> c_proj``, a gated MLP's ``act(gate_proj(x)) * up_proj(x)``),
  and the parent's source shows that call taking the layer's output whatever the module's
  state (no branch or loop reassigns it in between).

An activation module is recognised by what it computes, not by its class: it has no
parameters, buffers or hooks, and on a probe tensor covering the activation's range and
tails it gives, in training and in eval mode, element by element, what one of fastmlp's
activations gives (``torch.nn.Tanh``, ``transformers``' ``NewGELUActivation`` and
``SiLUActivation``, timm's ``GELU``, or a user's own class alike). A lookalike that
differs anywhere on the probe is not fused.

Everything else is instrumented as a lone layer (identity activation; the activation
then runs as before, outside). Dense layers that cannot be swapped (subclasses, lazy or
parametrized ones, layers with hooks) are left untouched, and so are 1x1 convolutions
(dense maths fastmlp does not instrument). A layer registered at several paths is
instrumented once, alone, and put at each. Every dense layer of the model is in the
:class:`InstrumentReport` (also ``model.fastmlp_report``): fused, lone or untouched, with
the reason; anything left untouched is warned about (``nn.MultiheadAttention.out_proj``,
a subclass of ``nn.Linear`` whose weight its parent reads directly, is one). Dense maths
applied functionally (``F.linear(x, self.w)``) has no module and cannot be seen.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import tokenize
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fastmlp.activations import ACTIVATIONS
from fastmlp.layers import InstrumentedDense, instrumented_class, is_hf_conv1d_class
from fastmlp.model_stats import ModelStats
from fastmlp.stats.config import FIELDS, StatsConfig
from fastmlp.tensor_parallel import is_dtensor

__all__ = ["InstrumentReport", "activation_of", "instrument", "stats_of"]


@dataclass
class InstrumentReport:
    """What :func:`instrument` did, by module path.

    ``fused``: ``(dense layer path, activation path, activation name)``; ``lone``:
    ``(dense layer path, why it was not fused)``; ``untouched``: ``(path, why)`` for dense
    layers (and 1x1 convolutions) left as they were; ``already``: ``(path, activation
    name)`` for layers that were instrumented before the call and that no earlier report
    of the model lists (a :class:`~fastmlp.MLP`'s, layers built as
    :class:`~fastmlp.InstrumentedLinear`). A second call keeps the first one's entries.
    """

    fused: list[tuple[str, str, str]] = field(default_factory=list)
    lone: list[tuple[str, str]] = field(default_factory=list)
    untouched: list[tuple[str, str]] = field(default_factory=list)
    already: list[tuple[str, str]] = field(default_factory=list)

    @property
    def instrumented(self) -> list[str]:
        """Paths of every instrumented layer."""
        return [f[0] for f in self.fused] + [p for p, _ in self.lone] + [p for p, _ in self.already]

    def __str__(self) -> str:
        lines = [f"fused: {lin} + {act} ({name})" for lin, act, name in self.fused]
        lines += [f"lone: {p} ({why})" for p, why in self.lone]
        lines += [f"already instrumented: {p} ({act})" for p, act in self.already]
        lines += [f"untouched: {p} ({why})" for p, why in self.untouched]
        return "\n".join(lines) or "nothing to instrument"


# ----------------------------------------------------------------------------- activations


def _probe() -> torch.Tensor:
    """Values covering every activation's range and tails: a fine grid over [-12, 12], a
    coarse one out to +-60, extremes and signed zeros, and seeded normal draws."""
    g = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.linspace(-12, 12, 2401),
            torch.linspace(-60, 60, 121),
            torch.tensor([-1e4, -1e2, 1e2, 1e4, 0.0, -0.0, 1e-6, -1e-6]),
            3 * torch.randn(512, generator=g),
        ]
    )


_PROBE = _probe()


def activation_of(module: nn.Module) -> str | None:
    """The name of the fastmlp activation that ``module`` computes, or ``None``.

    ``module`` qualifies when it has no parameters, buffers or hooks and, on a probe
    covering each activation's range and tails (:func:`_probe`), in training and in eval
    mode, applied to the probe as a row and as a column, matches one of fastmlp's
    activations (other than the identity) to float32 rounding.
    """
    if isinstance(module, (nn.Identity, InstrumentedDense)):
        return None
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return None
    was_training = module.training
    outputs = []
    try:
        with torch.no_grad():
            for mode in (True, False):
                module.train(mode)
                for shaped in (_PROBE.view(1, -1), _PROBE.view(-1, 1)):
                    out = module(shaped.clone())
                    if not isinstance(out, torch.Tensor) or out.shape != shaped.shape:
                        return None
                    outputs.append(out.detach().reshape(-1).float())
    except Exception:  # noqa: BLE001 - a module that cannot run on the probe is no activation
        return None
    finally:
        module.train(was_training)
    for name, act in ACTIVATIONS.items():
        if name == "identity":
            continue
        with torch.no_grad():
            expect = act.forward(_PROBE)
        tol = 1e-6 + 1e-5 * expect.abs()
        if all(bool(((o - expect).abs() <= tol).all()) for o in outputs):
            return name
    return None


# ----------------------------------------------------------------------------- pairing


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _ChildLeaves(fx.Tracer):
    """Traces one module with every submodule as a leaf: the graph shows its children's calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _traced_pairs(parent: nn.Module, dense: set[str]) -> dict[str, str]:
    """``{dense child: child}`` where the dense child's one call feeds exactly one call of
    another child, called nowhere else, with nothing else, in ``parent``'s forward traced
    in its current mode (whether that child is an activation is not checked here)."""
    graph = _ChildLeaves().trace(parent)
    children = dict(parent.named_children())
    uses: dict[str, int] = {}  # child -> calls or attribute reads of it
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            head = str(node.target).split(".")[0]
            uses[head] = uses.get(head, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in dense or uses[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        act = str(user.target)
        if act not in children or uses.get(act) != 1 or user.args != (node,) or user.kwargs:
            continue
        pairs[str(node.target)] = act
    return pairs


def _fx_pairs(
    parent: nn.Module, dense: set[str], acts: dict[str, str]
) -> tuple[dict[str, str], str | None]:
    """``{dense child: activation child}`` to fuse in ``parent``, and why others are not:
    the traced pairing (:func:`_traced_pairs`) the same in training and eval mode, onto an
    activation child (``acts``: child name -> activation), its call unconditional in the
    source (:func:`_unconditional`)."""
    was_training = parent.training
    try:
        found = []
        for mode in (True, False):
            parent.train(mode)
            found.append(_traced_pairs(parent, dense))
    except Exception as e:  # noqa: BLE001 - any tracing failure means: do not fuse
        return {}, f"parent {type(parent).__name__} does not trace with torch.fx: {e}"[:200]
    finally:
        parent.train(was_training)
    pairs, reasons = {}, []
    for lin, act in found[0].items():
        if act not in acts:
            continue
        if found[1].get(lin) != act:
            reasons.append(f"its call of {act} depends on the training mode")
        elif not _unconditional(parent, lin, act):
            reasons.append(f"its call of {act} is not provably unconditional in the source")
        else:
            pairs[lin] = act
    return pairs, "; ".join(reasons) or None


@functools.lru_cache(maxsize=256)
def _forward_tree(cls: type[nn.Module]) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The syntax tree of ``cls.forward`` (parsed once per class), or ``None`` where its
    source cannot be read or parsed."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError, tokenize.TokenError):
        # (TokenError: inspect read lines that are not the function's, as for code compiled
        # under a file name whose file holds something else)
        return None
    return fn if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _unconditional(parent: nn.Module, lin: str, act: str) -> bool:
    """Whether ``type(parent).forward``'s source calls ``self.<act>`` once, on the output
    of the one call of ``self.<lin>``, whatever the module's state: directly
    (``self.act(self.lin(x))``), or through a variable assigned ``self.lin(...)`` by an
    earlier statement of the same block that no statement in between assigns again."""
    fn = _forward_tree(type(parent))
    if fn is None:
        return False
    act_calls, lin_calls = _self_calls(fn, act), _self_calls(fn, lin)
    if len(act_calls) != 1 or len(lin_calls) != 1 or len(act_calls[0].args) != 1:
        return False
    if act_calls[0].keywords:
        return False
    arg = act_calls[0].args[0]
    if arg is lin_calls[0]:
        return True
    if not isinstance(arg, ast.Name):
        return False
    for block in _blocks(fn):
        for k, stmt in enumerate(block):
            if act_calls[0] not in set(ast.walk(stmt)):
                continue
            if any(isinstance(n, ast.stmt) and n is not stmt for n in _path_to(stmt, arg)):
                break  # the call sits in a nested block: look there
            for prev in reversed(block[:k]):
                if arg.id in _assigned(prev):
                    return (
                        isinstance(prev, ast.Assign)
                        and len(prev.targets) == 1
                        and isinstance(prev.targets[0], ast.Name)
                        and prev.value is lin_calls[0]
                    )
            return False
    return False


def _read_directly(parent: nn.Module, dense: set[str]) -> set[str]:
    """The dense children whose parameters ``type(parent).forward`` reads
    (``self.<child>.weight``) without ever calling the child: their maths runs outside
    them (``F.linear(x, self.qkv.weight)``), where a swapped layer would record nothing."""
    fn = _forward_tree(type(parent))
    if fn is None:
        return set()
    read = {
        n.value.attr
        for n in ast.walk(fn)
        if isinstance(n, ast.Attribute)
        and n.attr in ("weight", "bias")
        and isinstance(n.value, ast.Attribute)
        and isinstance(n.value.value, ast.Name)
        and n.value.value.id == "self"
        and n.value.attr in dense
    }
    return {name for name in read if not _self_calls(fn, name)}


def _self_calls(fn: ast.AST, name: str) -> list[ast.Call]:
    """The calls ``self.<name>(...)`` in ``fn``."""
    return [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == name
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "self"
    ]


def _path_to(root: ast.AST, target: ast.AST) -> list[ast.AST]:
    """The nodes from ``root`` down to ``target`` (empty if it is not inside)."""
    if root is target:
        return [root]
    for child in ast.iter_child_nodes(root):
        path = _path_to(child, target)
        if path:
            return [root, *path]
    return []


def _blocks(fn: ast.AST) -> list[list[ast.stmt]]:
    """Every statement list (function body, branches, loop bodies, ...) inside ``fn``."""
    blocks = []
    for node in ast.walk(fn):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                blocks.append(block)
    return blocks


def _assigned(stmt: ast.stmt) -> set[str]:
    """The names a statement (and anything nested in it) assigns."""
    return {
        n.id
        for n in ast.walk(stmt)
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))
    }


def _sequential_pairs(parent: nn.Module, dense: set[str], acts: dict[str, str]) -> dict[str, str]:
    """``{dense child: the next child}`` of an ``nn.Sequential`` where that one is an
    activation (``acts``: child name -> activation)."""
    names = list(dict(parent.named_children()))
    return {
        n: names[i + 1] for i, n in enumerate(names[:-1]) if n in dense and names[i + 1] in acts
    }


# ----------------------------------------------------------------------------- dense layers


def _is_dense(module: nn.Module) -> bool:
    """Whether ``module`` is a dense layer not yet instrumented: an ``nn.Linear`` (or
    subclass) or Hugging Face's ``Conv1D``."""
    if isinstance(module, InstrumentedDense):
        return False
    return isinstance(module, nn.Linear) or is_hf_conv1d_class(type(module))


def _is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution: a dense layer over channels."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and all(k == 1 for k in module.kernel_size)
        and module.groups == 1
    )


def _swappable(lin: nn.Module) -> str | None:
    """Why the dense layer ``lin`` cannot be replaced, or ``None``."""
    if type(lin) is not nn.Linear and not is_hf_conv1d_class(type(lin)):
        return f"a subclass of nn.Linear ({type(lin).__name__})"
    if isinstance(lin.weight, nn.parameter.UninitializedParameter):
        return "uninitialized (lazy) parameters"
    if is_dtensor(lin.weight):
        return (
            "its weight is a DTensor (sharded by tensor parallelism or FSDP): instrument the "
            "model first, then parallelize_module / fully_shard it"
        )
    if lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks:
        return "has module hooks"
    if getattr(lin, "parametrizations", None) is not None:
        return "parametrized"
    return None


def _make(lin: nn.Module, activation: str, index: int, options: dict) -> InstrumentedDense:
    """The instrumented layer standing for ``lin``, holding its ``Parameter`` objects."""
    cls = instrumented_class(type(lin))
    weight = lin.weight
    n_in, n_out = weight.shape if cls.weight_transposed else weight.shape[::-1]
    new = cls(
        n_in,
        n_out,
        activation,
        init="pytorch",
        bias=lin.bias is not None,
        layer_index=index,
        device="meta",
        dtype=weight.dtype,
        backend=options.get("backend", "auto"),
        config=options["config"],
        stats_in_state_dict=options.get("stats_in_state_dict", False),
        stats_device=weight.device,
    )
    new.weight = weight  # the same Parameter objects
    new.bias = lin.bias
    new.train(lin.training)
    return new


_OPTIONS = ("backend", "config", "stats_in_state_dict", "fuse", "fx", "warn", *FIELDS)


def instrument(model: nn.Module, **options) -> nn.Module:
    """Instrument every dense layer (``nn.Linear``, HF ``Conv1D``) of ``model`` in place
    (see the module docstring).

    Options: ``backend`` (as for :class:`~fastmlp.InstrumentedLinear`), ``config`` (what
    every layer records, a :class:`~fastmlp.stats.config.StatsConfig`) and any of its
    fields by name, overriding it (``bins``, ``saturation_thresholds``, ``histograms``,
    ``zeros``, ...),
    ``stats_in_state_dict`` (default ``False``: the statistics buffers stay out of
    ``state_dict``, whose keys are then unchanged; ``True`` saves them, and checkpoints
    of the untouched model then need ``strict=False``), ``fuse`` (default ``True``: fuse
    following activation modules), ``fx`` (default ``True``: use ``torch.fx`` to find
    them outside ``nn.Sequential``), ``warn`` (default ``True``: warn about untouched
    linear layers).

    Returns ``model`` (a bare dense layer cannot be replaced in place: a new instrumented
    layer sharing its parameters is returned). The
    :class:`InstrumentReport` is ``model.fastmlp_report``. A second call is harmless: layers
    already instrumented stay as they are and keep their report entries (options that
    would change them are refused, naming the option), dense layers added since are
    instrumented and numbered after them. A TorchScript module is refused (instrument the
    eager model). Layers are numbered 1, 2, ... in
    registration order; rows carry their module path. Statistics:
    :func:`stats_of(model) <stats_of>`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"instrument() takes a torch.nn.Module (an instance), got {model!r:.80} "
            f"({type(model).__name__})"
        )
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown instrument() options {unknown}; expected some of {_OPTIONS}")
    asked = {k for k, v in options.items() if v is not None}  # (before defaults fill in)
    config = options.get("config") or StatsConfig()
    if not isinstance(config, StatsConfig):
        raise TypeError(f"config must be a StatsConfig, got {type(config).__name__}")
    options["config"] = config.replace(**{k: options[k] for k in FIELDS if k in options})
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"instrument() cannot instrument a TorchScript module ({type(model).__name__}, "
            "from torch.jit.script or torch.jit.trace): its layers are compiled and cannot "
            "be replaced. Instrument the eager model; torch.compile and torch.export then "
            "work on the instrumented one"
        )
    fuse, use_fx = options.get("fuse", True), options.get("fx", True)
    report = InstrumentReport()
    # Layers instrumented before this call stay as they are, with their report entries.
    before = _already_instrumented(model, getattr(model, "fastmlp_report", None), report)
    _check_unchanged(before, options, asked)
    if _is_dense(model):
        why = _swappable(model)
        if why is None:
            new = _make(model, "identity", 1, options)
            report.lone.append(("", f"a lone {type(model).__name__}"))
            new.fastmlp_report = report
            return new
    # Every module path of each module object: shared modules are not fused.
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    # (parent, child name, activation, path, fused activation child or why not fused)
    plan: list[tuple[nn.Module, str, str, str, str]] = []
    done: set[int] = set()
    if _is_dense(model):  # the model itself, not swappable
        done.add(id(model))
        report.untouched.append(("", _swappable(model)))
    for prefix, parent in model.named_modules():
        if isinstance(parent, torch.jit.ScriptModule):
            continue  # (reported as a whole where it is a child of an eager module)
        children = dict(parent.named_children())
        for n, c in children.items():
            if _is_pointwise_conv(c) and id(c) not in done:
                done.add(id(c))
                why = "a 1x1 convolution (fastmlp instruments nn.Linear and HF Conv1D)"
                report.untouched.append((_join(prefix, n), why))
            elif _scripted_dense(c) and id(c) not in done:
                done.add(id(c))
                why = "a TorchScript module holding dense layers: instrument before scripting"
                report.untouched.append((_join(prefix, n), why))
        dense = {n for n, c in children.items() if _is_dense(c)}
        if not dense:
            continue
        pairs: dict[str, str] = {}
        reason = "not followed by a supported activation module"
        acts = {}
        if fuse:  # the children that compute an activation
            found = ((n, activation_of(c)) for n, c in children.items() if n not in dense)
            acts = {n: a for n, a in found if a is not None}
        if not fuse:
            reason = "fusion off (fuse=False)"
        elif not acts:
            pass
        elif type(parent).forward is nn.Sequential.forward:
            pairs = _sequential_pairs(parent, dense, acts)
        elif use_fx:
            pairs, failure = _fx_pairs(parent, dense, acts)
            reason = failure or reason
        else:
            reason = "not in an nn.Sequential (torch.fx disabled)"
        direct = (
            _read_directly(parent, dense)
            if type(parent).forward is not nn.Module.forward
            else set()
        )
        for n, lin in children.items():
            if n not in dense or id(lin) in done:
                continue
            path = _join(prefix, n)
            done.add(id(lin))
            why = _swappable(lin)
            if why is None and n in direct:
                why = f"its parent {type(parent).__name__} reads its weight instead of calling it"
            if why is not None:
                report.untouched.append((path, why))
                continue
            act = pairs.get(n)
            if act is not None and (len(paths[id(lin)]) > 1 or len(paths[id(children[act])]) > 1):
                plan.append((parent, n, "identity", path, "linear or activation module shared"))
            elif act is not None:
                plan.append((parent, n, acts[act], path, act))
            else:
                plan.append((parent, n, "identity", path, reason))
    # Apply in registration order; layer numbers follow it.
    replaced: dict[int, tuple[nn.Module, InstrumentedDense]] = {}  # old kept alive: ids stay
    first = 1 + max((layer.layer_index for _, layer in before), default=0)
    for index, (parent, n, act, path, extra) in enumerate(plan, start=first):
        lin = getattr(parent, n)
        new = _make(lin, act, index, options)
        replaced[id(lin)] = (lin, new)
        if act != "identity":
            setattr(parent, extra, nn.Identity())
            report.fused.append((path, _join(path.rpartition(".")[0], extra), act))
        else:
            report.lone.append((path, extra))
        setattr(parent, n, new)
    # A shared linear layer: the same instrumented module at its other paths.
    for m in list(model.modules()):
        for cn, c in list(m.named_children()):
            old, new = replaced.get(id(c), (None, None))
            if old is c:
                setattr(m, cn, new)
    model.fastmlp_report = report
    if report.untouched and options.get("warn", True):
        listed = "; ".join(f"{p}: {why}" for p, why in report.untouched)
        warnings.warn(f"fastmlp.instrument left dense layers untouched: {listed}", stacklevel=2)
    return model


def _already_instrumented(
    model: nn.Module, earlier: object, report: InstrumentReport
) -> list[tuple[str, InstrumentedDense]]:
    """The model's instrumented layers, each entered in ``report`` as the ``earlier``
    report (a previous call's) lists it, or else in ``report.already``."""
    fused, lone = {}, {}
    if isinstance(earlier, InstrumentReport):
        fused = {f[0]: f for f in earlier.fused}
        lone = dict(earlier.lone)
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, InstrumentedDense):
            continue
        found.append((path, m))
        if path in fused:
            report.fused.append(fused[path])
        elif path in lone:
            report.lone.append((path, lone[path]))
        else:
            report.already.append((path, m.activation.name))
    return found


def _check_unchanged(
    layers: list[tuple[str, InstrumentedDense]], options: dict, asked: set[str]
) -> None:
    """Refuse options the caller gave (``asked``) that differ from what already
    instrumented ``layers`` use: a second call leaves those layers as they are."""
    given = [k for k in ("backend", *FIELDS) if k in asked]
    explicit = "config" in asked
    for path, layer in layers:
        where = f"layer {path or '(the model itself)'}"
        current = layer.stats.config
        wanted = options["config"]
        names = [f for f in FIELDS if f != "saturation_thresholds"] if explicit else []
        names += [k for k in given if k in FIELDS and k not in names]
        for name in names:
            if getattr(wanted, name) != getattr(current, name):
                raise ValueError(
                    f"instrument(): {where} is already instrumented with {name}="
                    f"{getattr(current, name)!r}, not {getattr(wanted, name)!r}: instrument() "
                    "leaves instrumented layers as they are; change what they record with "
                    f"fastmlp.stats_of(model).configure({name}=...)"
                )
        if "backend" in given and options["backend"] != layer.backend:
            raise ValueError(
                f"instrument(): {where} is already instrumented with backend="
                f"{layer.backend!r}, not {options['backend']!r}: instrument() leaves "
                "instrumented layers as they are; instrument the untouched model to change it"
            )


def _scripted_dense(module: nn.Module) -> bool:
    """Whether ``module`` is a TorchScript module holding a dense layer (which
    :func:`instrument` cannot replace)."""
    return isinstance(module, torch.jit.ScriptModule) and any(
        getattr(m, "original_name", None) in ("Linear", "Conv1D") for m in module.modules()
    )


def stats_of(model: nn.Module) -> ModelStats:
    """The :class:`~fastmlp.ModelStats` of an instrumented model (or any model with
    :class:`~fastmlp.InstrumentedLinear` layers)."""
    return ModelStats(model)
