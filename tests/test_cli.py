"""The ``fastmlp`` console script: --help and --version (issue 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastmlp
from fastmlp.cli import build_parser, main


def _script() -> str:
    found = Path(sys.executable).with_name("fastmlp")
    if found.exists():
        return str(found)
    path = shutil.which("fastmlp")
    if path is None:
        pytest.fail("the fastmlp console script is not installed next to this Python")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_console_script_version():
    r = _run(_script(), "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"fastmlp {fastmlp.__version__}"


def test_console_script_help():
    r = _run(_script(), "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: fastmlp" in r.stdout
    assert "--version" in r.stdout


def test_python_dash_m():
    r = _run(sys.executable, "-m", "fastmlp", "--version")
    assert r.returncode == 0, r.stderr
    assert fastmlp.__version__ in r.stdout


def test_main_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastmlp {fastmlp.__version__}"


def test_main_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "usage: fastmlp" in capsys.readouterr().out


def test_main_without_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "usage: fastmlp" in capsys.readouterr().out


def test_unknown_option_fails(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--no-such-option"])
    assert info.value.code != 0
    assert "usage" in capsys.readouterr().err


def test_version_string():
    assert isinstance(fastmlp.__version__, str) and fastmlp.__version__.count(".") >= 2


def test_every_config_field_is_declared_once_and_becomes_a_flag():
    """The flags, their help and the resume rules come from TrainConfig's declarations."""
    import dataclasses

    from fastmlp.commands.train import RESUMABLE
    from fastmlp.config import TrainConfig, resumable_fields

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["flag"]:
            assert f.name in dests, f.name
            assert f.metadata["help"].split()[0] in (dests[f.name].help or ""), f.name
    assert "steps" in RESUMABLE == resumable_fields(flags_only=True) and "depth" not in RESUMABLE
    args = parser.parse_args(
        ["train", "--bins", "32", "--no-probe-histograms", "--backend", "torch"]
    )
    assert (args.bins, args.probe_histograms, args.backend) == (32, False, "torch")
    assert parser.parse_args(["train", "--valid-size", "none"]).valid_size is None


def test_triton_backend_on_a_cpu_without_the_interpreter_is_refused(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the Triton backend runs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run = tmp_path / "run"
    assert main(["train", "--backend", "triton", "--steps", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fastmlp train: error: --backend triton needs a CUDA device (on the CPU only under "
        "TRITON_INTERPRET=1); expected --backend auto or torch here"
    ]
    assert not run.exists()
