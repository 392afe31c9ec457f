"""The scripts in examples/ run (in seconds, on tiny random data) and write what they say."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, out: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """Run ``examples/<script>`` as ``python <script> <out>`` would, in this process (the
    libraries it imports are loaded once for all the tests)."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), str(out)])
    monkeypatch.chdir(out.parent)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def _scalar_steps(logdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in logdir.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_plain_loop_example(tmp_path, monkeypatch, capsys):
    out = tmp_path / "monitor"
    assert "logged to" in _run("monitor_tensorboard.py", out, monkeypatch, capsys)
    assert _scalar_steps(out, "fastmlp/2/activation/std") == [0, 10, 20, 30, 40]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 10, 20, 30, 40]


@pytest.mark.slow
def test_lightning_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    out = tmp_path / "lightning"
    _run("lightning_stats.py", out, monkeypatch, capsys)
    assert _scalar_steps(out / "tb", "fastmlp/net.0/activation/mean") == [0, 10, 20, 30]


@pytest.mark.slow
def test_hf_trainer_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path / "hf"
    _run("hf_trainer_stats.py", out, monkeypatch, capsys)
    tag = "fastmlp/transformer.h.1.mlp.c_fc/activation/std"
    assert _scalar_steps(out / "runs", tag) == [0, 4, 8]
