"""``fastmlp coordcheck``: coordinate sizes across widths (Tensor Programs V) and the paper's
eq. 5-6 variance predictions beside the measured ones."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fastmlp coordcheck``."""
    p = subparsers.add_parser(
        "coordcheck",
        help="coordinate check across widths (muP) and the paper's variance predictions",
        description="Build the paper's MLP at several widths in each parametrization, train "
        "a few SGD steps on one fixed data stream and fit, per layer and step, the slope of "
        "each coordinate size (activation l1 and rms, back-propagated gradient rms, dz_l1: "
        "mean |z_t - z_0| on a fixed batch, ||W_t - W_0|| / ||W_0||) against width: stable "
        "(|slope| <= 0.25), growing or shrinking. Writes DIR/coordcheck.json, one figure per "
        "parametrization and the eq. 5-6 prediction figure, and prints a summary and the "
        "prediction tables. Exit status 2 on bad flags.",
    )
    p.add_argument(
        "--parametrization",
        default="standard,normalized,mup",
        help="comma-separated, of standard, normalized, mup (default: all three)",
    )
    p.add_argument(
        "--widths", default="64,128,256,512,1024", help="comma-separated hidden widths (>= 2)"
    )
    p.add_argument("--depth", default="3", help="hidden layers (default 3)")
    p.add_argument("--activation", default="tanh", help="hidden activation (default tanh)")
    p.add_argument("--steps", default="4", help="SGD steps (default 4)")
    p.add_argument("--lr", default="0.1", help="SGD learning rate (muP: at width 64; default 0.1)")
    p.add_argument("--batch", default="64", help="batch size (default 64)")
    p.add_argument("--data", default="shapeset", help="shapeset (default) or random")
    p.add_argument("--seeds", default="1", help="data streams to average over (default 1)")
    p.add_argument("--seed", default="0", help="seed of the models and the data (default 0)")
    p.add_argument("--out", metavar="DIR", default="coordcheck", help="output directory")
    p.add_argument("--no-plot", action="store_true", help="write no figures")
    p.set_defaults(func=run, _parser=p)


def _int(value: str, flag: str, low: int) -> int:
    from fastmlp.errors import UsageError

    try:
        v = int(value)
    except ValueError:
        raise UsageError(f"{flag} expects an integer >= {low}, got {value!r}") from None
    if v < low:
        raise UsageError(f"{flag} expects an integer >= {low}, got {value!r}")
    return v


def _parse(args: argparse.Namespace) -> dict:
    from fastmlp.activations import ACTIVATIONS
    from fastmlp.coordcheck import DATA, PARAMETRIZATIONS
    from fastmlp.errors import UsageError

    params = [p.strip() for p in args.parametrization.split(",") if p.strip()]
    bad = [p for p in params if p not in PARAMETRIZATIONS]
    if not params or bad:
        raise UsageError(
            f"--parametrization expects a comma-separated list of {', '.join(PARAMETRIZATIONS)}; "
            f"got {args.parametrization!r}"
        )
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        widths = []
    if len(set(widths)) < 2 or min(widths) < 1:
        raise UsageError(
            f"--widths expects at least two different positive integers, comma-separated; "
            f"got {args.widths!r}"
        )
    if args.activation not in ACTIVATIONS:
        raise UsageError(
            f"--activation expects one of {', '.join(ACTIVATIONS)}; got {args.activation!r}"
        )
    if args.data not in DATA:
        raise UsageError(f"--data expects one of {', '.join(DATA)}; got {args.data!r}")
    try:
        lr = float(args.lr)
    except ValueError:
        lr = float("nan")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr expects a positive number, got {args.lr!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out expects a directory, got the file {args.out!r}")
    return {
        "parametrizations": list(dict.fromkeys(params)),
        "widths": sorted(set(widths)),
        "depth": _int(args.depth, "--depth", 1),
        "activation": args.activation,
        "steps": _int(args.steps, "--steps", 1),
        "lr": lr,
        "batch": _int(args.batch, "--batch", 1),
        "data": args.data,
        "seeds": _int(args.seeds, "--seeds", 1),
        "seed": _int(args.seed, "--seed", 0),
    }


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp coordcheck``."""
    from fastmlp.coordcheck import coord_check_mlp, format_predictions, plot_predictions

    options = _parse(args)
    out = Path(args.out)
    result = coord_check_mlp(**options)
    path = result.write(out)
    (out / "command.json").write_text(json.dumps(options, indent=1) + "\n")
    print(
        f"coordinate check: {', '.join(options['parametrizations'])}; widths "
        f"{options['widths']}, depth {options['depth']}, {options['activation']}, "
        f"{options['steps']} SGD steps at lr {options['lr']}, batch {options['batch']}, "
        f"{options['data']} data ({result.seconds:.1f} s)"
    )
    print(result.summary())
    for p, rows in result.predictions.items():
        print()
        print(format_predictions(rows, f"{p}: eq. 5-6 at init, width {max(options['widths'])}"))
    print()
    print(path)
    if not args.no_plot:
        for p in result.plot(out):
            print(p)
        if result.predictions:
            print(plot_predictions(result.predictions, out / "variance_prediction.png"))
    return 0
