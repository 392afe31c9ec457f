"""``Monitor``: record a model's statistics on a cadence and hand each snapshot to writers.

The one object a training loop needs::

    monitor = fastmlp.Monitor(model, every=100, writers=[fastmlp.writers.TensorBoard("tb")])
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        monitor.step()

Steps are numbered from 0 (``monitor.global_step``: the step being run). Steps ``0, N, 2N,
...`` (and the ``window - 1`` steps after each) are recorded; on every other step the layers
run with statistics off (``StatsConfig.enabled = False``: a plain pass, no statistics work).
After the last step of a window :meth:`Monitor.step` takes the snapshot (merged across ranks
when a process group is initialized: every rank must call it), hands it to the writers (on
rank 0 only) at the window's first step, resets the statistics, warns once of each new
finding of the diagnosis (:mod:`fastmlp.stats.diagnosis`, with its evidence) and of the first
non-finite value (the tripwire, on whatever ``diagnose`` says; it sees the recorded steps,
as nothing is counted in between: a non-finite value that persists, such as a NaN weight,
is caught at the next recorded step).

A trainer that counts its steps from 1 and labels a window by the steps done when it ends
(as ``fastmlp train`` does) passes ``label="done"``; it calls :meth:`Monitor.flush` to log a
window cut short by the end of training, :meth:`Monitor.check_nonfinite` at its other host
reads, and :meth:`Monitor.resume` after loading a checkpoint taken in the middle of a window.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn
from torch.distributed import ProcessGroup

from fastmlp.distributed import unwrap
from fastmlp.instrument import instrument
from fastmlp.model_stats import ModelStats, instrumented_layers
from fastmlp.stats.config import GROUPS, StatsConfig
from fastmlp.stats.diagnosis import SEVERITIES, Finding
from fastmlp.stats.ranks import rank_world
from fastmlp.stats.snapshot import Snapshot
from fastmlp.tripwire import NonFinite, Tripwire
from fastmlp.writers.base import Writer

__all__ = ["LABELS", "Monitor", "NonFiniteError"]

#: How a log is labelled: ``"first"``, the window's first step (steps numbered from 0), or
#: ``"done"``, the number of steps done when the window ends (steps numbered from 1).
LABELS = ("first", "done")


class NonFiniteError(RuntimeError):
    """A non-finite value was recorded and the monitor was told to stop
    (``on_nonfinite="raise"``)."""

    def __init__(self, hit: NonFinite) -> None:
        super().__init__(str(hit))
        self.hit = hit


def _finding_key(f: Finding) -> tuple:
    return (f.code, f.layer, f.name, f.quantity)


class Monitor:
    """Record the statistics of ``model`` every ``every`` steps and send them to ``writers``.

    Args:
        model: the model (a DDP wrapper is looked through). Instrumented in place with
            :func:`fastmlp.instrument` (``config`` and ``groups`` applied) when it holds no
            instrumented layer yet.
        every: record and log every ``every`` steps (steps 0, every, 2 every, ...).
        writers: where snapshots go (:class:`fastmlp.writers.Writer`: ``TensorBoard``,
            ``Wandb``, ``MLflow``, ``JSONL``, or your own); written by rank 0 only.
        window: consecutive steps recorded per log (1 to ``every``), logged at the first.
        label: the step a log is written under (:data:`LABELS`): ``"first"`` (default), the
            window's first step; ``"done"``, the number of steps done at the window's end
            (its last step counted from 1, as ``fastmlp train`` labels its rows; the
            tripwire then names a step by the same count).
        groups: opt-in statistic groups to switch on (:data:`fastmlp.stats.config.GROUPS`:
            ``zeros``, ``moments4``, ``per_unit``, ``exponents``).
        config: what the layers record (a :class:`~fastmlp.StatsConfig`; ``enabled`` is the
            monitor's to switch). Applied to an already instrumented model too.
        diagnose: run the diagnosis at each log and warn once of each new finding of at
            least ``min_severity``.
        min_severity: ``"info"``, ``"warning"`` (default) or ``"error"``.
        thresholds: overrides of the diagnosis thresholds (:class:`~fastmlp.Thresholds`).
        on_nonfinite: ``"warn"`` (default: once, naming the first step, layer and quantity),
            ``"raise"`` (:class:`NonFiniteError` from :meth:`step`), or a function called
            once with the first hit (:class:`~fastmlp.tripwire.NonFinite`; whatever it
            raises comes out of :meth:`step`).
        group: the process group to merge over (default: the world, when initialized).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        writers: Iterable[Writer] = (),
        *,
        window: int = 1,
        label: str = "first",
        groups: Sequence[str] = (),
        config: StatsConfig | None = None,
        diagnose: bool = True,
        min_severity: str = "warning",
        thresholds: dict[str, float] | None = None,
        on_nonfinite: str | Callable[[NonFinite], None] = "warn",
        group: ProcessGroup | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor watches an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= every:
            raise ValueError(f"window must be an integer in [1, every={every}], got {window!r}")
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown statistic groups {unknown}; expected some of {GROUPS}")
        if config is not None and not isinstance(config, StatsConfig):
            raise TypeError(f"config must be a StatsConfig, got {type(config).__name__}")
        if min_severity not in SEVERITIES:
            raise ValueError(f"min_severity must be one of {SEVERITIES}, got {min_severity!r}")
        if not callable(on_nonfinite) and on_nonfinite not in ("warn", "raise"):
            raise ValueError(
                f"on_nonfinite must be 'warn', 'raise' or a function, got {on_nonfinite!r}"
            )
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        self.writers: list[Writer] = list(writers)
        for w in self.writers:
            if not callable(getattr(w, "write", None)):
                raise TypeError(f"a writer needs write(step, snapshot); got {type(w).__name__}")
        self.every, self.window, self.label = every, window, label
        self.diagnose, self.min_severity = diagnose, min_severity
        self.thresholds = dict(thresholds or {})
        self.on_nonfinite, self.group = on_nonfinite, group

        inner = unwrap(model)
        options = {g: True for g in groups}
        if not instrumented_layers(inner):
            if not list(inner.children()):
                raise ValueError(
                    f"Monitor cannot instrument a bare {type(inner).__name__} in place: "
                    "instrument it first (layer = fastmlp.instrument(layer)) and monitor that"
                )
            instrument(inner, config=(config or StatsConfig()).replace(enabled=True, **options))
            if not instrumented_layers(inner):
                raise ValueError(
                    f"Monitor found no dense layer to instrument in {type(inner).__name__} "
                    "(fastmlp instruments nn.Linear and Hugging Face Conv1D layers)"
                )
        else:
            changes = {} if config is None else {f: getattr(config, f) for f in _CONFIGURABLE}
            changes.update(options)
            if changes:
                ModelStats(inner).configure(**changes)
        self.model = inner
        self.stats = ModelStats(inner)
        self.tripwire = Tripwire(inner)
        #: The step being run (steps completed so far).
        self.global_step = 0
        #: Every finding of the diagnosis so far, first occurrence only (rank 0).
        self.findings: list[Finding] = []
        #: The last logged snapshot (every rank), or ``None``.
        self.last_snapshot: Snapshot | None = None
        self._seen: set[tuple] = set()
        self._nonfinite: NonFinite | None = None
        self._closed = False
        self._recording: bool | None = None
        self._flushed: int | None = None  # global_step of the last flush()
        self.stats.reset()  # a window starts clean
        self.tripwire.rebase()
        self.arm()

    # ------------------------------------------------------------------ cadence
    def recorded(self, step: int) -> bool:
        """Whether ``step`` is recorded: ``step % every < window``."""
        return step % self.every < self.window

    @property
    def recording(self) -> bool:
        """Whether the layers record statistics now."""
        return bool(self._recording)

    def _record(self, on: bool) -> None:
        if on != self._recording:
            self.stats.configure(enabled=on)
            self._recording = on

    def arm(self, step: int | None = None) -> None:
        """Switch recording on or off for the step about to run (``step``, or
        :attr:`global_step`), as the cadence says. Callbacks call it at each step's start,
        with the trainer's step; a plain loop never needs to."""
        if step is not None:
            self.global_step = int(step)
        self._record(self.recorded(self.global_step))

    def pause(self) -> None:
        """Switch recording off until the next :meth:`arm` or :meth:`step` (e.g. around an
        evaluation pass between training steps)."""
        self._record(False)

    def step(self) -> Snapshot | None:
        """The training step :attr:`global_step` is done (call it after the optimizer step,
        on every rank): log when it ends a window, then go on to the next step.

        Returns the logged snapshot, or ``None`` where nothing was logged.
        """
        if self._closed:
            raise RuntimeError("Monitor.step() after close()")
        s = self.global_step
        snap = None
        if self._recording:
            self.tripwire.update(self._number(s))  # device ops only
            if s % self.every == self.window - 1:
                snap = self._log(s - self.window + 1 if self.label == "first" else s + 1)
        self.global_step = s + 1
        self.arm()
        return snap

    def _number(self, step: int) -> int:
        """Step ``step`` (counted from 0) as the labels count it."""
        return step if self.label == "first" else step + 1

    def flush(self) -> Snapshot | None:
        """Log now what was recorded since the last log: a window cut short (at the end of
        training), labelled as :meth:`step` labels it (its first step, or the steps done).
        Every rank calls it. Returns the logged snapshot, or ``None`` where nothing was
        recorded since the last log."""
        if self._closed:
            raise RuntimeError("Monitor.flush() after close()")
        done = self.global_step
        last = done - 1  # the last step run
        if (
            done == 0
            or self._flushed == done
            or not self.recorded(last)
            or last % self.every == self.window - 1  # logged by step()
        ):
            return None
        self._flushed = done
        return self._log(last - last % self.every if self.label == "first" else done)

    def check_nonfinite(self) -> NonFinite | None:
        """Read the tripwire now (one host read), the step being run included (what it
        recorded so far, e.g. before :meth:`step` is called for it), and report a first
        non-finite value not reported yet, as ``on_nonfinite`` says (a log reads it anyway).
        Returns the first hit so far, or ``None``."""
        if self._closed:
            raise RuntimeError("Monitor.check_nonfinite() after close()")
        if self._recording:
            self.tripwire.update(self._number(self.global_step))  # (step() finds nothing new)
        hit = self.tripwire.read()
        self._report(hit, stacklevel=3)
        return hit

    def resume(self, step: int) -> None:
        """Continue at ``step`` with the statistics the model holds now (loaded with its
        ``state_dict`` from a checkpoint taken in the middle of a window): the next log
        covers them too. Non-finite values counted before are not news to the tripwire.
        (:meth:`load_state_dict` instead starts the window over from empty statistics.)"""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"resume needs the steps done, an integer >= 0; got {step!r}")
        self.tripwire = Tripwire(self.model)  # its baseline: the counts there now
        self._flushed = None
        self.arm(step)

    # ------------------------------------------------------------------ logging
    def _log(self, step: int) -> Snapshot:
        snap = self.stats.snapshot(group=self.group)
        hit = self.tripwire.read()
        self.stats.reset()
        self.tripwire.rebase()
        main = rank_world()[0] == 0
        self.last_snapshot = snap
        if main:
            for w in self.writers:
                w.write(step, snap)
            if self.diagnose:
                self._warn_findings(step, snap)
        self._report(hit, stacklevel=4)
        return snap

    def _report(self, hit: NonFinite | None, *, stacklevel: int) -> None:
        """Report the first non-finite value, once (``stacklevel``: the user's frame)."""
        if hit is None or self._nonfinite is not None:
            return
        self._nonfinite = hit
        if callable(self.on_nonfinite):
            self.on_nonfinite(hit)
        elif self.on_nonfinite == "raise":
            raise NonFiniteError(hit)
        else:
            rank, world = rank_world()
            where = f" (rank {rank})" if world > 1 else ""
            warnings.warn(f"fastmlp.Monitor: {hit}{where}", RuntimeWarning, stacklevel=stacklevel)

    def _warn_findings(self, step: int, snap: Snapshot) -> None:
        floor = SEVERITIES.index(self.min_severity)
        for f in snap.diagnose(**self.thresholds):
            key = _finding_key(f)
            if key in self._seen:
                continue
            self._seen.add(key)
            self.findings.append(f)
            # Non-finite values are the tripwire's to report (the first one, once).
            if f.rank >= floor and f.code != "nonfinite":
                evidence = json.dumps(f.to_dict()["evidence"], sort_keys=True)
                warnings.warn(
                    f"fastmlp.Monitor at step {step}: {f.severity} {f.code}"
                    f"{'' if f.layer is None else f' layer {f.layer}'}"
                    f"{f' ({f.name})' if f.name else ''}: {f.message} {evidence}",
                    RuntimeWarning,
                    stacklevel=4,
                )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step counter and the findings already warned of."""
        return {
            "global_step": self.global_step,
            "findings": [f.to_dict() for f in self.findings],
            "nonfinite": None if self._nonfinite is None else vars(self._nonfinite).copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state: the next step is the one after the saved run's
        last (the statistics recorded since that run's last log are not restored)."""
        if "global_step" not in state:
            raise ValueError(f"not a Monitor state (no global_step): keys {sorted(state)}")
        self.findings = [Finding.from_dict(d) for d in state.get("findings", [])]
        self._seen = {_finding_key(f) for f in self.findings}
        nf = state.get("nonfinite")
        self._nonfinite = None if nf is None else NonFinite(**nf)
        self.stats.reset()
        self.tripwire.rebase()
        self._flushed = None
        self.arm(int(state["global_step"]))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the writers and leave the statistics on (the model records every step again,
        as an instrumented model does by default)."""
        if self._closed:
            return
        self._closed = True
        self._record(True)
        errors = []
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # close the others anyway
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(every={self.every}, window={self.window}, label={self.label!r}, "
            f"step={self.global_step}, "
            f"writers={[type(w).__name__ for w in self.writers]})"
        )


# StatsConfig fields a monitor applies to an instrumented model (``bins`` is fixed when a
# layer is built; ``enabled`` is the monitor's).
_CONFIGURABLE = tuple(f for f in StatsConfig.__dataclass_fields__ if f not in ("bins", "enabled"))
