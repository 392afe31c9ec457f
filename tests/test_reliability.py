"""Issue 14: a diverged run finishes and resumes, one process owns a run directory, a missing
checkpoint never silently restarts a run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastmlp
from fastmlp.cli import main
from fastmlp.jacobian import jacobian_singular_values
from fastmlp.run import LOG_FILES, CheckpointError, RunDirBusy, hold, load_checkpoint, read_jsonl
from fastmlp.train import TrainConfig, train

TINY = dict(depth=2, width=12, eval_every=5, probe_every=5, probe_size=20, valid_size=30,
            test_size=30, progress=False, tensorboard=False)  # fmt: skip


def _rows(run: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(run / name) for name in LOG_FILES}


# ------------------------------------------------------------ 2. non-finite monitoring


def test_jacobian_leaves_out_non_finite_examples() -> None:
    model = fastmlp.MLP(6, 3, depth=2, width=5, activation="tanh", seed=0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    clean = jacobian_singular_values(model, x[1:], max_examples=None)
    x[0, 2] = float("nan")
    rows = jacobian_singular_values(model, x, max_examples=None)
    for r, c in zip(rows, clean, strict=True):
        assert r["examples"] == 4 and r["nonfinite"] == 1 and c["nonfinite"] == 0
        for key in ("mean", "std", "min", "max", "median"):
            assert math.isclose(r[key], c[key], rel_tol=1e-4, abs_tol=1e-6), key
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("inf")
    rows = jacobian_singular_values(model, x, max_examples=None)
    # Layer 1's Jacobian holds Inf for every example; tanh(+-Inf) is finite, so layer 2 only
    # leaves out the NaN example.
    assert [r["nonfinite"] for r in rows] == [4, 1]
    assert all(rows[0][k] is None for k in ("mean", "std", "min", "max", "median"))
    assert rows[1]["mean"] is not None


def test_diverged_run_finishes_and_resumes(tmp_path: Path) -> None:
    """--lr 1e30: weights overflow to +-Inf/NaN; every monitoring step records it as non-finite
    (Jacobian, probe, evaluation) and the run ends, then --resume extends it."""
    kw = dict(TINY, activation="relu", lr=1e30, jacobian_every=10)
    run = train(TrainConfig(steps=20, out=str(tmp_path / "run"), **kw))
    train(TrainConfig(steps=30, out=str(run), **kw), resume=True)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 30
    rows = _rows(run)
    jac = [r for r in rows["jacobian.jsonl"] if r["step"] == 30]
    assert len(jac) == 2 and all(r["nonfinite"] == r["examples"] for r in jac)
    assert all(r["mean"] is None for r in jac)
    assert {m["step"] for m in rows["metrics.jsonl"]} == {0, 5, 10, 15, 20, 25, 30}
    last = [m for m in rows["metrics.jsonl"] if m["step"] == 30]
    assert all(m["loss"] is None for m in last)  # NaN loss, stored as JSON null
    probes = [r for r in rows["stats.jsonl"] if r["step"] == 30 and r["source"] == "probe"]
    assert probes and any(r["nonfinite"] for r in probes)


# ------------------------------------------------------------ 3. one process per run directory


def _spawn_train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastmlp", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait_for_rows(run: Path, proc: subprocess.Popen, name: str = "stats.jsonl") -> None:
    deadline = time.monotonic() + 120
    while not (run / name).exists() or not (run / name).stat().st_size:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.02)


LONG = ["--depth", "2", "--width", "12", "--eval-every", "5", "--probe-every", "5",
        "--probe-size", "20", "--valid-size", "30", "--test-size", "30", "--steps", "10000000",
        "--no-progress", "--no-tensorboard"]  # fmt: skip


def test_second_process_on_a_running_run_is_refused(tmp_path: Path) -> None:
    """Two `train --out RUN` started together: one trains, the other is refused with one line
    (exit 2). While it trains, `--resume RUN` is refused too and adds no row; once the first
    is killed, --resume works (the lock died with it)."""
    run = tmp_path / "run"
    procs = [_spawn_train(*LONG, "--out", str(run)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither process was refused"
            time.sleep(0.02)
        loser = next(p for p in procs if p.poll() is not None)
        first = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "already holds a run" in err or f"in use by process {first.pid}" in err, err
        _wait_for_rows(run, first)
        stats_before = (run / "stats.jsonl").read_bytes()
        res = subprocess.run(
            [sys.executable, "-m", "fastmlp", "train", "--resume", str(run), "--no-progress"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"{run} is in use by process {first.pid}" in lines[0]
        assert first.poll() is None, "the refused resume disturbed the running process"
        assert (run / "stats.jsonl").read_bytes().startswith(stats_before)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
    before = load_checkpoint(run / "checkpoint.pt")["step"]
    keys = [(r["step"], r["source"], r["layer"], r["quantity"])
            for r in read_jsonl(run / "stats.jsonl")]  # fmt: skip
    assert len(keys) == len(set(keys)), "rows were written twice"
    res = subprocess.run(
        [sys.executable, "-m", "fastmlp", "train", "--resume", str(run), "--no-progress",
         "--steps", str(before + 5)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == before + 5


def test_hold_is_exclusive_and_released(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with hold(run, new=True):
        with pytest.raises(RunDirBusy, match=f"{os.getpid()}"), hold(run, new=True):
            pass
        (run / "config.json").write_text("{}")
    with hold(run, new=False):  # released: a resume may take it
        pass
    with pytest.raises(FileExistsError, match="already holds a run"), hold(run, new=True):
        pass
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        with hold(tmp_path / "nothing", new=False):
            pass
    assert not (tmp_path / "nothing").exists()
    # A new run that fails before writing anything leaves no directory behind.
    with pytest.raises(RuntimeError), hold(tmp_path / "fails" / "run", new=True):
        raise RuntimeError("dataset missing")
    assert not (tmp_path / "fails").exists()


def test_nproc_resume_of_a_busy_run_is_refused_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = train(TrainConfig(steps=5, out=str(tmp_path / "run"), jacobian_every=-1, **TINY))
    with hold(run, new=False):
        assert main(["train", "--nproc", "2", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"in use by process {os.getpid()}" in err


# ------------------------------------------------------------ 4. missing checkpoint


def test_resume_without_checkpoint_past_step_0_refuses(tmp_path: Path) -> None:
    run = train(TrainConfig(steps=10, out=str(tmp_path / "run"), jacobian_every=-1, **TINY))
    (run / "checkpoint.pt").unlink()
    before = {name: (run / name).read_bytes() for name in LOG_FILES}
    with pytest.raises(CheckpointError, match="checkpoint.pt is missing but the logs .* step 10"):
        train(TrainConfig(steps=10, out=str(run), jacobian_every=-1, **TINY), resume=True)
    assert {name: (run / name).read_bytes() for name in LOG_FILES} == before


def test_resume_says_which_rows_it_drops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kw = dict(TINY, jacobian_every=-1)
    run = train(TrainConfig(steps=10, out=str(tmp_path / "run"), **kw))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step":11,"split":"test","loss":1.0,"error":2.0}\n{"step":12,')
    capsys.readouterr()
    train(TrainConfig(steps=10, out=str(run), **kw), resume=True)
    err = capsys.readouterr().err
    assert "metrics.jsonl: dropping 1 row(s)" in err and "after the last checkpoint" in err
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 10


def test_nproc_resume_below_the_current_step_is_refused_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = train(TrainConfig(steps=10, out=str(tmp_path / "run"), jacobian_every=-1, **TINY))
    assert main(["train", "--nproc", "2", "--resume", str(run), "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"fastmlp train: error: {run} is at step 10, past --steps 5: give --steps >= 10 to "
        "extend it, or leave --steps out"
    )
