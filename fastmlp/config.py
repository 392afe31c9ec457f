""":class:`TrainConfig`, declared once: every field carries its help, its kind (what values it
takes, how a flag's text is read) and whether ``--resume`` may change it. The validation,
the ``fastmlp train`` flags (:func:`fastmlp.commands.train.add_config_arguments`) and the
resume rules are all derived from these declarations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastmlp.stats.buffers import MAX_BINS

__all__ = ["KINDS", "Kind", "TrainConfig", "resumable_fields"]


@dataclass(frozen=True)
class Kind:
    """What a field takes: ``check(value)`` returns what was expected (``None``: fine),
    ``parse(text)`` reads a command-line value (raising ``ValueError``)."""

    check: Callable[[Any], str | None]
    parse: Callable[[str], Any]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _optional(kind: Kind) -> Kind:
    """``kind`` or ``None`` (``none`` on the command line)."""
    return Kind(
        lambda v: None if v is None else kind.check(v),
        lambda text: None if text.strip().lower() == "none" else kind.parse(text),
    )


def _parsed(parse: Callable[[str], Any], check: Callable[[Any], str | None]):
    def run(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        problem = check(value)  # a text that did not parse is None: what was expected
        if problem is not None:
            raise ValueError(f"expected {problem}, got {text!r}")
        return value

    return run


def _kind(check: Callable[[Any], str | None], parse: Callable[[str], Any]) -> Kind:
    return Kind(check, _parsed(parse, check))


def _device(text: str) -> str:
    import torch

    if text != "auto":
        try:
            torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(text) from None
    return text


MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds; the data derives more from it
POSITIVE = _kind(lambda v: None if _int(v) and v > 0 else "a positive integer", int)
PATH = _kind(lambda v: None if isinstance(v, str) and v.strip() else "a directory path", str)
KINDS: dict[str, Kind] = {
    "positive": POSITIVE,
    "positive?": _optional(POSITIVE),
    "count": _kind(lambda v: None if _int(v) and v >= 0 else "a non-negative integer", int),
    "seed": _kind(
        lambda v: None if _int(v) and 0 <= v <= MAX_SEED else "an integer in [0, 2**63 - 1]", int
    ),
    "every": _kind(lambda v: None if _int(v) and v >= -1 else "an integer >= -1", int),
    "rate": _kind(
        lambda v: None if _number(v) and math.isfinite(v) and v > 0 else "a positive finite number",
        float,
    ),
    "bins": _kind(
        lambda v: (
            None
            if _int(v) and 2 <= v <= MAX_BINS and v % 2 == 0
            else f"an even integer in [2, {MAX_BINS}]"
        ),
        int,
    ),
    "bool": Kind(lambda v: None if isinstance(v, bool) else "true or false", bool),
    "bool?": Kind(lambda v: None if v is None or isinstance(v, bool) else "true or false", bool),
    "path": PATH,
    "path?": _optional(PATH),
    "device": _kind(lambda v: None if isinstance(v, str) else "auto, cpu, cuda or cuda:N", _device),
    "dict": Kind(lambda v: None if isinstance(v, dict) else "a mapping", dict),
}


def _choices(name: str) -> tuple[str, ...]:
    """The values a choice field takes (looked up when needed: the registries may grow)."""
    if name == "dataset":
        from fastmlp import data

        return tuple(data.DATASETS)
    if name == "activation":
        from fastmlp.activations import ACTIVATIONS

        return tuple(a for a in ACTIVATIONS if a != "identity")
    if name == "init":
        from fastmlp.init import INITS

        return tuple(INITS)
    if name == "backend":
        from fastmlp.op import BACKENDS

        return tuple(BACKENDS)
    raise KeyError(name)


def _opt(
    default: Any,
    help: str,
    kind: str = "choice",
    *,
    resumable: bool = False,
    flag: bool = True,
) -> Any:
    meta = {"help": help, "kind": kind, "resumable": resumable, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    The defaults are the main job: Shapeset-3x2, 5 hidden layers of 1000 tanh
    units with normalized init, SGD on minibatches of 10, with a step count sized
    for a short run on a small CPU.
    """

    dataset: str = _opt("shapeset", "dataset")
    depth: int = _opt(5, "hidden layers", "positive")
    width: int = _opt(1000, "units per hidden layer", "positive")
    activation: str = _opt("tanh", "hidden activation")
    init: str = _opt("normalized", "weight init")
    lr: float = _opt(0.05, "SGD learning rate", "rate")
    batch_size: int = _opt(10, "minibatch size (per process under --nproc)", "positive")
    steps: int = _opt(3000, "SGD updates", "positive", resumable=True)
    eval_every: int = _opt(500, "steps between evaluations", "positive")
    probe_every: int = _opt(250, "steps between probes", "positive")
    probe_size: int = _opt(300, "probe examples (the first test examples)", "positive")
    jacobian_every: int = _opt(
        0, "steps between Jacobian singular values; 0: first and last step, -1: never", "every"
    )
    jacobian_examples: int = _opt(
        4, "probe examples for the Jacobian (one SVD each per hidden layer)", "positive"
    )
    valid_size: int | None = _opt(2000, "validation examples (none: the full split)", "positive?")
    test_size: int | None = _opt(2000, "test examples (none: the full split)", "positive?")
    eval_batch_size: int = _opt(1000, "batch size of evaluations", "positive")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N", "device", resumable=True)
    seed: int = _opt(0, "seed of the data, the init and the batches", "seed")
    data_dir: str = _opt("data", "dataset directory", "path")
    download: bool = _opt(False, "download MNIST / CIFAR-10 into --data-dir if missing", "bool")
    image_size: int = _opt(37, "side of the image-folder dataset's grey images", "positive")
    out: str | None = _opt(None, "run directory", "path?", flag=False)
    train_stats: bool = _opt(True, "record statistics during training steps", "bool")
    train_histograms: bool | None = _opt(
        None, "histograms in the training statistics (default: on CUDA only)", "bool?"
    )
    probe_histograms: bool = _opt(True, "record histograms in the probe statistics", "bool")
    bins: int = _opt(64, "histogram bins", "bins")
    backend: str = _opt("auto", "auto (Triton on CUDA), torch or triton")
    threads: int | None = _opt(
        None,
        "PyTorch CPU threads (default: 1 on the CPU, where minibatch-10 SGD is latency-bound; "
        "PyTorch's choice on CUDA)",
        "positive?",
        resumable=True,
    )
    checkpoint_every: int | None = _opt(
        None, "steps between checkpoints (default: at every evaluation and probe)", "positive?"
    )
    tensorboard: bool = _opt(True, "write TensorBoard events", "bool", resumable=True)
    stop_on_nonfinite: bool = _opt(
        False,
        "stop at the first NaN/Inf in the training statistics (seen at the next evaluation or "
        "probe), keeping the checkpoint from before it; default: warn and go on",
        "bool",
        resumable=True,
    )
    figures: bool = _opt(
        True, "draw the figures into RUN/figures/ at the end", "bool", resumable=True
    )
    progress: bool = _opt(
        True, "show the progress bar and the closing summary (stderr)", "bool", resumable=True
    )
    extra: dict = _opt(
        {}, "free-form labels carried into config.json", "dict", resumable=True, flag=False
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what was expected."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.metadata["kind"]
            if kind == "choice":
                choices = _choices(f.name)
                if value not in choices:
                    raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
                continue
            problem = KINDS[kind].check(value)
            if problem is not None:
                raise ValueError(f"{f.name} must be {problem}, got {value!r}")
        if self.test_size is not None and self.test_size < self.probe_size:
            raise ValueError(
                f"test_size ({self.test_size}) must be at least probe_size ({self.probe_size}): "
                "the probe set is taken from the test set"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. ``config.json``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**d)


def resumable_fields(*, flags_only: bool = False) -> tuple[str, ...]:
    """The fields a resume may change (by a flag, or by editing ``config.json``): they take
    effect from the resumed step on. Every other field is the run's own: ``--resume`` refuses
    a ``config.json`` where it differs from the checkpoint's. ``flags_only``: those that
    have a flag."""
    return tuple(
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.metadata["resumable"] and (f.metadata["flag"] or not flags_only)
    )


def choices(name: str) -> tuple[str, ...] | None:
    """The values of a choice field, ``None`` for other fields."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return _choices(name) if f.metadata["kind"] == "choice" else None
