"""The paper's training protocol: plain SGD on small minibatches, with per-layer monitoring.

``train(TrainConfig(...))`` trains an :class:`~fastmlp.MLP` with SGD and
cross-entropy and writes a run directory (:mod:`fastmlp.run`):

- every ``eval_every`` steps: loss (NLL) and error (%) on the validation and
  test sets, and on the training minibatches seen since the last evaluation;
- every ``probe_every`` steps: :func:`fastmlp.probe` on a fixed probe set (the
  first ``probe_size`` test examples, 300 as in the paper), and the streaming
  training statistics of the steps since the last one (rows with ``source``
  ``probe`` and ``train``); the training statistics are recorded and written
  through a :class:`fastmlp.Monitor` (``every = window = probe_every``, logged
  under the steps done) whose writer is the run directory (:class:`RunWriter`),
  the same path a user's own loop logs through;
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
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

from fastmlp import data as datasets
from fastmlp import distributed
from fastmlp.config import TrainConfig, resumable_fields
from fastmlp.errors import RunFailed, UsageError
from fastmlp.jacobian import jacobian_singular_values
from fastmlp.mlp import MLP
from fastmlp.monitor import Monitor
from fastmlp.op import is_deterministic, set_deterministic
from fastmlp.probe import probe
from fastmlp.run import (
    LOG_FILES,
    CheckpointError,
    RunDir,
    RunWriter,
    hold,
    load_checkpoint,
    save_checkpoint,
)
from fastmlp.stats.snapshot import Snapshot
from fastmlp.summary import compact_finding, finish_run, prediction_at_init, twin_at_init
from fastmlp.tripwire import NonFinite

__all__ = ["TrainConfig", "check_resume", "default_run_dir", "load_config", "train"]

CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("config", "step", "model", "optimizer", "running", "rng", "logs")


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


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train as ``config`` says; returns the run directory.

    With ``resume=True``, ``config.out`` must be an existing run directory with a
    checkpoint: training continues from it (``config.steps`` may be larger than
    the original to extend a run) and every log row written after the
    checkpoint is dropped and produced again.
    """
    config.validate()
    device = resolve_device(config.device)
    if config.backend == "triton" and device.type == "cpu" and not _triton_interpreter():
        raise ValueError(
            "--backend triton needs a CUDA device (on the CPU only under TRITON_INTERPRET=1); "
            "expected --backend auto or torch here"
        )
    if resume:
        if config.out is None:
            raise ValueError("resume=True needs config.out, the run directory to continue")
        run_dir = Path(config.out)
    else:
        # (hold() refuses a directory that holds a run, after its lock names a running writer)
        run_dir = Path(config.out) if config.out is not None else default_run_dir(config)
    threads = config.threads or (1 if device.type == "cpu" else None)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # Deterministic backends: a run resumed in another process, or run again with the same
    # seed, writes the same rows (no timing-dependent kernel choice, no float atomics).
    was_deterministic = is_deterministic()
    set_deterministic(True)
    try:
        # One writer per run directory (rank 0 of a distributed job); see fastmlp.run.hold.
        with hold(run_dir, new=not resume, enabled=_dist_info()[0] == 0):
            return _train(config, resume, run_dir, device)
    finally:
        set_deterministic(was_deterministic)
        torch.set_num_threads(saved_threads)


def _train(config: TrainConfig, resume: bool, run_dir: Path, device: torch.device) -> Path:
    rank, world_size = _dist_info()
    is_main = rank == 0
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes it
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    torch.manual_seed(config.seed)
    splits = _load_data(config, device, is_main)
    model = _build_model(config, splits, device)
    # Training steps go through DDP (gradients averaged over ranks); evaluation, probes and
    # Jacobians use the bare model on rank 0 alone. Statistics stay rank-local (wrap_model).
    ddp_model = distributed.wrap_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    run = RunDir(run_dir, enabled=is_main, tensorboard=config.tensorboard)
    monitor = _Monitor(config, run, model, optimizer, splits, device)
    step = monitor.restore() if resume else monitor.start()
    start_step = step
    batches = splits.train_batches(
        config.batch_size, seed=config.seed, start_step=step, rank=rank, world_size=world_size
    )
    bar = _progress(config, step, is_main)
    t0 = time.perf_counter()
    try:
        while True:
            if step > start_step or not monitor.restored:  # (the checkpoint's step is done)
                monitor(step)
            if step >= config.steps:
                break
            x, y = next(batches)
            logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            monitor.after_step(step, loss, logits, y)
            if bar is not None:
                bar.update(1)
                if step % monitor.refresh == 0 or step == config.steps:
                    bar.set_postfix_str(monitor.postfix(), refresh=False)
    finally:
        if bar is not None:
            bar.close()
        try:
            if monitor.recorder is not None:
                monitor.recorder.close()
        finally:
            run.close()
    if is_main:  # diagnosis.json, figures and the per-layer summary (fastmlp.summary)
        elapsed = time.perf_counter() - t0
        x_probe, y_probe = monitor.probe_set
        twin = twin_at_init(model, x_probe, y_probe, seed=config.seed)  # the other paper init
        prediction = prediction_at_init(model, x_probe, y_probe, seed=config.seed)  # eq. 5-6
        report = finish_run(run_dir, figures=config.figures, twin=twin, prediction=prediction)
        if config.progress:
            print(
                f"{step - start_step} steps in {elapsed:.1f} s; run written to {run_dir}\n{report}",
                file=sys.stderr,
            )
    return run_dir


def _load_data(config: TrainConfig, device: torch.device, is_main: bool) -> datasets.Splits:
    """The dataset's splits; under ``--download`` rank 0 downloads first."""
    if config.download and not is_main:
        distributed.barrier()
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
    return splits


def _build_model(config: TrainConfig, splits: datasets.Splits, device: torch.device) -> MLP:
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
    model.stats.enabled = config.train_stats
    model.stats.histograms = device.type == "cuda" if train_hist is None else train_hist
    return model


class _Monitor:
    """Everything around the SGD steps: the running loss, evaluations, probes, Jacobians,
    checkpoints (and restoring from one), the progress readout; the training statistics and
    their non-finite tripwire through :attr:`recorder`, a :class:`fastmlp.Monitor`.

    Evaluation, probe and Jacobian are the paper's monitoring (the probe set is the first
    test examples); they run on rank 0, checkpoints merge every rank's statistics first.
    """

    def __init__(
        self,
        config: TrainConfig,
        run: RunDir,
        model: MLP,
        optimizer: torch.optim.Optimizer,
        splits: datasets.Splits,
        device: torch.device,
    ) -> None:
        self.config, self.run, self.model, self.optimizer = config, run, model, optimizer
        self.splits, self.device = splits, device
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        self.probe_set = tuple(t[: config.probe_size] for t in splits.test)
        # Training loss / wrong / count since the last evaluation, kept on the device.
        self.running = torch.zeros(3, dtype=torch.float64, device=device)
        self.last_probe: Snapshot | None = None
        self.last_test_error: float | None = None
        # The training statistics: every step recorded, logged (merged over ranks) under
        # the steps done at each probe step and at the last step, written into the run
        # directory; its tripwire finds the first NaN/Inf on the device each step, read at
        # the monitoring points (no host synchronisation in the step).
        self.recorder: Monitor | None = None
        if config.train_stats:
            self.recorder = Monitor(
                model,
                every=config.probe_every,
                window=config.probe_every,
                label="done",
                writers=[RunWriter(run)],
                diagnose=False,  # the run's diagnosis is finish_run's, from the probes
                on_nonfinite=self._nonfinite,
            )
        self.refresh = max(1, min(50, config.steps // 100))
        self.restored = False  # continuing from a checkpoint

    # ---- start or restore

    def start(self) -> int:
        self.run.check_paths(figures=self.config.figures)
        self.run.write_config(self.config.to_dict())
        self.run.open(None)
        return 0

    def restore(self) -> int:
        """Load the run's checkpoint (or start over where that is safe); the step reached.

        Everything is checked (checkpoint, configuration, logs, paths) before anything in
        the run directory changes: a refused resume leaves it as it was.
        """
        run, config, model = self.run, self.config, self.model
        if not run.checkpoint_path.exists():
            _check_config_file(run.path, None, config)
            run.check_restart()  # killed before its first checkpoint: start over; else refuse
            return self.start()
        ckpt_path = run.checkpoint_path
        ckpt = check_resume(run.path, config, self.world_size, device=self.device, run=run)
        try:
            model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.running.copy_(ckpt["running"])
            torch.set_rng_state(ckpt["rng"]["torch"].cpu())
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            first = " ".join(str(e).split("\n")[0].split())[:160]
            raise CheckpointError(
                f"{ckpt_path} holds tensors that do not fit this run's model, optimizer or "
                f"random state ({first}): the checkpoint is damaged and cannot be resumed "
                "from; start a new run with another --out"
            ) from e
        if not self.is_main:
            # The checkpoint's statistics and running loss are every rank's, merged into
            # rank 0's: the other ranks start again from empty ones.
            model.stats.reset()
            self.running.zero_()
        step = int(ckpt["step"])
        run.open(ckpt["logs"], tb_step=step + 1, step=step)  # (checked by check_resume)
        run.write_config(config.to_dict())
        if self.recorder is not None:  # the statistics since the last log came with the model
            self.recorder.resume(step)
        self.restored = True
        return step

    # ---- every step, on the device

    def after_step(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            self.running[0] += loss.detach().double() * y.shape[0]
            self.running[1] += (logits.argmax(1) != y).sum()
            self.running[2] += y.shape[0]

    def postfix(self) -> str:
        return _postfix(self.running, self.last_test_error, self.last_probe, self.config.depth)

    # ---- at the monitoring steps, on the host

    def __call__(self, step: int) -> None:
        config, run, model, is_main = self.config, self.run, self.model, self.is_main
        due_eval = _due(step, config.eval_every, config.steps)
        due_probe = _due(step, config.probe_every, config.steps)
        jac = config.jacobian_every
        due_jac = jac >= 0 and (step in (0, config.steps) or (jac > 0 and step % jac == 0))
        every = config.checkpoint_every
        logged = due_eval or due_probe or due_jac
        due_ckpt = logged if every is None else _due(step, every, config.steps)
        if (logged or due_ckpt) and self.recorder is not None:  # the host is read here anyway
            self.recorder.check_nonfinite()  # (step `step` included; --stop-on-nonfinite raises)
        if due_eval:
            self._evaluate(step)
        if due_probe and is_main:
            with _stats_switched(model, "histograms", config.probe_histograms):
                self.last_probe = probe(model, *self.probe_set)
            run.log_stats(step, "probe", self.last_probe.rows())
        if self.recorder is not None and step > 0:
            # Training step `step` is done (every rank: a log is a collective): the train rows
            # at the end of each probe window, and of a window cut short by the last step.
            self.recorder.step()
            if step == config.steps:
                self.recorder.flush()
        if due_jac and is_main:
            n_jac = min(config.jacobian_examples, self.probe_set[0].shape[0])
            x_probe = self.probe_set[0]
            run.log_jacobian(step, jacobian_singular_values(model, x_probe, max_examples=n_jac))
        if due_ckpt:
            self.checkpoint(step)

    def _nonfinite(self, hit: NonFinite) -> None:
        """The recorder's tripwire found the first non-finite value (reported once)."""
        if self.config.stop_on_nonfinite:
            raise RunFailed(f"stopped by --stop-on-nonfinite: {hit}")
        if self.is_main:
            print(f"fastmlp train: warning: {hit}", file=sys.stderr)

    def _evaluate(self, step: int) -> None:
        running = self.running
        distributed.all_reduce_sum_(running)  # training loss over every rank
        if self.is_main and step > 0 and running[2] > 0:
            loss_sum, wrong, n = running.tolist()
            self.run.log_metrics(step, "train", loss_sum / n, 100.0 * wrong / n)
        running.zero_()
        if not self.is_main:
            return
        for split, (x, y) in (("valid", self.splits.valid), ("test", self.splits.test)):
            loss, err = evaluate(self.model, x, y, self.config.eval_batch_size)
            self.run.log_metrics(step, split, loss, err)
            if split == "test":
                self.last_test_error = err

    def checkpoint(self, at: int) -> None:
        # Collectives (every rank): move all ranks' statistics and running loss into rank 0.
        if self.world_size > 1:
            distributed.consolidate_stats(self.model.stats)
            distributed.all_reduce_sum_(self.running)
            if not self.is_main:
                self.running.zero_()
        if not self.is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "step": at,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "running": self.running.cpu(),
            "rng": rng,
            "logs": self.run.positions(step=at),
            "world_size": self.world_size,
        }
        if self.run.tb is not None:
            self.run.tb.flush()
        save_checkpoint(self.run.checkpoint_path, state)


def check_resume(
    run_dir: str | Path,
    config: TrainConfig,
    world_size: int,
    *,
    device: str | torch.device = "cpu",
    run: RunDir | None = None,
) -> dict:
    """Check that ``run_dir`` can be resumed with ``config`` on ``world_size`` processes,
    changing nothing; returns its checkpoint.

    Refused (:class:`~fastmlp.errors.UsageError` naming the file and what was expected): a
    checkpoint that cannot be read or is not ours; a ``config.json`` whose fields differ
    from the checkpoint's in anything but :func:`~fastmlp.config.resumable_fields`, or
    lacks one; another number of processes; ``steps`` below the checkpoint's step; logs
    edited since the checkpoint (:meth:`RunDir.verify`); a ``tb``/``figures`` file.
    """
    verify_logs = run is None or run.enabled  # (ranks that do not write the run: no logs)
    run = run if run is not None else RunDir(run_dir, enabled=False, tensorboard=config.tensorboard)
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if ckpt.get("version") != CHECKPOINT_VERSION or missing:
        raise CheckpointError(
            f"{ckpt_path} is not a version-{CHECKPOINT_VERSION} fastmlp checkpoint (version "
            f"{ckpt.get('version')!r}" + (f", no {', '.join(missing)})" if missing else ")")
        )
    step, saved_world, logs = ckpt["step"], ckpt.get("world_size", 1), ckpt["logs"]
    if not _is_count(step):
        raise CheckpointError(f"{ckpt_path} holds step {step!r}: expected an integer >= 0")
    if not _is_count(saved_world) or saved_world < 1:
        raise CheckpointError(
            f"{ckpt_path} holds world_size {saved_world!r}: expected a positive number of "
            "processes; the checkpoint is damaged"
        )
    if not isinstance(logs, dict) or not all(
        isinstance(logs.get(name), dict)
        and _is_count(logs[name].get("bytes"))
        and _is_count(logs[name].get("lines"))
        for name in LOG_FILES
    ):
        raise CheckpointError(
            f"{ckpt_path} holds log positions {str(logs)[:80]}: expected "
            f"{{file: {{bytes, lines}}}} with integers >= 0 for {', '.join(LOG_FILES)}; the "
            "checkpoint is damaged"
        )
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{ckpt_path} holds no configuration (a {type(ckpt['config'])})")
    _check_config_file(Path(run_dir), ckpt["config"], config)
    if step > config.steps:
        raise UsageError(
            f"{run_dir} is at step {step}, past --steps {config.steps}: give --steps "
            f">= {step} to extend it, or leave --steps out"
        )
    if saved_world != world_size:
        raise UsageError(
            f"{ckpt_path} was written by a run on {saved_world} process(es); resume it with "
            "the same number ("
            + ("no --nproc, or --nproc 1" if saved_world == 1 else f"--nproc {saved_world}")
            + f"), not {world_size}"
        )
    if verify_logs:
        run.verify(logs, step)
        run.check_paths(figures=config.figures)
    return ckpt


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_config_file(run_dir: Path, saved: dict | None, config: TrainConfig) -> None:
    """Refuse a ``config.json`` edited in a way a resume cannot honour.

    ``saved``: the checkpoint's configuration (``None``: no checkpoint, the run restarts
    from step 0 and every field takes effect). A field missing from ``config.json`` is
    refused (it would fall back to a default silently); with a checkpoint, a field that
    differs from it is refused unless it is resumable (it then takes effect).
    """
    path = run_dir / "config.json"
    written = RunDir(run_dir, enabled=False).read_config()
    required = set(saved) if saved is not None else set(TrainConfig.__dataclass_fields__)
    lost = sorted(required - set(written) - {"out"})
    if lost:
        was = f" (the checkpoint has {lost[0]} = {saved[lost[0]]!r})" if saved else ""
        raise UsageError(
            f"{path} has no {', '.join(lost)}{was}: a field deleted from it would fall back "
            "to its default; put it back to resume"
        )
    if saved is None:
        return
    free = set(resumable_fields()) | {"out"}
    changed = [
        f"{name} is {getattr(config, name)!r}, the run was trained with {saved[name]!r}"
        for name in TrainConfig.__dataclass_fields__
        if name not in free and name in saved and getattr(config, name) != saved[name]
    ]
    if changed:
        allowed = ", ".join(resumable_fields(flags_only=True))
        raise UsageError(
            f"{path}: cannot resume with a different configuration: {'; '.join(changed)} "
            f"(a resume changes only {allowed} and extra): restore the file, or start a "
            "new run with another --out"
        )


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
