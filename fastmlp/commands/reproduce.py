"""``fastmlp reproduce``: the paper's Table 1 and figures at a chosen compute budget."""

from __future__ import annotations

import argparse

from fastmlp.commands.train import device_arg, non_negative_int, positive_float
from fastmlp.train import datasets_names

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fastmlp reproduce``."""
    from fastmlp.reproduce import BUDGETS

    p = subparsers.add_parser(
        "reproduce",
        help="train the paper's models and write Table 1 with figures (markdown report)",
        description="Train sigmoid, tanh, tanh N, softsign, softsign N (5 hidden layers) and "
        "sigmoid with 4, draw their figures and write report.md: Table 1 at this budget beside "
        "the paper's numbers. Rerunning continues interrupted runs.",
    )
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke", help="(default: smoke)")
    p.add_argument("--dataset", choices=datasets_names(), default="shapeset")
    p.add_argument("--out", metavar="DIR", help="default: runs/reproduce-<dataset>-<budget>")
    p.add_argument("--device", type=device_arg, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--lr", type=positive_float, help="learning rate for every model")
    p.add_argument("--data-dir", help="dataset directory (default: data)")
    p.add_argument("--download", action="store_true", help="download MNIST / CIFAR-10")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp reproduce``."""
    from fastmlp.reproduce import reproduce

    report = reproduce(
        args.dataset,
        args.budget,
        out=args.out,
        device=args.device,
        seed=args.seed,
        data_dir=args.data_dir,
        download=args.download,
        lr=args.lr,
        progress=args.progress,
    )
    print(report)
    return 0
