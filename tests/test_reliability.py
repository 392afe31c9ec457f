"""Issue 14: a diverged run finishes and resumes, one process owns a run directory, a missing
checkpoint never silently restarts a run."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import fastmlp
from fastmlp.jacobian import jacobian_singular_values
from fastmlp.run import LOG_FILES, load_checkpoint, read_jsonl
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
