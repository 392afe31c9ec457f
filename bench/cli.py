"""Command line of the benchmark: ``python -m bench`` and ``fastmlp bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .command import (
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_int,
    positive_ints,
    write_text_atomically,
)
from .machine import machine_slug
from .report import RESULTS_DIR, summary
from .suite import BenchConfig, default_config, run_suite
from .variants import VARIANTS

__all__ = ["add_arguments", "main", "config_from_args"]

SECTIONS = ("main", "batch", "width", "kernel", "shapeset")


def _ints(text: str) -> list[int]:
    """Comma-separated integers >= 1, or none (``none`` or nothing: skip)."""
    if text.strip().lower() in ("", "none"):
        return []
    return positive_ints(text)


def _names(choices: tuple[str, ...] | list[str]) -> argparse.Action:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names

    return parse  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m bench`` and ``fastmlp bench``)."""
    parser.add_argument(
        "--quick", action="store_true", help="short plan: ~2 min on a CPU, ~3 on one GPU"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--out",
        type=output_dir,
        default=RESULTS_DIR,
        help="directory for JSON and PNG (bench/results)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, help="timed repeats per variant (main table)"
    )
    parser.add_argument("--curve-repeats", type=positive_int, help="timed repeats per curve point")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed rounds before timing")
    parser.add_argument(
        "--variants", type=_names(list(VARIANTS)), help="main-table variants (comma-separated)"
    )
    parser.add_argument("--curve-variants", type=_names(list(VARIANTS)), help="curve variants")
    parser.add_argument("--batch", type=_ints, help="main-table batch size(s), e.g. 256,4096")
    parser.add_argument("--width", type=positive_int, help="hidden width (default 1000)")
    parser.add_argument("--depth", type=positive_int, help="hidden layers (default 5)")
    parser.add_argument("--in-features", type=positive_int, help="input size (default 1024)")
    parser.add_argument("--out-features", type=positive_int, help="classes (default 10)")
    parser.add_argument("--batches", type=_ints, help="batch-size curve points ('none' to skip)")
    parser.add_argument("--widths", type=_ints, help="width curve points ('none' to skip)")
    parser.add_argument("--dtypes", type=_names(["fp32", "bf16"]), help="main-table dtypes")
    parser.add_argument("--curve-dtypes", type=_names(["fp32", "bf16"]), help="curve dtypes")
    parser.add_argument(
        "--sections",
        type=_names(SECTIONS),
        default=list(SECTIONS),
        help=f"what to run (default: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--compile-timeout",
        type=non_negative_float,
        help="seconds allowed per torch.compile (then n/a; 0: no limit)",
    )
    parser.add_argument(
        "--min-time",
        type=non_negative_float,
        help="seconds per measurement (calls are batched to reach it)",
    )
    parser.add_argument("--shapeset-images", type=positive_int, help="images per Shapeset-3x2 call")
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        help="torch.set_float32_matmul_precision for the run (default: leave as is; "
        "'high' allows TF32 on GPU)",
    )
    parser.add_argument("--name", help="file stem of the outputs (default: machine name)")
    parser.add_argument("--note", help="free text stored in the JSON and shown with the table")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested, but PyTorch sees no CUDA device")
    return text


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The plan: :func:`~.suite.default_config` overridden by the given options."""
    cfg = default_config(_device(args.device), quick=args.quick)
    overrides = {
        "repeats": args.repeats,
        "curve_repeats": args.curve_repeats,
        "warmup": args.warmup,
        "variants": args.variants,
        "curve_variants": args.curve_variants,
        "main_batches": args.batch,
        "width": args.width,
        "depth": args.depth,
        "in_features": args.in_features,
        "out_features": args.out_features,
        "batches": args.batches,
        "widths": args.widths,
        "dtypes": args.dtypes,
        "curve_dtypes": args.curve_dtypes,
        "compile_timeout": args.compile_timeout,
        "shapeset_images": args.shapeset_images,
        "min_time": args.min_time,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if not cfg.main_batches:
        raise SystemExit("--batch needs at least one batch size")
    if "plain" not in cfg.variants:
        cfg.variants.insert(0, "plain")  # ratios need the reference
    if cfg.curve_variants and "plain" not in cfg.curve_variants:
        cfg.curve_variants.insert(0, "plain")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; writes JSON (+ PNG) under ``--out`` and prints the table last."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="fastmlp vs hooks vs plain PyTorch: training-step speed, side by side.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    prog = "python -m bench"
    return run(args, list(sys.argv[1:] if argv is None else argv), prog=prog)


def run(args: argparse.Namespace, argv: list[str], prog: str = "python -m bench") -> int:
    """Run with parsed ``args`` (``prog`` and ``argv`` are recorded in the JSON)."""
    cfg = config_from_args(args)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    sections = tuple(s for s in SECTIONS if s in args.sections)
    doc = run_suite(cfg, argv=argv, sections=sections, prog=prog)
    if args.note:
        doc["note"] = args.note
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or machine_slug(doc["machine"]) + ("-quick" if cfg.quick else "")
    if not args.no_plots:
        try:
            from .plots import plot_curves

            doc["plots"] = [p.name for p in plot_curves(doc, out, stem)]
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    path = out / f"{stem}.json"
    write_text_atomically(path, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}" + "".join(f", {p}" for p in doc.get("plots", [])), file=sys.stderr)
    print(f"total {doc['elapsed_s']:.0f} s", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.write(summary(doc))
    sys.stdout.flush()
    return 0
