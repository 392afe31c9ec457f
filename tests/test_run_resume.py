"""A run killed with SIGKILL at any moment and resumed logs every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmlp.run import LOG_FILES, RunDir, load_checkpoint, read_jsonl, save_checkpoint

ARGS = [
    "--depth", "3", "--width", "48", "--steps", "120", "--eval-every", "10",
    "--probe-every", "10", "--jacobian-every", "40", "--valid-size", "300", "--test-size", "300",
    "--probe-size", "100", "--seed", "3", "--lr", "0.05", "--no-progress", "--no-figures",
]  # fmt: skip


def _train(*extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastmlp", "train", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _rows(run: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(run / name) for name in LOG_FILES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    res = _train(*ARGS, "--out", str(run), "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    return run


def _kill_when(run: Path, proc: subprocess.Popen, stats_lines: int) -> None:
    deadline = time.monotonic() + 240
    while _lines(run / "stats.jsonl") < stats_lines:
        assert proc.poll() is None, f"run ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_and_resume_gives_every_row_exactly_once(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    expected = _rows(reference)
    per_probe = len([r for r in expected["stats.jsonl"] if r["step"] == 10])
    # Kill twice at different points (mid-way through a probe's rows, then later), resume each time.
    for target in (per_probe * 2 + 5, per_probe * 7 + 11):
        proc = (
            _train(*ARGS, "--out", str(run), wait=False)
            if target == per_probe * 2 + 5
            else (_train("--resume", str(run), "--no-progress", wait=False))
        )
        _kill_when(run, proc, target)
        ckpt = load_checkpoint(run / "checkpoint.pt")
        assert 0 <= ckpt["step"] < 120
    res = _train("--resume", str(run), "--no-progress")
    assert res.returncode == 0, res.stderr
    got = _rows(run)
    for name in LOG_FILES:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"
    keys = [(r["step"], r["source"], r["layer"], r["quantity"]) for r in got["stats.jsonl"]]
    assert len(keys) == len(set(keys))
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 120
    assert any((run / "tb").iterdir())


def test_resume_refuses_configuration_flags(reference: Path) -> None:
    res = _train("--resume", str(reference), "--width", "10")
    assert res.returncode == 2
    assert "--width" in res.stderr


def test_resume_of_a_finished_run_changes_nothing(reference: Path) -> None:
    before = {name: (reference / name).read_bytes() for name in LOG_FILES}
    res = _train("--resume", str(reference), "--no-progress", "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    assert {name: (reference / name).read_bytes() for name in LOG_FILES} == before


def test_save_checkpoint_is_atomic_and_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.arange(3), "step": 7})
    save_checkpoint(path, {"x": torch.arange(4), "step": 8})
    state = load_checkpoint(path)
    assert state["step"] == 8 and state["x"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler during the test, also where the suite runs as a shell's
    background job (which starts with SIGINT ignored)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_ctrl_c_in_the_middle_of_a_checkpoint_write_lets_it_finish(
    tmp_path, monkeypatch, python_ctrl_c
):
    """SIGINT arriving inside torch.save's write: the C++ writer would turn the interrupt
    into a RuntimeError ("unexpected pos") and the CLI would report a failure (exit 1);
    the write finishes, then KeyboardInterrupt is raised, and the new checkpoint is whole."""
    import fastmlp.run as run_module

    real_save = torch.save
    sent = []

    class Interrupting:  # a file whose first write gets Ctrl-C, as a user's would
        def __init__(self, f):
            self._f = f

        def write(self, data):
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs here, inside the writer's call
            return self._f.write(data)

        def flush(self):
            return self._f.flush()

    monkeypatch.setattr(run_module.torch, "save", lambda obj, f: real_save(obj, Interrupting(f)))
    path = tmp_path / "c.pt"
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"x": x, "step": 9})
    assert sent
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 9 and torch.equal(state["x"], x)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_open_truncates_rows_written_after_the_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path, tensorboard=False).open(None)
    run.log_metrics(0, "test", 1.0, 50.0)
    positions = run.positions()
    run.log_metrics(1, "test", 0.5, 25.0)
    run.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "spl')  # a half-written row from a killed writer
    RunDir(tmp_path, tensorboard=False).open(positions).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 0, "split": "test", "loss": 1.0, "error": 50.0}
    ]
    positions["metrics.jsonl"]["lines"] = 5
    with pytest.raises(RuntimeError, match="lines"):
        RunDir(tmp_path, tensorboard=False).open(positions)


def test_resume_with_more_steps_extends_the_run(tmp_path: Path) -> None:
    from fastmlp.train import TrainConfig, train

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(depth=2, width=12, eval_every=10, probe_every=10, probe_size=40,
                  valid_size=50, test_size=50, jacobian_every=-1, progress=False,
                  tensorboard=False, figures=False)  # fmt: skip
        whole = train(TrainConfig(steps=40, out=str(tmp_path / "whole"), **kw))
        part = train(TrainConfig(steps=20, out=str(tmp_path / "part"), **kw))
        train(TrainConfig(steps=40, out=str(part), **kw), resume=True)
    finally:
        torch.set_num_threads(saved)
    assert _rows(part) == _rows(whole)
    assert json.loads((part / "config.json").read_text())["steps"] == 40


def test_resume_before_the_first_checkpoint_starts_over(tmp_path: Path) -> None:
    from fastmlp.train import TrainConfig, train

    kw = dict(depth=1, width=8, steps=10, eval_every=5, probe_every=5, probe_size=20,
              valid_size=30, test_size=30, jacobian_every=-1, progress=False,
              tensorboard=False, figures=False)  # fmt: skip
    ref = train(TrainConfig(out=str(tmp_path / "ref"), **kw))
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), **kw))
    # As if killed during the step-0 monitoring: no checkpoint, logs up to part of step 0.
    (run / "checkpoint.pt").unlink()
    for name in LOG_FILES:
        kept = [line for line in (run / name).read_text().splitlines() if '"step":0,' in line]
        (run / name).write_text("".join(line + "\n" for line in kept[:3]))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 0, "spl')
    train(TrainConfig(out=str(run), **kw), resume=True)
    assert _rows(run) == _rows(ref)
