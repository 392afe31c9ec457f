"""``fastmlp diagnose RUN``: what a run's statistics say (saturation, vanishing gradients...)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fastmlp diagnose``."""
    p = subparsers.add_parser(
        "diagnose",
        help="read a run's statistics: saturation, vanishing gradients, dead units, NaN...",
        description="Diagnose one snapshot of a run's stats.jsonl (default: the latest probe) "
        "with fastmlp.diagnosis: saturated layers (paper Fig 2/3), back-propagated gradients "
        "shrinking or growing across layers (Fig 7), collapsed activations, dead ReLU units "
        "and non-finite values. Exit status 0 whatever is found; 2 when the run or the step "
        "cannot be read.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (written by fastmlp train)")
    p.add_argument("--step", type=int, help="the step to diagnose (default: the latest)")
    p.add_argument(
        "--source",
        choices=("probe", "train"),
        default="probe",
        help="probe: the fixed probe set (default); train: the training steps before it",
    )
    p.add_argument(
        "--min-severity",
        choices=("info", "warning", "error"),
        default="info",
        help="hide findings below this severity (default: info, show all)",
    )
    p.add_argument("--json", action="store_true", help="findings as JSON on stdout")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp diagnose``."""
    from fastmlp.run import load_run_snapshot
    from fastmlp.stats.diagnosis import (
        SEVERITIES,
        diagnose,
        findings_json,
        format_findings,
    )

    try:
        step, snap = load_run_snapshot(args.run, args.step, args.source)
    except (OSError, ValueError) as e:
        print(f"fastmlp diagnose: error: {e}", file=sys.stderr)
        return 2
    floor = SEVERITIES.index(args.min_severity)
    findings = [f for f in diagnose(snap) if f.rank >= floor]
    if args.json:
        print(findings_json(findings, run=str(args.run), step=step, source=args.source))
    else:
        print(f"{args.run}: {args.source} statistics at step {step}, {len(snap)} layers")
        print(format_findings(findings, args.min_severity))
    return 0
