"""probe() changes nothing it must not, and reports the stats of that one pass (issue 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastmlp import MLP, InstrumentedLinear, ModelStats, probe

BUFFERS = ("acc", "shift", "hist", "hist_range")


def _state(model):
    """Everything probe() must leave exactly as it was (cloned)."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    stats = []
    for m in model.modules():
        if isinstance(m, InstrumentedLinear):
            s = m.stats
            stats.append(
                (
                    id(s),
                    [getattr(s, b).clone() for b in BUFFERS],
                    list(s.calibrated),
                    s.enabled,
                    s.histograms,
                    s.saturation,
                )
            )
    return params, grads, stats


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _assert_same(before, after):
    (p0, g0, s0), (p1, g1, s1) = before, after
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(_bits(a), _bits(b))
    for (i0, bufs0, *rest0), (i1, bufs1, *rest1) in zip(s0, s1, strict=True):
        assert i0 == i1  # the very same accumulator objects are back in place
        assert rest0 == rest1
        for name, a, b in zip(BUFFERS, bufs0, bufs1, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(_bits(a), _bits(b)), name


def _trained(seed=0, activation="tanh"):
    model = MLP(13, 5, depth=2, width=[17, 11], activation=activation, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(10, 13, generator=g)
        y = torch.randint(0, 5, (10,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # one more backward without a step, so .grad is populated and accumulators are calibrated
    F.cross_entropy(model(torch.randn(10, 13, generator=g)), torch.arange(10) % 5).backward()
    return model


def _probe_batch(seed=42):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(30, 13, generator=g), torch.randint(0, 5, (30,), generator=g)


def _fresh_run_snapshot(model, x, y, loss_fn=F.cross_entropy):
    fresh = copy.deepcopy(model)
    fresh.stats.reset()
    fresh.stats.enabled = True
    fresh.zero_grad(set_to_none=True)
    loss_fn(fresh(x), y).backward()
    return fresh.stats.snapshot()


def _assert_snapshots_equal(a, b):
    rows_a, rows_b = a.rows(), b.rows()
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-12, abs=1e-300), (ra["layer"], k)
            elif isinstance(va, list) and va and isinstance(va[0], float):
                assert va == pytest.approx(vb, rel=1e-12), (ra["layer"], k)
            else:
                assert va == vb, (ra["layer"], ra["quantity"], k)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_probe_changes_nothing_with_grads(activation):
    model = _trained(activation=activation)
    assert all(p.grad is not None for p in model.parameters())
    before = _state(model)
    x, y = _probe_batch()
    snap = probe(model, x, y)
    _assert_same(before, _state(model))
    _assert_snapshots_equal(snap, _fresh_run_snapshot(model, x, y))


def test_probe_changes_nothing_with_grads_none():
    model = _trained()
    model.zero_grad(set_to_none=True)
    before = _state(model)
    x, y = _probe_batch()
    snap = probe(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    _assert_same(before, _state(model))
    _assert_snapshots_equal(snap, _fresh_run_snapshot(model, x, y))


def test_probe_on_untrained_model_leaves_accumulators_empty():
    model = MLP(13, 5, depth=2, width=9, seed=1)
    before = _state(model)
    x, y = _probe_batch()
    snap = probe(model, x, y)
    _assert_same(before, _state(model))
    assert all(qs.count == 0 for qs in model.stats.snapshot())
    assert snap[1]["preactivation"].count == 30 * 9
    assert snap[3]["weight_grad"].count == 5 * 9


def test_probe_with_statistics_disabled_still_reports():
    model = _trained()
    model.stats.enabled = False
    before = _state(model)
    x, y = _probe_batch()
    snap = probe(model, x, y)
    _assert_same(before, _state(model))
    assert model.stats.enabled is False
    _assert_snapshots_equal(snap, _fresh_run_snapshot(model, x, y))


def test_probe_custom_loss_and_mixed_model():
    inner = MLP(13, 5, depth=1, width=8, seed=2)
    model = nn.Sequential(nn.Linear(13, 13), inner)
    x, y = _probe_batch()
    F.mse_loss(model(x), torch.randn(30, 5)).backward()
    before = _state(model)

    def loss_fn(out, target):
        return F.mse_loss(out, F.one_hot(target, 5).float())

    snap = probe(model, x, y, loss_fn)
    _assert_same(before, _state(model))
    fresh = copy.deepcopy(model)
    ModelStats(fresh).reset()
    loss_fn(fresh(x), y).backward()
    _assert_snapshots_equal(snap, ModelStats(fresh).snapshot())


def test_probe_repeated_gives_identical_snapshots():
    model = _trained()
    x, y = _probe_batch()
    _assert_snapshots_equal(probe(model, x, y), probe(model, x, y))


def test_probe_restores_state_when_loss_raises():
    model = _trained()
    before = _state(model)
    x, y = _probe_batch()

    def bad_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        probe(model, x, y, bad_loss)
    _assert_same(before, _state(model))
