"""Property-based tests (hypothesis): random shapes, activations, inits, dtypes (issue 2)."""

from __future__ import annotations

import numpy as np
import torch
from _reference import (
    ACTS,
    FIXED_RANGE,
    QUANTITIES,
    SATURATION,
    assert_matches,
    capture,
    stream_stats,
    torch_act,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from fastmlp import INITS, InstrumentedLinear, ModelStats

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 40),
        "n_in": st.integers(1, 24),
        "n_out": st.integers(1, 24),
        "act": st.sampled_from(ACTS),
        "init": st.sampled_from(INITS),
        "bias": st.booleans(),
        "bins": st.sampled_from([2, 6, 16, 64]),
        "steps": st.integers(1, 3),
        "scale": st.sampled_from([0.01, 1.0, 3.0, 100.0]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _setup(c, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    layer = InstrumentedLinear(
        c["n_in"],
        c["n_out"],
        c["act"],
        c["init"],
        c["bias"],
        zero_bias=False,
        bins=c["bins"],
        generator=g,
        dtype=dtype,
    )
    xs = [
        c["scale"] * (1 + k) * torch.randn(c["batch"], c["n_in"], generator=g, dtype=dtype)
        for k in range(c["steps"])
    ]
    ups = [torch.randn(c["batch"], c["n_out"], generator=g, dtype=dtype) for _ in xs]
    return layer, xs, ups


def _plain(layer, x, up):
    w = layer.weight.detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = torch_act(layer.activation.name, F.linear(xr, w, b))
    out.backward(up)
    return out.detach(), xr.grad, w.grad, None if b is None else b.grad


@SETTINGS
@given(c=cases, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_outputs_gradients_and_statistics(c, dtype):
    layer, xs, ups = _setup(c, dtype)
    captured = {q: [] for q in QUANTITIES}
    for x, up in zip(xs, ups, strict=True):
        ref = capture(x, layer.weight, layer.bias, c["act"], up)
        out_p, dx_p, dw_p, db_p = _plain(layer, x, up)
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        out = layer(xr)
        torch.testing.assert_close(out, out_p)
        out.backward(up)
        torch.testing.assert_close(xr.grad, dx_p)
        torch.testing.assert_close(layer.weight.grad, dw_p)
        if db_p is not None:
            torch.testing.assert_close(layer.bias.grad, db_p)
        for q in QUANTITIES:
            captured[q].append(ref[q])
    snap = ModelStats(layer).snapshot()[1]
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for q in QUANTITIES:
        is_act = q == "activation"
        maxabs = max(float(np.abs(b).max()) for b in captured[q])
        ref = stream_stats(
            captured[q],
            bins=c["bins"],
            fixed_range=FIXED_RANGE.get(c["act"]) if is_act else None,
            thresholds=SATURATION.get(c["act"]) if is_act else None,
            tol=rel * maxabs,
        )
        assert_matches(
            snap[q],
            ref,
            saturating=is_act and c["act"] in SATURATION,
            check_percentile=c["steps"] == 1,
        )


@SETTINGS
@given(c=cases)
def test_bfloat16_outputs_and_statistics(c):
    layer, xs, ups = _setup(c, torch.bfloat16)
    counts = {q: 0 for q in QUANTITIES}
    outs = []
    for x, up in zip(xs, ups, strict=True):
        ref = capture(x, layer.weight, layer.bias, c["act"], up)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        h = ref["activation"]
        tol = 2e-2 * (np.abs(h).max() + 1e-3)  # bf16 has 8 significant bits
        np.testing.assert_allclose(out.detach().double().numpy(), h, rtol=2e-2, atol=tol)
        outs.append(out.detach().double().numpy())
        out.backward(up)
        for q in QUANTITIES:
            counts[q] += ref[q].size
    snap = ModelStats(layer).snapshot()[1]
    for q in QUANTITIES:
        qs = snap[q]
        assert qs.count == counts[q] and qs.nonfinite == 0
        assert qs.min <= qs.mean <= qs.max and qs.var >= 0
        assert sum(qs.hist_counts) + qs.underflow + qs.overflow == qs.count
    # the activation statistics describe exactly the bf16 values the layer returned
    act = c["act"]
    maxabs = max(float(np.abs(o).max()) for o in outs)
    ref = stream_stats(
        outs,
        bins=c["bins"],
        fixed_range=FIXED_RANGE.get(act),
        thresholds=SATURATION.get(act),
        tol=1e-6 * maxabs,
    )
    assert_matches(
        snap["activation"], ref, saturating=act in SATURATION, check_percentile=c["steps"] == 1
    )
