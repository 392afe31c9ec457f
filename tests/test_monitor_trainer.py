"""One path for recording and logging: what ``fastmlp train`` needs of :class:`fastmlp.Monitor`
(labels by the steps done, a final window cut short, the tripwire read at other host reads,
resuming mid-window), and the run directory as a writer (:class:`fastmlp.run.RunWriter`)
writing the rows and histograms the writers write. The trainer's rows against the old path
are checked by tests/test_train.py, test_run_resume.py and test_distributed.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmlp
from fastmlp import writers
from fastmlp.run import RunDir, RunWriter, load_checkpoint
from fastmlp.train import TrainConfig, _Monitor, train
from fastmlp.writers.base import json_safe

IN, WIDTH, OUT, BATCH = 10, 12, 3, 6


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, OUT)
    )
    return fastmlp.instrument(net, stats_in_state_dict=True)


def _batches(n: int, seed: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(n):
        x = torch.randn(BATCH, IN, generator=g)
        if s == nan_at:
            x[1, 2] = float("nan")
        out.append((x, torch.randint(0, OUT, (BATCH,), generator=g)))
    return out


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_done_labels_and_flush_log_what_a_manual_loop_logs(tmp_path):
    """label="done": a window is logged under the steps done at its end (5, 10), and flush()
    logs the window cut short by the end (12): the rows of a loop that snapshots and resets
    by hand at those steps, recording every step (as fastmlp train did)."""
    seed, steps, every = 11, 12, 5
    data = _batches(steps, seed)
    model = _model(seed)
    monitor = fastmlp.Monitor(
        model,
        every=every,
        window=every,
        label="done",
        writers=[writers.JSONL(tmp_path / "monitor.jsonl")],
        diagnose=False,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    for x, y in data:
        _sgd_step(model, opt, x, y)
        if monitor.step() is not None:
            logged.append(monitor.global_step)
    assert logged == [5, 10]
    assert monitor.flush() is not None
    assert monitor.flush() is None  # nothing recorded since
    monitor.close()

    hand = _model(seed)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    stats = fastmlp.stats_of(hand)
    expected = []
    for step, (x, y) in enumerate(data, 1):
        _sgd_step(hand, opt, x, y)
        if step % every == 0 or step == steps:
            expected += [
                json_safe({"step": step, "source": "train", **r}) for r in stats.snapshot().rows()
            ]
            stats.reset()
    got = _rows(tmp_path / "monitor.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert got == expected


class _Collect:
    """A writer that keeps the steps it was given."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def write(self, step: int, snapshot: fastmlp.Snapshot) -> None:
        self.steps.append(step)

    def close(self) -> None:
        pass


def test_flush_under_first_labels_and_after_a_full_window():
    model = _model(3)
    monitor = fastmlp.Monitor(model, every=5, window=3, diagnose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s, (x, y) in enumerate(_batches(12, 3)):
        _sgd_step(model, opt, x, y)
        snap = monitor.step()
        if s == 7:  # the window 5..7 is complete: logged, nothing pending
            assert snap is not None and monitor.flush() is None
    # Steps 10 and 11 of the window 10..12 were recorded: logged under step 10.
    written = _Collect()
    monitor.writers.append(written)
    snap = monitor.flush()
    assert written.steps == [10]
    assert snap["0"]["preactivation"].count == 2 * BATCH * WIDTH
    with pytest.raises(ValueError, match="label must be one of"):
        fastmlp.Monitor(_model(3), label="last")


def test_check_nonfinite_sees_the_step_in_progress_and_reports_once():
    """A NaN in the 3rd step's input: check_nonfinite() before that step's monitor.step()
    names step 3 (steps counted from 1 under label="done"), calls on_nonfinite once; the log
    at the window's end reports nothing again."""
    model = _model(5)
    hits = []
    monitor = fastmlp.Monitor(model, every=4, window=4, label="done", diagnose=False,
                              on_nonfinite=hits.append)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s, (x, y) in enumerate(_batches(8, 5, nan_at=2)):
        _sgd_step(model, opt, x, y)
        hit = monitor.check_nonfinite()
        assert (hit is None) == (s < 2)
        monitor.step()
    assert len(hits) == 1
    assert hits[0].step == 3 and hits[0].layer == 1 and hits[0].quantity == "preactivation"

    def stop(hit):
        raise KeyboardInterrupt(str(hit))

    model = _model(5)
    monitor = fastmlp.Monitor(model, every=4, window=4, label="done", diagnose=False,
                              on_nonfinite=stop)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt, match="step 3"):  # out of step(), at its log
        for x, y in _batches(8, 5, nan_at=2):
            _sgd_step(model, opt, x, y)
            monitor.step()


def test_resume_mid_window_keeps_the_statistics_and_writes_the_same_rows(tmp_path):
    """A checkpoint at step 7 (model with its statistics, in the middle of the window 6..10),
    loaded into a new model and monitor with resume(7): the rows written are those of the run
    never interrupted, byte for byte, the window's first steps included (load_state_dict
    would start the window over; and the CPU path's centring hints come with the model)."""
    seed, steps = 7, 13
    data = _batches(steps, seed)

    def run(model, monitor, opt, batches):
        for x, y in batches:
            _sgd_step(model, opt, x, y)
            monitor.step()

    def monitor_for(model, path):
        return fastmlp.Monitor(model, every=5, window=5, label="done", diagnose=False,
                               writers=[writers.JSONL(path)])  # fmt: skip

    model = _model(seed)
    whole = monitor_for(model, tmp_path / "whole.jsonl")
    run(model, whole, torch.optim.SGD(model.parameters(), lr=0.1), data)
    whole.flush()
    whole.close()

    model = _model(seed)
    first = monitor_for(model, tmp_path / "cut.jsonl")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, first, opt, data[:7])
    first.close()
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))

    again = _model(seed + 1)  # other weights: everything comes from the checkpoint
    monitor = monitor_for(again, tmp_path / "cut.jsonl")
    again.load_state_dict(state[0])
    opt = torch.optim.SGD(again.parameters(), lr=0.1)
    opt.load_state_dict(state[1])
    monitor.resume(7)
    assert monitor.global_step == 7 and monitor.recording
    with pytest.raises(ValueError, match="integer >= 0"):
        monitor.resume(-1)
    run(again, monitor, opt, data[7:])
    monitor.flush()
    monitor.close()
    cut = _rows(tmp_path / "cut.jsonl")
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted({r["step"] for r in cut}) == [5, 10, 13]
    pre = [r for r in cut if r["step"] == 10 and r["quantity"] == "preactivation"]
    assert pre[0]["count"] == 5 * BATCH * WIDTH  # steps 6..10, two of them before the cut


def _snapshot(seed: int) -> fastmlp.Snapshot:
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(3, seed, nan_at=1):  # a NaN: non-finite figures as null
        _sgd_step(model, opt, x, y)
    return fastmlp.stats_of(model).snapshot()


def test_run_writer_writes_the_jsonl_writers_rows_under_the_run_positions(tmp_path):
    snap = _snapshot(13)
    jsonl = writers.JSONL(tmp_path / "rows.jsonl")
    jsonl.write(9, snap)
    jsonl.close()
    run = RunDir(tmp_path / "run", tensorboard=False).open(None)
    writer = RunWriter(run)
    assert isinstance(writer, writers.Writer)
    writer.write(9, snap)
    writer.close()
    pos = run.positions()["stats.jsonl"]
    run.close()
    data = (tmp_path / "run" / "stats.jsonl").read_bytes()
    assert data == (tmp_path / "rows.jsonl").read_bytes()
    assert b"null" in data
    assert pos["bytes"] == len(data) and pos["lines"] == len(snap.rows())


def test_run_dir_histograms_are_the_tensorboard_writers(tmp_path):
    """The run directory's TensorBoard histograms go through writers.tensorboard's code:
    the same buckets, count, sum and sum of squares as the TensorBoard writer's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    snap = _snapshot(17)
    run = RunDir(tmp_path / "run").open(None)
    if run.tb is None:
        pytest.skip("tensorboard is not importable")
    RunWriter(run).write(4, snap)
    run.close()
    tb = writers.TensorBoard(tmp_path / "tb")
    tb.write(4, snap)
    tb.close()

    def histograms(logdir):
        acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
        acc.Reload()
        return {t: acc.Histograms(t) for t in acc.Tags()["histograms"]}

    ours, theirs = histograms(tmp_path / "run" / "tb"), histograms(tmp_path / "tb")
    assert theirs and len(ours) == len(theirs)
    for tag, events in theirs.items():
        _, path, quantity = tag.split("/")
        (mine,) = ours[f"train/{path}/{quantity}"]
        (event,) = events
        assert mine.step == event.step == 4
        assert mine.histogram_value == event.histogram_value, tag


def test_trainer_killed_mid_window_resumes_with_the_same_rows(tmp_path, monkeypatch):
    """fastmlp train stopped after step 14 (its checkpoint at step 12, in the middle of the
    probe window 11..15) and resumed writes the rows of the run never stopped, byte for byte:
    the window's train rows at step 15 cover steps 11..15 exactly as recorded without the
    stop (the statistics and centring hints come back with the model)."""
    tiny = dict(depth=2, width=12, eval_every=4, probe_every=5, jacobian_every=-1,
                probe_size=20, valid_size=30, test_size=30, progress=False,
                tensorboard=False, figures=False, steps=20)  # fmt: skip
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **tiny))

    after_step = _Monitor.after_step

    def stop_at_14(self, step, *args):
        after_step(self, step, *args)
        if step == 14:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Monitor, "after_step", stop_at_14)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **tiny))
    monkeypatch.setattr(_Monitor, "after_step", after_step)
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 12
    train(TrainConfig(out=str(cut), **tiny), resume=True)
    for name in ("stats.jsonl", "metrics.jsonl"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    steps = {r["step"] for r in _rows(cut / "stats.jsonl") if r["source"] == "train"}
    assert steps == {5, 10, 15, 20}
