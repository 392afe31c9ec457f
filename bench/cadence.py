"""``python -m bench.cadence``: what recording on a cadence costs.

The paper's 5x1000 tanh network (1024 inputs, 10 classes, SGD) trained side by side as
plain ``nn.Linear`` + ``nn.Tanh``, instrumented with statistics off (``fastmlp-off``: what
the steps between logs cost) and instrumented under
``fastmlp.Monitor(every=100)`` with a JSONL writer on: one step in 100 records every
statistic and is logged (snapshot, writer, reset, diagnosis), the other 99 run with
statistics off; and a second plain network built the same way (``plain-2``), whose ratio
to the first is the run's own noise floor (where the networks' memory lies alone can
change a step's time). The variants' steps alternate, in an order rotated every step, so
all see the same machine; each repeat is one block of ``every`` steps of each (each
monitor block holds exactly one recorded and logged step). The figures are per-step
medians over the blocks and the median of the per-block ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastmlp

from .command import entry, output_dir, positive_int, positive_ints, write_result
from .machine import cpu_summary, machine_info, machine_slug

RESULTS = Path(__file__).resolve().parent / "results"


def _network(in_features: int, width: int, depth: int, classes: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    sizes = [in_features] + [width] * depth
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        mods += [nn.Linear(a, b), nn.Tanh()]
    mods.append(nn.Linear(width, classes))
    return nn.Sequential(*mods)


def _trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0

    return step


def measure(batch: int, every: int, repeats: int, depth: int, width: int, log_dir: Path) -> dict:
    """Per-step seconds of both variants at one batch size: steps alternate between the
    variants (so both see the same machine), summed per block of ``every`` steps."""

    # Every variant's network built the same way (the same seed, no copies): on a shared CPU
    # two identical plain networks can run at different speeds for where their memory
    # lies, so "plain-2", a second plain network, measures that floor in the same run.
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return _network(1024, width, depth, 10)

    plain, plain2, watched = build(), build(), build()
    off = fastmlp.instrument(build())
    fastmlp.stats_of(off).enabled = False
    x = torch.rand(batch, 1024)
    y = torch.randint(0, 10, (batch,))
    writer = fastmlp.writers.JSONL(log_dir / f"stats-{batch}.jsonl")
    monitor = fastmlp.Monitor(watched, every=every, writers=[writer], diagnose=True)
    fns = {
        "plain": _trainer(plain, x, y),
        "plain-2": _trainer(plain2, x, y),
        "fastmlp-off": _trainer(off, x, y),
        "monitor": _trainer(watched, x, y, monitor),
    }
    for _ in range(every):  # warm-up: one block (the first recorded step, allocations)
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        block = dict.fromkeys(fns, 0.0)
        names = list(fns)
        for i in range(every):
            k = i % len(names)  # rotate the order step by step
            for name in names[k:] + names[:k]:
                block[name] += fns[name]()
        for name, t in block.items():
            times[name].append(t / every)
    monitor.close()
    # the steps the writer logged after the warm-up block: one a block
    logged = {json.loads(line)["step"] for line in writer.path.read_text().splitlines()}
    logged.discard(0)
    ratios = [m / p for m, p in zip(times["monitor"], times["plain"], strict=True)]
    off_ratios = [o / p for o, p in zip(times["fastmlp-off"], times["plain"], strict=True)]
    over_off = [m / o for m, o in zip(times["monitor"], times["fastmlp-off"], strict=True)]
    floor = [q / p for q, p in zip(times["plain-2"], times["plain"], strict=True)]
    return {
        "batch": batch,
        "steps_per_variant": repeats * every,
        "logged_steps": len(logged),
        **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "off_ratio": statistics.median(off_ratios),
        "monitor_over_off": statistics.median(over_off),
        "plain2_ratio": statistics.median(floor),
        "plain2_ratios": floor,
        "block_ms": {name: [1e3 * v for v in t] for name, t in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cadence", description=__doc__)
    parser.add_argument("--batches", type=positive_ints, default=[10, 256])
    parser.add_argument("--every", type=positive_int, default=100)
    parser.add_argument("--repeats", type=positive_int, default=5, help="blocks of every steps")
    parser.add_argument("--depth", type=positive_int, default=5)
    parser.add_argument("--width", type=positive_int, default=1000)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    parser.add_argument("--out", type=output_dir, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the diagnosis' findings on random data
        for batch in args.batches:
            row = measure(batch, args.every, args.repeats, args.depth, args.width, Path(tmp))
            rows.append(row)
            print(
                f"batch {batch:>5}: plain {row['plain_ms']:.2f} ms/step; Monitor(every="
                f"{args.every}) {row['monitor_ms']:.2f} ms, {row['ratio']:.3f}x plain, "
                f"{row['monitor_over_off']:.3f}x fastmlp-off; fastmlp-off "
                f"{row['fastmlp-off_ms']:.2f} ms, {row['off_ratio']:.3f}x plain; a second "
                f"plain network {row['plain2_ratio']:.3f}x plain "
                f"({row['steps_per_variant']} steps each)",
                flush=True,
            )
    name = f"cadence-{machine_slug(info)}-{torch.get_num_threads()}t.json"
    path = write_result(
        args.out,
        name,
        "fastmlp.bench.cadence/1",
        "python -m bench.cadence",
        argv,
        args.note,
        machine=info,
        network={"in_features": 1024, "depth": args.depth, "width": args.width, "classes": 10},
        every=args.every,
        results=rows,
    )
    print(f"{cpu_summary(info)}, {torch.get_num_threads()} threads; written to {path}")
    return 0


if __name__ == "__main__":
    entry("python -m bench.cadence", main)
