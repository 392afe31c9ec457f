"""``python -m bench.floor``: how far host-side tuning of the CPU statistics can go.

On the CPU every statistic is computed by a handful of PyTorch calls issued from Python
(:mod:`fastmlp.backends.cpu`), with host-side logic around them: branches, NumPy
bookkeeping of the buffers, scalar arithmetic. This times, interleaved in one process,
the training step of the main table's network (5 hidden layers, tanh, SGD):

- ``plain``, ``fastmlp-off`` and ``fastmlp-all``, as in the main table;
- ``fastmlp-all-calls``: ``fastmlp-all`` in which each statistics record, instead of
  running, replays the PyTorch calls the same record made in a captured step (the same
  functions with the same arguments, on this step's tensors, in the same order, their
  results discarded) and nothing else.

``fastmlp-all-calls / plain`` is the lowest step ratio the pure-PyTorch path can reach
on this CPU with the PyTorch calls it makes: host-side tuning (fewer Python
lines, no NumPy) can at best remove the difference to ``fastmlp-all``; going lower
needs fewer or cheaper calls. NumPy work (the buffers' bookkeeping, the small products
of the weight gradient's factored moments) is not replayed, so the floor is if anything
low. A replay that fails because this step's values left the slots of the captured
histogram captures that record again (``recaptures`` in the JSON counts them). The
replaying variant keeps no statistics; it is a measurement, not a mode.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fastmlp.backends import cpu

from .command import add_timing_options, entry, positive_int, positive_ints, write_result
from .machine import machine_info, machine_slug
from .report import RESULTS_DIR
from .timing import interleaved, quantiles
from .variants import Case, build_variant

__all__ = ["CallTape", "main", "measure"]


class _Slot:
    """A placeholder for a tensor that is a record's input or an earlier call's result."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a call's result (a tensor, or a tuple or list of values)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)


class _Recorder(TorchFunctionMode):
    """Logs each top-level PyTorch call that computes something (:func:`_computes`) as
    ``(func, args, kwargs, result slots, result layout)``, tensors known to ``slots``
    (inputs, earlier results) replaced by :class:`_Slot` placeholders."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.slots = {id(t): i for i, t in enumerate(inputs)}
        self.keep: list[torch.Tensor] = list(inputs)  # ids stay unique while logging
        self.calls: list[tuple] = []

    def _template(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and id(value) in self.slots:
            return _Slot(self.slots[id(value)])
        if isinstance(value, tuple | list):
            return type(value)(self._template(v) for v in value)
        if isinstance(value, dict):
            return {k: self._template(v) for k, v in value.items()}
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        template = (self._template(args), self._template(kwargs))
        result = func(*args, **kwargs)
        if not _computes(func, result):
            return result
        outs, positions = [], []
        flat = list(_tensors(result))
        for j, t in enumerate(flat):
            if id(t) not in self.slots:  # (an in-place or ``out=`` result keeps its slot)
                self.slots[id(t)] = len(self.keep)
                self.keep.append(t)
                outs.append(self.slots[id(t)])
                positions.append(j)
        if not outs:
            layout = None
        elif isinstance(result, torch.Tensor):
            layout = ()
        elif len(flat) == len(result):  # a flat tuple or list of tensors
            layout = tuple(positions)
        else:
            raise TypeError(f"bench.floor: nested results of {func} are not replayed")
        self.calls.append((func, *template, outs, layout))
        return result


# Calls that compute something: those returning tensors, and reads of values to the host.
# Left out: metadata getters, ``numel``, NumPy views of buffers (host-side logic), and item
# assignment (returns nothing; the CPU path's steady records assign through NumPy views).
_READS = frozenset({"__float__", "__int__", "__bool__", "item", "tolist"})


def _computes(func: Callable, result: Any) -> bool:
    return next(_tensors(result), None) is not None or getattr(func, "__name__", "") in _READS


def _compile(calls: list, inputs: int) -> Callable[..., None]:
    """Straight-line Python calling ``calls`` in order: ``run(*inputs)``, every tensor that is
    an input or an earlier result a local variable, everything else a bound constant, so
    that the replay costs what the calls cost and no more."""
    consts: dict[str, Any] = {}

    def const(value: Any) -> str:
        name = f"k{len(consts)}"
        consts[name] = value
        return name

    def expr(value: Any) -> str:
        if isinstance(value, _Slot):
            return f"s{value.index}"
        if isinstance(value, tuple | list) and any(isinstance(v, _Slot) for v in value):
            items = ", ".join(expr(v) for v in value)
            return f"({items},)" if isinstance(value, tuple) else f"[{items}]"
        return const(value)

    lines = [f"def run({', '.join(f's{i}' for i in range(inputs))}):"]
    for func, args, kwargs, outs, layout in calls:
        call = ", ".join([*(expr(a) for a in args), *(f"{k}={expr(v)}" for k, v in kwargs.items())])
        call = f"{const(func)}({call})"
        if layout is None:  # no new tensor (in place, out=, a read)
            lines.append(f"    {call}")
        elif layout == ():
            lines.append(f"    s{outs[0]} = {call}")
        else:
            lines.append(f"    r = {call}")
            lines += [f"    s{slot} = r[{j}]" for slot, j in zip(outs, layout, strict=True)]
    lines.append("    return None")
    namespace = dict(consts)
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from the calls above
    return namespace["run"]


class CallTape:
    """The PyTorch calls of every statistics record of one step, captured in order, and
    their replay in later steps (:meth:`replaying`)."""

    def __init__(self) -> None:
        self.tapes: list[tuple[Callable[..., None], int]] = []  # per record: (replay, calls)
        self.recaptures = 0
        self._position = 0

    @staticmethod
    def _inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """A record's tensors: ``x`` and the ``factors`` (``record(bufs, settings, q, x,
        total, factors)``)."""
        factors = kwargs.get("factors", args[5] if len(args) > 5 else None)
        return [args[3], *(factors or ())]

    def _capture(self, real: Callable, args: tuple, kwargs: dict) -> tuple[Callable, int]:
        inputs = self._inputs(args, kwargs)
        rec = _Recorder(inputs)
        with rec:
            real(*args, **kwargs)
        return _compile(rec.calls, len(inputs)), len(rec.calls)

    def capturing(self, real: Callable) -> Callable:
        """A stand-in for ``cpu.record`` that runs it and appends its calls."""

        def record(*args: Any, **kwargs: Any) -> None:
            self.tapes.append(self._capture(real, args, kwargs))

        return record

    def replaying(self, real: Callable) -> Callable:
        """A stand-in for ``cpu.record`` that replays the next captured record on
        this call's tensors. A replay that fails (this step's values left the slots the
        capture saw) captures that record again, and is counted in ``recaptures``."""

        def record(*args: Any, **kwargs: Any) -> None:
            i = self._position
            self._position += 1
            try:
                self.tapes[i][0](*self._inputs(args, kwargs))
            except RuntimeError:
                self.recaptures += 1
                self.tapes[i] = self._capture(real, args, kwargs)

        return record

    def rewind(self) -> None:
        """The next replayed record is the step's first."""
        self._position = 0


def _patched(fn: Callable[[], object], stand_in: Callable) -> Callable[[], object]:
    def run() -> object:
        saved = cpu.record
        cpu.record = stand_in
        try:
            return fn()
        finally:
            cpu.record = saved

    return run


def measure(batch: int, repeats: int, warmup: int, min_time: float, width: int = 1000) -> dict:
    """One batch size: the four variants' step times and their ratios to ``plain``."""
    device = torch.device("cpu")
    case = Case(batch=batch, width=width)
    names = ("plain", "fastmlp-off", "fastmlp-all")
    fns = {n: build_variant(n, case, device, modes=("step",)).run["step"] for n in names}
    replayed = build_variant("fastmlp-all", case, device, modes=("step",)).run["step"]
    for _ in range(3):  # past calibration: the captured step is a steady one
        replayed()
    tape = CallTape()
    real = cpu.record
    _patched(replayed, tape.capturing(real))()
    replay = _patched(replayed, tape.replaying(real))

    def calls_step() -> None:
        tape.rewind()
        replay()

    fns["fastmlp-all-calls"] = calls_step
    res, inner = interleaved(fns, repeats=repeats, warmup=warmup, device=device, min_time=min_time)
    rows: dict[str, dict] = {}
    for name, m in res.items():
        if not m.ok:
            raise RuntimeError(f"{name}: {m.error}")
        q25, med, q75 = quantiles(m.times)
        paired = [a / b for a, b in zip(m.times, res["plain"].times, strict=True)]
        p25, ratio, p75 = quantiles(paired)
        rows[name] = {
            "ms": med * 1e3,
            "iqr_ms": [q25 * 1e3, q75 * 1e3],
            "over_plain": ratio,
            "over_plain_iqr": [p25, p75],
        }
    return {
        "batch": batch,
        "width": width,
        "inner": inner,
        "repeats": repeats,
        "records_per_step": len(tape.tapes),
        "calls_per_step": sum(n for _, n in tape.tapes),
        "recaptures": tape.recaptures,
        "variants": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument(
        "--batches", type=positive_ints, default=[10, 256], help="comma-separated batch sizes"
    )
    p.add_argument("--width", type=positive_int, default=1000, help="hidden width")
    add_timing_options(p, RESULTS_DIR)
    args = p.parse_args(argv)
    info = machine_info(torch.device("cpu"))
    rows = [measure(b, args.repeats, args.warmup, args.min_time, args.width) for b in args.batches]
    name = f"floor-{machine_slug(info)}.json"
    path = write_result(
        args.out, name, "fastmlp-floor/1", p.prog, argv, args.note, machine=info, rows=rows
    )
    print(f"{info.get('cpu', 'cpu')}, {torch.get_num_threads()} threads; written to {path}")
    print("batch  variant              step ms  / plain (IQR)")
    for r in rows:
        for variant, v in r["variants"].items():
            lo, hi = v["over_plain_iqr"]
            print(f"{r['batch']:5d}  {variant:19s} {v['ms']:8.2f}  {v['over_plain']:.3f} "
                  f"({lo:.3f}-{hi:.3f})")  # fmt: skip
        print(f"       {r['records_per_step']} records, {r['calls_per_step']} PyTorch calls "
              f"a step; {r['recaptures']} replays recaptured")  # fmt: skip
    return 0


if __name__ == "__main__":
    entry("python -m bench.floor", main)
