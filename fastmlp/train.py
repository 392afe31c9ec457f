"""The paper's training protocol: plain SGD on small minibatches, with per-layer monitoring.

``train(TrainConfig(...))`` trains an :class:`~fastmlp.MLP` with SGD and
cross-entropy and writes a run directory (:mod:`fastmlp.run`):

- every ``eval_every`` steps: loss (NLL) and error (%) on the validation and
  test sets, and on the training minibatches seen since the last evaluation;
- every ``probe_every`` steps: :func:`fastmlp.probe` on a fixed probe set (the
  first ``probe_size`` test examples, 300 as in the paper), and a snapshot +
  reset of the streaming training statistics (rows with ``source`` ``probe``
  and ``train``);
- every ``jacobian_every`` steps (and at the first and last step): singular
  values of each hidden layer's Jacobian on the probe set;
- a checkpoint after each of those, so ``--resume`` continues a killed run with
  every row exactly once.

Distributed (:mod:`fastmlp.distributed`): when a process group of several
ranks is initialized (``fastmlp train --nproc N``, or torchrun), the model is
wrapped in DistributedDataParallel, each rank draws its own training batches
(``batch_size`` per rank: the global batch is ``batch_size x world_size``),
training statistics are merged over ranks at each snapshot (a collective every
rank joins), and only rank 0 writes the run directory, evaluates, probes and
measures Jacobians. Checkpoints carry the statistics and running training loss
of every rank (merged into rank 0's first), so ``--resume`` is exact too; it
needs the same number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from fastmlp import data as datasets
from fastmlp import distributed
from fastmlp.errors import RunFailed
from fastmlp.jacobian import jacobian_singular_values
from fastmlp.mlp import MLP
from fastmlp.probe import probe
from fastmlp.run import CheckpointError, RunDir, hold, load_checkpoint, save_checkpoint
from fastmlp.stats.snapshot import Snapshot
from fastmlp.summary import compact_finding, finish_run, twin_at_init
from fastmlp.tripwire import NonFinite, Tripwire

__all__ = ["TrainConfig", "train", "load_config", "default_run_dir"]

CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("config", "step", "model", "optimizer", "running", "rng", "logs")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    The defaults are the main job: Shapeset-3x2, 5 hidden layers of 1000 tanh
    units with normalized init, SGD on minibatches of 10, sized to finish in a
    few minutes on a 2-core CPU.
    """

    dataset: str = "shapeset"
    depth: int = 5
    width: int = 1000
    activation: str = "tanh"
    init: str = "normalized"
    lr: float = 0.05
    batch_size: int = 10
    steps: int = 3000
    eval_every: int = 500
    probe_every: int = 250
    probe_size: int = 300
    jacobian_every: int = 0
    """Steps between Jacobian measurements; 0: only at the first and the last step; -1: never."""
    jacobian_examples: int = 4
    """Probe examples for the Jacobian (one SVD per example and hidden layer, ~0.3 s each)."""
    valid_size: int | None = 2000
    test_size: int | None = 2000
    """Validation / test set sizes (``None``: the dataset's full split)."""
    eval_batch_size: int = 1000
    device: str = "auto"
    seed: int = 0
    data_dir: str = "data"
    download: bool = False
    image_size: int = 37
    out: str | None = None
    """Run directory (``None``: ``runs/<dataset>-<activation>-<init>-<depth>x<width>-seed<N>``)."""
    train_stats: bool = True
    """Record the streaming statistics of every training step (snapshots with source ``train``)."""
    train_histograms: bool | None = None
    """Histograms in the training statistics; ``None``: on CUDA only (they are costly on CPU)."""
    probe_histograms: bool = True
    bins: int = 64
    backend: str = "auto"
    threads: int | None = None
    """PyTorch CPU threads while training (restored afterwards). ``None``: 1 on the CPU, where
    minibatch-10 SGD is latency-bound and extra threads mostly wait (measured 10x slower with
    2 threads on a busy 2-core machine), PyTorch's default on CUDA."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; ``None``: at every evaluation, probe and Jacobian step."""
    tensorboard: bool = True
    stop_on_nonfinite: bool = False
    """Stop at the first host read after a NaN/Inf appeared in the training statistics
    (:mod:`fastmlp.tripwire`), keeping the checkpoint from before it; else report and go on."""
    figures: bool = True
    """Draw the paper's figures into ``RUN/figures/`` at the end (:mod:`fastmlp.summary`)."""
    progress: bool = True
    extra: dict = field(default_factory=dict)
    """Free-form labels carried into ``config.json`` (e.g. by ``fastmlp reproduce``)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what was expected."""
        from fastmlp.activations import ACTIVATIONS
        from fastmlp.init import INITS
        from fastmlp.op import BACKENDS

        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in (
            "download",
            "train_stats",
            "probe_histograms",
            "tensorboard",
            "progress",
            "stop_on_nonfinite",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, kind in (("data_dir", str), ("device", str), ("extra", dict)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if not isinstance(self.dataset, str) or self.dataset not in datasets_names():
            raise ValueError(
                f"dataset must be one of {list(datasets_names())}, got {self.dataset!r}"
            )
        if self.activation not in ACTIVATIONS or self.activation == "identity":
            choices = [a for a in ACTIVATIONS if a != "identity"]
            raise ValueError(f"activation must be one of {choices}, got {self.activation!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {self.depth!r}")
        for name in ("width", "batch_size", "steps", "eval_every", "probe_every", "probe_size"):
            positive(name)
        for name in ("jacobian_examples", "eval_batch_size", "image_size"):
            positive(name)
        for name in ("valid_size", "test_size", "checkpoint_every", "threads"):
            positive(name, allow_none=True)
        if not isinstance(self.jacobian_every, int) or self.jacobian_every < -1:
            raise ValueError(
                f"jacobian_every must be an integer >= -1, got {self.jacobian_every!r}"
            )
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.bins, int) or self.bins < 2 or self.bins % 2:
            raise ValueError(f"bins must be an even integer >= 2, got {self.bins!r}")
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


def datasets_names() -> tuple[str, ...]:
    return tuple(getattr(datasets, "DATASETS", ("shapeset", "mnist", "cifar10", "imagefolder")))


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<activation>-<init>-<depth>x<width>-seed<seed>``, suffixed ``-2``, ``-3``...
    when that directory already holds a run."""
    base = Path(root) / (
        f"{config.dataset}-{config.activation}-{config.init}-"
        f"{config.depth}x{config.width}-seed{config.seed}"
    )
    path, k = base, 1
    while (path / "config.json").exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in ``run_dir/config.json``."""
    return TrainConfig.from_dict(RunDir(run_dir, enabled=False).read_config())


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): expected cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: expected auto, cpu, cuda or cuda:N")
    return dev


def _dist_info() -> tuple[int, int]:
    return distributed.rank_world()


@contextlib.contextmanager
def _stats_switched(model: MLP, switch: str, on: bool) -> Iterator[None]:
    """Set every layer's ``switch`` flag (``enabled``, ``histograms``), then restore it."""
    stats = [s for _, s in model.stats.layer_stats()]
    saved = [getattr(s, switch) for s in stats]
    try:
        for s in stats:
            setattr(s, switch, on)
        yield
    finally:
        for s, value in zip(stats, saved, strict=True):
            setattr(s, switch, value)


@torch.no_grad()
def evaluate(
    model: MLP, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean NLL and error (%) of ``model`` on ``(x, y)``; records no statistics."""
    total = torch.zeros(2, dtype=torch.float64, device=x.device)
    with _stats_switched(model, "enabled", False):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            logits = model(xb)
            total[0] += F.cross_entropy(logits, yb, reduction="sum").double()
            total[1] += (logits.argmax(1) != yb).sum()
    loss, wrong = total.tolist()
    n = max(int(y.shape[0]), 1)
    return loss / n, 100.0 * wrong / n


def _saturation_readout(snap: Snapshot | None, depth: int) -> str:
    """``"sat% 0|1|12|40|3"``: saturated activations per hidden layer, in percent."""
    if snap is None:
        return ""
    parts = []
    for layer in range(1, depth + 1):
        s = snap[layer]["activation"].saturated
        parts.append("-" if s is None else f"{100 * s:.0f}")
    return "|".join(parts)


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _due_any(step: int, config: TrainConfig) -> bool:
    """Whether anything (evaluation, probe, Jacobian, checkpoint) reads the host at ``step``."""
    jac, ckpt = config.jacobian_every, config.checkpoint_every
    return (
        _due(step, config.eval_every, config.steps)
        or _due(step, config.probe_every, config.steps)
        or (jac >= 0 and (step in (0, config.steps) or (jac > 0 and step % jac == 0)))
        or (ckpt is not None and _due(step, ckpt, config.steps))
    )


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as ``config`` says; returns the run directory.

    With ``resume=True``, ``config.out`` must be an existing run directory with a
    checkpoint: training continues from it (``config.steps`` may be larger than
    the original to extend a run) and every log row written after the
    checkpoint is dropped and produced again.
    """
    config.validate()
    device = resolve_device(config.device)
    if resume:
        if config.out is None:
            raise ValueError("resume=True needs config.out, the run directory to continue")
        run_dir = Path(config.out)
    else:
        run_dir = Path(config.out) if config.out is not None else default_run_dir(config)
        if (run_dir / "config.json").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                "or choose another --out"
            )
    threads = config.threads or (1 if device.type == "cpu" else None)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # One writer per run directory (rank 0 of a distributed job); see fastmlp.run.hold.
        with hold(run_dir, new=not resume, enabled=_dist_info()[0] == 0):
            return _train(config, resume, run_dir, device)
    finally:
        torch.set_num_threads(saved_threads)


def _train(config: TrainConfig, resume: bool, run_dir: Path, device: torch.device) -> Path:
    rank, world_size = _dist_info()
    is_main = rank == 0
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes it
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    torch.manual_seed(config.seed)

    # Data: fixed validation/test sets; the probe set is the first test examples (paper).
    if config.download and not is_main:
        distributed.barrier()  # rank 0 downloads first
    splits = datasets.load(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        seed=config.seed,
        device=device,
        valid_size=config.valid_size,
        test_size=config.test_size,
        image_size=config.image_size,
    )
    if config.download and is_main:
        distributed.barrier()
    x_probe, y_probe = (t[: config.probe_size] for t in splits.test)

    model = MLP(
        splits.in_features,
        splits.num_classes,
        depth=config.depth,
        width=config.width,
        activation=config.activation,
        init=config.init,
        bins=config.bins,
        backend=config.backend,
        seed=config.seed,
        device=device,
    )
    train_hist = config.train_histograms
    if train_hist is None:
        train_hist = device.type == "cuda"
    model.stats.enabled = config.train_stats
    model.stats.histograms = train_hist
    # Training steps go through DDP (gradients averaged over ranks); evaluation, probes and
    # Jacobians use the bare model on rank 0 alone. Statistics stay rank-local (wrap_model).
    ddp_model = distributed.wrap_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    # Training loss / wrong / count since the last evaluation, kept on the device.
    running = torch.zeros(3, dtype=torch.float64, device=device)

    run = RunDir(run_dir, enabled=is_main, tensorboard=config.tensorboard)
    step = 0
    if resume and not run.checkpoint_path.exists():
        run.check_restart()  # killed before its first checkpoint: start over; else refuse
        resume = False
    if resume:
        ckpt_path = run.checkpoint_path
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
        if ckpt.get("version") != CHECKPOINT_VERSION or missing:
            raise CheckpointError(
                f"{ckpt_path} is not a version-{CHECKPOINT_VERSION} fastmlp checkpoint (version "
                f"{ckpt.get('version')!r}" + (f", no {', '.join(missing)})" if missing else ")")
            )
        _check_compatible(TrainConfig.from_dict(ckpt["config"]), config)
        if ckpt.get("world_size", 1) != world_size:
            raise ValueError(
                f"{ckpt_path} was written by a run on {ckpt.get('world_size', 1)} process(es); "
                f"resume it with the same number (--nproc {ckpt.get('world_size', 1)}), "
                f"not {world_size}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        running.copy_(ckpt["running"])
        if not is_main:
            # The checkpoint's statistics and running loss are every rank's, merged into
            # rank 0's: the other ranks start again from empty ones.
            model.stats.reset()
            running.zero_()
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        step = int(ckpt["step"])
        if step > config.steps:
            raise ValueError(
                f"{run_dir} is at step {step}, past --steps {config.steps}: give --steps "
                f">= {step} to extend it, or leave --steps out"
            )
        run.open(ckpt["logs"], tb_step=step + 1)  # checks every log before changing any
        run.write_config(config.to_dict())
    else:
        run.write_config(config.to_dict())
        run.open(None)
    start_step = step

    batches = splits.train_batches(
        config.batch_size, seed=config.seed, start_step=step, rank=rank, world_size=world_size
    )
    jac_every = config.jacobian_every
    ckpt_every = config.checkpoint_every
    last_probe: Snapshot | None = None
    last_test_error: float | None = None
    bar = _progress(config, step, is_main)
    # The first NaN/Inf of the training statistics, found on the device every step and read
    # at the monitoring points (no host synchronisation in the step).
    wire = Tripwire(model) if config.train_stats else None
    reported: NonFinite | None = None
    t0 = time.perf_counter()
    refresh = max(1, min(50, config.steps // 100))

    def checkpoint(at: int) -> None:
        # Collectives (every rank): move all ranks' statistics and running loss into rank 0.
        if world_size > 1:
            distributed.consolidate_stats(model.stats)
            distributed.all_reduce_sum_(running)
            if not is_main:
                running.zero_()
        if not is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "version": CHECKPOINT_VERSION,
            "config": config.to_dict(),
            "step": at,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "running": running.cpu(),
            "rng": rng,
            "logs": run.positions(),
            "world_size": world_size,
        }
        if run.tb is not None:
            run.tb.flush()
        save_checkpoint(run.checkpoint_path, state)

    try:
        while True:
            # ---- monitoring at this step (already done for the step a resume starts from)
            if step > start_step or not resume:
                logged = False
                hit = wire.read() if wire is not None and _due_any(step, config) else None
                if hit is not None and hit != reported:
                    reported = hit
                    if config.stop_on_nonfinite:
                        raise RunFailed(f"stopped by --stop-on-nonfinite: {hit}")
                    if is_main:
                        print(f"fastmlp train: warning: {hit}", file=sys.stderr)
                if _due(step, config.eval_every, config.steps):
                    distributed.all_reduce_sum_(running)  # training loss over every rank
                    if is_main and step > 0 and running[2] > 0:
                        loss_sum, wrong, n = running.tolist()
                        run.log_metrics(step, "train", loss_sum / n, 100.0 * wrong / n)
                    running.zero_()
                    for split, (x, y) in (("valid", splits.valid), ("test", splits.test)):
                        if not is_main:
                            break
                        loss, err = evaluate(model, x, y, config.eval_batch_size)
                        run.log_metrics(step, split, loss, err)
                        if split == "test":
                            last_test_error = err
                    logged = True
                if _due(step, config.probe_every, config.steps):
                    if is_main:
                        with _stats_switched(model, "histograms", config.probe_histograms):
                            last_probe = probe(model, x_probe, y_probe)
                        run.log_stats(step, "probe", last_probe.rows())
                    if config.train_stats and step > 0:  # every rank: its own accumulators
                        run.log_stats(step, "train", model.stats.snapshot().rows())
                        model.stats.reset()
                        if wire is not None:
                            wire.rebase()
                    logged = True
                if jac_every >= 0 and (
                    step in (0, config.steps) or (jac_every > 0 and step % jac_every == 0)
                ):
                    if is_main:
                        n_jac = min(config.jacobian_examples, x_probe.shape[0])
                        run.log_jacobian(
                            step, jacobian_singular_values(model, x_probe, max_examples=n_jac)
                        )
                    logged = True
                if (ckpt_every is None and logged) or (
                    ckpt_every is not None and (step % ckpt_every == 0 or step == config.steps)
                ):
                    checkpoint(step)
            if step >= config.steps:
                break

            # ---- one SGD step
            x, y = next(batches)
            logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                running[0] += loss.detach().double() * y.shape[0]
                running[1] += (logits.argmax(1) != y).sum()
                running[2] += y.shape[0]
            step += 1
            if wire is not None:
                wire.update(step)

            if bar is not None:
                bar.update(1)
                if step % refresh == 0 or step == config.steps:
                    bar.set_postfix_str(
                        _postfix(running, last_test_error, last_probe, config.depth), refresh=False
                    )
    finally:
        if bar is not None:
            bar.close()
        run.close()
    if is_main:  # diagnosis.json, figures and the per-layer summary (fastmlp.summary)
        elapsed = time.perf_counter() - t0
        twin = twin_at_init(model, x_probe, y_probe, seed=config.seed)  # the other paper init
        report = finish_run(run_dir, figures=config.figures, twin=twin)
        if config.progress:
            print(
                f"{step - start_step} steps in {elapsed:.1f} s; run written to {run_dir}\n{report}",
                file=sys.stderr,
            )
    return run_dir


_MODEL_FIELDS = (
    "dataset",
    "depth",
    "width",
    "activation",
    "init",
    "batch_size",
    "seed",
    "bins",
    "probe_size",
    "valid_size",
    "test_size",
    "image_size",
)


def _check_compatible(saved: TrainConfig, config: TrainConfig) -> None:
    diff = [
        f"{name}: checkpoint {getattr(saved, name)!r} vs {getattr(config, name)!r}"
        for name in _MODEL_FIELDS
        if getattr(saved, name) != getattr(config, name)
    ]
    if diff:
        raise ValueError("cannot resume with a different configuration: " + "; ".join(diff))


def _postfix(
    running: torch.Tensor, test_error: float | None, snap: Snapshot | None, depth: int
) -> str:
    """``loss=.. err=..% test=..% sat%=a|b|c|d|e code@layer``: training loss and error since the
    last evaluation, the last test error, the saturated activations of each hidden layer and the
    last probe's worst finding (warning or error; :mod:`fastmlp.diagnosis`)."""
    loss_sum, wrong, n = running.tolist()
    parts = []
    if n:
        parts.append(f"loss={loss_sum / n:.3f} err={100 * wrong / n:.1f}%")
    if test_error is not None:
        parts.append(f"test={test_error:.1f}%")
    if snap is not None:
        parts.append(f"sat%={_saturation_readout(snap, depth)}")
        parts.append(compact_finding(snap))  # the worst finding at warning level, e.g. saturation@5
    return " ".join(p for p in parts if p)


def _progress(config: TrainConfig, step: int, is_main: bool):  # noqa: ANN202 - tqdm or None
    if not (config.progress and is_main):
        return None
    from tqdm.auto import tqdm

    desc = f"{config.dataset} {config.depth}x{config.width} {config.activation} {config.init}"
    return tqdm(total=config.steps, initial=step, desc=desc, dynamic_ncols=True)
