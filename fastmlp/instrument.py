"""``fastmlp.instrument(model)``: watch any model's linear layers, in place.

Every ``nn.Linear`` of the model becomes an :class:`~fastmlp.InstrumentedLinear` that holds
the *same* ``Parameter`` objects (an optimizer built before the call keeps training the
model) at the same module path, so ``state_dict`` keys and values are unchanged. Its
statistics buffers are left out of the ``state_dict`` by default
(``stats_in_state_dict=False``), so checkpoints of the untouched model load with
``strict=True`` and the model's checkpoints load into an untouched one.

A supported activation *module* directly following a linear layer is fused into it (the
activation module is replaced by ``nn.Identity``, which has no state either):

- in an ``nn.Sequential`` (and subclasses that keep its ``forward``, e.g.
  ``torchvision.ops.MLP``): the next child;
- elsewhere, where ``torch.fx`` traces the parent module: the linear's output feeds exactly
  one call of an activation module of the same parent, which is called nowhere else and
  takes nothing else (e.g. a transformer block's ``c_fc -> gelu -> c_proj``).

Everything else is instrumented as a lone linear layer (identity activation, the
activation then runs as before, outside). Linear layers that cannot be swapped (subclasses
of ``nn.Linear``, lazy or parametrized ones, modules whose weight is read by their parent
rather than called, e.g. ``nn.MultiheadAttention.out_proj``, a subclass) are left untouched. A
linear layer registered at several paths is instrumented once, alone, and put at each. What was
fused, instrumented alone and left untouched is returned in an :class:`InstrumentReport`
(also ``model.fastmlp_report``), and anything left untouched is warned about.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import fx, nn

from fastmlp.layers import InstrumentedLinear
from fastmlp.model_stats import ModelStats
from fastmlp.stats.config import FIELDS, SWITCHES, StatsConfig

__all__ = ["InstrumentReport", "activation_of", "instrument", "stats_of"]


def activation_of(module: nn.Module) -> str | None:
    """The fastmlp activation name of an activation module, or ``None`` if not supported."""
    kind = type(module)
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return {
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
        nn.Softsign: "softsign",
        nn.SiLU: "silu",
    }.get(kind)


@dataclass
class InstrumentReport:
    """What :func:`instrument` did, by module path.

    ``fused``: ``(linear path, activation path, activation name)``; ``lone``:
    ``(linear path, why it was not fused)``; ``untouched``: ``(path, why)`` for linear
    layers left as they were.
    """

    fused: list[tuple[str, str, str]] = field(default_factory=list)
    lone: list[tuple[str, str]] = field(default_factory=list)
    untouched: list[tuple[str, str]] = field(default_factory=list)

    @property
    def instrumented(self) -> list[str]:
        """Paths of every instrumented linear layer."""
        return [f[0] for f in self.fused] + [p for p, _ in self.lone]

    def __str__(self) -> str:
        lines = [f"fused: {lin} + {act} ({name})" for lin, act, name in self.fused]
        lines += [f"lone: {p} ({why})" for p, why in self.lone]
        lines += [f"untouched: {p} ({why})" for p, why in self.untouched]
        return "\n".join(lines) or "nothing to instrument"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _ChildLeaves(fx.Tracer):
    """Traces one module with every submodule as a leaf: the graph shows its children's calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _fx_pairs(parent: nn.Module) -> tuple[dict[str, str], str | None]:
    """``{linear child: activation child}`` fusable in ``parent``'s traced forward, or the
    reason tracing failed."""
    try:
        graph = _ChildLeaves().trace(parent)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: do not fuse
        return {}, f"parent {type(parent).__name__} does not trace with torch.fx: {e}"[:200]
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            calls.setdefault(node.target.split(".")[0], []).append(node)
    pairs = {}
    for target, nodes in calls.items():
        child = parent.get_submodule(target) if "." not in target else None
        if type(child) is not nn.Linear or len(nodes) != 1 or nodes[0].op != "call_module":
            continue
        users = list(nodes[0].users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        act_target = user.target
        if "." in act_target or activation_of(parent.get_submodule(act_target)) is None:
            continue
        if len(calls.get(act_target, [])) != 1 or user.args != (nodes[0],) or user.kwargs:
            continue
        pairs[target] = act_target
    return pairs, None


def _swappable(lin: nn.Linear) -> str | None:
    """Why ``lin`` cannot be replaced, or ``None``."""
    if type(lin) is not nn.Linear:
        return f"a subclass of nn.Linear ({type(lin).__name__})"
    if isinstance(lin.weight, nn.parameter.UninitializedParameter):
        return "uninitialized (lazy) parameters"
    if lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks:
        return "has module hooks"
    if getattr(lin, "parametrizations", None) is not None:
        return "parametrized"
    return None


def _make(lin: nn.Linear, activation: str, index: int, options: dict) -> InstrumentedLinear:
    new = InstrumentedLinear(
        lin.in_features,
        lin.out_features,
        activation,
        init="pytorch",
        bias=lin.bias is not None,
        layer_index=index,
        device="meta",
        dtype=lin.weight.dtype,
        backend=options.get("backend", "auto"),
        config=options["config"],
        stats_in_state_dict=options.get("stats_in_state_dict", False),
        stats_device=lin.weight.device,
    )
    new.weight = lin.weight  # the same Parameter objects
    new.bias = lin.bias
    new.train(lin.training)
    return new


_OPTIONS = ("backend", "config", "stats_in_state_dict", "fuse", "fx", "warn", *FIELDS)


def instrument(model: nn.Module, **options) -> nn.Module:
    """Instrument every ``nn.Linear`` of ``model`` in place (see the module docstring).

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

    Returns ``model`` (a bare ``nn.Linear`` cannot be replaced in place: a new
    :class:`~fastmlp.InstrumentedLinear` sharing its parameters is returned). The
    :class:`InstrumentReport` is ``model.fastmlp_report``. Layers are numbered 1, 2, ... in
    registration order; rows carry their module path. Statistics:
    :func:`stats_of(model) <stats_of>`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown instrument() options {unknown}; expected some of {_OPTIONS}")
    config = options.get("config") or StatsConfig()
    if not isinstance(config, StatsConfig):
        raise TypeError(f"config must be a StatsConfig, got {type(config).__name__}")
    changes = {k: options[k] for k in FIELDS if k in options}
    options["config"] = config.replace(
        **{k: bool(v) if k in SWITCHES else v for k, v in changes.items()}
    )
    fuse, use_fx = options.get("fuse", True), options.get("fx", True)
    report = InstrumentReport()
    if type(model) is nn.Linear:
        why = _swappable(model)
        if why is None:
            new = _make(model, "identity", 1, options)
            report.lone.append(("", "a lone nn.Linear"))
            new.fastmlp_report = report
            return new
    # Every module path of each module object: shared modules are not fused.
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    # (parent, child name, activation, path, fused activation child or why not fused)
    plan: list[tuple[nn.Module, str, str, str, str]] = []
    done: set[int] = set()
    for prefix, parent in model.named_modules():
        children = dict(parent.named_children())
        linears = [n for n, c in children.items() if isinstance(c, nn.Linear)]
        if not linears:
            continue
        pairs: dict[str, str] = {}
        reason = "not followed by a supported activation module"
        if fuse and type(parent).forward is nn.Sequential.forward:
            names = list(children)
            for i, n in enumerate(names[:-1]):
                if n in linears and activation_of(children[names[i + 1]]) is not None:
                    pairs[n] = names[i + 1]
        elif fuse and use_fx:
            pairs, failure = _fx_pairs(parent)
            reason = failure or reason
        elif fuse:
            reason = "not in an nn.Sequential (torch.fx disabled)"
        for n in linears:
            lin = children[n]
            path = _join(prefix, n)
            if id(lin) in done:
                continue
            done.add(id(lin))
            why = _swappable(lin)
            if why is not None:
                report.untouched.append((path, why))
                continue
            act = pairs.get(n)
            if act is not None and (len(paths[id(lin)]) > 1 or len(paths[id(children[act])]) > 1):
                plan.append((parent, n, "identity", path, "linear or activation module shared"))
            elif act is not None:
                plan.append((parent, n, activation_of(children[act]), path, act))
            else:
                plan.append((parent, n, "identity", path, reason))
    # Apply in registration order; layer numbers follow it.
    replaced: dict[int, tuple[nn.Linear, InstrumentedLinear]] = {}  # old kept alive: ids stay
    for index, (parent, n, act, path, extra) in enumerate(plan, start=1):
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
        warnings.warn(f"fastmlp.instrument left linear layers untouched: {listed}", stacklevel=2)
    return model


def stats_of(model: nn.Module) -> ModelStats:
    """The :class:`~fastmlp.ModelStats` of an instrumented model (or any model with
    :class:`~fastmlp.InstrumentedLinear` layers)."""
    return ModelStats(model)
