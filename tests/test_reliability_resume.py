"""Issue 27 (part A): what a resume reads takes effect or is refused, logs are verified before
a resume appends to them, ``plot --out`` holds every figure, and the command answers Ctrl-C
and SIGTERM at any moment with one line and its exit status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmlp.cli import main
from fastmlp.plot import FIGURES
from fastmlp.run import LOG_FILES, load_checkpoint, read_jsonl

FLAGS = ["--depth", "2", "--width", "12", "--eval-every", "5", "--probe-every", "5",
         "--probe-size", "20", "--valid-size", "30", "--test-size", "30", "--no-progress",
         "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-step run (copied by each test, never changed)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FLAGS, "--steps", "10", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def _write_config(run: Path, config: dict) -> None:
    (run / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------- config edited before a resume


def test_resumable_fields_edited_in_config_json_take_effect(run: Path) -> None:
    """steps (how far to go) and extra (labels) change only the future: edited in config.json
    they take effect, and the checkpoint and config.json record them."""
    config = _config(run)
    config.update(steps=15, extra={"label": "edited"})
    _write_config(run, config)
    assert main(["train", "--resume", str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 15 and ckpt["config"]["extra"] == {"label": "edited"}
    assert _config(run)["steps"] == 15
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 15


def test_every_non_resumable_field_edited_is_refused_by_name(
    run: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each field a resume cannot honour, edited alone, is refused naming it; nothing changes."""
    from fastmlp.config import TrainConfig, resumable_fields

    original = _config(run)
    before = {n: (run / n).read_bytes() for n in (*LOG_FILES, "checkpoint.pt")}
    edits = {"lr": 0.07, "eval_every": 7, "probe_every": 3, "jacobian_every": -1,
             "eval_batch_size": 7, "train_stats": False, "probe_histograms": False,
             "backend": "torch", "checkpoint_every": 2, "data_dir": "elsewhere",
             "jacobian_examples": 2, "train_histograms": True, "download": True}  # fmt: skip
    fixed = set(TrainConfig.__dataclass_fields__) - set(resumable_fields()) - {"out"}
    assert set(edits) <= fixed
    for name, value in edits.items():
        assert original[name] != value, name
        _write_config(run, {**original, name: value})
        assert main(["train", "--resume", str(run), "--steps", "20"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{name} is {value!r}, the run was trained with {original[name]!r}" in err, err
    _write_config(run, original)
    assert {n: (run / n).read_bytes() for n in before} == before


# ------------------------------------------------------------------ logs on resume


def test_checkpoint_records_a_hash_of_every_log(run: Path) -> None:
    logs = load_checkpoint(run / "checkpoint.pt")["logs"]
    for name in LOG_FILES:
        data = (run / name).read_bytes()[: logs[name]["bytes"]]
        assert logs[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert logs[name]["lines"] == data.count(b"\n")


def _without_hashes(run: Path) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for pos in state["logs"].values():
        del pos["sha256"], pos["step"]
    torch.save(state, run / "checkpoint.pt")


def test_checkpoint_without_hashes_resumes_and_its_logs_are_still_checked(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint written before the hashes: it resumes (exactly, as a hashed one), and a
    garbage line before its offset is still refused with its line number."""
    hashed = tmp_path / "hashed"
    shutil.copytree(run, hashed)
    _without_hashes(run)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    assert main(["train", "--resume", str(run), "--steps", "20"]) == 0
    assert main(["train", "--resume", str(hashed), "--steps", "20"]) == 0
    for name in LOG_FILES:
        assert (run / name).read_bytes() == (hashed / name).read_bytes(), name
    lines = (broken / "stats.jsonl").read_bytes().split(b"\n")
    (broken / "stats.jsonl").write_bytes(b"\n".join([*lines[:5], b"oops", *lines[5:]]))
    capsys.readouterr()
    assert main(["train", "--resume", str(broken), "--steps", "20"]) == 2
    assert "stats.jsonl line 6 is not a JSON row" in capsys.readouterr().err


# ------------------------------------------------------------------------------ plot --out


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def test_plot_out_holds_every_figure_and_leaves_the_run_alone(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _tree(run)
    out = tmp_path / "figs"
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / name) for name in FIGURES)
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)
    assert _tree(run) == before  # nothing written into the run (it may be read-only)
    # Two runs: each run's figures in its own folder under --out, the overlay beside them.
    other = tmp_path / "other" / "run"
    shutil.copytree(run, other)
    both = tmp_path / "both"
    assert main(["plot", str(run), str(other), "--out", str(both)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 * len(FIGURES) + 1 and all(p.startswith(str(both)) for p in printed)
    assert (both / "fig11_test_error_all.png").is_file()
    assert sorted(p.name for p in (both / "run-2").iterdir()) == sorted(FIGURES)
    assert _tree(run) == before


# ------------------------------------------------------------------- signals (subprocess)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen:
    # SIGINT as a terminal delivers it, also when this suite runs as a background job (whose
    # children inherit an ignored SIGINT from the shell); a process group of its own, as a
    # terminal's job has (Ctrl-C reaches every process of it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "fastmlp", "train", *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
        start_new_session=True,
    )  # fmt: skip


def _after_checkpoint(run: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return err


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGINT, 130, "fastmlp: interrupted"),
     (signal.SIGTERM, 143, "fastmlp: terminated (SIGTERM)")],
    ids=["ctrl-c", "sigterm"],
)  # fmt: skip
def test_a_signal_during_the_imports_is_one_line_and_its_status(
    tmp_path: Path, signum: int, status: int, line: str
) -> None:
    proc = _start(*FLAGS, "--steps", "5", "--out", str(tmp_path / "run"))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    # Until torch's library is loaded (fastmlp imports it after its first line; the rest
    # of the imports take a second or more), or where there is no /proc, a short while.
    while maps.exists() and "libtorch" not in maps.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    if not maps.exists():
        time.sleep(0.5)
    proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == status, err
    assert err.strip().splitlines() == [line], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "whole_group", "status", "said"),
    [(signal.SIGINT, True, 130, "interrupted"),
     (signal.SIGTERM, False, 143, "terminated (SIGTERM)")],
    ids=["ctrl-c-to-the-job", "sigterm-to-the-launcher"],
)  # fmt: skip
def test_a_signal_to_an_nproc_2_run_is_one_line(
    tmp_path: Path, signum: int, whole_group: bool, status: int, said: str
) -> None:
    """``fastmlp train --nproc 2``: Ctrl-C (every process of the job gets SIGINT) or SIGTERM
    to the launcher alone: one line, from the launcher, none from rank 0 or torchrun's agent."""
    run = tmp_path / "run"
    proc = _start(*FLAGS, "--nproc", "2", "--steps", "100000000", "--out", str(run))
    _after_checkpoint(run, proc)
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == status, err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert err.strip().splitlines() == [
        f"fastmlp train: {said}; {run}/checkpoint.pt (step {step}) is intact: "
        f"continue with fastmlp train --resume {run}"
    ], err


def test_sigterm_says_where_the_run_stands_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(*FLAGS, "--steps", "100000000", "--out", str(run))
    _after_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert err.strip() == (
        f"fastmlp train: terminated (SIGTERM); {run}/checkpoint.pt (step {step}) is intact: "
        f"continue with fastmlp train --resume {run}"
    )


def test_repeated_ctrl_c_is_still_one_line_and_130(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(*FLAGS, "--steps", "100000000", "--out", str(run))
    _after_checkpoint(run, proc)
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastmlp train: interrupted; "), err


def test_output_closed_early_ends_quietly(finished: Path) -> None:
    """``fastmlp diagnose RUN | head``: stdout closed before the command writes: no error
    line, the status a shell gives a process ended by SIGPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run(
            [sys.executable, "-P", "-m", "fastmlp", "diagnose", str(finished)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert res.returncode == 141 and res.stderr == "", res.stderr
