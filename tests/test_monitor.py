"""fastmlp.Monitor and the writers, with the real libraries, reading back what they wrote:
TensorBoard event files (EventAccumulator), an MLflow sqlite store (MlflowClient), a W&B
offline run, JSONL; the cadence against float64 statistics of the recorded steps; a 2-rank
gloo run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmlp
from fastmlp import writers
from fastmlp.run import load_run_snapshot

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
IN, WIDTH, OUT, BATCH = 12, 16, 4, 8


def _model(seed: int, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, WIDTH), act(), nn.Linear(WIDTH, WIDTH), act(), nn.Linear(WIDTH, OUT)
    )


def _train(model, monitor, steps, *, seed=0, nan_at=None, scale=1.0):
    """Train ``steps`` SGD steps; returns {step: (snapshot logged, layer-1 float64
    preactivation of every recorded step since the last log)}."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lin = model[0]
    logged, since = {}, []
    for s in range(steps):
        x = torch.randn(BATCH, IN, generator=g) * scale
        if s == nan_at:
            x[0, 0] = float("nan")
        y = torch.randint(0, OUT, (BATCH,), generator=g)
        if monitor.recorded(s):
            z = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
            since.append(z)
        assert lin.stats.enabled == monitor.recorded(s)  # statistics off between logs
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        snap = monitor.step()
        if snap is not None:
            logged[s - monitor.window + 1] = (snap, torch.cat(since))
            since = []
    return logged


def _scalar_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_plain_loop_logs_4_of_20_steps_to_tensorboard_mlflow_and_jsonl(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # (MLflow's defaults, ./mlruns artifacts, land here)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = _model(1)
    tb_dir = tmp_path / "tb"
    try:
        with mlflow.start_run() as run, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # findings on a random net
            ws = [
                writers.TensorBoard(tb_dir),
                writers.MLflow(),
                writers.JSONL(tmp_path / "stats.jsonl"),
            ]
            with fastmlp.Monitor(model, every=5, writers=ws) as monitor:
                logged = _train(model, monitor, 20)
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(logged) == [0, 5, 10, 15]
    for snap, z in logged.values():
        pre = snap["0"]["preactivation"]
        # one step's values only (nothing recorded in between), equal to float64's
        assert pre.count == z.numel() == BATCH * WIDTH
        np.testing.assert_allclose(pre.mean, z.mean().item(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pre.std, z.std(unbiased=False).item(), rtol=1e-5)
        np.testing.assert_allclose(pre.min, z.min().item(), rtol=1e-6)
        np.testing.assert_allclose(pre.max, z.max().item(), rtol=1e-6)

    # TensorBoard: every scalar of the snapshot, at exactly the recorded steps
    acc = _scalar_events(tb_dir)
    expected = {s: writers.scalars(snap) for s, (snap, _) in logged.items()}
    names = set(expected[0])
    assert "fastmlp/0/activation/std" in names and "fastmlp/2/activation/saturated" in names
    assert names <= set(acc.Tags()["scalars"])
    for name in names:
        events = acc.Scalars(name)
        assert [e.step for e in events] == [0, 5, 10, 15], name
        for e in events:
            np.testing.assert_allclose(e.value, expected[e.step][name], rtol=1e-6, atol=1e-30)
    # ... and the exact histograms
    for tag, row in writers.histograms(logged[10][0]):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [0, 5, 10, 15], tag
        h = next(e.histogram_value for e in events if e.step == 10)
        assert h.num == row["count"]
        np.testing.assert_allclose(h.sum, row["mean"] * row["count"], rtol=1e-9, atol=1e-12)
        edges = list(row["hist_edges"])  # fastmlp's bins; under/overflow as end buckets
        counts = list(row["hist_counts"])
        if row["underflow"]:
            edges.insert(0, row["min"])
            counts.insert(0, row["underflow"])
        if row["overflow"]:
            edges.append(row["max"])
            counts.append(row["overflow"])
        assert list(h.bucket) == counts and sum(counts) == row["count"]
        np.testing.assert_allclose(list(h.bucket_limit), edges[1:], rtol=1e-12)
        sumsq = (row["var"] + row["mean"] ** 2) * row["count"]
        np.testing.assert_allclose(h.sum_squares, sumsq, rtol=1e-9)
        assert (h.min, h.max) == (row["min"], row["max"])

    # MLflow: batched metrics at the recorded steps, histograms as JSON artifacts
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = run.info.run_id
    for name in ("fastmlp/0/activation/mean", "fastmlp/2/weight_grad/absmax"):
        hist = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [m.step for m in hist] == [0, 5, 10, 15]
        for m in hist:
            np.testing.assert_allclose(m.value, expected[m.step][name], rtol=1e-12)
    assert len(client.get_run(run_id).data.metrics) == len(names)
    arts = sorted(a.path for a in client.list_artifacts(run_id, "fastmlp"))
    assert arts == [f"fastmlp/step_{s:08d}.json" for s in (0, 5, 10, 15)]
    local = client.download_artifacts(run_id, "fastmlp/step_00000005.json", str(tmp_path))
    doc = json.loads(Path(local).read_text())
    row = logged[5][0]["2"]["activation"]
    assert doc["histograms"]["fastmlp/2/activation"]["counts"] == row.hist_counts

    # JSONL: the run directories' stats.jsonl rows, read back as snapshots
    for s, (snap, _) in logged.items():
        step, back = load_run_snapshot(tmp_path, step=s, source="train")
        assert step == s
        assert json.dumps(back.rows()) == json.dumps(writers.base.json_safe(snap.rows()))


def test_window_records_consecutive_steps_and_logs_at_the_first(tmp_path):
    model = _model(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        monitor = fastmlp.Monitor(model, every=5, window=2, diagnose=False)
        logged = _train(model, monitor, 12)
    assert sorted(logged) == [0, 5, 10]
    for snap, z in logged.values():
        pre = snap["0"]["preactivation"]
        assert pre.count == 2 * BATCH * WIDTH == z.numel()
        np.testing.assert_allclose(pre.mean, z.mean().item(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pre.std, z.std(unbiased=False).item(), rtol=1e-5)
    monitor.close()
    assert model[0].stats.enabled  # closed: the model records as an instrumented one does


def test_groups_on_an_instrumented_model_are_logged_generically(tmp_path):
    model = fastmlp.instrument(_model(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        monitor = fastmlp.Monitor(model, every=3, groups=["zeros", "moments4"], diagnose=False)
        ((snap, _),) = _train(model, monitor, 1).values()
    scal = writers.scalars(snap)
    assert scal["fastmlp/0/activation/kurtosis"] == snap["0"]["activation"].kurtosis
    assert "fastmlp/0/activation/zero_fraction" in scal
    with pytest.raises(ValueError, match="unknown statistic groups"):
        fastmlp.Monitor(model, groups=["bogus"])


def test_resume_continues_the_cadence():
    model = _model(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = fastmlp.Monitor(model, every=5, diagnose=False)
        _train(model, first, 7)
        state = first.state_dict()
        again = fastmlp.Monitor(_model(4), every=5, diagnose=False)
        again.load_state_dict(json.loads(json.dumps(state)))  # JSON-safe
        assert again.global_step == 7 and not again.recording
        steps = []
        for _ in range(8):  # steps 7..14
            again.model(torch.randn(2, IN)).sum().backward()
            if again.step() is not None:
                steps.append(again.global_step - 1)
    assert steps == [10]


def test_a_finding_is_warned_once_with_its_evidence_and_nonfinite_always():
    model = _model(5, nn.Sigmoid)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(8.0)  # saturates the sigmoids
    with pytest.warns(RuntimeWarning) as record:
        monitor = fastmlp.Monitor(model, every=2, diagnose=False)
        _train(model, monitor, 8, nan_at=4, scale=3.0)
    texts = [str(w.message) for w in record]
    nonfinite = [t for t in texts if "non-finite" in t]
    assert len(nonfinite) == 1 and "step 4" in nonfinite[0] and "preactivation" in nonfinite[0]
    assert not [t for t in texts if "saturation" in t]  # diagnose=False

    model = _model(5, nn.Sigmoid)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(8.0)
    with pytest.warns(RuntimeWarning) as record:
        monitor = fastmlp.Monitor(model, every=2)
        _train(model, monitor, 8, scale=3.0)
    sat = [str(w.message) for w in record if " saturation " in str(w.message)]
    assert sat, [str(w.message) for w in record]
    keys = [t.split(":")[1] for t in sat]
    assert len(keys) == len(set(keys))  # each finding once, though logged 4 times
    assert all("{" in t and "}" in t for t in sat)  # its evidence
    assert monitor.findings

    model = _model(6)
    monitor = fastmlp.Monitor(model, every=2, diagnose=False, on_nonfinite="raise")
    with pytest.raises(fastmlp.NonFiniteError, match="step 2"):
        _train(model, monitor, 4, nan_at=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be a positive integer"),
        ({"every": 3, "window": 4}, ValueError, "window must be an integer in"),
        ({"writers": [object()]}, TypeError, "a writer needs write"),
        ({"on_nonfinite": "stop"}, ValueError, "on_nonfinite must be"),
        ({"min_severity": "fatal"}, ValueError, "min_severity must be one of"),
    ],
)
def test_bad_options_say_what_was_expected(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastmlp.Monitor(_model(0), **kwargs)


def test_a_bare_layer_or_a_model_without_dense_layers_is_refused():
    with pytest.raises(ValueError, match="instrument it first"):
        fastmlp.Monitor(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="no dense layer"):
        fastmlp.Monitor(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))


def test_writers_need_their_run():
    pytest.importorskip("mlflow")
    snap = fastmlp.stats_of(fastmlp.instrument(_model(0))).snapshot()
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        writers.MLflow().write(0, snap)
    with pytest.raises(TypeError, match="log directory or a SummaryWriter"):
        writers.TensorBoard(3)


def test_mlflow_names_follow_mlflow_rules():
    from mlflow.utils.validation import _validate_metric_name

    for raw in (
        "fastmlp/a.b/activation/mean",
        "fastmlp/x[0]/q/f",
        "fastmlp/../a//b/./c",
        "a" * 300,
    ):
        name = writers.mlflow.mlflow_name(raw)
        _validate_metric_name(name)  # raises where MLflow would refuse it
        assert len(name) <= 250
    assert writers.mlflow.mlflow_name("fastmlp/h.0.mlp/activation/std") == (
        "fastmlp/h.0.mlp/activation/std"
    )


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows of a W&B offline run, by step, read from its ``.wandb`` file (a
    LevelDB-style log of protobuf records: 7-byte header, then per 32 KiB block records of
    checksum, length, type and data; type 1 a whole record, 2/3/4 its first, middle and
    last parts)."""
    from wandb.proto import wandb_internal_pb2 as pb

    # wandb-core writes the file from its own process: wait for the run's exit record
    deadline = time.monotonic() + 30
    while True:
        out, ended = _wandb_records(next(run_dir.rglob("*.wandb")).read_bytes(), pb)
        if ended or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _wandb_records(data: bytes, pb) -> tuple[dict[int, dict], bool]:
    assert data[:4] == b":W&B"
    pos, block, part, out, ended = 7, 32768, b"", {}, False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            kind = rec.WhichOneof("record_type")
            ended = ended or kind == "exit"
            if kind == "history":
                items = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
                out[int(items["_step"])] = items
    return out, ended


def test_wandb_offline_run_gets_scalars_and_histograms(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = _model(7)
    run = wandb.init(dir=str(tmp_path), project="fastmlp-test")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            monitor = fastmlp.Monitor(model, every=3, writers=[writers.Wandb()])
            logged = _train(model, monitor, 7)
    finally:
        run.finish()
    assert sorted(logged) == [0, 3, 6]
    history = _wandb_history(tmp_path)
    assert sorted(history) == [0, 3, 6]
    for step, (snap, _) in logged.items():
        expected = writers.scalars(snap)
        got = {k: v for k, v in history[step].items() if k in expected}
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-12, err_msg=name)
        for tag, row in writers.histograms(snap):
            # a histogram is stored as its fields under its name
            hist = {f: history[step].get(f"{tag}/{f}") for f in ("_type", "values", "bins")}
            assert hist["_type"] == "histogram"
            edges, counts = writers.base.histogram_buckets(row)
            assert hist["values"] == counts
            np.testing.assert_allclose(hist["bins"], edges, rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_log_once_with_merged_counts(tmp_path):
    """2 gloo ranks under DDP, each with its own data: rank 0 alone writes, the rows hold
    both ranks' values (float64 reference of both ranks' inputs)."""
    port = _free_port()
    code = (
        "import sys, torch.multiprocessing as mp, _monitor_workers as W\n"
        f"mp.spawn(W.monitor_worker, args=(2, {port}, sys.argv[1]), nprocs=2)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "rank1.jsonl").exists()  # rank 1 writes nothing
    rows = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 2]
    for step in (0, 2):
        z = torch.cat([torch.load(tmp_path / f"z{r}_{step}.pt") for r in (0, 1)])
        (row,) = [
            r
            for r in rows
            if r["step"] == step and r["name"] == "0" and r["quantity"] == "preactivation"
        ]
        assert row["count"] == z.numel() == 2 * BATCH * WIDTH
        np.testing.assert_allclose(row["mean"], z.mean().item(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["std"], z.std(unbiased=False).item(), rtol=1e-5)
        assert row["min"] == pytest.approx(z.min().item(), rel=1e-6)
        assert row["max"] == pytest.approx(z.max().item(), rel=1e-6)
    same = json.loads((tmp_path / "same.json").read_text())
    assert same == {"0": True, "1": True}  # every rank got the merged snapshot
