"""The fused Triton kernels against a float64 reference and against the PyTorch path.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py),
with CPU tensors; with one, on CUDA tensors. Every case runs two training
steps through an ``InstrumentedLinear`` with ``backend="triton"`` and one with
``backend="torch"`` holding the same weights: the first step calibrates the
statistics (PyTorch ops in both), the second runs the kernels, with inputs
scaled up so that automatic histogram ranges must grow on the device.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import (
    FIXED_RANGE,
    FROM_INPUT_ACTS,
    SATURATION,
    assert_matches,
    capture,
    stream_stats,
)

from fastmlp.backends import fused as K
from fastmlp.layers import InstrumentedLinear
from fastmlp.stats import QUANTITIES
from fastmlp.stats.snapshot import Snapshot

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parent.parent
ACTS = ("sigmoid", "tanh", "softsign", "relu", "identity", "gelu", "gelu_tanh", "silu")

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not K.INTERPRET,
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Compare IEEE float32 dots (the GPU default "highest"; exact fp32 in the interpreter)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the kernel passes, to make sure the second step did not fall back to PyTorch."""
    calls = {"forward": 0, "backward": 0}
    fwd, bwd = K.forward, K.backward

    def count_fwd(*a, **k):
        calls["forward"] += 1
        return fwd(*a, **k)

    def count_bwd(*a, **k):
        calls["backward"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(K, "forward", count_fwd)
    monkeypatch.setattr(K, "backward", count_bwd)
    return calls


def make_pair(act: str, k: int, n: int, bias: bool, seed: int):
    """Two layers with identical parameters: PyTorch path and Triton kernels."""
    g = torch.Generator().manual_seed(seed)
    ref = InstrumentedLinear(k, n, act, init="pytorch", bias=bias, backend="torch", generator=g)
    tri = InstrumentedLinear(k, n, act, init="pytorch", bias=bias, backend="triton")
    tri.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), tri.to(DEVICE)


def step(layer: InstrumentedLinear, x: torch.Tensor, g: torch.Tensor):
    """Forward + backward of ``sum(h * g)``; returns h, dx, dW, db."""
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    h = layer(x)
    h.backward(g)
    db = layer.bias.grad if layer.bias is not None else None
    return h.detach(), x.grad, layer.weight.grad, db


def batches(m: int, k: int, n: int, seed: int, scale: float = 6.0):
    """Two (x, upstream) pairs; the second is ``scale`` times larger, to force range growth."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(m, k, generator=g)
    g1 = torch.randn(m, n, generator=g)
    x2 = scale * torch.randn(m, k, generator=g)
    g2 = scale * torch.randn(m, n, generator=g)
    return (x1, g1), (x2, g2)


def inject_nonfinite(x: torch.Tensor, up: torch.Tensor, seed: int) -> None:
    """NaN and +-Inf into the input and the upstream gradient (in place)."""
    g = torch.Generator().manual_seed(seed)
    m, k = x.shape
    n = up.shape[1]

    def pick(rows, cols):
        return (
            int(torch.randint(rows, (), generator=g)),
            int(torch.randint(cols, (), generator=g)),
        )

    x[pick(m, k)] = float("nan")
    if m > 1:
        x[pick(m, k)] = float("inf")
    up[pick(m, n)] = float("nan")
    up[pick(m, n)] = float("-inf")
    up[pick(m, n)] = float("inf")


def grad_from_output(act: str, h: torch.Tensor, up: torch.Tensor) -> np.ndarray:
    """dL/dz in float64 from the layer's output ``h`` (relu: PyTorch's threshold_backward)."""
    h64, u64 = h.detach().double().cpu().numpy(), up.detach().double().cpu().numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        if act == "relu":
            return np.where(h64 <= 0, 0.0, u64)
        f = {
            "sigmoid": lambda v: v * (1 - v),
            "tanh": lambda v: 1 - v * v,
            "softsign": lambda v: (1 - np.abs(v)) ** 2,
            "identity": np.ones_like,
        }[act]
        return u64 * f(h64)


def close(a, b, rtol=2e-5, atol_scale=2e-6):
    """``assert_close`` with an absolute tolerance relative to the data's magnitude."""
    a64, b64 = a.detach().double().cpu(), torch.as_tensor(b).double().cpu()
    fin = torch.isfinite(b64)
    scale = float(b64[fin].abs().max()) if fin.any() else 1.0
    torch.testing.assert_close(a64, b64, rtol=rtol, atol=atol_scale * scale + 1e-30, equal_nan=True)


def snapshot(layer: InstrumentedLinear) -> dict:
    return Snapshot.from_layers([(1, layer.stats)])[1]


def assert_same_stats(qa, qb, ref: dict, where: str) -> None:
    """The kernel's and the PyTorch path's figures of one quantity agree."""
    assert qa.count == qb.count, where
    assert qa.nonfinite == qb.nonfinite, where
    for name in ("mean", "var", "std", "min", "max", "saturated_low", "saturated_high"):
        va, vb = getattr(qa, name), getattr(qb, name)
        assert (va is None) == (vb is None), (where, name)
        if va is None:
            continue
        if name == "mean":
            scale = abs(qb.mean) + qb.std
        elif name in ("min", "max"):
            scale = max(abs(qb.min), abs(qb.max))
        else:
            scale = abs(vb)
        if name.startswith("saturated"):
            # a value on a threshold may round to either side: allow the ambiguous ones
            assert abs(va - vb) * qb.count <= ref["ambiguous"] + 1e-9, (where, name, va, vb)
            continue
        assert abs(va - vb) <= 1e-5 * scale + 1e-12, (where, name, va, vb)
    assert (qa.hist_counts is None) == (qb.hist_counts is None), where
    if qa.hist_counts is not None:
        assert qa.hist_edges == qb.hist_edges, where
        diff = np.abs(np.subtract(qa.hist_counts, qb.hist_counts)).sum()
        diff += abs(qa.underflow - qb.underflow) + abs(qa.overflow - qb.overflow)
        assert diff <= 2 * ref["ambiguous"], (where, diff, ref["ambiguous"])


def check_case(act, bias, m, k, n, seed, nonfinite=False, calls=None):
    ref_layer, tri = make_pair(act, k, n, bias, seed)
    (x1, g1), (x2, g2) = batches(m, k, n, seed + 1)
    if nonfinite:
        inject_nonfinite(x2, g2, seed + 2)
    captured = []
    outs = {}
    for i, (x, g) in enumerate(((x1, g1), (x2, g2))):
        x, g = x.to(DEVICE), g.to(DEVICE)
        out_ref = step(ref_layer, x, g)
        out_tri = step(tri, x, g)
        w, b = tri.weight.detach(), None if tri.bias is None else tri.bias.detach()
        # float64 reference; dL/dz through the layer's own h (the contract of Activation.backward)
        # or, for GELU and SiLU, float64 autograd through z
        cap = capture(x.cpu(), w.cpu(), None if b is None else b.cpu(), act, g.cpu())
        if act in FROM_INPUT_ACTS:
            dz64 = cap["preactivation_grad"]
        else:
            cap["preactivation_grad"] = dz64 = grad_from_output(act, out_tri[0], g)
        with np.errstate(invalid="ignore", over="ignore"):
            cap["weight_grad"] = dz64.T @ x.detach().double().cpu().numpy()
        captured.append(cap)
        outs[i] = (out_ref, out_tri, cap, x, g)
    if calls is not None:
        assert calls == {"forward": 1, "backward": 1}, calls

    # outputs and gradients of the kernel step vs float64 and vs the PyTorch path
    (h_r, dx_r, dw_r, db_r), (h_t, dx_t, dw_t, db_t), cap, x, g = outs[1]
    close(h_t, cap["activation"])
    if act == "gelu":
        # PyTorch's float32 CPU gelu gives NaN at z = +inf (its float64 one, the kernel and
        # the definition z * Phi(z) give +inf): compare the paths elsewhere
        keep = ~torch.from_numpy(np.isinf(cap["activation"]))
        close(h_t[keep], h_r[keep])
    else:
        close(h_t, h_r)
    w64 = tri.weight.detach().double().cpu()
    dz64 = torch.from_numpy(cap["preactivation_grad"])
    with np.errstate(invalid="ignore"):
        dx64 = dz64 @ w64
    close(dx_t, dx64)
    close(dx_t, dx_r)
    close(dw_t, cap["weight_grad"])
    close(dw_t, dw_r)
    if bias:
        close(db_t, dz64.sum(0))
        close(db_t, db_r)
    else:
        assert db_t is None and db_r is None

    # every statistic vs the float64 stream reference and vs the PyTorch path
    snap_t, snap_r = snapshot(tri), snapshot(ref_layer)
    for qi, q in enumerate(QUANTITIES):
        fixed = FIXED_RANGE.get(act) if q == "activation" else None
        thr = SATURATION.get(act) if q == "activation" else None
        vals = [c[q] for c in captured]
        span = max(float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in vals)
        ref = stream_stats(vals, fixed_range=fixed, thresholds=thr, tol=2e-5 * span + 1e-30)
        where = f"{act} bias={bias} {m}x{k}x{n} {q}"
        assert_matches(
            snap_t[q], ref, saturating=thr is not None, check_percentile=False, minmax_rel=2e-5
        )
        assert_same_stats(snap_t[q], snap_r[q], ref, where)
        assert torch.equal(tri.stats.hist_range[qi].cpu(), ref_layer.stats.hist_range[qi].cpu())
    return ref_layer, tri


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_every_activation(act, bias, kernel_calls):
    check_case(act, bias, 37, 70, 50, seed=hash((act, bias)) % 1000, calls=kernel_calls)


SHAPES = [(m, k, n) for m in (1, 10, 37) for k in (3, 70) for n in (50, 129)]


@pytest.mark.parametrize("i,shape", list(enumerate(SHAPES)))
def test_odd_shapes(i, shape, kernel_calls):
    m, k, n = shape
    check_case(ACTS[i % len(ACTS)], i % 2 == 0, m, k, n, seed=100 + i, calls=kernel_calls)


@pytest.mark.parametrize("shape", [(24, 40, 48), (10, 64, 16)])
def test_aligned_shapes(shape, kernel_calls):
    """Strides, N and K multiples of 8: the kernels get them divided by ALIGN=8."""
    m, k, n = shape
    check_case("tanh", True, m, k, n, seed=sum(shape), calls=kernel_calls)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_nonfinite_injected(act, bias, kernel_calls):
    check_case(
        act, bias, 10, 70, 50, seed=200 + ACTS.index(act), nonfinite=True, calls=kernel_calls
    )


def test_range_grows_on_device():
    """Step 2 exceeds the calibrated range: under/overflow counted, ranges doubled, bins merged."""
    _, tri = check_case("relu", True, 37, 70, 50, seed=7)
    snap = snapshot(tri)
    for q in ("preactivation", "activation", "preactivation_grad", "weight_grad"):
        assert snap[q].underflow + snap[q].overflow > 0, q  # values beyond the first range
    # the ranges cover everything seen
    for qi in range(4):
        lo, hi = tri.stats.hist_range[qi].tolist()
        mn, mx = tri.stats.acc[qi, 3].item(), tri.stats.acc[qi, 4].item()
        assert lo <= mn and mx <= hi


def test_input_without_grad_and_no_stats(kernel_calls):
    """dX is skipped for an input that needs no grad; stats=None records nothing."""
    ref_layer, tri = make_pair("tanh", 70, 50, True, seed=3)
    (x1, g1), (x2, g2) = batches(37, 70, 50, 4)
    for x, g in ((x1, g1), (x2, g2)):
        x, g = x.to(DEVICE), g.to(DEVICE)
        for layer in (ref_layer, tri):
            layer.weight.grad = None
            layer(x).backward(g)  # x needs no grad
    close(tri.weight.grad, ref_layer.weight.grad)
    assert kernel_calls == {"forward": 1, "backward": 1}
    acc_before = tri.stats.acc.clone()
    hist_before = tri.stats.hist.clone()
    tri.stats.enabled = False
    ref_layer.stats.enabled = False
    x = x2.to(DEVICE).requires_grad_(True)
    h = tri(x)
    h.backward(g2.to(DEVICE))
    xr = x2.to(DEVICE).requires_grad_(True)
    ref_layer(xr).backward(g2.to(DEVICE))
    close(x.grad, xr.grad)
    assert torch.equal(tri.stats.acc, acc_before) and torch.equal(tri.stats.hist, hist_before)
    assert kernel_calls == {"forward": 2, "backward": 2}


def test_noncontiguous_input_and_upstream():
    ref_layer, tri = make_pair("softsign", 70, 50, True, seed=5)
    base = torch.randn(70, 2 * 37, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    x = base.t()[::2]  # [37, 70], strides (2, 74)
    gbase = torch.randn(50, 37, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    g = gbase.t()  # [37, 50], column-major
    assert not x.is_contiguous() and not g.is_contiguous()
    for _ in range(2):
        out_r = step(ref_layer, x, g)
        out_t = step(tri, x, g)
    for a, b in zip(out_t, out_r, strict=True):
        close(a, b)
    close(tri.stats.acc[:, :3], ref_layer.stats.acc[:, :3], rtol=1e-5, atol_scale=1e-6)


def test_histograms_and_saturation_off():
    ref_layer, tri = make_pair("sigmoid", 70, 50, True, seed=9)
    for layer in (ref_layer, tri):
        layer.stats.histograms = False
        layer.stats.saturation = False
    (x1, g1), (x2, g2) = batches(10, 70, 50, 10)
    for x, g in ((x1, g1), (x2, g2)):
        step(ref_layer, x.to(DEVICE), g.to(DEVICE))
        step(tri, x.to(DEVICE), g.to(DEVICE))
    assert int(tri.stats.hist.abs().sum()) == 0
    # counts exact; abs_sum (the last field, a float sum like the moments) close
    assert torch.equal(tri.stats.acc[:, 5:-1], ref_layer.stats.acc[:, 5:-1])
    close(tri.stats.acc[:, :5], ref_layer.stats.acc[:, :5], rtol=1e-5, atol_scale=1e-6)
    close(tri.stats.acc[:, -1:], ref_layer.stats.acc[:, -1:], rtol=1e-5, atol_scale=1e-6)


def test_more_bins_than_the_kernels_take_run_on_the_torch_path(kernel_calls):
    """A layer with more bins than ``fastmlp.backends.fused.MAX_BINS`` still trains under
    backend="triton": its passes run on the PyTorch path, with the same statistics."""
    bins = K.MAX_BINS * 2
    g = torch.Generator().manual_seed(3)
    ref = InstrumentedLinear(30, 20, "tanh", bins=bins, backend="torch", generator=g)
    tri = InstrumentedLinear(30, 20, "tanh", bins=bins, backend="triton")
    tri.load_state_dict(ref.state_dict())
    for x, up in batches(9, 30, 20, 4):
        step(ref.to(DEVICE), x.to(DEVICE), up.to(DEVICE))
        step(tri.to(DEVICE), x.to(DEVICE), up.to(DEVICE))
    assert kernel_calls == {"forward": 0, "backward": 0}
    assert (
        Snapshot.from_layers([(1, tri.stats)]).rows()
        == Snapshot.from_layers([(1, ref.stats)]).rows()
    )


def test_deterministic_mode_is_bitwise_reproducible():
    """Deterministic mode: identical statistics twice, equal to the atomic mode's up to rounding."""
    results = []
    try:
        for det in (True, True, False):
            K.set_deterministic(det)
            assert K.is_deterministic() == det
            _, tri = make_pair("tanh", 70, 129, True, seed=11)
            (x1, g1), (x2, g2) = batches(37, 70, 129, 12)
            for x, g in ((x1, g1), (x2, g2), (x2 * 0.5, g2)):
                step(tri, x.to(DEVICE), g.to(DEVICE))
            results.append((tri.stats.acc.clone(), tri.stats.hist.clone()))
    finally:
        K.set_deterministic(os.environ.get("FASTMLP_DETERMINISTIC", "0") == "1")
    (a1, h1), (a2, h2), (a3, h3) = results
    assert torch.equal(a1, a2) and torch.equal(h1, h2)
    assert torch.equal(h1, h3)
    torch.testing.assert_close(a1, a3, rtol=1e-12, atol=1e-9)


def test_many_steps_match_torch_path():
    """Six steps (range growth, bin merging, shifted sums) stay on the PyTorch path's numbers."""
    ref_layer, tri = make_pair("identity", 70, 50, True, seed=13)
    gen = torch.Generator().manual_seed(14)
    for i in range(6):
        s = 2.0 ** (i % 4)
        x = (s * torch.randn(10, 70, generator=gen) + 3.0).to(DEVICE)
        g = (s * torch.randn(10, 50, generator=gen)).to(DEVICE)
        step(ref_layer, x, g)
        step(tri, x, g)
    snap_t, snap_r = snapshot(tri), snapshot(ref_layer)
    for q in QUANTITIES:
        qt, qr = snap_t[q], snap_r[q]
        assert qt.count == qr.count and qt.hist_edges == qr.hist_edges, q
        assert math.isclose(qt.mean, qr.mean, rel_tol=1e-6, abs_tol=1e-6 * qr.std), q
        assert math.isclose(qt.var, qr.var, rel_tol=1e-5), q
        diff = np.abs(np.subtract(qt.hist_counts, qr.hist_counts)).sum()
        assert diff <= max(2, qt.count // 500), (q, diff)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU compiles the kernels anyway")
def test_kernels_compile_for_sm90():
    """The interpreter is lenient: lower a few variants through the real NVIDIA backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "FAIL" not in proc.stdout:
        pytest.skip(f"cannot compile here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_float16_and_tf32_paths():
    """float16 tensors (fp32 accumulation, fp32 statistics) and the TF32 setting run and agree."""
    gen = torch.Generator().manual_seed(21)
    x1, x2 = torch.randn(37, 70, generator=gen), 4 * torch.randn(37, 70, generator=gen)
    g1, g2 = torch.randn(37, 50, generator=gen), torch.randn(37, 50, generator=gen)
    # float16: compare with float64 computed from the same (rounded) float16 values
    ref_layer, tri = make_pair("tanh", 70, 50, True, seed=22)
    tri = tri.half()
    for x, g in ((x1, g1), (x2, g2)):
        xh, gh = x.half().to(DEVICE), g.half().to(DEVICE)
        h, dx, dw, db = step(tri, xh, gh)
        assert h.dtype == dx.dtype == dw.dtype == db.dtype == torch.float16
    w64, b64 = tri.weight.detach().double().cpu(), tri.bias.detach().double().cpu()
    x64, g64 = x2.half().double(), g2.half().double()
    h64 = torch.tanh(x64 @ w64.t() + b64)
    close(h, h64, rtol=1e-2, atol_scale=2e-3)
    dz64 = g64 * (1 - h.double().cpu() ** 2)
    close(dx, dz64 @ w64, rtol=2e-2, atol_scale=5e-3)
    close(dw, dz64.t() @ x64, rtol=2e-2, atol_scale=5e-3)
    close(db, dz64.sum(0), rtol=2e-2, atol_scale=5e-3)
    snap = snapshot(tri)
    assert snap["activation"].count == snap["preactivation_grad"].count == 2 * 37 * 50
    ref = stream_stats(
        [torch.tanh(x.half().double() @ w64.t() + b64).numpy() for x in (x1, x2)],
        fixed_range=(-1.0, 1.0),
    )
    assert abs(snap["activation"].mean - ref["mean"]) < 1e-2
    # TF32 allowed: same numbers within TF32 rounding
    ref_layer, tri = make_pair("sigmoid", 70, 50, True, seed=23)
    torch.set_float32_matmul_precision("high")
    for x, g in ((x1, g1), (x2, g2)):
        out_r = step(ref_layer, x.to(DEVICE), g.to(DEVICE))
        out_t = step(tri, x.to(DEVICE), g.to(DEVICE))
    for a, b in zip(out_t, out_r, strict=True):
        close(a, b, rtol=5e-3, atol_scale=5e-3)


def test_expanded_upstream_gradient():
    """``h.sum().backward()`` gives a stride-0 upstream gradient."""
    ref_layer, tri = make_pair("relu", 70, 129, False, seed=24)
    gen = torch.Generator().manual_seed(25)
    for _ in range(2):
        x = torch.randn(10, 70, generator=gen).to(DEVICE)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        for layer, xi in zip((ref_layer, tri), xs, strict=True):
            layer.weight.grad = None
            layer(xi).sum().backward()
    close(xs[1].grad, xs[0].grad)
    close(tri.weight.grad, ref_layer.weight.grad)
    assert snapshot(tri)["preactivation_grad"].count == 2 * 10 * 129


def test_autotuned_choice_is_cached(monkeypatch):
    """The GPU launch path: the autotuner runs once per key, later launches reuse its choice."""
    import triton

    class FakeKernel:
        __name__ = "fake_kernel"

        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **kw: self.launches.append((grid, args, kw))

    class FakeTuner(FakeKernel):
        best_config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=2, num_stages=5)

        def __getitem__(self, grid_fn):
            return lambda *args, **kw: self.launches.append((grid_fn(self.best_config.kwargs), kw))

    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "_BEST", {})
    kernel, tuner = FakeKernel(), FakeTuner()

    def grid(cfg):
        return (cfg["BLOCK_M"] * 1000 + cfg["BLOCK_N"],)

    for _ in range(3):
        K._launch(kernel, tuner, grid, (1, 2), {"ACT": 2}, False, (64, 50, 70))
    assert len(tuner.launches) == 1 and tuner.launches[0][0] == (32064,)
    assert len(kernel.launches) == 2
    g, args, kw = kernel.launches[-1]
    assert g == (32064,) and args == (1, 2)
    assert kw == {"ACT": 2, "BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 2, "num_stages": 5}
    # another variant or shape is tuned separately
    K._launch(kernel, tuner, grid, (1, 2), {"ACT": 1}, False, (64, 50, 70))
    assert len(tuner.launches) == 2
    # deterministic mode: the fixed configuration, never the tuner
    K._launch(kernel, tuner, grid, (1, 2), {"ACT": 2}, True, (64, 50, 70))
    assert len(tuner.launches) == 2 and kernel.launches[-1][2]["BLOCK_M"] == 64
