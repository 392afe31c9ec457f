"""The ``l1`` (mean |x|) and ``rms`` figures: against float64 on the PyTorch path (CPU
backend and reference), in the kernels (Triton interpreter, deterministic mode too),
merged across ranks, in rows, and restored from checkpoints of older layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmlp import InstrumentedLinear, ModelStats
from fastmlp.backends import reference
from fastmlp.stats import QUANTITIES, LayerStats
from fastmlp.stats.algebra import LayerBuffers, merge_buffers
from fastmlp.stats.layout import ABS_SUM, NFIELDS
from fastmlp.stats.ranks import snapshot_from_buffers
from fastmlp.stats.snapshot import ROW_FIELDS, Snapshot


def _backends():
    out = ["torch"]
    try:
        from fastmlp.backends import fused as K

        if K.INTERPRET or torch.cuda.is_available():
            out.append("triton")
    except ImportError:
        pass
    return out


def _layer(backend: str, act: str = "tanh", seed: int = 0) -> InstrumentedLinear:
    g = torch.Generator().manual_seed(seed)
    layer = InstrumentedLinear(23, 17, act, zero_bias=False, init="pytorch", generator=g)
    layer.backend = backend
    with torch.no_grad():  # off-centre pre-activations: rms differs from std
        layer.bias.add_(0.7)
    return layer


def _run(layer: InstrumentedLinear, steps: int, seed: int, nan: bool = False) -> dict:
    """Train-free passes over fresh batches; the float64 values of every quantity, from the
    layer's own float32 outputs where the statistics see those."""
    g = torch.Generator().manual_seed(seed)
    seen = {q: [] for q in QUANTITIES}
    act = layer.stats.activation
    for step in range(steps):
        x = (1 + step) * torch.randn(29, 23, generator=g) + 0.3 * step
        up = torch.randn(29, 17, generator=g)
        if nan and step == 1:
            x[4, 2] = float("nan")  # a row of non-finite pre-activations: excluded
        h = layer(x)
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        z = x.double() @ w.T + b
        h64 = act.forward(z)
        dz = act.backward(up.double(), h64 if not act.from_input else z)
        ref = {
            "preactivation": z,
            "activation": h64,
            "preactivation_grad": dz,
            "weight_grad": torch.nan_to_num(dz.T @ x.double(), nan=np.nan),
        }
        for q, v in ref.items():
            seen[q].append(v.numpy().ravel())
        h.backward(up)
    return {q: np.concatenate(v) for q, v in seen.items()}


def _assert_figures(snap, seen: dict, rel: float = 2e-6) -> None:
    for q in QUANTITIES:
        v = seen[q]
        v = v[np.isfinite(v)]
        qs = snap[q]
        assert qs.count == v.size, q
        l1, rms = np.abs(v).mean(), np.sqrt(np.mean(v * v))
        assert qs.l1 == pytest.approx(l1, rel=rel), (q, qs.l1, l1)
        assert qs.rms == pytest.approx(rms, rel=rel), (q, qs.rms, rms)
        row = qs.row()
        assert row["l1"] == qs.l1 and row["rms"] == qs.rms


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("backend", _backends())
def test_l1_rms_match_float64(backend, act, monkeypatch):
    calls = []
    if backend == "triton":  # the later passes must run in the kernels, not fall back
        from fastmlp.backends import fused as K

        fwd, bwd = K.forward, K.backward
        monkeypatch.setattr(K, "forward", lambda *a, **k: calls.append(1) or fwd(*a, **k))
        monkeypatch.setattr(K, "backward", lambda *a, **k: calls.append(2) or bwd(*a, **k))
    layer = _layer(backend, act, seed=len(act))
    seen = _run(layer, 3, seed=5)
    if backend == "triton":
        assert calls.count(1) >= 2 and calls.count(2) >= 2
    _assert_figures(ModelStats(layer).snapshot()[1], seen)


@pytest.mark.parametrize("backend", _backends())
def test_l1_rms_with_nonfinite_values_count_only_finite_ones(backend):
    layer = _layer(backend, "tanh", seed=3)
    seen = _run(layer, 3, seed=6, nan=True)
    snap = ModelStats(layer).snapshot()[1]
    assert snap["preactivation"].nonfinite > 0
    _assert_figures(snap, seen)


def test_l1_rms_in_kernels_deterministic_mode():
    if "triton" not in _backends():
        pytest.skip("no Triton (interpreter or GPU)")
    from fastmlp.backends import fused as K

    K.set_deterministic(True)
    try:
        layer = _layer("triton", "tanh", seed=9)
        seen = _run(layer, 3, seed=7)
    finally:
        K.set_deterministic(False)
    _assert_figures(ModelStats(layer).snapshot()[1], seen)


def test_rms_keeps_precision_far_from_zero():
    """Values 1e4 +- 1e-3 (mean far above the spread): rms and l1 to float64 precision of
    the float32 values recorded, on the reference's float64 sums."""
    stats = LayerStats(reference_activation())
    g = torch.Generator().manual_seed(1)
    vals = []
    for _ in range(3):
        x = 1e4 + 1e-3 * torch.randn(4096, generator=g, dtype=torch.float64)
        x = x.float()
        vals.append(x.double().numpy())
        reference.record(stats.buffers_tuple(), stats.settings(), 0, x)
    v = np.concatenate(vals)
    qs = Snapshot.from_layers([(1, stats)])[1]["preactivation"]
    assert qs.rms == pytest.approx(np.sqrt(np.mean(v * v)), rel=1e-12)
    assert qs.l1 == pytest.approx(np.abs(v).mean(), rel=1e-12)


def reference_activation():
    from fastmlp.activations import get_activation

    return get_activation("identity")


def test_l1_rms_merge_across_ranks():
    """Three ranks' buffers merged equal one process that saw every batch."""
    whole = _layer("torch", "tanh", seed=4)
    parts, seen_all = [], {q: [] for q in QUANTITIES}
    for r in range(3):
        rank = _layer("torch", "tanh", seed=4)
        seen = _run(rank, 2, seed=20 + r)
        _run(whole, 2, seed=20 + r)
        for q in QUANTITIES:
            seen_all[q].append(seen[q])
        parts.append(LayerBuffers.from_stats(rank.stats))
    merged = merge_buffers(parts, whole.stats.fixed_range)
    seen_all = {q: np.concatenate(v) for q, v in seen_all.items()}
    c = snapshot_from_buffers([(1, whole.stats)], [merged])[1]
    b = Snapshot.from_layers([(1, whole.stats)])[1]
    _assert_figures(c, seen_all)
    for q in QUANTITIES:  # float32 partial sums, summed in another order: 1e-6
        assert c[q].l1 == pytest.approx(b[q].l1, rel=1e-6), q
        assert c[q].rms == pytest.approx(b[q].rms, rel=1e-6), q
    target = _layer("torch", "tanh", seed=4)
    merged.load_into(target.stats)
    a = Snapshot.from_layers([(1, target.stats)])[1]
    for q in QUANTITIES:
        assert a[q].l1 == c[q].l1 and a[q].rms == pytest.approx(c[q].rms, rel=1e-12), q


@pytest.mark.parametrize("old_fields", [8, 11])
def test_old_layouts_load_with_l1_unknown_until_reset(old_fields):
    layer = _layer("torch", "tanh", seed=2)
    layer.stats.zeros = True
    seen = _run(layer, 2, seed=3)
    state = layer.state_dict()
    key = next(k for k in state if k.endswith("stats.acc"))
    assert state[key].shape[1] == NFIELDS
    state[key] = state[key][:, :old_fields].clone()  # as an older version wrote it
    fresh = _layer("torch", "tanh", seed=2)
    fresh.stats.zeros = True
    fresh.load_state_dict(state)
    snap = ModelStats(fresh).snapshot()[1]
    # the 11-field layout had the zero counts: still read; the 8-field one had not
    zf = snap["activation"].zero_fraction
    assert (zf is None) == (old_fields == 8), zf
    for q in QUANTITIES:
        v = seen[q]
        assert snap[q].l1 is None, q  # not recorded by the old layout
        assert snap[q].rms == pytest.approx(np.sqrt(np.mean(v * v)), rel=2e-6), q
    assert np.isnan(fresh.stats.acc[:, ABS_SUM].numpy()).all()
    _run(fresh, 1, seed=4)  # accumulating further: still unknown (part of the window lacks it)
    assert ModelStats(fresh).snapshot()[1]["activation"].l1 is None
    fresh.stats.reset()
    seen = _run(fresh, 2, seed=5)
    _assert_figures(ModelStats(fresh).snapshot()[1], seen)
    # host buffers of the old layout (LayerBuffers) are padded alike and merge as unknown
    old = LayerBuffers.from_stats(layer.stats)
    old.acc = old.acc[:, :old_fields]
    padded = LayerBuffers(old.acc, old.shift, old.hist, old.hist_range, old.calibrated)
    assert padded.acc.shape[1] == NFIELDS
    merged = merge_buffers([padded, LayerBuffers.from_stats(layer.stats)])
    assert np.isnan(merged.acc[:, ABS_SUM]).all()
    c = snapshot_from_buffers([(1, layer.stats)], [merged])[1]
    assert c["activation"].l1 is None and c["activation"].rms is not None


def test_rows_carry_l1_and_rms():
    assert "l1" in ROW_FIELDS and "rms" in ROW_FIELDS
    layer = _layer("torch", "relu", seed=1)
    _run(layer, 1, seed=1)
    rows = ModelStats(layer).snapshot().rows()
    back = Snapshot.from_rows(rows)
    for r in rows:
        assert r["l1"] > 0 and r["rms"] >= r["l1"]  # rms >= mean |x| (Jensen)
        assert back[r["layer"]][r["quantity"]].l1 == r["l1"]
