"""The end of ``fastmlp train``: figures, TensorBoard events, diagnosis.json and the summary."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fastmlp.plot import FIGURES
from fastmlp.run import RunDir
from fastmlp.stats.diagnosis import Finding
from fastmlp.summary import finish_run, layer_table
from fastmlp.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_train_ends_with_figures_events_diagnosis_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = TrainConfig(
        depth=3, width=24, init="standard", steps=20, eval_every=10, probe_every=10,
        probe_size=100, valid_size=100, test_size=100, jacobian_every=0, jacobian_examples=2,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    assert cfg.figures and cfg.tensorboard and cfg.progress  # the defaults
    run = train(cfg)
    err = capsys.readouterr().err
    # Figures and TensorBoard events in the run directory...
    assert sorted(p.name for p in (run / "figures").glob("*.png")) == sorted(FIGURES)
    assert all((run / "figures" / f).stat().st_size > 1000 for f in FIGURES)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # ...the diagnosis of the last probe, of the first, and of the other init's twin...
    doc = json.loads((run / "diagnosis.json").read_text())
    assert doc["step"] == 20 and doc["source"] == "probe"
    assert doc["initial"]["step"] == 0
    assert doc["twin_at_init"]["init"] == "normalized"
    codes_at_init = {f["code"] for f in doc["initial"]["findings"]}
    assert "vanishing_gradient" in codes_at_init  # standard init, paper Fig 7
    assert "vanishing_gradient" not in {f["code"] for f in doc["twin_at_init"]["findings"]}
    for f in doc["findings"]:
        Finding.from_dict(f)
    # ...and, printed: where things are, the per-layer table, the diagnosis, the contrast.
    assert f"run written to {run}" in err
    assert re.search(r"layer  name +act mean  act std  sat %  dC/ds std  dC/dW std", err)
    assert "diagnosis at step 20:" in err and "diagnosis at step 0 (initialization):" in err
    assert "standard (this run)" in err and "normalized (same network)" in err
    assert f"figures (8 PNG): {run / 'figures'}" in err
    assert f"TensorBoard events: {run / 'tb'}" in err


def test_layer_table_rows(tmp_path: Path) -> None:
    from fastmlp.run import load_run_snapshot

    cfg = TrainConfig(
        depth=2, width=16, steps=10, eval_every=10, probe_every=10, probe_size=50,
        valid_size=50, test_size=50, jacobian_every=-1, progress=False, tensorboard=False,
        figures=False, out=str(tmp_path / "run"),
    )  # fmt: skip
    run = train(cfg)
    assert not (run / "figures").exists()
    assert (run / "diagnosis.json").exists()  # written whatever the switches
    _, snap = load_run_snapshot(run)
    lines = layer_table(snap).splitlines()
    assert len(lines) == 1 + 3  # header, 2 hidden layers, the output layer
    first = lines[1].split()
    a = snap[1]["activation"]
    assert first[:2] == ["1", "layers.0"]
    assert float(first[2]) == pytest.approx(a.mean, abs=1e-3)
    assert float(first[3]) == pytest.approx(a.std, abs=1e-3)
    assert lines[3].split()[4] == "-"  # the output layer does not saturate
    # Without any probe the summary says so instead of failing.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "stats.jsonl").write_text("")
    assert "no diagnosis" in finish_run(empty, figures=False)


def test_missing_tensorboard_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = RunDir(tmp_path / "run", tensorboard=True).open()
    try:
        assert run.tb is None
    finally:
        run.close()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no TensorBoard events" in err and "pip install tensorboard" in err


def test_summary_shows_eq5_6_for_the_runs_own_network_at_init(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The eq. 5-6 table of the run's network at initialization: measured on the run's own
    initial weights (its step-0 probe), predicted from them; none for relu."""
    from fastmlp.run import load_run_snapshot

    base = dict(
        depth=3, width=32, steps=4, eval_every=4, probe_every=4, probe_size=200, valid_size=50,
        test_size=200, jacobian_every=-1, tensorboard=False, figures=False, seed=7,
    )  # fmt: skip
    run = train(TrainConfig(init="normalized", out=str(tmp_path / "tanh"), **base))
    err = capsys.readouterr().err
    rows = json.loads((run / "diagnosis.json").read_text())["prediction_at_init"]
    _, first = load_run_snapshot(run, 0)
    assert [r["layer"] for r in rows] == sorted(first.layers) == [1, 2, 3, 4]
    for r in rows:  # the network measured is the run's own at step 0
        for key, quantity in (("activation_var", "activation"), ("grad_var", "preactivation_grad")):
            assert r[key]["measured"] == pytest.approx(first[r["layer"]][quantity].var, rel=1e-5)
    # the factors are the run's weights': normalized init, n_in Var[W] = 2 n_in / (n_in + n_out)
    for r in rows:
        expected = 2 * r["n_in"] / (r["n_in"] + r["n_out"])
        assert r["forward_factor"] == pytest.approx(expected, rel=0.1)
    assert "variances at initialization, eq. 5-6 (linear regime) and measured:" in err
    assert re.search(r"layer n_in Var\[W\] act var pred", err)

    run = train(TrainConfig(activation="relu", out=str(tmp_path / "relu"), **base))
    err = capsys.readouterr().err
    assert "prediction_at_init" not in json.loads((run / "diagnosis.json").read_text())
    assert "eq. 5-6" not in err
