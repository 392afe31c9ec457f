"""``python -m bench.op_boundary``: the eager cost of the custom-op boundary.

Under ``torch.compile``, ``export``, fake tensors and torch modes every instrumented pass
is a call of ``torch.ops.fastmlp.dense_forward`` / ``dense_backward`` (PyTorch's
dispatcher and the autograd function's ``setup_context``); in plain eager mode the layers
call the same implementations directly (``fastmlp.op._eager``). This times, interleaved in
one process, the eager training step of the 5-hidden-layer network with every statistic
on, at width 1000 (the paper's) and at width 4, where the arithmetic is negligible and the
difference per call is the boundary's own cost (at width 1000 the step's own noise can
hide it; measured: see bench/results/op-boundary-*.json):

- ``op``: every pass through the custom ops' dispatcher, as a traced model would;
- ``direct``: as users run eager mode (the implementations called directly);
- ``plain``: ``nn.Linear`` + ``nn.Tanh`` (the reference of the main bench),

and reports the per-step difference, the cost per op call, and ``op / direct``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from fastmlp import op

from .command import add_timing_options, entry, positive_ints, write_result
from .machine import machine_info, machine_slug
from .report import RESULTS_DIR
from .timing import interleaved, quantiles
from .variants import Case, build_variant

__all__ = ["main", "measure"]


@contextlib.contextmanager
def _through_dispatcher() -> Iterator[None]:
    """Inside: the layers call the custom ops through PyTorch's dispatcher, as under tracing."""
    saved = op._eager
    op._eager = lambda: False
    try:
        yield
    finally:
        op._eager = saved


def measure(batch: int, repeats: int, warmup: int, min_time: float, width: int = 1000) -> dict:
    """One batch size and width: the three variants' step times and the op boundary's cost.

    At a width as small as 4 (inputs as wide) the arithmetic is negligible, so the step
    difference is the boundary's own cost, free of the noise of a 5x1000 step's."""
    device = torch.device("cpu")
    case = Case(batch=batch, width=width, in_features=1024 if width >= 64 else width)
    built = {n: build_variant(n, case, device, modes=("step",)) for n in ("fastmlp-all", "plain")}
    direct_step = built["fastmlp-all"].run["step"]
    op_built = build_variant("fastmlp-all", case, device, modes=("step",))

    def op_step() -> None:
        with _through_dispatcher():
            op_built.run["step"]()

    fns = {"op": op_step, "direct": direct_step, "plain": built["plain"].run["step"]}
    res, inner = interleaved(fns, repeats=repeats, warmup=warmup, device=device, min_time=min_time)
    rows = {}
    for name, m in res.items():
        if not m.ok:
            raise RuntimeError(f"{name}: {m.error}")
        q25, med, q75 = quantiles(m.times)
        rows[name] = {"ms": med * 1e3, "iqr_ms": [q25 * 1e3, q75 * 1e3]}
    paired = [a / b for a, b in zip(res["op"].times, res["direct"].times, strict=True)]
    delta = [a - b for a, b in zip(res["op"].times, res["direct"].times, strict=True)]
    calls = 2 * (case.depth + 1)  # one forward and one backward op per layer
    _, ratio, _ = quantiles(paired)
    _, d, _ = quantiles(delta)
    return {
        "batch": batch,
        "width": width,
        "in_features": case.in_features,
        "inner": inner,
        "repeats": repeats,
        "variants": rows,
        "op_over_direct": ratio,
        "op_over_direct_iqr": list(quantiles(paired)[::2]),
        "op_over_plain": rows["op"]["ms"] / rows["plain"]["ms"],
        "delta_ms_per_step": d * 1e3,
        "op_calls_per_step": calls,
        "us_per_op_call": d * 1e6 / calls,
    }


def dispatch_cost(calls: int = 2000, repeats: int = 15) -> dict:
    """The dispatcher alone: ``fastmlp::dense_forward`` called through ``torch.ops`` against
    its implementation called directly, on a width-4 layer (statistics on, calibrated, no
    autograd), interleaved; microseconds per call (medians over ``repeats`` of ``calls``).
    This is what a traced graph (compile, export) pays per pass for the boundary."""
    import time

    from fastmlp import InstrumentedLinear

    layer = InstrumentedLinear(4, 4, "tanh", generator=torch.Generator().manual_seed(0))
    x = torch.rand(10, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)  # calibrated
    stats = layer.stats
    args = (x, layer.weight.detach(), layer.bias.detach(), *stats.buffers_tuple())
    args += ("tanh", "torch", *op._flags(stats.settings()))
    fns = {"op": lambda: op.FORWARD_OP(*args), "direct": lambda: op._dense_forward(*args)}
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
    op_s, direct_s = (quantiles(times[n][1:])[1] for n in ("op", "direct"))  # [0]: warm-up
    per_call = (op_s - direct_s) * 1e6
    return {"op_us": op_s * 1e6, "direct_us": direct_s * 1e6, "us_per_call": per_call}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.op_boundary", description=__doc__)
    p.add_argument(
        "--batches", type=positive_ints, default=[10, 256], help="comma-separated batch sizes"
    )
    p.add_argument(
        "--widths",
        type=positive_ints,
        default=[1000, 4],
        help="comma-separated widths (4: the boundary alone)",
    )
    add_timing_options(p, RESULTS_DIR)
    args = p.parse_args(argv)
    info = machine_info(torch.device("cpu"))
    rows = [
        measure(b, args.repeats, args.warmup, args.min_time, width=w)
        for w in args.widths
        for b in args.batches
    ]
    dispatch = dispatch_cost()
    name = f"op-boundary-{machine_slug(info)}.json"
    path = write_result(
        args.out,
        name,
        "fastmlp-op-boundary/1",
        p.prog,
        argv,
        args.note,
        machine=info,
        rows=rows,
        dispatch=dispatch,
    )
    print(f"{info.get('cpu', 'cpu')}, {torch.get_num_threads()} threads; written to {path}")
    print("width  batch   op ms  direct ms  plain ms  op/direct  us per op call")
    for r in rows:
        v = r["variants"]
        print(
            f"{r['width']:5d}  {r['batch']:5d}  {v['op']['ms']:6.2f}  {v['direct']['ms']:9.2f}  "
            f"{v['plain']['ms']:8.2f}  {r['op_over_direct']:9.3f}  {r['us_per_op_call']:14.1f}"
        )
    d = dispatch
    print(
        f"dispatcher alone (what a traced graph pays): {d['us_per_call']:.1f} us per call "
        f"({d['op_us']:.1f} through torch.ops, {d['direct_us']:.1f} direct)"
    )
    return 0


if __name__ == "__main__":
    entry("python -m bench.op_boundary", main)
