"""Every error a user can cause ends in one line on stderr naming what was wrong and what was
expected: exit status 2 for bad input, 1 for a failure at run time, 130 for Ctrl-C; no
traceback; and the run directory's existing rows are left as they were (issue 14)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fastmlp import run as run_module
from fastmlp.cli import main
from fastmlp.run import LOG_FILES, hold, load_checkpoint, read_jsonl

FLAGS = ["--depth", "2", "--width", "12", "--eval-every", "5", "--probe-every", "5",
         "--probe-size", "20", "--valid-size", "30", "--test-size", "30", "--no-progress",
         "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-step run every case starts from (copied, never changed)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FLAGS, "--steps", "10", "--out", str(run)]) == 0
    return run


def _edit_config(run: Path, **changes: object) -> None:
    config = json.loads((run / "config.json").read_text())
    config.update(changes)
    (run / "config.json").write_text(json.dumps(config))


def _empty_class(root: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for k in range(4):
        Image.new("L", (6, 6), k).save(root / "a" / f"{k}.png")


def _crafted_cifar(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta"):  # fmt: skip
        (folder / name).write_bytes(pickle.dumps({"data": Path.touch}))


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    real = run_module.RunDir._append

    def append(self, name, rows):  # noqa: ANN001, ANN202
        if name == "stats.jsonl" and self._lines[name] > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))
        return real(self, name, rows)

    monkeypatch.setattr(run_module.RunDir, "_append", append)


def _unwritable(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if "locked" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@dataclass
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (copy of the finished run, scratch dir) -> argv
    status: int
    says: str  # a piece of the one-line message
    prepare: Callable[[Path, Path], object] = lambda run, tmp: None  # its result is ignored
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    one_line: bool = True  # argparse's own errors print the usage line first
    rows_grow: bool = False  # the run went on before failing: old rows kept, new ones after
    extra: dict = field(default_factory=dict)


def _resume(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda run, tmp: ["train", "--resume", str(run), *extra]


def _new(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda run, tmp: ["train", *FLAGS, "--steps", "10", *extra,
                             "--out", str(tmp / "new")]  # fmt: skip


CASES = [
    Case(
        "zero-byte checkpoint",
        _resume(),
        2,
        "checkpoint.pt is empty (0 bytes)",
        lambda run, tmp: (run / "checkpoint.pt").write_bytes(b""),
    ),
    Case(
        "truncated checkpoint",
        _resume(),
        2,
        "is truncated or corrupted",
        lambda run, tmp: (run / "checkpoint.pt").write_bytes(
            (run / "checkpoint.pt").read_bytes()[:2000]
        ),
    ),
    Case(
        "garbage checkpoint",
        _resume(),
        2,
        "is truncated or corrupted",
        lambda run, tmp: (run / "checkpoint.pt").write_bytes(b"not a checkpoint"),
    ),
    Case(
        "missing checkpoint",
        _resume(),
        2,
        "checkpoint.pt is missing but the logs",
        lambda run, tmp: (run / "checkpoint.pt").unlink(),
    ),
    Case(
        "config.json width of another type",
        _resume(),
        2,
        "width must be a positive integer, got 'wide'",
        lambda run, tmp: _edit_config(run, width="wide"),
    ),
    Case(
        "config.json with an unknown key",
        _resume(),
        2,
        "unknown TrainConfig fields: ['foo']",
        lambda run, tmp: _edit_config(run, foo=1),
    ),
    Case(
        "config.json edited into another width",
        _resume(),
        2,
        "cannot resume with a different configuration: width",
        lambda run, tmp: _edit_config(run, width=24),
    ),
    Case(
        "config.json not JSON",
        _resume(),
        2,
        "config.json is not valid JSON",
        lambda run, tmp: (run / "config.json").write_text("{width: 3"),
    ),
    Case(
        "config.json a list",
        _resume(),
        2,
        "must hold a JSON object",
        lambda run, tmp: (run / "config.json").write_text("[1, 2]"),
    ),
    Case(
        "config.json flag of another type",
        _resume(),
        2,
        "tensorboard must be true or false",
        lambda run, tmp: _edit_config(run, tensorboard="no"),
    ),
    Case(
        "--resume --steps below the current step",
        _resume("--steps", "5"),
        2,
        "is at step 10, past --steps 5",
    ),
    Case(
        "--resume of a directory that is not a run",
        lambda run, tmp: ["train", "--resume", str(tmp)],
        2,
        "is not a run directory",
    ),
    Case("--resume of a run another process holds", _resume(), 2, "is in use by process"),
    Case(
        "--out of an existing run",
        lambda run, tmp: ["train", *FLAGS, "--out", str(run)],
        2,
        "already holds a run",
    ),
    Case(
        "MNIST missing",
        _new("--dataset", "mnist", "--data-dir", "/nonexistent"),
        2,
        "Pass --download",
    ),
    Case(
        "CIFAR-10 missing",
        _new("--dataset", "cifar10", "--data-dir", "/nonexistent"),
        2,
        "Pass --download",
    ),
    Case(
        "CIFAR-10 batch that would run code",
        lambda run, tmp: _new("--dataset", "cifar10", "--data-dir", str(tmp / "c"))(run, tmp),
        2,
        "was refused: it names pathlib",
        lambda run, tmp: _crafted_cifar(tmp / "c"),
    ),
    Case(
        "empty class folder",
        lambda run, tmp: _new(
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp / "img"),
            "--valid-size",
            "1",
            "--test-size",
            "1",
            "--probe-size",
            "1",
        )(run, tmp),  # fmt: skip
        2,
        "class folder(s) b in",
        lambda run, tmp: _empty_class(tmp / "img"),
    ),
    Case("--device that is not there", _new("--device", "cuda:7"), 2, "cuda:7"),
    Case(
        "--out under a file",
        lambda run, tmp: ["train", *FLAGS, "--out", str(run / "config.json" / "x")],
        2,
        "cannot create the run directory (Not a directory)",
    ),
    Case(
        "--out that cannot be written",
        lambda run, tmp: ["train", *FLAGS, "--out", str(tmp / "locked" / "x")],
        2,
        "cannot create the run directory (Permission denied)",
        patch=_unwritable,
    ),
    Case(
        "disk full while extending a run",
        _resume("--steps", "20"),
        1,
        "No space left on device",
        patch=_no_space,
        rows_grow=True,
    ),
    Case(
        "plot of a run with a corrupted row",
        lambda run, tmp: ["plot", str(run)],
        2,
        "stats.jsonl line 2 is not a JSON row",
        lambda run, tmp: (run / "stats.jsonl").write_bytes(
            b"\n".join((run / "stats.jsonl").read_bytes().split(b"\n")[:1] + [b"{oops", b""])
        ),
    ),
    Case(
        "a flag of the wrong type",
        _new("--lr", "fast"),
        2,
        "--lr: expected a positive",
        one_line=False,
    ),
    Case(
        "--out of a directory holding another run's rows but no config.json",
        lambda run, tmp: ["train", *FLAGS, "--out", str(run)],
        2,
        "jacobian.jsonl (rows of another run, no config.json): refusing to overwrite",
        lambda run, tmp: (run / "config.json").unlink(),
    ),
    Case(
        "an empty --out",
        lambda run, tmp: ["train", "--out", ""],
        2,
        "--out: expected a directory path",
        one_line=False,
    ),
    Case(
        "rows removed after the checkpoint",
        _resume(),
        2,
        "stats.jsonl has 0 bytes but the checkpoint recorded",
        lambda run, tmp: (run / "stats.jsonl").write_bytes(b""),
    ),
    Case(
        "a row edited before the checkpoint's offset",
        _resume(),
        2,
        "metrics.jsonl line 1 is not a JSON row",
        lambda run, tmp: (run / "metrics.jsonl").write_bytes(
            (run / "metrics.jsonl").read_bytes().replace(b"\n", b" ", 1)
        ),
    ),
    Case(
        "checkpoint from another program",
        _resume(),
        2,
        "is not a version-1 fastmlp checkpoint (version None, no config, step",
        lambda run, tmp: torch.save({"weights": 1}, run / "checkpoint.pt"),
    ),
]


# ------------------------------------------------- issue 27: resume, checkpoints, paths


def _drop_config_field(run: Path, name: str) -> None:
    config = json.loads((run / "config.json").read_text())
    del config[name]
    (run / "config.json").write_text(json.dumps(config))


def _insert_line(run: Path, name: str, at: int, line: bytes) -> None:
    rows = (run / name).read_bytes().split(b"\n")
    (run / name).write_bytes(b"\n".join([*rows[:at], line, *rows[at:]]))


def _replace_once(run: Path, name: str, old: bytes, new: bytes) -> None:
    data = (run / name).read_bytes()
    assert old in data and len(old) == len(new)
    (run / name).write_bytes(data.replace(old, new, 1))


def _edit_checkpoint(run: Path, edit: Callable[[dict], object]) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoint.pt")


def _step_3_as_an_old_checkpoint(state: dict) -> None:
    """Step edited to 3 in a checkpoint without the step in its log positions (as before
    issue 27): the rows of steps 5 and 10 before its offsets give it away."""
    state["step"] = 3
    for pos in state["logs"].values():
        del pos["step"], pos["sha256"]


def _bad_first_weight(state: dict) -> None:
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = torch.zeros(3, 3)


def _disk_full_at_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's temporary file is /dev/full: every write fails with ENOSPC."""
    real = Path.open

    def open_(self, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        if self.name.startswith(".checkpoint.pt.tmp") and "w" in mode:
            return real(Path("/dev/full"), mode, *args, **kwargs)
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def _bad_mean(run: Path) -> None:
    data = (run / "stats.jsonl").read_bytes()
    (run / "stats.jsonl").write_bytes(re.sub(rb'"mean":[^,]+', b'"mean":"abc"', data, count=1))


def _figures_file(run: Path) -> None:
    shutil.rmtree(run / "figures", ignore_errors=True)
    (run / "figures").write_text("not a folder")


CASES += [
    Case(
        "config.json with an edited lr",
        _resume("--steps", "20"),
        2,
        "config.json: cannot resume with a different configuration: lr is 0.5, the run was "
        "trained with 0.05",
        lambda run, tmp: _edit_config(run, lr=0.5),
    ),
    Case(
        "config.json with an edited eval_every",
        _resume("--steps", "20"),
        2,
        "eval_every is 3, the run was trained with 5",
        lambda run, tmp: _edit_config(run, eval_every=3),
    ),
    Case(
        "config.json with a deleted field",
        _resume("--steps", "20"),
        2,
        "config.json has no lr (the checkpoint has lr = 0.05)",
        lambda run, tmp: _drop_config_field(run, "lr"),
    ),
    Case(
        "garbage line inserted in stats.jsonl",
        _resume("--steps", "20"),
        2,
        "stats.jsonl line 4 is not a JSON row",
        lambda run, tmp: _insert_line(run, "stats.jsonl", 3, b"garbage"),
    ),
    Case(
        "garbage line inserted in metrics.jsonl",
        _resume("--steps", "20"),
        2,
        "metrics.jsonl line 3 is not a JSON row",
        lambda run, tmp: _insert_line(run, "metrics.jsonl", 2, b"x"),
    ),
    Case(
        "JSON row inserted in metrics.jsonl",
        _resume("--steps", "20"),
        2,
        "metrics.jsonl: the checkpoint's offset",
        lambda run, tmp: _insert_line(run, "metrics.jsonl", 2, b'{"step":0}'),
    ),
    Case(
        "same-size edit that breaks a row",
        _resume("--steps", "20"),
        2,
        "stats.jsonl line 1 is not a JSON row",
        lambda run, tmp: _replace_once(run, "stats.jsonl", b'"mean":', b'"mean";'),
    ),
    Case(
        "same-size edit of a value",
        _resume("--steps", "20"),
        2,
        "metrics.jsonl: the first 8 lines differ from those the checkpoint recorded (SHA-256)",
        lambda run, tmp: _replace_once(run, "metrics.jsonl", b'"step":5,', b'"step":4,'),
    ),
    Case(
        "checkpoint whose step was edited",
        _resume("--steps", "20"),
        2,
        "holds step 5, past the checkpoint's step 3",
        lambda run, tmp: _edit_checkpoint(run, _step_3_as_an_old_checkpoint),
    ),
    Case(
        "checkpoint whose step was edited upward",
        _resume("--steps", "20"),
        2,
        "checkpoint.pt holds step 12, but its log positions were taken at step 10",
        lambda run, tmp: _edit_checkpoint(run, lambda s: s.update(step=12)),
    ),
    Case(
        "half-truncated checkpoint",
        _resume(),
        2,
        "is truncated or corrupted and cannot be resumed from",
        lambda run, tmp: (run / "checkpoint.pt").write_bytes(
            (run / "checkpoint.pt").read_bytes()[: (run / "checkpoint.pt").stat().st_size // 2]
        ),
    ),
    Case(
        "text file as checkpoint",
        _resume(),
        2,
        "is truncated or corrupted and cannot be resumed from (unreadable pickle data",
        lambda run, tmp: (run / "checkpoint.pt").write_text("epoch 10, loss 0.3\n"),
    ),
    Case(
        "checkpoint with bad tensors",
        _resume("--steps", "20"),
        2,
        "checkpoint.pt holds tensors that do not fit this run's model",
        lambda run, tmp: _edit_checkpoint(run, _bad_first_weight),
    ),
    Case(
        "checkpoint with world_size 0",
        _resume("--steps", "20"),
        2,
        "holds world_size 0: expected a positive number of processes",
        lambda run, tmp: _edit_checkpoint(run, lambda s: s.update(world_size=0)),
    ),
    Case(
        "disk full while writing a checkpoint",
        _resume("--steps", "20"),
        1,
        "cannot write the checkpoint (No space left on device):",
        patch=_disk_full_at_checkpoint,
        rows_grow=True,
    ),
    Case(
        "--seed 2**70",
        _new("--seed", str(2**70)),
        2,
        "--seed: expected an integer in [0, 2**63 - 1], got '1180591620717411303424'",
        one_line=False,
    ),
    Case(
        "figures path that is a file",
        _resume("--steps", "20"),
        2,
        "figures is a file, expected a directory",
        lambda run, tmp: _figures_file(run),
    ),
    Case(
        "tb path that is a file",
        _resume("--steps", "20"),
        2,
        "tb is a file, expected a directory",
        lambda run, tmp: ((run / "tb").write_text("x"), _edit_config(run, tensorboard=True)),
    ),
    Case(
        "--out of a run another process holds",
        lambda run, tmp: ["train", *FLAGS, "--out", str(run)],
        2,
        f"is in use by process {os.getpid()}, which is training a run there: choose another --out",
    ),
    Case(
        "--resume --nproc 2 of a one-process run",
        _resume("--steps", "20", "--nproc", "2"),
        2,
        "written by a run on 1 process(es); resume it with the same number (no --nproc, or "
        "--nproc 1), not 2",
    ),
    Case(
        "diagnose of a stats row with a bad type",
        lambda run, tmp: ["diagnose", str(run)],
        2,
        'stats.jsonl line 1 has mean = "abc", expected a number or null',
        lambda run, tmp: _bad_mean(run),
    ),
    Case(
        "plot of a stats row with a bad type",
        lambda run, tmp: ["plot", str(run), "--out", str(tmp / "figs")],
        2,
        'stats.jsonl line 1 has mean = "abc", expected a number or null',
        lambda run, tmp: _bad_mean(run),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_leaves_the_run_alone(
    case: Case, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    case.prepare(run, scratch)
    kept = (*LOG_FILES, "config.json", "checkpoint.pt")
    before = {name: (run / name).read_bytes() for name in kept if (run / name).exists()}
    if case.patch is not None:
        case.patch(monkeypatch)
    capsys.readouterr()
    with hold(run, new=False, enabled=case.name.endswith("another process holds")):
        try:
            status = main(case.argv(run, scratch))
        except SystemExit as e:  # argparse
            status = e.code
    out, err = capsys.readouterr()
    assert status == case.status, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("fastmlp") and "error:" in lines[-1], err
    assert case.says in lines[-1], lines[-1]
    if case.one_line:
        assert len(lines) == 1, err
    for name in before:
        now = (run / name).read_bytes()
        if case.rows_grow and name in LOG_FILES:
            assert now.startswith(before[name]), f"{name}: rows before the failure changed"
        elif case.rows_grow:
            continue  # the run went on: its config and checkpoint moved on too
        else:
            assert now == before[name], f"{name} changed"
    assert not (scratch / "new").exists(), "a refused new run left a directory behind"


def test_disk_full_run_resumes_with_every_row_once(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    """After the disk-full failure above, --resume (with space again) completes the run, every
    row exactly once, and says so on its last line."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with monkeypatch.context() as m:
        _no_space(m)
        assert main(["train", "--resume", str(run), "--steps", "20"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint.pt (step 10) is intact: continue with fastmlp train --resume {run}" in err
    assert main(["train", "--resume", str(run), "--steps", "20"]) == 0
    keys = [(r["step"], r["source"], r["layer"], r["quantity"])
            for r in read_jsonl(run / "stats.jsonl")]  # fmt: skip
    assert len(keys) == len(set(keys)) and max(k[0] for k in keys) == 20


def test_debug_shows_the_traceback(finished: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoint.pt").write_bytes(b"")
    assert main(["train", "--resume", str(run), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fastmlp train: error:")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_the_checkpoint_is_intact(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) mid-training: exit 130, one line saying which checkpoint is intact and
    how to continue; --resume then goes on from it."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmlp", "train", *FLAGS, "--steps", "100000000",
           "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal delivers it, also when this suite runs as a background job
    # (whose children inherit an ignored SIGINT from the shell)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert err.strip() == (
        f"fastmlp train: interrupted; {run}/checkpoint.pt (step {step}) is intact: "
        f"continue with fastmlp train --resume {run}"
    )
    assert main(["train", "--resume", str(run), "--steps", str(step + 5)]) == 0
