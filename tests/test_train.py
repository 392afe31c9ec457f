"""The trainer and the ``fastmlp train`` / ``fastmlp reproduce`` commands on tiny configurations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlp.cli import build_parser, main
from fastmlp.run import load_checkpoint, read_jsonl
from fastmlp.stats.snapshot import ROW_FIELDS
from fastmlp.train import TrainConfig, train

TINY = dict(
    depth=2, width=24, steps=30, eval_every=10, probe_every=15, probe_size=50, valid_size=100,
    test_size=100, jacobian_every=0, jacobian_examples=3, progress=False, tensorboard=False,
    figures=False,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: on a CPU shared with other processes, parallel regions wait for
    descheduled threads and slow every step down."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny(tmp_path: Path, **kw: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **kw})


def test_cli_train_writes_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmlp", "train", "--depth", "2", "--width", "16",
           "--steps", "20", "--eval-every", "10", "--probe-every", "10", "--valid-size", "100",
           "--test-size", "300", "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert f"run written to {run}" in res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["width"] == 16 and cfg["activation"] == "tanh" and cfg["init"] == "normalized"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert {(m["step"], m["split"]) for m in metrics} == {
        (0, "valid"), (0, "test"), (10, "train"), (10, "valid"), (10, "test"),
        (20, "train"), (20, "valid"), (20, "test"),
    }  # fmt: skip
    for m in metrics:
        assert set(m) == {"step", "split", "loss", "error"}
        assert 0 <= m["error"] <= 100 and math.isfinite(m["loss"])
    stats = read_jsonl(run / "stats.jsonl")
    assert {(r["step"], r["source"]) for r in stats} == {
        (0, "probe"), (10, "probe"), (10, "train"), (20, "probe"), (20, "train"),
    }  # fmt: skip
    for r in stats:
        assert set(r) == set(ROW_FIELDS) | {"step", "source"}
    assert {r["layer"] for r in read_jsonl(run / "jacobian.jsonl")} == {1, 2}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"loss/test", "error/valid", "probe/layer1/activation/std"} <= set(
        events.Tags()["scalars"]
    )
    hists = events.Histograms("probe/layer2/activation")
    assert [h.step for h in hists] == [0, 10, 20]
    assert sum(hists[0].histogram_value.bucket) == hists[0].histogram_value.num == 300 * 16
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 20


def test_monitoring_contents(tmp_path: Path) -> None:
    run = train(_tiny(tmp_path, activation="sigmoid", init="standard"))
    stats = read_jsonl(run / "stats.jsonl")
    probe = [r for r in stats if r["source"] == "probe" and r["step"] == 0]
    assert {(r["layer"], r["quantity"]) for r in probe} == {
        (layer, q) for layer in (1, 2, 3)
        for q in ("preactivation", "activation", "preactivation_grad", "weight_grad")
    }  # fmt: skip
    act = {r["layer"]: r for r in probe if r["quantity"] == "activation"}
    # probe rows cover exactly probe_size examples x width units; histograms are on
    assert act[1]["count"] == 50 * 24 and sum(act[1]["hist_counts"]) == 50 * 24
    assert 0 <= act[1]["min"] <= act[1]["max"] <= 1 and act[1]["saturated"] is not None
    # training rows: steps 1..15 of 10 examples; no histograms on CPU by default
    tr = [r for r in stats if r["source"] == "train" and r["step"] == 15]
    tr_act = next(r for r in tr if r["layer"] == 1 and r["quantity"] == "activation")
    assert tr_act["count"] == 15 * 10 * 24 and tr_act["hist_counts"] is None
    wg = next(r for r in tr if r["layer"] == 2 and r["quantity"] == "weight_grad")
    assert wg["count"] == 15 * 24 * 24
    jac = read_jsonl(run / "jacobian.jsonl")
    assert sorted({r["step"] for r in jac}) == [0, 30]
    assert all(r["examples"] == 3 and r["min"] <= r["mean"] <= r["max"] for r in jac)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert {"model", "optimizer", "step", "rng", "logs", "running"} <= set(ckpt)
    assert any(k.endswith("stats.acc") for k in ckpt["model"])


def test_same_seed_same_run_other_seed_differs(tmp_path: Path) -> None:
    a = train(_tiny(tmp_path / "a", steps=10))
    b = train(_tiny(tmp_path / "b", steps=10))
    c = train(_tiny(tmp_path / "c", steps=10, seed=1))
    ra, rb, rc = (read_jsonl(r / "metrics.jsonl") for r in (a, b, c))
    assert ra == rb
    assert ra != rc
    assert read_jsonl(a / "stats.jsonl") == read_jsonl(b / "stats.jsonl")


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, steps=300, eval_every=100, probe_every=300, lr=0.01, valid_size=300)
    run = train(cfg)
    valid = [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if m["split"] == "valid"]
    assert valid[-1] < valid[0] - 0.05, valid


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    train(_tiny(tmp_path, steps=5))
    with pytest.raises(FileExistsError, match="--resume"):
        train(_tiny(tmp_path, steps=5))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--activation", "mish"], "invalid choice: 'mish'"),
        (["--init", "he"], "invalid choice: 'he'"),
        (["--depth", "0"], "expected a positive integer, got '0'"),
        (["--width", "x"], "expected a positive integer, got 'x'"),
        (["--lr", "-1"], "expected a positive finite number, got '-1'"),
        (["--lr", "nan"], "expected a positive finite number, got 'nan'"),
        (["--batch-size", "1.5"], "expected a positive integer, got '1.5'"),
        (["--seed", "-3"], "expected an integer in [0, 2**63 - 1], got '-3'"),
        (["--device", "gpu7"], "expected auto, cpu, cuda or cuda:N, got 'gpu7'"),
    ],
)
def test_bad_flags_are_argparse_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", *argv])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_inconsistent_sizes_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--test-size", "100", "--out", str(tmp_path / "r")])
    assert "test_size (100) must be at least probe_size (300)" in capsys.readouterr().err


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        TrainConfig(activation="identity")
    with pytest.raises(ValueError, match="jacobian_every"):
        TrainConfig(jacobian_every=-2)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"depht": 3})


def test_default_config_is_the_main_job() -> None:
    c = TrainConfig()
    assert (c.dataset, c.depth, c.width, c.activation, c.init, c.batch_size, c.probe_size) == (
        "shapeset", 5, 1000, "tanh", "normalized", 10, 300,
    )  # fmt: skip


def test_reproduce_smoke_writes_table_and_figures(tmp_path: Path) -> None:
    from fastmlp.reproduce import MODELS, PAPER_TABLE1, Budget, reproduce

    tiny = Budget(width=16, steps=20, eval_every=10, probe_every=10, valid_size=100,
                  test_size=100, jacobian_every=-1, jacobian_examples=2, lr=0.05)  # fmt: skip
    import fastmlp.reproduce as rp

    rp.BUDGETS["tiny-test"] = tiny
    try:
        report = reproduce("shapeset", "tiny-test", out=tmp_path, progress=False,
                           models=MODELS[2:4])  # fmt: skip
    finally:
        del rp.BUDGETS["tiny-test"]
    text = report.read_text()
    assert "| Tanh | 5 |" in text and "| Tanh N | 5 |" in text
    assert f"{PAPER_TABLE1['Tanh N']['shapeset']:.2f}" in text
    assert (tmp_path / "fig11_test_error.png").stat().st_size > 0
    assert (tmp_path / "tanh-normalized-d5" / "figures" / "fig02_activation_mean_std.png").exists()
    assert "## Diagnosis" in text
    assert "- **Tanh** (depth 5), step 20:" in text and "- **Tanh N** (depth 5), step 20:" in text
    mtime = (tmp_path / "tanh-standard-d5" / "checkpoint.pt").stat().st_mtime_ns
    rp.BUDGETS["tiny-test"] = tiny
    try:  # a second invocation reuses finished runs
        reproduce("shapeset", "tiny-test", out=tmp_path, progress=False, models=MODELS[2:3])
    finally:
        del rp.BUDGETS["tiny-test"]
    assert (tmp_path / "tanh-standard-d5" / "checkpoint.pt").stat().st_mtime_ns == mtime


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_train_on_cuda(tmp_path: Path) -> None:
    run = train(_tiny(tmp_path, device="cuda"))
    stats = read_jsonl(run / "stats.jsonl")
    tr = [r for r in stats if r["source"] == "train"]
    assert tr and all(r["hist_counts"] is not None for r in tr if r["count"])


def test_train_restores_the_thread_count(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    train(_tiny(tmp_path, steps=2))
    assert torch.get_num_threads() == 2
    train(_tiny(tmp_path / "b", steps=2, threads=3))
    assert torch.get_num_threads() == 2
