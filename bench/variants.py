"""The benchmarked variants: one network, one batch, one optimizer, different ways to watch it.

Every variant trains the same ``depth x width`` tanh network (``in_features``
inputs, ``out_features`` logits, cross-entropy, plain SGD) from the same
initial weights on the same batch:

- ``plain``: ``nn.Linear`` + ``nn.Tanh`` in eager PyTorch, unwatched (the reference);
- ``hooks`` / ``hooks-all``: the plain network with :class:`~.hooks.HookStats`
  (moments, min/max, non-finite, saturation; ``-all`` adds histograms);
- ``hooks-naive``: the plain network with :class:`~.hooks.NaiveHookStats`;
- ``fastmlp-moments`` / ``fastmlp-all``: :class:`fastmlp.MLP` with histograms off / on
  (Triton kernels on CUDA, the PyTorch path elsewhere); ``fastmlp-all-torch``
  forces the PyTorch path on any device; ``fastmlp-off``: statistics disabled, so the
  cost of the statistics alone is the ratio to it;
- ``plain-compiled`` / ``fastmlp-compiled``: ``torch.compile`` of ``plain`` /
  ``fastmlp-all`` (the optimizer step stays eager);
- ``*-graph`` (CUDA only): the whole step (or forward) captured in a CUDA graph
  and replayed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fastmlp

from .hooks import HookStats, NaiveHookStats
from .timing import CompileTimeout, time_limit

__all__ = [
    "Case",
    "Built",
    "Unavailable",
    "VARIANTS",
    "build_variant",
    "make_batch",
    "dynamo_graphs",
]

# name -> (base, wrapper, description)
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "plain": ("plain", None, "nn.Linear + nn.Tanh, eager, no statistics (reference)"),
    "hooks": ("hooks", None, "forward/tensor hooks, device-side moments + saturation"),
    "hooks-all": ("hooks-all", None, "hooks as above + fixed-range histograms"),
    "hooks-naive": ("hooks-naive", None, "hooks with .item()/.cpu() per call, torch.histc"),
    "fastmlp-moments": ("fastmlp-moments", None, "fastmlp.MLP, histograms off"),
    "fastmlp-all": ("fastmlp-all", None, "fastmlp.MLP, every statistic"),
    "fastmlp-all-torch": ("fastmlp-all-torch", None, "fastmlp.MLP, PyTorch path forced"),
    "fastmlp-all-zeros": ("fastmlp-all-zeros", None, "fastmlp-all + zero counts (stats.zeros)"),
    "fastmlp-all-moments4": ("fastmlp-all-moments4", None, "fastmlp-all + skewness/kurtosis"),
    "fastmlp-all-per_unit": ("fastmlp-all-per_unit", None, "fastmlp-all + per-unit counts"),
    "fastmlp-all-exponents": ("fastmlp-all-exponents", None, "fastmlp-all + exponent hists"),
    "fastmlp-all-groups": ("fastmlp-all-groups", None, "fastmlp-all + every opt-in group"),
    "fastmlp-off": ("fastmlp-off", None, "fastmlp.MLP, statistics disabled"),
    "plain-compiled": ("plain", "compile", "torch.compile(plain)"),
    "fastmlp-compiled": ("fastmlp-all", "compile", "torch.compile(fastmlp-all)"),
    "plain-graph": ("plain", "graph", "plain in a CUDA graph"),
    "hooks-graph": ("hooks", "graph", "hooks in a CUDA graph"),
    "fastmlp-moments-graph": ("fastmlp-moments", "graph", "fastmlp-moments in a CUDA graph"),
    "fastmlp-all-graph": ("fastmlp-all", "graph", "fastmlp-all in a CUDA graph"),
}

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class Unavailable(RuntimeError):
    """A variant that cannot run here; the message says why (reported as ``n/a``)."""


@dataclass(frozen=True)
class Case:
    """One network shape and batch."""

    batch: int
    width: int
    depth: int = 5
    in_features: int = 1024
    out_features: int = 10
    dtype: str = "fp32"
    activation: str = "tanh"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {list(DTYPES)}")
        for name in ("batch", "width", "in_features", "out_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Built:
    """A ready variant: ``run[mode]()`` does one training step (``step``) or forward pass."""

    name: str
    run: dict[str, Callable[[], object]]
    notes: dict[str, str] = field(default_factory=dict)
    keep: list[object] = field(default_factory=list)  # hooks, graphs: kept alive


def make_batch(case: Case, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs uniform in [0, 1) (never zeros) and random labels, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(case.batch, case.in_features, generator=g)
    y = torch.randint(0, case.out_features, (case.batch,), generator=g)
    return x.to(device), y.to(device)


def _fastmlp(case: Case, device: torch.device, seed: int, backend: str = "auto") -> fastmlp.MLP:
    return fastmlp.MLP(
        case.in_features,
        case.out_features,
        depth=case.depth,
        width=case.width,
        activation=case.activation,
        init="normalized",
        backend=backend,
        seed=seed,
        device=device,
    )


_ACT = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "relu": nn.ReLU}


def _plain(case: Case, device: torch.device, seed: int) -> nn.Sequential:
    """``nn.Linear`` + activation with the same initial weights as the fastmlp variants."""
    ref = _fastmlp(case, device, seed, backend="torch")
    mods: list[nn.Module] = []
    for i, layer in enumerate(ref.layers):
        lin = nn.Linear(layer.in_features, layer.out_features, device=device)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            lin.bias.copy_(layer.bias)
        mods.append(lin)
        if i < len(ref.layers) - 1:
            mods.append(_ACT[case.activation]())
    return nn.Sequential(*mods)


def _autocast(device: torch.device, case: Case) -> contextlib.AbstractContextManager:
    dt = DTYPES[case.dtype]
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


def _eager_fns(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    case: Case,
    device: torch.device,
    params: list[nn.Parameter],
    lr: float,
) -> dict[str, Callable[[], object]]:
    opt = torch.optim.SGD(params, lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, case):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad(), _autocast(device, case):
            model(x)

    return {"step": step, "forward": forward}


def _graph(fn: Callable[[], object], device: torch.device, prepare: Callable[[], None]) -> Callable:
    """Capture ``fn`` in a CUDA graph after warming it up on a side stream; returns its replay.

    ``prepare`` runs before every warm-up call and before the capture (e.g. drops gradients,
    so that the captured backward creates them in the graph's memory).
    """
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            prepare()
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _graph_fns(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    case: Case,
    device: torch.device,
    params: list[nn.Parameter],
    lr: float,
    modes: tuple[str, ...],
) -> dict[str, Callable[[], object]]:
    """Step and forward captured in CUDA graphs (gradients are recreated in the graph)."""
    opt = torch.optim.SGD(params, lr=lr)

    def step() -> None:
        with _autocast(device, case):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad(), _autocast(device, case):
            model(x)

    def drop_grads() -> None:
        opt.zero_grad(set_to_none=True)

    fns: dict[str, Callable[[], object]] = {}
    if "step" in modes:
        fns["step"] = _graph(step, device, drop_grads)
    if "forward" in modes:
        fns["forward"] = _graph(forward, device, lambda: None)
    return fns


def build_variant(
    name: str,
    case: Case,
    device: torch.device,
    *,
    modes: tuple[str, ...] = ("step", "forward"),
    seed: int = 0,
    lr: float = 0.01,
    compile_timeout: float | None = None,
) -> Built:
    """Build variant ``name`` for ``case``; raises :class:`Unavailable` saying why it cannot run.

    Compiled variants are compiled here (first call of each mode) within
    ``compile_timeout`` seconds; graph variants are captured here.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    base, wrapper, _ = VARIANTS[name]
    if wrapper == "graph" and device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    if case.dtype == "bf16" and device.type != "cuda":
        raise Unavailable("bf16 is benchmarked on GPU only")
    x, y = make_batch(case, device, seed)
    keep: list[object] = []
    if base.startswith("fastmlp"):
        backend = "torch" if base.endswith("-torch") else "auto"
        model: nn.Module = _fastmlp(case, device, seed, backend=backend)
        model.stats.histograms = base != "fastmlp-moments"  # on for every fastmlp-all-*
        model.stats.enabled = base != "fastmlp-off"
        for group in ("zeros", "moments4", "per_unit", "exponents"):
            setattr(model.stats, group, base.endswith((f"-{group}", "-groups")))
    else:
        model = _plain(case, device, seed)
        if base in ("hooks", "hooks-all"):
            keep.append(HookStats(model, histograms=base == "hooks-all"))
        elif base == "hooks-naive":
            keep.append(NaiveHookStats(model))
    params = list(model.parameters())
    notes: dict[str, str] = {}
    if wrapper == "compile":
        model = _compile(model, x, y, case, device, params, lr, modes, compile_timeout, notes)
    if wrapper == "graph":
        try:
            fns = _graph_fns(model, x, y, case, device, params, lr, modes)
        except Exception as exc:  # noqa: BLE001 - capture failures are reported as n/a
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            raise Unavailable(f"CUDA graph capture failed: {type(exc).__name__}: {exc}") from exc
    else:
        eager = _eager_fns(model, x, y, case, device, params, lr)
        fns = {m: eager[m] for m in modes}
    return Built(name, fns, notes, keep + [model])


def dynamo_graphs() -> int:
    """Graphs compiled by torch._dynamo so far in this process (0 if unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _compile(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    case: Case,
    device: torch.device,
    params: list[nn.Parameter],
    lr: float,
    modes: tuple[str, ...],
    timeout: float | None,
    notes: dict[str, str],
) -> nn.Module:
    """``torch.compile(model)``, compiled now for each mode within ``timeout`` seconds."""
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is not available in this PyTorch")
    # Every case builds a new model, but they share Sequential/MLP.forward: without a higher
    # limit, dynamo would silently fall back to eager after 8 compilations of that code.
    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), 64))
    compiled = torch.compile(model)
    fns = _eager_fns(compiled, x, y, case, device, params, lr)
    dynamo_log = logging.getLogger("torch._dynamo")
    level = dynamo_log.level
    dynamo_log.setLevel(logging.ERROR)  # graph-break warnings are counted, not printed
    t0 = time.perf_counter()
    try:
        for mode in modes:
            breaks = _graph_breaks()
            t0 = time.perf_counter()
            with time_limit(timeout):
                for _ in range(3):  # compile, then let data-dependent recompiles settle
                    fns[mode]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            note = f"compiled in {time.perf_counter() - t0:.0f} s (3 calls)"
            if (n := _graph_breaks() - breaks) > 0:
                note += f", {n} graph breaks"
            notes[mode] = note
    except (Exception, CompileTimeout) as exc:  # no compiler, unsupported op, timeout: n/a
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        if isinstance(exc, CompileTimeout) or (
            timeout is not None and time.perf_counter() - t0 >= timeout
        ):
            raise Unavailable(
                f"torch.compile did not finish within {timeout:g} s (see --compile-timeout)"
            ) from exc
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {text}") from exc
    finally:
        dynamo_log.setLevel(level)
    return compiled
