"""Large-model training features (issue 24): FSDP2, DDP with ``no_sync``, tensor parallelism,
gradient accumulation and mixed precision, each against a single-process reference.

Everything runs on the CPU, but for the GPU-marked test (the kernels, on CUDA). The
distributed cases (FSDP2 ``fully_shard`` in fp32 and bf16, ``reshard_after_forward`` True
and False, DDP, and tensor parallelism) run in ONE spawn of 2 gloo ranks, after
their single-process references, in a subprocess of its own session
(``tests/_large_workers.py``) with a hard timeout: a hang fails the tests (the whole process
group is killed) instead of blocking the suite. The data and the initialization come from a
fresh random seed per session (``FASTMLP_TEST_SEED`` replays one; every failure message
names it).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmlp

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import _large_workers as W  # noqa: E402
from _reference import pow2_above  # noqa: E402

SEED = int(os.environ.get("FASTMLP_TEST_SEED") or secrets.randbelow(2**31))
FORWARD = ("preactivation", "activation")
PROPAGATED = ("preactivation", "activation", "preactivation_grad")
SPAWN_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows_by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["layer"], r["name"], r["quantity"]): r for r in rows}


def _moment_tolerances(v, *, rtol: float = 1e-5) -> tuple[float, float]:
    """Absolute tolerances of (mean, var) against values ``v`` (an array, or a row with
    ``mean`` and ``var``): ``rtol`` of the std and of the variance (float32 sums of deviations
    per batch)."""
    mean, var = (float(v.mean()), float(v.var())) if isinstance(v, np.ndarray) else v
    mean_tol = rtol * math.sqrt(var) + 1e-12
    var_tol = rtol * var + 1e-15
    return mean_tol, var_tol


def _assert_same_stats(
    got: list[dict],
    ref: list[dict],
    quantities: tuple[str, ...],
    what: str,
) -> None:
    """Rows of ``quantities`` agree: counts and extremes exactly, moments to
    :func:`_moment_tolerances` (the CPU path sums float32 deviations per batch around each
    process's own shift).

    Histograms: same edges and totals; the same counts where neither side has values counted
    as under/overflow. A value outside the range a process had calibrated when it arrived
    stays counted as under/overflow (the range grows for later batches), so with several
    ranks, each calibrating on its own batches, the split between bins and flows depends on
    arrival order: the cumulative counts may then differ by at most the values so counted."""
    g, r = _rows_by_key(got), _rows_by_key(ref)
    assert g.keys() == r.keys(), what
    checked = 0
    for key, b in r.items():
        if key[2] not in quantities:
            continue
        a = g[key]
        where = f"{what}, layer {key[0]} ({key[1]}) {key[2]}, seed {SEED}"
        assert a["count"] == b["count"] > 0 and a["nonfinite"] == b["nonfinite"] == 0, where
        mean_tol, var_tol = _moment_tolerances((b["mean"], b["var"]))
        assert a["mean"] == pytest.approx(b["mean"], abs=mean_tol), where
        assert a["var"] == pytest.approx(b["var"], abs=var_tol), where
        assert (a["min"], a["max"]) == (b["min"], b["max"]), where
        assert a["hist_edges"] == b["hist_edges"], where
        ha = np.array([a["underflow"], *a["hist_counts"], a["overflow"]])
        hb = np.array([b["underflow"], *b["hist_counts"], b["overflow"]])
        assert ha.sum() == hb.sum() == a["count"], where
        flows = a["underflow"] + a["overflow"] + b["underflow"] + b["overflow"]
        if flows == 0:
            np.testing.assert_array_equal(ha, hb, err_msg=where)
        else:
            assert np.abs(np.cumsum(ha) - np.cumsum(hb)).max() <= flows, where
        checked += 1
    assert checked == 3 * len(quantities), what  # 3 layers


@contextlib.contextmanager
def _addmm_only() -> Iterator[None]:
    """oneDNN off: every float32 product is addmm. Otherwise the PyTorch path picks oneDNN or
    addmm per shape by timing both once per process, so a plain layer and an instrumented
    one, or the same layer on batches of two sizes, may round differently.
    (``mkldnn.flags`` warns about TF32 on Intel GPUs, which is not this test's concern.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield


# ----------------------------------------------------------------------------- the spawn


def _spawn(out: Path, main: str, ranks: int) -> tuple[list[dict], dict]:
    """Run ``_large_workers.<main>(out, port, seed)`` in a subprocess of its own session with
    a hard timeout (a hang fails the test; the whole process group is killed); the ranks'
    saved results and the saved reference."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    code = (
        f"import sys, _large_workers as W\n"
        f"W.{main}(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    )
    cmd = [sys.executable, "-c", code, str(out), str(_free_port()), str(SEED)]
    # Its own session: on a timeout the spawned ranks are killed with their parent.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=SPAWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(
            f"{ranks}-rank spawn still running after {SPAWN_TIMEOUT_S} s (seed {SEED})\n{err}"
        )
    assert proc.returncode == 0, f"seed {SEED}\n{err[-4000:]}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]
    return results, torch.load(out / "reference.pt", weights_only=False)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{case: [rank 0's results, rank 1's]}`` of one 2-rank gloo spawn of every case, and
    ``"reference"``: the single-process references (:mod:`_large_workers`)."""
    ranks, reference = _spawn(tmp_path_factory.mktemp("large"), "main", W.WORLD)
    results = {case: [rk[case] for rk in ranks] for case in ranks[0]}
    results["reference"] = reference
    return results


def _case(dist_results: dict, name: str) -> list[dict]:
    res = dist_results[name]
    for r, one in enumerate(res):
        assert "error" not in one, f"{name}, rank {r} (seed {SEED}):\n{one['error']}"
    return res


# ----------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "no-reshard"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_statistics_equal_single_process(dist_results, dtype, reshard):
    """FSDP2: ``fully_shard`` on every instrumented layer and at the root, 2 gloo ranks,
    ``MixedPrecisionPolicy(param_dtype=...)``. The parameters really are sharded DTensors
    (each rank holds half of each weight); the instrumented layer runs on the unsharded
    parameters FSDP2 all-gathers for its forward and backward. ``stats_of(model).snapshot()``
    on every rank merges the ranks' statistics and equals one process running the same model
    over both ranks' batches: forward quantities over the concatenated batch,
    ``preactivation_grad`` as two accumulated micro-batches with each rank's loss.

    ``weight_grad`` under FSDP2 is recorded inside the layer's backward: it is each rank's
    local, unreduced, full (unsharded) gradient of its own batch's loss, before FSDP2's
    reduce-scatter averages and shards it; merged over ranks it counts ranks x weight numel
    per step and equals the two-micro-batch reference, not the averaged gradient the
    optimizer sees."""
    res = _case(dist_results, f"fsdp-{dtype}-{reshard}")
    r0, r1 = res
    for one in res:
        local = (W.WIDTH // W.WORLD, W.IN_FEATURES)  # rank's half of layer 1's weight
        assert one["sharding"] == {"dtensor": True, "local_shape": local}
        assert one["out_dtypes"] == [f"torch.{dtype}"] * W.STEPS
    assert r0["merged"] == r1["merged"]  # every rank gets the same snapshot
    assert r0["local"] != r1["local"]  # the ranks did record their own batches
    ref = dist_results["reference"][f"fsdp-{dtype}"]
    ref_rows, ref_params = ref["rows"], ref["params"]
    # Same init: the full parameters before the first step are the reference's, bitwise.
    for k, v in ref_params[0].items():
        assert torch.equal(r0["params"][0][k], v), k
    what = f"FSDP2 {dtype} reshard_after_forward={reshard}"
    _assert_same_stats(r0["merged"], ref_rows, (*PROPAGATED, "weight_grad"), what)
    # weight_grad is each rank's full local gradient (recorded in the layer's backward,
    # before the reduce-scatter): ranks x weight numel values a step, not a shard's.
    merged = _rows_by_key(r0["merged"])
    shapes = {"0": (W.WIDTH, W.IN_FEATURES), "2": (W.WIDTH, W.WIDTH), "4": (W.CLASSES, W.WIDTH)}
    for layer, (name, (n_out, n_in)) in enumerate(shapes.items(), start=1):
        count = merged[(layer, name, "weight_grad")]["count"]
        assert count == W.WORLD * n_out * n_in * W.STEPS, name
        count = merged[(layer, name, "activation")]["count"]
        assert count == W.WORLD * W.BATCH * n_out * W.STEPS, name
    # The optimizer's step used the reduced (averaged) gradient: parameters follow the
    # reference's at every step. In bf16, FSDP2 reduce-scatters bf16 gradients (reduce_dtype
    # defaults to param_dtype): one bf16 rounding of the ranks' sum, as the reference's bf16
    # accumulation of its two micro-batches, and halving is exact: equal bitwise.
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == "float32" else {"rtol": 0.0, "atol": 0.0}
    for step in range(1, W.STEPS + 1):
        for k, v in ref_params[step].items():
            assert torch.equal(r0["params"][step][k], r1["params"][step][k]), k
            torch.testing.assert_close(r0["params"][step][k], v, **tol, msg=f"{k} step {step}")


# ----------------------------------------------------------------------------- tensor parallel


def _assert_tp_stats(got: list[dict], ref: list[dict], what: str) -> None:
    """Every row (4 quantities x 3 layers) agrees with the unsharded model's: counts exactly,
    the float64 figures to a few ulps (a row-sharded layer's products are summed in another
    order), the histograms as :func:`_assert_same_stats` says, the per-unit figures
    exactly."""
    g, r = _rows_by_key(got), _rows_by_key(ref)
    assert g.keys() == r.keys() and len(r) == 12, what
    for key, b in r.items():
        a = g[key]
        where = f"{what}, layer {key[0]} ({key[1]}) {key[2]}, seed {SEED}"
        assert a["count"] == b["count"] > 0 and a["nonfinite"] == b["nonfinite"] == 0, where
        for figure in ("mean", "std", "l1", "rms", "min", "max"):
            if figure in b:
                assert a[figure] == pytest.approx(b[figure], rel=1e-9, abs=1e-12), (where, figure)
        for figure in ("dead_fraction", "saturated_low", "saturated_high"):
            assert a[figure] == b[figure], (where, figure)
        assert a["hist_edges"] == b["hist_edges"], where
        ha = np.array([a["underflow"], *a["hist_counts"], a["overflow"]])
        hb = np.array([b["underflow"], *b["hist_counts"], b["overflow"]])
        assert ha.sum() == hb.sum() == a["count"], where
        flows = a["underflow"] + a["overflow"] + b["underflow"] + b["overflow"]
        assert np.abs(np.cumsum(ha) - np.cumsum(hb)).max() <= flows, where


@pytest.mark.parametrize("case", W.TP_CASES)
def test_tensor_parallel_equals_unsharded(dist_results, case):
    """``parallelize_module`` on an ``instrument()``ed model, 2 gloo ranks: layer 0
    ``ColwiseParallel``, layer 2 ``RowwiseParallel`` (its tanh applied after the all-reduce),
    layer 4 ``ColwiseParallel`` gathering its output; ``tp-sp`` with sequence-sharded inputs
    and outputs. Outputs, input gradients, parameters after 2 SGD steps and the merged
    statistics (per-unit counts on) equal the unsharded model's in one process on the whole
    batch. Each rank records its own features of a column-sharded layer; a row-sharded
    layer's pre-activation, activation and their gradient are recorded once (by the mesh's
    first rank), its weight gradient by each rank for its columns."""
    r0, r1 = _case(dist_results, case)
    ref = dist_results["reference"][case]
    for res in (r0, r1):
        assert res["placements"]["0.weight"] == "(Shard(dim=0),)"
        assert res["placements"]["2.weight"] == "(Shard(dim=1),)"
        # parallelized before instrument(): each layer left as it is, saying why
        assert res["late_report"].count("instrument the model first") == 3, res["late_report"]
    for step in range(W.STEPS):
        if case == "tp":
            outs, dxs = [r0["outs"][step], r1["outs"][step]], [r0["dxs"][step]]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
            out, dx = outs[0], dxs[0]
        else:  # each rank's tokens
            out = torch.cat([r0["outs"][step], r1["outs"][step]], dim=1)
            dx = torch.cat([r0["dxs"][step], r1["dxs"][step]], dim=1)
        torch.testing.assert_close(out, ref["outs"][step], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dx, ref["dxs"][step], rtol=1e-12, atol=1e-14)
    for k, v in ref["params"].items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-12, atol=1e-14, msg=k)
    assert r0["merged"] == r1["merged"]
    _assert_tp_stats(r0["merged"], ref["rows"], f"tensor parallel {case}")
    # What each rank recorded: half of a column-sharded layer's features; all of a
    # row-sharded layer's replicated quantities on rank 0 and none on rank 1; half of its
    # weight gradient each.
    local = [_rows_by_key(r["local"]) for r in (r0, r1)]
    full = _rows_by_key(ref["rows"])
    for key, row in full.items():
        layer, quantity = key[0], key[2]
        counts = [loc[key]["count"] for loc in local]
        if layer == 2 and quantity != "weight_grad":
            assert counts == [row["count"], 0], key
        else:
            assert counts == [row["count"] // 2] * 2, key


@pytest.mark.slow
def test_tensor_parallel_with_fsdp2_on_a_2d_mesh_merges_once(tmp_path):
    """A (data parallel 2) x (tensor parallel 2) mesh, 4 gloo ranks: ``parallelize_module`` on
    the ``tp`` dimension, then FSDP2 on ``dp``, each data-parallel group on its own batch.
    The snapshot (merged over all 4 ranks) equals one process running the two groups'
    batches as micro-batches: every value counted once, though each row-sharded layer's
    replicated quantities exist on both ranks of its tensor-parallel group and each batch on
    both. Parameters after the SGD steps equal the reference's."""
    ranks, ref = _spawn(tmp_path, "mesh2d_main", W.MESH_2D[0] * W.MESH_2D[1])
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r} (seed {SEED}):\n{res['error']}"
    assert all(res["merged"] == ranks[0]["merged"] for res in ranks)
    _assert_tp_stats(ranks[0]["merged"], ref["rows"], "2-D mesh: FSDP2 x tensor parallel")
    for k, v in ref["params"].items():
        torch.testing.assert_close(ranks[0]["params"][k], v, rtol=1e-12, atol=1e-14, msg=k)


# ----------------------------------------------------------------------------- DDP + no_sync


def test_ddp_no_sync_accumulation_equals_single_process(dist_results):
    """DDP as the README says (``fastmlp.distributed.wrap_model``: DistributedDataParallel
    with the statistics buffers kept rank-local) around an ``instrument()``ed nn.Sequential,
    2 micro-batches a step, the first under ``no_sync()``: the merged statistics equal one
    process running the 2 ranks x 2 micro-batches as accumulated micro-batches with the same
    per-micro-batch loss, and the parameters after the SGD steps equal its (gradients
    accumulated per rank, then averaged over the ranks, as DDP's all-reduce does)."""
    r0, r1 = _case(dist_results, "ddp")
    assert r0["merged"] == r1["merged"]
    assert r0["local"] != r1["local"]
    ref = dist_results["reference"]["ddp"]
    ref_rows, ref_params = ref["rows"], ref["params"]
    # no_sync really kept the first micro-batch's gradient local: each rank's gradient after
    # it is the gradient of its own micro-batch alone.
    for rank, res in enumerate((r0, r1)):
        for k, g in ref["first_grads"][rank].items():
            torch.testing.assert_close(res["first_grads"][k], g, rtol=1e-6, atol=1e-7)
    _assert_same_stats(r0["merged"], ref_rows, (*PROPAGATED, "weight_grad"), "DDP no_sync")
    for k, p in ref_params.items():
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- accumulation


def _accumulation_model() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)
        )  # fmt: skip


def _forward_values(plain: nn.Sequential, x: torch.Tensor) -> dict[tuple[int, str], np.ndarray]:
    """``{(layer, quantity): values [examples, units]}`` of the forward quantities for ``x``
    (plain fp32 PyTorch)."""
    out, h, layer = {}, x, 0
    mods = list(plain)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            layer += 1
            h = m(h)
            out[(layer, "preactivation")] = h.detach().double().numpy()
            if i + 1 < len(mods):
                h = mods[i + 1](h)
            out[(layer, "activation")] = h.detach().double().numpy()
    return out


@pytest.mark.parametrize("order", ["widest-first", "random"])
def test_gradient_accumulation_equals_one_pass(order):
    """k = 3 micro-batches (7, 5 and 9 examples) through one instrumented model, gradients
    accumulated, against one pass of another instrumented copy over their concatenation,
    both on the PyTorch path.

    Count, mean, variance, min and max of the forward quantities are equal, and so are those
    of ``preactivation_grad`` with a summed loss (each example's gradient does not depend on
    the batching). Histograms: a value outside the range a layer had calibrated when it
    arrived is counted as under/overflow, and the range then grows for later batches (the
    contract written out in ``tests/_reference.py``). So the histogram counts equal the
    single pass's exactly when the first micro-batch holds each layer's largest value
    (``widest-first``); in random order, the under/overflow counts are exactly the values
    that arrived outside the range, and with those binned back the counts equal the single
    pass's."""
    n, sizes = 21, (7, 5, 9)
    g = torch.Generator().manual_seed(SEED + 7)
    scale = torch.linspace(0.5, 3.0, n)[torch.randperm(n, generator=g)]  # unequal rows
    x = torch.randn(n, 12, generator=g) * scale[:, None]
    y = torch.randint(0, 5, (n,), generator=g)
    plain = _accumulation_model()
    with _addmm_only():
        values = _forward_values(plain, x)
        if order == "widest-first":
            # The examples holding some layer's largest |preactivation| or |activation| first.
            first = list(dict.fromkeys(int(np.abs(v).max(1).argmax()) for v in values.values()))
            assert len(first) <= sizes[0]
            perm = torch.tensor(first + [i for i in range(n) if i not in first])
            x, y = x[perm], y[perm]
            values = _forward_values(plain, x)
        micro = fastmlp.instrument(copy.deepcopy(plain), backend="torch")
        whole = fastmlp.instrument(copy.deepcopy(plain), backend="torch")
        for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
            F.cross_entropy(micro(xs), ys, reduction="sum").backward()
        F.cross_entropy(whole(x), y, reduction="sum").backward()
    got = _rows_by_key(fastmlp.stats_of(micro).snapshot().rows())
    ref = _rows_by_key(fastmlp.stats_of(whole).snapshot().rows())
    flowed = 0
    for key, b in ref.items():
        layer, _, q = key
        if q not in (*FORWARD, "preactivation_grad"):
            continue
        a = got[key]
        where = f"{order}: layer {layer} {q}, seed {SEED}"
        assert a["count"] == b["count"] > 0, where
        mean_tol, var_tol = _moment_tolerances((b["mean"], b["var"]))
        assert a["mean"] == pytest.approx(b["mean"], abs=mean_tol), where
        assert a["var"] == pytest.approx(b["var"], abs=var_tol), where
        assert (a["min"], a["max"]) == (b["min"], b["max"]), where
        if q == "preactivation_grad":
            continue
        assert a["hist_edges"] == b["hist_edges"], where
        assert b["underflow"] == b["overflow"] == 0, where  # calibrated on all of it
        # Replay the range policy over the micro-batches: the values that arrived outside.
        outside, r = [], None
        if not (q == "activation" and layer == 1):  # tanh: on its fixed range [-1, 1]
            for part in np.split(values[(layer, q)], np.cumsum(sizes)[:-1]):
                top = float(np.abs(part).max())
                r = pow2_above(top) if r is None else r
                outside.append(part[np.abs(part) > r])
                r = max(r, pow2_above(top))
        flows = np.concatenate(outside) if outside else np.zeros(0)
        flowed += flows.size
        assert (a["underflow"], a["overflow"]) == ((flows < 0).sum(), (flows > 0).sum()), where
        edges = a["hist_edges"]
        back, _ = np.histogram(flows, bins=len(edges) - 1, range=(edges[0], edges[-1]))
        assert (np.array(a["hist_counts"]) + back).tolist() == b["hist_counts"], where
    if order == "widest-first":
        assert flowed == 0  # so the histogram counts above were equal as they are


# ----------------------------------------------------------------------------- mixed precision


@functools.cache
def _interpreter_bf16_problem() -> str | None:
    """Why backend="triton" cannot be tested in bf16 here, or None where it can: it needs the
    interpreter (TRITON_INTERPRET=1, set by conftest.py without CUDA), and the interpreter
    must compute bf16 (probed: a bf16 layer's second pass, the first through the kernels,
    against the PyTorch path's)."""
    try:
        from fastmlp.backends import fused
    except ImportError as e:
        return f"triton cannot be imported: {e}"
    if not fused.INTERPRET:
        return "needs TRITON_INTERPRET=1 (CPU tensors through the Triton interpreter)"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    outs = []
    for backend in ("torch", "triton"):
        layer = fastmlp.InstrumentedLinear(8, 16, "tanh", backend=backend, generator=g)
        layer = layer.to(torch.bfloat16)
        g.manual_seed(1)
        with torch.no_grad(), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's overflows
            layer.weight.copy_(torch.randn(16, 8, generator=g))
            layer(x)  # calibration pass (PyTorch path either way)
            outs.append(layer(x).float())
    err = float((outs[0] - outs[1]).abs().max())
    if err > 1e-2:
        return (
            "Triton's interpreter has no bfloat16 arithmetic: it stores bf16 as uint16 and "
            "applies +, * to the raw bits (triton/runtime/interpreter.py, binary_op; only "
            f"bf16<->fp32 conversions are handled); probed: a bf16 tanh layer's kernel output "
            f"is off by {err:.3g} from the PyTorch path's"
        )
    return None


def _bf16_capture(plain: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """What a bf16 model computes, with plain PyTorch on a bf16 copy: ``F.linear`` in bf16,
    then tanh (identity for the output layer). Returns the output and, per layer, the bf16
    tensors z, h, dL/dz and dL/dW."""
    bf = copy.deepcopy(plain).to(torch.bfloat16)
    linears = [m for m in bf if isinstance(m, nn.Linear)]
    h, zs = x.to(torch.bfloat16), []
    for i, lin in enumerate(linears):
        z = F.linear(h, lin.weight, lin.bias)
        z.retain_grad()
        h = torch.tanh(z) if i < len(linears) - 1 else z
        zs.append((z, h))
    F.cross_entropy(h.float(), y).backward()
    layers = []
    for (z, hh), lin in zip(zs, linears, strict=True):
        layers.append(
            {
                "preactivation": z.detach(),
                "activation": hh.detach(),
                "preactivation_grad": z.grad,
                "weight_grad": lin.weight.grad,
            }
        )
    return h.detach(), layers


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["autocast", "bf16-params"])
def test_mixed_precision_records_the_bf16_values(mode, backend):
    """``torch.autocast("cpu", dtype=torch.bfloat16)`` around an instrumented model's forward,
    and a model made bf16 (``model.to(torch.bfloat16)``): forward and backward run in bf16,
    the output is close to the fp32 model's at bf16 tolerance, and every statistic is of the
    bf16 values the layer computed: z, h, dL/dz and dL/dW as a plain bf16 copy computes them
    (``F.linear`` in bf16, then tanh), converted exactly to float32 (the PyTorch path sums a
    batch's deviations in float32, then accumulates in float64). Their min and max are bf16
    numbers, equal to the bf16 values' own."""
    if backend == "triton":
        problem = _interpreter_bf16_problem()
        if problem:
            pytest.skip(problem)
    g = torch.Generator().manual_seed(SEED + 11)
    x = torch.randn(12, W.IN_FEATURES, generator=g) * 2
    y = torch.randint(0, W.CLASSES, (12,), generator=g)
    plain = W.make_plain(SEED)
    model = fastmlp.instrument(copy.deepcopy(plain), backend=backend)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    else:
        model.to(torch.bfloat16)
        out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y).backward()
    ref_out, captured = _bf16_capture(plain, x, y)
    fp32_out = plain(x).detach()
    # bf16 keeps 8 significant bits; a few roundings per layer.
    torch.testing.assert_close(out.float(), fp32_out, rtol=0.05, atol=0.05 * fp32_out.abs().max())
    assert not torch.equal(out.float(), fp32_out)  # it did compute in bf16
    assert torch.equal(out, ref_out)  # the very values a bf16 model computes
    rows = _rows_by_key(fastmlp.stats_of(model).snapshot().rows())
    linears = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]
    assert len(linears) == len(captured) == 3
    for layer, ((name, lin), cap) in enumerate(zip(linears, captured, strict=True), start=1):
        # The parameter gradient is the bf16 dL/dW (cast to fp32 for fp32 parameters).
        assert lin.weight.grad.dtype == (torch.float32 if mode == "autocast" else torch.bfloat16)
        assert torch.equal(lin.weight.grad.to(torch.bfloat16), cap["weight_grad"])
        for q, values in cap.items():
            assert values.dtype == torch.bfloat16
            v = values.double().numpy().ravel()
            row = rows[(layer, name, q)]
            where = f"{mode}/{backend}: layer {layer} {q}, seed {SEED}"
            assert row["count"] == v.size and row["nonfinite"] == 0, where
            assert (row["min"], row["max"]) == (v.min(), v.max()), where
            for k in ("min", "max"):  # bf16 numbers: not a float32 accumulator's values
                assert float(torch.tensor(row[k]).to(torch.bfloat16)) == row[k], (where, k)
            mean_tol, var_tol = _moment_tolerances(v)
            assert row["mean"] == pytest.approx(v.mean(), abs=mean_tol), where
            assert row["var"] == pytest.approx(v.var(), abs=var_tol), where


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float32, id="float32"),
        pytest.param(torch.bfloat16, id="bfloat16"),
    ],
)
def test_bf16_preactivation_grad_mean_is_exact(dtype):
    """The mean of ``preactivation_grad`` is the float64 mean of the gradient values, also in
    bf16. A lone identity layer, weight 1: batch 1's dL/dz is centred (+-1), so batch 2's
    sum is taken as a total, and batch 2's dL/dz, 1 +- 16 alternating over 257 rows, all
    bf16 numbers, sums to 273, which bf16 rounds to 272."""
    layer = fastmlp.InstrumentedLinear(1, 1, "identity", backend="torch")
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    layer.to(dtype)
    signs = torch.tensor([(-1.0) ** i for i in range(257)])
    values = []
    for up in (torch.tensor([1.0, -1.0] * 8), 1 + 16 * signs):
        up = up.reshape(-1, 1).to(dtype)
        layer(torch.ones(up.shape[0], 1, dtype=dtype)).backward(up)
        values.append(up.double().numpy().ravel())
    v = np.concatenate(values)
    assert v.sum() == 273
    q = fastmlp.stats_of(layer).snapshot()[1]["preactivation_grad"]
    assert q.count == v.size
    assert q.mean == pytest.approx(v.mean(), rel=1e-9)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kernels_checkpointed_accumulation(dtype):
    """On CUDA with the Triton kernels (``backend="auto"``): 3 micro-batches accumulated,
    each layer checkpointed (non-reentrant), under ``torch.autocast(bfloat16)`` in the bf16
    case, record what the PyTorch path (``backend="torch"``, the same device, no
    checkpointing) records over the same micro-batches: the same counts, and moments and
    extremes to the precision of the dtype (the kernels and cuBLAS sum in other orders)."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(SEED + 13)
    xs = [torch.randn(n, 12, generator=g).cuda() * 2 for n in (64, 32, 96)]
    ys = [torch.randint(0, 5, (x.shape[0],), generator=g).cuda() for x in xs]
    plain = _accumulation_model().cuda()
    fast = fastmlp.instrument(copy.deepcopy(plain), backend="auto")
    ref = fastmlp.instrument(copy.deepcopy(plain), backend="torch")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    for x, y in zip(xs, ys, strict=True):
        with autocast:
            h = x
            for m in fast:
                h = checkpoint(m, h, use_reentrant=False)
            F.cross_entropy(h.float(), y, reduction="sum").backward()
            F.cross_entropy(ref(x).float(), y, reduction="sum").backward()
    got = _rows_by_key(fastmlp.stats_of(fast).snapshot().rows())
    want = _rows_by_key(fastmlp.stats_of(ref).snapshot().rows())
    assert got.keys() == want.keys()
    rtol = 1e-4 if dtype == "float32" else 5e-2
    for key, b in want.items():
        a = got[key]
        assert a["count"] == b["count"] > 0, key
        scale = max(abs(b["mean"]), b["std"], 1e-30)
        assert abs(a["mean"] - b["mean"]) <= rtol * scale, key
        assert a["std"] == pytest.approx(b["std"], rel=rtol), key
        assert a["max"] == pytest.approx(b["max"], rel=rtol, abs=rtol * scale), key
    for p, q in zip(fast.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * float(q.grad.abs().max()))
