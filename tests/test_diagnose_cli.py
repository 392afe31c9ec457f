"""``fastmlp diagnose RUN`` on a real (tiny) run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlp.cli import main
from fastmlp.train import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tanh, standard init, 3 hidden layers: the probe at step 0 shows vanishing gradients."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(
            depth=3, width=32, init="standard", steps=20, eval_every=10, probe_every=10,
            probe_size=100, valid_size=100, test_size=100, jacobian_every=-1, progress=False,
            tensorboard=False, figures=False, out=str(tmp_path_factory.mktemp("diag") / "run"),
        )  # fmt: skip
        return train(cfg)
    finally:
        torch.set_num_threads(saved)


def test_latest_probe_by_default(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["diagnose", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{run_dir}: probe statistics at step 20, 4 layers"


def test_step_and_json(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["diagnose", str(run_dir), "--step", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 0 and doc["source"] == "probe"
    vanishing = [f for f in doc["findings"] if f["code"] == "vanishing_gradient"]
    assert len(vanishing) == 1 and vanishing[0]["layer"] == 1
    assert vanishing[0]["evidence"]["per_layer"] > 1.5
    # Text output says the same.
    assert main(["diagnose", str(run_dir), "--step", "0"]) == 0
    assert "vanishing_gradient" in capsys.readouterr().out
    # Training statistics (no histograms on the CPU) can be diagnosed too.
    assert main(["diagnose", str(run_dir), "--source", "train", "--step", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "train"


def test_min_severity_filters(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["diagnose", str(run_dir), "--step", "0", "--min-severity", "error"]) == 0
    assert "no findings at error level or above" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "7"], "no probe statistics at step 7"),
        (["--step", "0", "--source", "train"], "no train statistics at step 0"),
    ],
)
def test_unknown_step_is_one_line_and_status_2(
    run_dir: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["diagnose", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert "steps: " in err


def test_unreadable_runs(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "not a run directory (no stats.jsonl)" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (run_dir / "stats.jsonl").read_text().splitlines(keepends=True)
    # A last row cut short (a run being written) is skipped...
    (broken / "stats.jsonl").write_text("".join(lines) + lines[0][:40])
    assert main(["diagnose", str(broken)]) == 0
    capsys.readouterr()
    # ...a corrupt row elsewhere is an error, named with its line.
    (broken / "stats.jsonl").write_text("".join([lines[0], "{not json\n", *lines[1:]]))
    assert main(["diagnose", str(broken)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stats.jsonl line 2 is not a JSON row" in err


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "fastmlp", "diagnose", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == f"fastmlp diagnose: error: {tmp_path / 'nope'} is not a directory"
