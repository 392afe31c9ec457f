"""Distributed training (issue 6): exact cross-rank statistics, DDP, launching, dead ranks.

Everything runs on the CPU with gloo. Multi-process tests start real processes
(``torch.multiprocessing`` or torchrun's elastic agent) in a subprocess with a
hard timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import update
from torch.nn import functional as F

from fastmlp.activations import get_activation
from fastmlp.cli import build_parser, main
from fastmlp.commands.train import argv_from_args
from fastmlp.distributed import LayerBuffers, merge_buffers, regroup_bins
from fastmlp.run import load_checkpoint, read_jsonl
from fastmlp.stats import (
    ACTIVATION,
    COUNT,
    MAX,
    MIN,
    NFIELDS,
    NONFINITE,
    PREACTIVATION,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUMSQ,
    LayerStats,
)
from fastmlp.stats.algebra import grow_range_

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import _dist_workers as W  # noqa: E402

BINS = 16


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- merge, unit level


def _ref_bins(x: np.ndarray, r: float, bins: int = BINS) -> np.ndarray:
    """Histogram on [-r, r] (bins [e_i, e_i+1), last closed), float64, by direct binning."""
    idx = np.floor(x * (bins / (2 * r))).astype(np.int64) + bins // 2
    assert idx.min() >= 0 and idx.max() <= bins
    return np.bincount(np.minimum(idx, bins - 1), minlength=bins)


def _buffers(
    values: dict[int, np.ndarray],
    shift: dict[int, float],
    ranges: dict[int, float | tuple[float, float]],
    *,
    flows: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    nonfinite: int = 0,
    sat: tuple[float, float] = (-0.99, 0.99),
) -> LayerBuffers:
    """One rank's raw buffers built by hand in float64: per quantity ``q`` its finite values,
    its own shift and histogram range; ``flows[q]`` = values that were counted as
    underflow / overflow when they arrived (outside the range the rank had then)."""
    acc = np.zeros((4, NFIELDS))
    acc[:, MIN], acc[:, MAX] = np.inf, -np.inf
    sh = np.zeros(4)
    hist = np.zeros((4, BINS + 2), dtype=np.int64)
    rng = np.zeros((4, 2))
    cal = np.zeros(4, dtype=bool)
    for q, x in values.items():
        under, over = (flows or {}).get(q, (np.zeros(0), np.zeros(0)))
        allx = np.concatenate([x, under, over])
        d = allx - shift[q]
        acc[q, COUNT], acc[q, SUM], acc[q, SUMSQ] = allx.size, d.sum(), (d * d).sum()
        acc[q, MIN], acc[q, MAX] = allx.min(), allx.max()
        acc[q, NONFINITE] = nonfinite
        acc[q, SAT_LOW] = (allx <= sat[0]).sum()
        acc[q, SAT_HIGH] = (allx >= sat[1]).sum()
        sh[q] = shift[q]
        r = ranges[q]
        lo, hi = (-r, r) if isinstance(r, float) else r
        rng[q] = (lo, hi)
        hist[q, 1:-1] = _ref_bins(x - (lo + hi) / 2, (hi - lo) / 2)
        hist[q, 0], hist[q, -1] = under.size, over.size
        cal[q] = True
    return LayerBuffers(acc, sh, hist, rng, cal)


def test_merge_exact_with_different_shifts_and_ranges() -> None:
    """Chan's merge and histogram regrouping equal a float64 reference on the union of values,
    with every rank on its own shift and its own power-of-two histogram range."""
    g = np.random.default_rng(0)
    q0, q1 = PREACTIVATION, ACTIVATION  # q1: fixed range [-1, 1]
    x0 = 3 + 0.5 * g.standard_normal(700)  # range +-8
    x1 = -20 + 5 * g.standard_normal(900)  # range +-64, plus sticky under/overflow
    x3 = 0.1 * g.standard_normal(300)  # range +-0.5 or +-1
    a0, a1, a3 = (np.tanh(g.standard_normal(n) * 2) for n in (400, 500, 200))
    under1, over1 = np.array([-75.0, -90.0]), np.array([70.0])
    assert np.abs(x0).max() < 8 and np.abs(x1).max() < 64 and np.abs(x3).max() < 0.5
    ranks = [
        _buffers({q0: x0, q1: a0}, {q0: 2.9, q1: 0.2}, {q0: 8.0, q1: (-1.0, 1.0)}, nonfinite=3),
        _buffers(
            {q0: x1, q1: a1},
            {q0: -19.0, q1: -0.3},
            {q0: 128.0, q1: (-1.0, 1.0)},
            flows={q0: (under1, over1)},
            nonfinite=2,
        ),
        _buffers({}, {}, {}),  # a rank that saw nothing: uncalibrated, range (0, 0)
        _buffers({q0: x3, q1: a3}, {q0: 0.01, q1: 0.0}, {q0: 0.5, q1: (-1.0, 1.0)}),
    ]
    merged = merge_buffers(ranks, fixed_range=(False, True, False, False))

    for q, parts, r in (
        (q0, [x0, x1, under1, over1, x3], 128.0),
        (q1, [a0, a1, a3], 1.0),
    ):
        union = np.concatenate(parts)
        n = merged.acc[q, COUNT]
        assert n == union.size
        mean = merged.shift[q] + merged.acc[q, SUM] / n
        var = merged.acc[q, SUMSQ] / n - (merged.acc[q, SUM] / n) ** 2
        assert mean == pytest.approx(union.mean(), rel=1e-13, abs=1e-13)
        assert var == pytest.approx(union.var(), rel=1e-12)
        assert merged.acc[q, MIN] == union.min() and merged.acc[q, MAX] == union.max()
        assert merged.acc[q, NONFINITE] == 5
        assert merged.acc[q, SAT_LOW] == (union <= -0.99).sum()
        assert merged.acc[q, SAT_HIGH] == (union >= 0.99).sum()
        assert merged.calibrated[q]
        assert merged.hist_range[q].tolist() == [-r, r]
    in_range = np.concatenate([x0, x1, x3])
    np.testing.assert_array_equal(merged.hist[q0, 1:-1], _ref_bins(in_range, 128.0))
    assert (merged.hist[q0, 0], merged.hist[q0, -1]) == (2, 1)
    np.testing.assert_array_equal(
        merged.hist[q1, 1:-1], _ref_bins(np.concatenate([a0, a1, a3]), 1.0)
    )
    for q in (2, 3):  # never recorded anywhere
        assert merged.acc[q, COUNT] == 0 and not merged.calibrated[q]


def test_merge_keeps_precision_far_from_zero() -> None:
    """Values 1e4 +- 1e-3 on ranks with shifts half a unit apart: the merged variance keeps
    float64 precision (an average of per-rank means, or unshifted sums, would not)."""
    g = np.random.default_rng(1)
    xs = [1e4 + 1e-3 * g.standard_normal(n) + k * 1e-3 for k, n in enumerate((1000, 3000, 17))]
    ranks = [_buffers({0: x}, {0: 1e4 + 0.5 * k}, {0: 16384.0}) for k, x in enumerate(xs)]
    merged = merge_buffers(ranks)
    union = np.concatenate(xs)
    n = merged.acc[0, COUNT]
    var = merged.acc[0, SUMSQ] / n - (merged.acc[0, SUM] / n) ** 2
    assert merged.shift[0] == pytest.approx(union.mean(), rel=1e-15)
    assert var == pytest.approx(union.var(), rel=1e-6)


def test_merge_rejects_inconsistent_fixed_ranges() -> None:
    a = _buffers({1: np.array([0.1])}, {1: 0.0}, {1: (-1.0, 1.0)})
    b = _buffers({1: np.array([0.1])}, {1: 0.0}, {1: (0.0, 1.0)})
    with pytest.raises(ValueError, match="fixed histogram range"):
        merge_buffers([a, b], fixed_range=(False, True, False, False))


def test_regroup_bins_matches_grow_range() -> None:
    """The regrouping is the same exact power-of-two bin merge as the PyTorch path's."""
    s = LayerStats(get_activation("tanh"), bins=BINS)
    g = torch.Generator().manual_seed(3)
    row = torch.randint(0, 50, (BINS + 2,), generator=g)
    s.hist[PREACTIVATION] = row
    s.hist_range[PREACTIVATION] = torch.tensor([-2.0, 2.0], dtype=torch.float64)
    grow_range_(
        s.buffers_tuple(), PREACTIVATION, torch.tensor(13.0, dtype=torch.float64)
    )  # -> +-16: factor 8
    assert s.hist_range[PREACTIVATION].tolist() == [-16.0, 16.0]
    np.testing.assert_array_equal(
        regroup_bins(row[1:-1].numpy(), 8.0), s.hist[PREACTIVATION, 1:-1].numpy()
    )
    with pytest.raises(ValueError, match="power of two"):
        regroup_bins(row.numpy(), 3.0)


def test_merge_of_layerstats_matches_one_layerstats() -> None:
    """Two LayerStats fed different data (their own calibration) merge to what one LayerStats
    fed all of it reports, and to the float64 moments of the union."""
    g = torch.Generator().manual_seed(5)
    # float64 inputs, so the per-rank sums themselves carry float64 precision.
    xa = torch.randn(4000, generator=g, dtype=torch.float64) * 0.3 + 1.0  # range +-4
    xb = torch.randn(3000, generator=g, dtype=torch.float64) * 6.0 - 2.0  # range +-32
    act = get_activation("tanh")
    sa, sb, one = (LayerStats(act, bins=BINS) for _ in range(3))
    update(sa, PREACTIVATION, xa)
    update(sb, PREACTIVATION, xb)
    update(one, PREACTIVATION, torch.cat([xb, xa]))  # one batch: no sticky overflow
    assert sa.shift[0] != sb.shift[0] and sa.hist_range[0, 1] != sb.hist_range[0, 1]
    merged = merge_buffers(
        [LayerBuffers.from_stats(sa), LayerBuffers.from_stats(sb)], sa.fixed_range
    )
    ref = LayerBuffers.from_stats(one)
    union = torch.cat([xa, xb]).numpy()
    n = merged.acc[0, COUNT]
    assert n == union.size
    assert merged.shift[0] + merged.acc[0, SUM] / n == pytest.approx(union.mean(), rel=1e-12)
    assert merged.acc[0, SUMSQ] / n == pytest.approx(union.var(), rel=1e-10)
    np.testing.assert_array_equal(merged.hist[0], ref.hist[0])
    np.testing.assert_array_equal(merged.hist_range[0], ref.hist_range[0])
    np.testing.assert_array_equal(merged.hist[0, 1:-1], _ref_bins(union, 32.0))


# ----------------------------------------------------------------------------- 2-process DDP run


def _reference_run() -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process: per step, the two ranks' batches as micro-batches with accumulated
    gradients averaged (what DDP computes), and separately plain SGD on the concatenated
    batch. Returns the micro-batch run's statistics rows and both runs' parameters."""
    torch.set_num_threads(1)
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    full = W.make_model()
    full.stats.enabled = False
    opt_full = torch.optim.SGD(full.parameters(), lr=W.LR)
    for x, y in W.global_batches():
        opt.zero_grad(set_to_none=True)
        for r in range(2):
            sl = slice(r * W.BATCH, (r + 1) * W.BATCH)
            F.cross_entropy(model(x[sl]), y[sl]).backward()
        for p in model.parameters():
            p.grad /= 2
        opt.step()
        opt_full.zero_grad(set_to_none=True)
        F.cross_entropy(full(x), y).backward()
        opt_full.step()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params_full = {k: v.detach().clone() for k, v in full.named_parameters()}
    return model.stats.snapshot().rows(), params, params_full


def _compare_rows(got: list[dict], ref: list[dict]) -> None:
    assert [(r["layer"], r["quantity"]) for r in got] == [(r["layer"], r["quantity"]) for r in ref]
    for a, b in zip(got, ref, strict=True):
        what = f"layer {a['layer']} {a['quantity']}"
        assert a["count"] == b["count"] and a["nonfinite"] == b["nonfinite"], what
        # The CPU path sums float32 deviations per batch (around a per-process centre), so
        # moments agree to float32 rounding; extremes and counts are exact.
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-6 * b["std"] + 1e-12), what
        assert a["var"] == pytest.approx(b["var"], rel=1e-6, abs=1e-15), what
        for k in ("min", "max", "saturated_low", "saturated_high"):
            assert a[k] == b[k], (what, k)
        assert a["hist_edges"] == b["hist_edges"], what
        ha = np.array([a["underflow"], *a["hist_counts"], a["overflow"]])
        hb = np.array([b["underflow"], *b["hist_counts"], b["overflow"]])
        assert ha.sum() == hb.sum() == a["count"], what
        flows = a["underflow"] + a["overflow"] + b["underflow"] + b["overflow"]
        if flows == 0:
            np.testing.assert_array_equal(ha, hb, err_msg=what)
        else:
            # A value outside the range a process had when it arrived stays counted as
            # under/overflow, so the split between bins and flows depends on arrival order;
            # the cumulative counts can differ by at most the values so counted.
            diff = np.abs(np.cumsum(ha) - np.cumsum(hb))
            assert diff.max() <= flows, what


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    """2 gloo ranks under DDP: merged statistics equal a single process running both ranks'
    batches, parameters equal its updates (and plain SGD on the concatenated batch), every
    rank gets the same snapshot, and consolidating into rank 0 changes nothing."""
    port = _free_port()
    code = (
        "import sys, torch.multiprocessing as mp, _dist_workers as W\n"
        f"mp.spawn(W.ddp_train_worker, args=(2, {port}, sys.argv[1]), nprocs=2)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.perf_counter() - t0 < 120
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    ref_rows, ref_params, full_params = _reference_run()

    assert r0["merged"] == r1["merged"]  # every rank gets the same snapshot
    _compare_rows(r0["merged"], ref_rows)
    # The ranks really accumulated different data locally (DDP did not sync the buffers).
    assert r0["local"] != r1["local"]
    for a, b, m in zip(r0["local"], r1["local"], r0["merged"], strict=True):
        assert a["count"] + b["count"] == m["count"]
    # Consolidation: rank 0 holds everything, rank 1 is empty, merged figures unchanged.
    assert r0["after_consolidate"] == r1["after_consolidate"]
    _compare_rows(r0["after_consolidate"], r0["merged"])
    assert all(row["count"] == 0 for row in r1["local_after"])
    _compare_rows(r0["local_after"], r0["merged"])
    for name, p in ref_params.items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        torch.testing.assert_close(r0["params"][name], p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r0["params"][name], full_params[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- launching


def _launch_code(what: str) -> str:
    return (
        "import sys\n"
        "from fastmlp.distributed import launch\n"
        f"sys.exit(launch(2, [{what!r}, sys.argv[1]], module='_dist_workers'))\n"
    )


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_failing_rank_reports_its_error(tmp_path: Path) -> None:
    """An exception on one rank ends the job with exit status 1 and the rank's error."""
    proc = subprocess.run(
        [sys.executable, "-c", _launch_code("fail"), str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("_dist_workers: error: rank 1 of 2 failed (exit code 1"), last
    assert last[1] == "  rank 1: ValueError: deliberate failure on rank 1", last


def test_single_process_snapshot_is_local() -> None:
    """Without a process group, snapshot() is the local one and nothing is communicated."""
    model = W.make_model()
    x, y = W.global_batches(steps=1)[0]
    F.cross_entropy(model(x), y).backward()
    from fastmlp import distributed

    assert not distributed.is_distributed()
    assert distributed.wrap_model(model) is model
    rows = model.stats.snapshot().rows()
    assert (
        rows == model.stats.snapshot(local=True).rows() == distributed.snapshot(model.stats).rows()
    )
    assert math.isfinite(rows[0]["var"])


# ----------------------------------------------------------------------------- fastmlp train

FLAGS = ["--depth", "1", "--width", "16", "--batch-size", "10", "--eval-every", "5",
         "--probe-every", "10", "--probe-size", "50", "--valid-size", "100", "--test-size",
         "100", "--jacobian-every", "-1", "--no-tensorboard", "--no-progress",
         "--train-histograms"]  # fmt: skip


def _fastmlp(*args: str, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastmlp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_nproc_2_trains_writes_one_run_and_resumes(tmp_path: Path) -> None:
    """2 gloo ranks on a tiny Shapeset run: one run directory, training statistics merged over
    both ranks (global batch 2 x 10; the checkpoints at steps 5 and 15 move every rank's
    statistics into rank 0 mid-way, so exact counts also check that), no row written twice;
    --resume extends it on 2 ranks and refuses another number of processes."""
    res = _fastmlp("train", "--nproc", "2", *FLAGS, "--steps", "20", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    stats = read_jsonl(run / "stats.jsonl")
    keys = [(r["step"], r["source"], r["layer"], r["quantity"]) for r in stats]
    assert len(keys) == len(set(keys)), "a statistics row was written twice"
    assert {(r["step"], r["source"]) for r in stats} == {
        (0, "probe"), (10, "probe"), (10, "train"), (20, "probe"), (20, "train"),
    }  # fmt: skip
    for r in stats:
        if r["source"] == "train" and r["layer"] == 1 and r["quantity"] == "preactivation":
            # 10 steps x 10 examples x 16 units on each of the 2 ranks
            assert r["count"] == 10 * 10 * 16 * 2
            assert sum(r["hist_counts"]) + r["underflow"] + r["overflow"] == r["count"]
        if r["source"] == "probe" and r["layer"] == 1 and r["quantity"] == "activation":
            assert r["count"] == 50 * 16  # probed once (rank 0), not once per rank
    metrics = read_jsonl(run / "metrics.jsonl")
    mkeys = [(m["step"], m["split"]) for m in metrics]
    assert sorted(mkeys) == sorted(
        [(0, "valid"), (0, "test")]
        + [(s, split) for s in (5, 10, 15, 20) for split in ("train", "valid", "test")]
    )
    assert load_checkpoint(run / "checkpoint.pt")["world_size"] == 2

    res = _fastmlp("train", "--nproc", "2", "--resume", str(run), "--steps", "30", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert len(list((tmp_path / "runs").iterdir())) == 1
    stats = read_jsonl(run / "stats.jsonl")
    keys = [(r["step"], r["source"], r["layer"], r["quantity"]) for r in stats]
    assert len(keys) == len(set(keys))
    assert {r["step"] for r in stats} == {0, 10, 20, 30}
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 30

    res = _fastmlp("train", "--resume", str(run), "--steps", "40", cwd=tmp_path)
    assert res.returncode != 0
    assert "same number" in res.stderr and "--nproc 2" in res.stderr


def test_argv_from_args_round_trips() -> None:
    """The flags handed to the --nproc processes parse back to the same arguments."""
    parser = build_parser()
    argv = ["train", "--nproc", "2", "--depth", "3", "--lr", "0.125", "--jacobian-every", "-1",
            "--no-train-histograms", "--no-progress", "--no-train-stats", "--download",
            "--out", "some dir"]  # fmt: skip
    args = parser.parse_args(argv)
    sub = args._parser
    regenerated = argv_from_args(sub, args, skip=("nproc",))
    assert "--nproc" not in " ".join(regenerated)
    again = parser.parse_args(["train", *regenerated])
    strip = {"func", "_parser", "nproc"}

    def plain(ns: argparse.Namespace) -> dict:
        return {k: v for k, v in vars(ns).items() if k not in strip}

    assert plain(again) == plain(args)


def test_nproc_refuses_an_existing_run_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "x"])
def test_nproc_must_be_a_positive_integer(bad: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--nproc", bad])
    assert e.value.code == 2 and "--nproc" in capsys.readouterr().err


def test_nproc_under_torchrun_must_match(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["train", "--nproc", "3"])
    assert "leave --nproc out" in capsys.readouterr().err


def _workers(agent: int) -> dict[int, int]:
    """``{LOCAL_RANK: pid}`` of the processes the agent ``agent`` started (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                out[int(item.split(b"=", 1)[1])] = int(d.name)
    return out


def test_killed_rank_ends_the_train_job_and_it_resumes(tmp_path: Path) -> None:
    """SIGKILL one of the two ranks of `fastmlp train --nproc 2`: the job exits non-zero with a
    clear message within 60 s and leaves no rank behind; --resume continues from the last
    checkpoint with every row exactly once."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastmlp", "train", "--nproc", "2", *FLAGS,
           "--probe-every", "20", "--steps", "1000000", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any(
            r.get("source") == "train" for r in _rows(run / "stats.jsonl")
        ):  # training is under way, past a checkpoint
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training statistics after 90 s"
            time.sleep(0.05)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and elapsed < 60
    assert "fastmlp: error: rank 1 of 2 failed (killed by signal SIGKILL" in err, err[-3000:]
    time.sleep(0.5)
    assert (
        not Path(f"/proc/{workers[0]}").exists()
        or "Z" in (Path(f"/proc/{workers[0]}/stat").read_text().rsplit(")", 1)[1].split()[:1])
    ), "rank 0 still running"

    at = load_checkpoint(run / "checkpoint.pt")["step"]
    steps = at + 30
    res = _fastmlp("train", "--nproc", "2", "--resume", str(run), "--steps", str(steps),
                   cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    stats = read_jsonl(run / "stats.jsonl")
    keys = [(r["step"], r["source"], r["layer"], r["quantity"]) for r in stats]
    assert len(keys) == len(set(keys)), "a statistics row was written twice"
    train_steps = sorted({r["step"] for r in stats if r["source"] == "train"})
    assert train_steps == list(range(20, steps + 1, 20)) + ([steps] if steps % 20 else [])
    for r in stats:
        if r["source"] == "train" and r["layer"] == 1 and r["quantity"] == "preactivation":
            n_steps = r["step"] - max(s for s in [0, *train_steps] if s < r["step"])
            assert r["count"] == n_steps * 10 * 16 * 2, (r["step"], r["count"])
    metrics = read_jsonl(run / "metrics.jsonl")
    mkeys = [(m["step"], m["split"]) for m in metrics]
    assert len(mkeys) == len(set(mkeys)) and max(m["step"] for m in metrics) == steps


def _rows(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except (FileNotFoundError, ValueError):
        return []


def test_exit_rank_runs_exit_handlers_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    """A rank's process ends with the status given, its atexit handlers run and what it wrote
    to stdout reaches the reader (the interpreter's teardown is what it skips)."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys\n"
        "from fastmlp import distributed\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('unflushed line')\n"
        "distributed.exit_rank(3)\n"
        "print('not reached')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout == "unflushed line"
    assert marker.read_text() == "yes"


def test_setup_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmlp import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.setup()
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()


def test_setup_reports_bad_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmlp import distributed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        distributed.setup(backend="gloo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("FASTMLP_DIST_TIMEOUT", "soon")
    with pytest.raises(RuntimeError, match="FASTMLP_DIST_TIMEOUT"):
        distributed.setup(backend="gloo")
    with pytest.raises(ValueError, match="backend must be"):
        distributed.setup(backend="mpi")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(RuntimeError, match="RANK='two' is not an integer"):
        distributed.setup()
    assert not torch.distributed.is_initialized()
