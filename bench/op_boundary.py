"""``python -m bench.op_boundary``: the eager cost of the custom-op boundary.

Under ``torch.compile``, ``export``, fake tensors and torch modes every instrumented pass
is a call of ``torch.ops.fastmlp.dense_forward`` / ``dense_backward`` (PyTorch's
dispatcher, the schema check, the mutation bookkeeping of ``torch.library``); in plain
eager mode the layers call the same implementations directly (``fastmlp.op._eager``).
This times, interleaved in one process, the eager training step of the 5x1000 network
with every statistic on:

- ``op``: every pass through the custom ops' dispatcher, as a traced model would;
- ``direct``: as users run eager mode (the implementations called directly);
- ``plain``: ``nn.Linear`` + ``nn.Tanh`` (the reference of the main bench),

and reports the per-step difference, the cost per op call, and ``op / direct``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastmlp import op

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


def measure(batch: int, repeats: int, warmup: int, min_time: float) -> dict:
    """One batch size: the three variants' step times and the op boundary's cost."""
    device = torch.device("cpu")
    case = Case(batch=batch, width=1000)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.op_boundary", description=__doc__)
    p.add_argument("--batches", default="10,256", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        print(f"bench.op_boundary: --batches must be positive integers, got {args.batches!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    info = machine_info(torch.device("cpu"))
    rows = [measure(b, args.repeats, args.warmup, args.min_time) for b in batches]
    result = {
        "schema": "fastmlp-op-boundary/1",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.op_boundary " + " ".join(argv or sys.argv[1:]),
        "note": args.note,
        "machine": info,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"op-boundary-{machine_slug(info)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{info.get('cpu', 'cpu')}, {torch.get_num_threads()} threads; written to {path}")
    print("batch  op ms  direct ms  plain ms  op/direct  us per op call")
    for r in rows:
        v = r["variants"]
        print(
            f"{r['batch']:5d}  {v['op']['ms']:5.1f}  {v['direct']['ms']:9.1f}  "
            f"{v['plain']['ms']:8.1f}  {r['op_over_direct']:9.3f}  {r['us_per_op_call']:14.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
