"""``fastmlp train``: train an MLP with the paper's monitoring and write a run directory.

Several processes: ``fastmlp train --nproc N`` starts N ranks on this machine
through torchrun's elastic agent (:func:`fastmlp.distributed.launch`); across
machines, start it with ``torchrun --nnodes ... --nproc-per-node ... -m fastmlp
train ...``, which this command detects (``WORLD_SIZE``) and joins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from fastmlp import distributed
from fastmlp.config import KINDS, Kind, TrainConfig, choices, resumable_fields
from fastmlp.errors import EXIT_INTERRUPTED, RunFailed, UsageError, describe, exit_status
from fastmlp.interrupts import EXIT_TERMINATED, Terminated
from fastmlp.run import CHECKPOINT, CheckpointError, check_new, hold, load_checkpoint
from fastmlp.train import (
    check_resume,
    default_run_dir,
    load_config,
    resolve_device,
    train,
)

__all__ = ["register", "run"]


def _arg_type(kind: Kind):
    """An argparse type from a config kind (its message says what was expected)."""

    def parse(text: str):
        try:
            return kind.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


# argparse types, one per kind of value (fastmlp.config.KINDS)
positive_int = _arg_type(KINDS["positive"])
non_negative_int = _arg_type(KINDS["count"])
positive_float = _arg_type(KINDS["rate"])
path_arg = _arg_type(KINDS["path"])
device_arg = _arg_type(KINDS["device"])


# Flags that may change when resuming (everything else comes from the run's config.json).
RESUMABLE = resumable_fields(flags_only=True)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, derived from its declaration; every default
    is ``None`` so explicit flags can be told apart."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta["flag"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = meta["kind"]
        default = f.default
        if kind == "bool?":
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=meta["help"],
            )  # fmt: skip
        elif kind == "bool":
            flag = flag if default is False else "--no-" + f.name.replace("_", "-")
            p.add_argument(
                flag, dest=f.name, action="store_false" if default else "store_true",
                default=None, help=meta["help"] if not default else f"do not {meta['help']}",
            )  # fmt: skip
        elif kind == "choice":
            p.add_argument(
                flag, dest=f.name, choices=choices(f.name), help=f"{meta['help']} "
                f"(default: {default})",
            )  # fmt: skip
        else:
            p.add_argument(
                flag, dest=f.name, type=_arg_type(KINDS[kind]),
                help=f"{meta['help']} (default: {default})",
            )  # fmt: skip


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
    p.add_argument(
        "--out", metavar="RUN_DIR", type=path_arg, help="run directory (default: runs/<name>)"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=path_arg,
        help="continue the run in RUN_DIR from its checkpoint (only "
        + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
        + " may be given with it)",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        help="train with N processes on this machine (DistributedDataParallel, one per GPU; "
        "gloo on CPU); --batch-size is per process, so the global batch is N x batch size. "
        "Several machines: torchrun --nnodes M --nproc-per-node N ... -m fastmlp train ...",
    )
    p.set_defaults(func=run, _parser=p)


def argv_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str] = ()
) -> list[str]:
    """The command-line flags that reproduce ``args`` (the options that were given; every
    option of ``fastmlp train`` defaults to ``None``), e.g. for the processes of ``--nproc``."""
    skip = set(skip) | {"help"}
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        if value is False and isinstance(action, argparse._StoreTrueAction):
            continue  # --debug: False comes from the top-level parser's default
        if isinstance(action, argparse.BooleanOptionalAction):
            pos = [o for o in action.option_strings if not o.startswith("--no-")]
            neg = [o for o in action.option_strings if o.startswith("--no-")]
            out.append(pos[0] if value else neg[0])
        elif action.nargs == 0:  # store_true / store_false / store_const
            out.append(action.option_strings[0])
        else:
            out.append(f"{action.option_strings[-1]}={value}")
    return out


def _torchrun_world() -> int | None:
    """``WORLD_SIZE`` when this process was started by torchrun (or ``--nproc``), else None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``fastmlp train`` (in this process, in ``--nproc`` processes, or as a torchrun rank)."""
    parser: argparse.ArgumentParser = args._parser
    world = _torchrun_world()
    nproc = getattr(args, "nproc", None)
    if world is not None and nproc is not None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if nproc != local_world:
            parser.error(
                f"--nproc {nproc} given under torchrun, which started {local_world} "
                "process(es) here: leave --nproc out"
            )
    launching = world is None and nproc is not None and nproc > 1
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
        except (ValueError, TypeError) as e:  # config.json edited into something else
            if isinstance(e, UsageError):
                raise
            raise UsageError(
                f"{Path(args.resume) / 'config.json'}: {e} (expected the TrainConfig fastmlp wrote)"
            ) from e
        config = config_from_args(args, base)
        config.out = args.resume
        resume = True
    else:
        try:
            config = config_from_args(args)
        except ValueError as e:
            parser.error(str(e))
        resume = False
        if launching and config.out is not None:
            check_new(config.out)  # in use, or holding a run: refused before starting N ranks
    if world is None:
        resolve_device(config.device)  # a device that is not there: refused before any work
    if launching:
        if resume:  # refuse what the ranks would refuse before starting N processes
            with hold(config.out, new=False):
                if (Path(config.out) / CHECKPOINT).is_file():
                    check_resume(config.out, config, nproc)
        # The flags were checked here; each of the N ranks runs this command again.
        argv = ["train", *argv_from_args(parser, args, skip=("nproc",))]
        try:
            return distributed.launch(nproc, argv)
        except Exception as e:  # Ctrl-C / SIGTERM reach torchrun's agent as a SignalException
            sigval = getattr(e, "sigval", None)
            if sigval not in (signal.SIGINT, signal.SIGTERM):
                raise
            run_dir = Path(config.out) if config.out is not None else default_run_dir(config)
            return _interrupted(run_dir, Terminated() if sigval == signal.SIGTERM else None)
    return _train(config, resume=resume, world=world)


def _interrupted(run_dir: Path, e: BaseException | None = None) -> int:
    """One line saying where the interrupted run stands; 130 (Ctrl-C) or 143 (SIGTERM)."""
    note = _checkpoint_note(run_dir) or "no checkpoint was written yet"
    if isinstance(e, Terminated):
        print(f"fastmlp train: terminated (SIGTERM); {note}", file=sys.stderr)
        return EXIT_TERMINATED
    print(f"fastmlp train: interrupted; {note}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _checkpoint_note(run_dir: Path) -> str:
    """What the run directory's checkpoint offers after an interruption or failure ("" when
    there is none to continue from)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return ""
    try:
        step = load_checkpoint(path)["step"]
    except (CheckpointError, KeyError, OSError):
        return ""
    return f"{path} (step {step}) is intact: continue with fastmlp train --resume {run_dir}"


def _train(config: TrainConfig, *, resume: bool, world: int | None) -> int:
    """Train here; as one rank of a torchrun job when ``world`` is set (whose process then
    ends in :func:`fastmlp.distributed.exit_rank`)."""
    if world is None:
        run_dir = Path(config.out) if config.out is not None else default_run_dir(config)
        try:
            train(config, resume=resume)
        except KeyboardInterrupt as e:
            return _interrupted(run_dir, e)
        except Exception as e:
            note = _checkpoint_note(run_dir) if exit_status(e) == 1 else ""
            if note:  # a failure at run time (disk full, a device error) after a checkpoint
                raise RunFailed(f"{describe(e)}; {note}") from e
            raise
        return 0
    distributed.setup(device=None if config.device == "auto" else config.device)
    finished = False
    status = 0
    try:
        # Errors are recorded for torchrun's agent, which reports the failing rank.
        distributed.run_recorded(train, config, resume=resume)
        finished = True
    except KeyboardInterrupt as e:  # rank 0 says where the run stands, unless --nproc will
        if os.environ.get("RANK") == "0" and config.out is not None and not distributed.launched():
            status = _interrupted(Path(config.out), e)
        else:
            status = EXIT_INTERRUPTED
    finally:
        distributed.cleanup(wait=finished)  # every rank leaves the group together
    distributed.exit_rank(status)  # (without the interpreter's teardown: see there)
