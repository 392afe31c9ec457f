"""``fastmlp train``: train an MLP with the paper's monitoring and write a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fastmlp.activations import ACTIVATIONS
from fastmlp.init import INITS
from fastmlp.train import TrainConfig, datasets_names, load_config, train

__all__ = ["register", "run"]


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def device_arg(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected auto, cpu, cuda or cuda:N, got {text!r}"
        ) from None
    return text


# Flags that may change when resuming (everything else comes from the run's config.json).
RESUMABLE = ("steps", "device", "threads", "progress", "tensorboard")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The training flags; every default is ``None`` so explicit flags can be told apart."""
    d = TrainConfig()
    activations = [a for a in ACTIVATIONS if a != "identity"]
    p.add_argument("--dataset", choices=datasets_names(), help=f"(default: {d.dataset})")
    p.add_argument("--depth", type=positive_int, help=f"hidden layers (default: {d.depth})")
    p.add_argument(
        "--width", type=positive_int, help=f"units per hidden layer (default: {d.width})"
    )
    p.add_argument("--activation", choices=activations, help=f"(default: {d.activation})")
    p.add_argument("--init", choices=INITS, help=f"weight init (default: {d.init})")
    p.add_argument("--lr", type=positive_float, help=f"SGD learning rate (default: {d.lr})")
    p.add_argument("--batch-size", type=positive_int, help=f"(default: {d.batch_size})")
    p.add_argument("--steps", type=positive_int, help=f"SGD updates (default: {d.steps})")
    p.add_argument(
        "--eval-every",
        type=positive_int,
        help=f"steps between evaluations (default: {d.eval_every})",
    )
    p.add_argument(
        "--probe-every", type=positive_int, help=f"steps between probes (default: {d.probe_every})"
    )
    p.add_argument(
        "--probe-size", type=positive_int, help=f"probe examples (default: {d.probe_size})"
    )
    p.add_argument(
        "--jacobian-every",
        type=int,
        help="steps between Jacobian singular values; 0: first and last step only, -1: never "
        f"(default: {d.jacobian_every})",
    )
    p.add_argument(
        "--jacobian-examples",
        type=positive_int,
        help=f"probe examples used for the Jacobian (default: {d.jacobian_examples})",
    )
    p.add_argument("--valid-size", type=positive_int, help=f"(default: {d.valid_size})")
    p.add_argument("--test-size", type=positive_int, help=f"(default: {d.test_size})")
    p.add_argument("--device", type=device_arg, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--threads",
        type=positive_int,
        help="PyTorch CPU threads (default: 1 on the CPU, where minibatch-10 SGD is "
        "latency-bound; PyTorch's choice on CUDA)",
    )
    p.add_argument("--seed", type=non_negative_int, help=f"(default: {d.seed})")
    p.add_argument("--data-dir", help=f"dataset directory (default: {d.data_dir})")
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download MNIST / CIFAR-10 into --data-dir if missing",
    )
    p.add_argument(
        "--train-histograms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="histograms in the streaming training statistics (default: on CUDA only)",
    )
    p.add_argument(
        "--no-train-stats",
        dest="train_stats",
        action="store_false",
        default=None,
        help="do not record statistics during training steps (probe statistics only)",
    )
    p.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        default=None,
        help="do not write TensorBoard events",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the :class:`TrainConfig` defaults) with the flags given."""
    values = (base or TrainConfig()).to_dict()
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fastmlp train``."""
    p = subparsers.add_parser(
        "train",
        help="train an MLP with the paper's monitoring (default: Shapeset-3x2, 5x1000 tanh)",
        description="Train an MLP with SGD while monitoring every layer (Glorot & Bengio, 2010). "
        "Without arguments: the main job, Shapeset-3x2, 5x1000 tanh, normalized init.",
    )
    add_config_arguments(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<name>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (only --steps, --device, "
        "--no-progress and --no-tensorboard may be given with it)",
    )
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp train``."""
    parser: argparse.ArgumentParser = args._parser
    if args.resume is not None:
        given = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None and f.name not in RESUMABLE
        ]
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            parser.error(f"--resume takes the run's own configuration; remove {flags}")
        try:
            base = load_config(args.resume)
        except FileNotFoundError as e:
            parser.error(str(e))
        config = config_from_args(args, base)
        config.out = args.resume
        train(config, resume=True)
        return 0
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        train(config)
    except FileExistsError as e:
        print(f"fastmlp train: error: {e}", file=sys.stderr)
        return 2
    return 0
