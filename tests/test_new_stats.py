"""Statistics added for watching real models: absolute max and the fraction of exact zeros,
on the PyTorch path, in the kernels (interpreter) and merged across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmlp import InstrumentedLinear, ModelStats
from fastmlp.stats import QUANTITIES
from fastmlp.stats.algebra import LayerBuffers, merge_buffers
from fastmlp.stats.snapshot import Snapshot


def _backends():
    out = ["torch"]
    try:
        import fastmlp.kernels as K

        if K.INTERPRET or torch.cuda.is_available():
            out.append("triton")
    except ImportError:
        pass
    return out


def _layer(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = InstrumentedLinear(9, 13, "relu", bias=False, init="pytorch", generator=g)
    layer.backend = backend
    layer.stats.zeros = True
    return layer


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(21, 9, generator=g)
    x[:, 2] = 0.0  # a dead input: dW[:, 2] == 0 exactly
    x[3] = 0.0  # a zero row: z[3] == 0 exactly (no bias)
    up = torch.randn(21, 13, generator=g)
    up[5, :4] = 0.0
    return x, up


def _reference(layer, x, up):
    w = layer.weight.detach().double()
    z = x.double() @ w.T
    h = torch.relu(z)
    dz = torch.where(h <= 0, 0.0, up.double())
    return {
        "preactivation": z,
        "activation": h,
        "preactivation_grad": dz,
        "weight_grad": dz.T @ x.double(),
    }


@pytest.mark.parametrize("backend", _backends())
def test_zero_fraction_and_absmax_match_reference(backend):
    layer = _layer(backend)
    refs = {q: [] for q in QUANTITIES}
    for step in range(2):  # the first step calibrates (PyTorch path), the second runs backend
        x, up = _batch(step)
        for q, v in _reference(layer, x, up).items():
            refs[q].append(v.numpy().ravel())
        layer(x).backward(up)
    snap = ModelStats(layer).snapshot()[1]
    for q in QUANTITIES:
        v = np.concatenate(refs[q])
        qs = snap[q]
        assert qs.zero_fraction == np.count_nonzero(v == 0) / v.size, q
        assert qs.zero_fraction > 0, q
        assert qs.absmax == pytest.approx(np.abs(v).max(), rel=1e-6), q
        assert qs.row()["zero_fraction"] == qs.zero_fraction
        assert qs.row()["absmax"] == qs.absmax


def test_zeros_off_by_default_and_nonfinite_never_zero():
    layer = InstrumentedLinear(3, 2, "relu", bias=False)
    x = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 1.0, 1.0]])
    layer(x).sum().backward()
    snap = ModelStats(layer).snapshot()[1]
    assert snap["preactivation"].zero_fraction is None
    layer.stats.reset()
    layer.stats.zeros = True
    layer(x).sum().backward()
    z = ModelStats(layer).snapshot()[1]["preactivation"]
    assert z.nonfinite == 2 and z.count == 2 and z.zero_fraction == 1.0


def test_zero_counts_merge_across_ranks():
    """Two ranks' buffers merged equal one process that saw both batches."""
    parts, whole = [], _layer("torch", seed=1)
    for step in range(2):
        x, up = _batch(10 + step)
        rank = _layer("torch", seed=1)
        rank(x).backward(up)
        whole(x).backward(up)
        parts.append(LayerBuffers.from_stats(rank.stats))
    merged = merge_buffers(parts, whole.stats.fixed_range)
    one = LayerBuffers.from_stats(whole.stats)
    target = _layer("torch", seed=1)
    merged.load_into(target.stats)
    a = Snapshot.from_layers([(1, target.stats)])[1]
    b = Snapshot.from_layers([(1, whole.stats)])[1]
    for q in QUANTITIES:
        assert a[q].zero_fraction == b[q].zero_fraction, q
        assert a[q].absmax == b[q].absmax, q
    np.testing.assert_array_equal(merged.acc[:, -1], one.acc[:, -1])
