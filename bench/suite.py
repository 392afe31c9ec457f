"""The benchmark plan (:class:`BenchConfig`) and its execution (:func:`run_suite`).

Sections of a run, each a list of flat rows in the result:

- ``main``: every variant at the headline shape(s), training step and forward alone;
- ``batch`` / ``width``: scaling curves (training step) of the core variants;
- ``kernel`` (CUDA): one layer alone, fastmlp's kernels against cuBLAS;
- ``shapeset``: Shapeset-3x2 generation throughput.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .machine import machine_info
from .timing import Measurement, error_text, interleaved, quantiles
from .variants import VARIANTS, Built, Case, Unavailable, build_variant, dynamo_graphs

# Idle seconds after a round's compiled variants on a CPU, for their spinning OpenMP
# threads to go to sleep before the next round's eager variants (libgomp's default spin,
# 300,000 pauses, lasts a few milliseconds at most).
_SETTLE_S = 0.02

__all__ = ["BenchConfig", "default_config", "run_suite", "SCHEMA"]

SCHEMA = "fastmlp-bench/1"

CPU_MAIN = [
    "plain",
    "hooks",
    "hooks-all",
    "hooks-naive",
    "fastmlp-off",
    "fastmlp-moments",
    "fastmlp-all",
    "plain-compiled",
    "fastmlp-compiled",
]
GPU_MAIN = CPU_MAIN[:7] + [
    "fastmlp-all-torch",
    "plain-compiled",
    "fastmlp-compiled",
    "plain-graph",
    "hooks-graph",
    "fastmlp-moments-graph",
    "fastmlp-all-graph",
]
CURVE_VARIANTS = ["plain", "hooks", "hooks-all", "fastmlp-moments", "fastmlp-all"]


@dataclass
class BenchConfig:
    """What to run. :func:`default_config` fills it for a device and ``--quick``."""

    device: str = "cpu"
    quick: bool = False
    repeats: int = 10
    warmup: int = 2
    depth: int = 5
    width: int = 1000
    in_features: int = 1024
    out_features: int = 10
    activation: str = "tanh"
    lr: float = 0.01
    seed: int = 0
    main_batches: list[int] = field(default_factory=lambda: [256])
    variants: list[str] = field(default_factory=lambda: list(CPU_MAIN))
    main_modes: list[str] = field(default_factory=lambda: ["step", "forward"])
    compiled_modes: list[str] = field(default_factory=lambda: ["step", "forward"])
    compiled_dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    curve_variants: list[str] = field(default_factory=lambda: list(CURVE_VARIANTS))
    batches: list[int] = field(default_factory=lambda: [10, 32, 64, 128, 256, 512, 1024, 4096])
    widths: list[int] = field(default_factory=lambda: [256, 512, 1000, 2048, 4096])
    curve_dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    curve_repeats: int = 5
    graph_max_batch: int = 1024
    compile_timeout: float = 300.0
    min_time: float = 0.02
    kernels: bool = True
    kernel_shapes: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(256, 1000, 1000), (4096, 1000, 1000), (4096, 4096, 4096)]
    )
    shapeset_images: int = 10000


def default_config(device: str = "cpu", quick: bool = False) -> BenchConfig:
    """The plan for ``device`` (``cpu`` or ``cuda``); ``quick`` trims the repeats, curve points
    and compiled modes to a short run."""
    cuda = device.startswith("cuda")
    cfg = BenchConfig(device=device, quick=quick)
    if cuda:
        cfg.variants = list(GPU_MAIN)
        cfg.main_batches = [256, 4096]
        cfg.dtypes = ["fp32", "bf16"]
        cfg.curve_dtypes = ["fp32", "bf16"]
        cfg.repeats = 20
        cfg.min_time = 0.02
    if quick:
        cfg.repeats = 10 if cuda else 5
        cfg.warmup = 2 if cuda else 1
        cfg.curve_repeats = 5 if cuda else 3
        cfg.compiled_modes = ["step"]  # each mode is a separate compilation
        cfg.compile_timeout = 120.0
        cfg.shapeset_images = 2000 if not cuda else 10000
        if cuda:
            cfg.batches = [10, 64, 256, 1024, 4096]
            cfg.widths = [256, 1000, 2048, 4096]
            cfg.curve_dtypes = ["fp32"]
            cfg.compiled_dtypes = ["fp32"]
        else:
            cfg.batches = [10, 64, 256, 1024]
            cfg.widths = [256, 1000, 2048]
            cfg.curve_variants = ["plain", "hooks", "fastmlp-moments", "fastmlp-all"]
    return cfg


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row_base(section: str, mode: str, case: Case) -> dict:
    return {
        "section": section,
        "mode": mode,
        "dtype": case.dtype,
        "batch": case.batch,
        "width": case.width,
        "depth": case.depth,
        "in_features": case.in_features,
        "out_features": case.out_features,
    }


def _rows_for(
    section: str,
    mode: str,
    case: Case,
    names: list[str],
    unavailable: dict[str, str],
    measured: dict[str, Measurement],
    inner: int,
    notes: dict[str, dict[str, str]],
) -> list[dict]:
    """Summaries with ratios against ``plain`` (and ``plain-compiled``) of the same run.

    ``ratio`` is the median of the per-repeat ratios (each repeat times every variant
    once, so a repeat's ratio shares that moment's machine state), with its quartiles
    ``ratio_q25``/``ratio_q75``; ``ratio_of_medians`` is the plain quotient of medians.
    """
    rows = []

    def ref_times(name: str) -> list[float] | None:
        m = measured.get(name)
        return m.times if m is not None and m.ok else None

    ref, ref_c = ref_times("plain"), ref_times("plain-compiled")
    for name in names:
        row = _row_base(section, mode, case) | {"variant": name}
        m = measured.get(name)
        if name in unavailable or m is None or not m.ok:
            reason = unavailable.get(name) or (m.error if m is not None else None) or "not run"
            rows.append(row | {"status": "n/a", "reason": reason})
            continue
        q25, q50, q75 = quantiles(m.times)
        row |= {
            "status": "ok",
            "median_s": q50,
            "q25_s": q25,
            "q75_s": q75,
            "repeats": len(m.times),
            "inner": inner,
            "samples_per_s": case.batch / q50,
            "times_s": m.times,
        }
        if note := notes.get(name, {}).get(mode):
            row["note"] = note
        if ref is not None:
            paired = [t / r for t, r in zip(m.times, ref, strict=False)]
            row["ratio_q25"], row["ratio"], row["ratio_q75"] = quantiles(paired)
            row["ratio_of_medians"] = q50 / quantiles(ref)[1]
        if ref_c is not None:
            paired = [t / r for t, r in zip(m.times, ref_c, strict=False)]
            row["ratio_compiled"] = quantiles(paired)[1]
        rows.append(row)
    return rows


def measure_case(
    section: str,
    case: Case,
    names: list[str],
    modes: list[str],
    cfg: BenchConfig,
    device: torch.device,
    repeats: int,
    log: Log = _stderr,
) -> list[dict]:
    """Build ``names`` for ``case``, time each mode interleaved; a row per variant and mode."""
    built: dict[str, Built] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        wrapper = VARIANTS[name][1]
        vmodes = [m for m in modes if wrapper != "compile" or m in cfg.compiled_modes]
        if wrapper == "compile" and case.dtype not in cfg.compiled_dtypes:
            vmodes = []
        if not vmodes:
            unavailable[name] = "not timed in this plan (each compilation takes long)"
            continue
        if wrapper == "graph" and case.batch > cfg.graph_max_batch:
            continue
        t0 = time.perf_counter()
        try:
            built[name] = build_variant(
                name,
                case,
                device,
                modes=tuple(vmodes),
                seed=cfg.seed,
                lr=cfg.lr,
                compile_timeout=cfg.compile_timeout,
            )
        except Unavailable as exc:
            unavailable[name] = str(exc)
            log(f"  {name}: n/a ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this variant is n/a
            unavailable[name] = error_text(exc)
            log(f"  {name}: n/a ({unavailable[name]})")
            _cleanup(device)
            continue
        if wrapper is not None:
            log(f"  {name}: ready in {time.perf_counter() - t0:.1f} s")
    present = [n for n in names if n in built or n in unavailable]
    rows: list[dict] = []
    for mode in modes:
        fns = {n: b.run[mode] for n, b in built.items() if mode in b.run}
        skipped = {
            n: f"{mode} not timed for compiled variants in this plan (one compilation per mode)"
            for n in built
            if mode not in built[n].run
        }
        compiled = frozenset(n for n in fns if VARIANTS[n][1] == "compile")
        # On a CPU, OpenMP threads of torch.compile'd kernels keep spinning after each call
        # and slow down whatever runs next: every round times the compiled variants after
        # the eager ones and then idles, so all of them are still timed round by round
        # (two separate rounds let the machine's drift between them into the ratios).
        cpu = device.type == "cpu"
        measured, inner = interleaved(
            fns,
            repeats=repeats,
            warmup=cfg.warmup,
            device=device,
            min_time=cfg.min_time,
            recompiles=dynamo_graphs,
            compiled=compiled,
            apart=compiled if cpu else frozenset(),
            settle=_SETTLE_S if cpu and compiled else 0.0,
        )
        rows += _rows_for(
            section,
            mode,
            case,
            present,
            unavailable | skipped,
            measured,
            inner,
            {n: b.notes for n, b in built.items()},
        )
        for r in rows[-len(present) :]:
            if r["status"] == "ok":
                ratio = f" x{r['ratio']:.2f}" if "ratio" in r else ""
                log(f"  {mode:7s} {r['variant']:22s} {r['median_s'] * 1e3:9.2f} ms{ratio}")
    built.clear()
    _cleanup(device)
    return rows


def _kernel_rows(cfg: BenchConfig, device: torch.device, log: Log) -> list[dict]:
    """One layer alone on CUDA: fastmlp's kernels vs cuBLAS (``triton.testing.do_bench``)."""
    from .kernel_bench import kernel_rows

    return kernel_rows(cfg.kernel_shapes, device, repeats=max(3, cfg.repeats // 2), log=log)


def _shapeset(cfg: BenchConfig, device: torch.device, log: Log) -> dict:
    """Shapeset-3x2 generation throughput (images/s), or why it was skipped."""
    try:
        shapeset = importlib.import_module("fastmlp.data").shapeset
        if inspect.ismodule(shapeset):  # the package may not re-export the function
            shapeset = shapeset.shapeset
        if not callable(shapeset):
            raise ImportError("fastmlp.data.shapeset is not callable")
    except (ImportError, AttributeError) as exc:
        msg = f"fastmlp.data.shapeset is not importable yet ({exc})"
        log(f"shapeset: skipped: {msg}")
        return {"status": "skipped", "reason": msg}
    n = cfg.shapeset_images
    times = []
    try:
        for i in range(1 + max(2, cfg.repeats // 3)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = shapeset(n, seed=i, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call is warm-up
                times.append(time.perf_counter() - t0)
            del out
    except Exception as exc:  # noqa: BLE001 - the data helper may still be in progress
        msg = f"shapeset({n}, seed=..., device={device.type!r}) failed: {type(exc).__name__}: {exc}"
        log(f"shapeset: skipped: {msg}")
        return {"status": "skipped", "reason": msg[:300]}
    q25, q50, q75 = quantiles(times)
    res = {
        "status": "ok",
        "images": n,
        "median_s": q50,
        "q25_s": q25,
        "q75_s": q75,
        "images_per_s": n / q50,
        "repeats": len(times),
    }
    log(f"shapeset: {res['images_per_s']:.0f} images/s ({n} images)")
    return res


def run_suite(
    cfg: BenchConfig,
    *,
    argv: list[str] | None = None,
    sections: tuple[str, ...] = ("main", "batch", "width", "kernel", "shapeset"),
    log: Log = _stderr,
    prog: str = "python -m bench",
) -> dict:
    """Run the plan and return the result document (see ``bench/README`` in the report module)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
    unknown = [v for v in cfg.variants + cfg.curve_variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    t_start = time.perf_counter()
    doc: dict = {
        "schema": SCHEMA,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([prog, *(argv or [])]),
        "argv": list(argv or []),
        "machine": machine_info(device),
        "config": asdict(cfg),
        "variants": {n: VARIANTS[n][2] for n in dict.fromkeys(cfg.variants + cfg.curve_variants)},
        "rows": [],
        "errors": [],
    }

    def case(batch: int, width: int, dtype: str) -> Case:
        return Case(
            batch=batch,
            width=width,
            depth=cfg.depth,
            in_features=cfg.in_features,
            out_features=cfg.out_features,
            dtype=dtype,
            activation=cfg.activation,
        )

    def guarded(
        section: str, c: Case, names: list[str], modes: list[str], repeats: int
    ) -> list[dict]:
        """:func:`measure_case`, recording (not raising) an unexpected failure of a case."""
        try:
            return measure_case(section, c, names, modes, cfg, device, repeats, log)
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the run
            msg = f"{section} batch {c.batch} width {c.width} {c.dtype}: {error_text(exc)}"
            doc["errors"].append(msg)
            log(f"case failed: {msg}")
            _cleanup(device)
            return []

    if "main" in sections:
        for dtype in cfg.dtypes:
            for b in cfg.main_batches:
                log(f"main: batch {b}, width {cfg.width}, {dtype}")
                doc["rows"] += guarded(
                    "main",
                    case(b, cfg.width, dtype),
                    cfg.variants,
                    cfg.main_modes,
                    cfg.repeats,
                )
    for section, points in (("batch", cfg.batches), ("width", cfg.widths)):
        if section not in sections:
            continue
        for dtype in cfg.curve_dtypes:
            for p in points:
                b, w = (p, cfg.width) if section == "batch" else (cfg.main_batches[0], p)
                log(f"{section} curve: batch {b}, width {w}, {dtype}")
                doc["rows"] += guarded(
                    section, case(b, w, dtype), cfg.curve_variants, ["step"], cfg.curve_repeats
                )
    if "kernel" in sections and cfg.kernels and device.type == "cuda":
        try:
            doc["kernel_rows"] = _kernel_rows(cfg, device, log)
        except Exception as exc:  # noqa: BLE001 - the rest of the run still reports
            doc["errors"].append(f"kernel section: {error_text(exc)}")
            log(f"kernel section failed: {error_text(exc)}")
    if "shapeset" in sections:
        doc["shapeset"] = _shapeset(cfg, device, log)
    doc["elapsed_s"] = time.perf_counter() - t_start
    return doc
