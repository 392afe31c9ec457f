"""pytest-benchmark suite over the bench's cases: ``pytest bench --benchmark-only``.

Kept out of the default test run (``testpaths = ["tests"]``). Each case times one
variant alone (pytest-benchmark does not interleave variants; ``python -m bench``
does, and is the source of the README's numbers). Environment knobs:
``FASTMLP_BENCH_DEVICE`` (default: cuda if available), ``FASTMLP_BENCH_BATCH``
(256), ``FASTMLP_BENCH_WIDTH`` (1000), ``FASTMLP_BENCH_ROUNDS`` (5). On a CPU, OpenMP
threads spinning after compiled kernels slow down whatever runs next: select the
compiled cases separately (``-k compiled``) for clean numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from .variants import Case, Unavailable, build_variant

DEVICE = torch.device(
    os.environ.get("FASTMLP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
BATCH = int(os.environ.get("FASTMLP_BENCH_BATCH", "256"))
WIDTH = int(os.environ.get("FASTMLP_BENCH_WIDTH", "1000"))
ROUNDS = int(os.environ.get("FASTMLP_BENCH_ROUNDS", "5"))

VARIANTS = [
    "plain",
    "hooks",
    "hooks-all",
    "hooks-naive",
    "fastmlp-moments",
    "fastmlp-all",
    "plain-compiled",
    "fastmlp-compiled",
    "plain-graph",
    "fastmlp-all-graph",
]


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    if DEVICE.type != "cuda":
        return fn  # type: ignore[return-value]

    def run() -> None:
        fn()
        torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("mode", ["step", "forward"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant(benchmark, variant: str, mode: str) -> None:
    """One training step (or forward pass) of the 5-layer tanh MLP."""
    case = Case(batch=BATCH, width=WIDTH)
    try:
        built = build_variant(variant, case, DEVICE, modes=(mode,), compile_timeout=600)
    except Unavailable as exc:
        pytest.skip(f"{variant}: {exc}")
    benchmark.group = f"{mode} batch={BATCH} width={WIDTH} {DEVICE.type}"
    benchmark.extra_info.update(variant=variant, mode=mode, batch=BATCH, width=WIDTH)
    benchmark.pedantic(_synced(built.run[mode]), rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("variant", ["plain", "hooks", "fastmlp-moments", "fastmlp-all"])
@pytest.mark.parametrize("batch", [10, 1024])
def test_batch_scaling(benchmark, variant: str, batch: int) -> None:
    """Training step at a small and a large batch."""
    built = build_variant(variant, Case(batch=batch, width=WIDTH), DEVICE, modes=("step",))
    benchmark.group = f"step width={WIDTH} batch={batch} {DEVICE.type}"
    benchmark.pedantic(_synced(built.run["step"]), rounds=ROUNDS, warmup_rounds=1, iterations=1)
