"""GPU checks of the fused kernels on the paper's 5x1000 network (skipped without CUDA).

Run with ``pytest -m gpu tests/test_kernels_gpu.py`` (``python -m bench.gpu_check``
runs them too). Each test trains a few SGD steps of an instrumented
``MLP(1024 -> 5x1000 tanh -> 10)`` with the Triton backend next to the same
network in float64 on the PyTorch path, and compares outputs, gradients and
statistics with a tolerance per precision.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fastmlp.backends import fused as K
from fastmlp.mlp import MLP
from fastmlp.stats import QUANTITIES

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
IN, WIDTH, DEPTH = (
    1024,
    1000,
    5,
)  # the paper's network (module-level so a CPU dry run can shrink it)

# precision -> (matmul precision, autocast dtype or None, tolerances)
# tolerances: rel = outputs/gradients (relative to each tensor's largest magnitude),
# mom = mean (relative to |mean| + std), var (relative), hist = L1 fraction of moved counts.
PRECISIONS = {
    "fp32-highest": ("highest", None, {"rel": 1e-4, "mom": 1e-4, "var": 1e-4, "hist": 2e-3}),
    "fp32-high": ("high", None, {"rel": 2e-2, "mom": 5e-3, "var": 1e-2, "hist": 6e-2}),
    "bf16-autocast": (
        "highest",
        torch.bfloat16,
        {"rel": 6e-2, "mom": 2e-2, "var": 4e-2, "hist": 0.3},
    ),
}


def _models(seed: int = 0):
    dev = torch.device(DEVICE)
    tri = MLP(IN, 10, depth=DEPTH, width=WIDTH, activation="tanh", backend="triton", seed=seed)
    ref = MLP(IN, 10, depth=DEPTH, width=WIDTH, activation="tanh", backend="torch", seed=seed)
    ref.load_state_dict(tri.state_dict())
    return tri.to(dev), ref.to(dev).double()


def _data(batch: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.rand(batch, IN, device=DEVICE, generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=DEVICE, generator=g)
    return x, y


def _train_step(model, x, y, lr=0.05, autocast_dtype=None):
    ctx = (
        torch.autocast(DEVICE, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    for p in model.parameters():
        p.grad = None
    with ctx:
        out = model(x)
    loss = F.cross_entropy(out.float() if out.dtype != torch.float64 else out, y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
    return out.detach(), grads


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _matmul_precision(value: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) or 1.0
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("batch", [10, 256, 4096])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_5x1000_vs_float64(precision: str, batch: int) -> None:
    mm, ac, tol = PRECISIONS[precision]
    tri, ref = _models()
    with _matmul_precision(mm):
        for s in range(3):  # step 0 calibrates, then the kernels run (ranges may grow)
            x, y = _data(batch, 100 + s)
            out_t, g_t = _train_step(tri, x, y, autocast_dtype=ac)
            out_r, g_r = _train_step(ref, x.double(), y)
            _rel_close(out_t, out_r, tol["rel"], f"logits step {s}")
            for i, (a, b) in enumerate(zip(g_t, g_r, strict=True)):
                _rel_close(a, b, tol["rel"], f"grad {i} step {s}")
    _sync()
    snap_t, snap_r = tri.stats.snapshot(), ref.stats.snapshot()
    for layer in range(1, DEPTH + 2):
        for q in QUANTITIES:
            a, b = snap_t[layer][q], snap_r[layer][q]
            where = f"{precision} batch {batch} layer {layer} {q}"
            assert a.count == b.count and a.nonfinite == b.nonfinite == 0, where
            assert abs(a.mean - b.mean) <= tol["mom"] * (abs(b.mean) + b.std), (
                where,
                a.mean,
                b.mean,
            )
            assert abs(a.var - b.var) <= tol["var"] * b.var + 1e-30, (where, a.var, b.var)
            span = max(abs(b.min), abs(b.max))
            assert abs(a.min - b.min) <= tol["rel"] * span, (where, a.min, b.min)
            assert abs(a.max - b.max) <= tol["rel"] * span, (where, a.max, b.max)
            if b.saturated_low is not None:
                assert abs(a.saturated - b.saturated) <= tol["hist"], where
            if a.hist_edges == b.hist_edges:
                moved = np.abs(np.subtract(a.hist_counts, b.hist_counts)).sum()
                moved += abs(a.underflow - b.underflow) + abs(a.overflow - b.overflow)
                assert moved <= tol["hist"] * b.count + 2, (where, moved, b.count)
            else:  # a range on a power-of-two boundary may differ by one doubling
                assert precision != "fp32-highest", (where, a.hist_edges[-1], b.hist_edges[-1])
                ratio = a.hist_edges[-1] / b.hist_edges[-1]
                assert ratio in (0.5, 2.0), (where, ratio)


@pytest.mark.parametrize("precision", ["fp32-high", "bf16-autocast"])
def test_no_host_sync_in_training_step(precision: str) -> None:
    mm, ac, _ = PRECISIONS[precision]
    tri, _ = _models()
    with _matmul_precision(mm):
        for s in range(2):  # calibration and autotuning happen here
            _train_step(tri, *_data(256, s), autocast_dtype=ac)
        batches = [_data(256, 10 + s) for s in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in batches:
                _train_step(tri, x, y, autocast_dtype=ac)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert tri.stats.snapshot()[1]["activation"].count == 5 * 256 * WIDTH


def _run_stats(batch: int, deterministic: bool) -> list[torch.Tensor]:
    K.set_deterministic(deterministic)
    try:
        tri, _ = _models(seed=3)
        with _matmul_precision("high"):
            for s in range(4):
                _train_step(tri, *_data(batch, 200 + s))
        _sync()
        return [t.clone() for layer in tri.layers for t in (layer.stats.acc, layer.stats.hist)]
    finally:
        K.set_deterministic(False)


@pytest.mark.parametrize("batch", [256, 4096])
def test_statistics_stable_across_runs(batch: int) -> None:
    a, b = _run_stats(batch, False), _run_stats(batch, False)
    for ta, tb in zip(a, b, strict=True):
        if ta.dtype == torch.int64:
            assert torch.equal(ta, tb)  # counts and histograms are exact
        else:
            torch.testing.assert_close(ta, tb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("batch", [256, 4096])
def test_deterministic_mode_bitwise(batch: int) -> None:
    a, b = _run_stats(batch, True), _run_stats(batch, True)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta, tb)
    c = _run_stats(batch, False)
    for ta, tc in zip(a, c, strict=True):
        if ta.dtype == torch.float64:
            fin = torch.isfinite(ta)
            assert torch.equal(fin, torch.isfinite(tc))
            torch.testing.assert_close(ta[fin], tc[fin], rtol=1e-6, atol=1e-6)


def test_forward_kernel_large_offsets() -> None:
    """A batch whose element count exceeds 2^31 exercises the int64 offsets."""
    free, _ = torch.cuda.mem_get_info()
    m, k, n = 2_200_000, 1000, 1000  # x and h have 2.2e9 elements each
    if free < 2 * m * (k + n) * 2 * 1.2:
        pytest.skip("not enough GPU memory")
    from fastmlp.layers import InstrumentedLinear

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / math.sqrt(k)
    layer = InstrumentedLinear(k, n, "tanh", bias=False, backend="triton", device="cuda")
    layer.to(torch.bfloat16).stats.enabled = False
    with torch.no_grad():
        layer.weight.copy_(w)
        h = layer(x)
    rows = torch.tensor([0, m // 2, m - 1], device="cuda")
    ref = torch.tanh(x[rows].float() @ w.float().t())
    torch.testing.assert_close(h[rows].float(), ref, rtol=2e-2, atol=2e-2)
    del x, h
    torch.cuda.empty_cache()
