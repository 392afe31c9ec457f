"""The non-finite tripwire: the first step, layer and quantity, found without host reads."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fastmlp.mlp import MLP
from fastmlp.tripwire import Tripwire


def _train(model, wire, steps, poison=None):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        x = torch.rand(8, 12, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        if poison is not None:
            x, model = poison(step, x, model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        wire.update(step)


def test_quiet_run_reads_nothing():
    model = MLP(12, 3, depth=3, width=9, seed=0)
    wire = Tripwire(model)
    _train(model, wire, 4)
    assert wire.read() is None


def test_nan_in_the_input_is_reported_at_layer_one():
    model = MLP(12, 3, depth=3, width=9, seed=0)
    wire = Tripwire(model)

    def poison(step, x, model):
        if step == 2:
            x = x.clone()
            x[0, 5] = math.nan
        return x, model

    _train(model, wire, 5, poison)
    hit = wire.read()
    assert (hit.step, hit.layer, hit.name, hit.quantity) == (2, 1, "layers.0", "preactivation")
    assert "step 2, layer 1 (layers.0) preactivation" in str(hit)


def test_an_infinite_weight_is_reported_where_it_is():
    model = MLP(12, 3, depth=3, width=9, seed=0)
    wire = Tripwire(model)

    def poison(step, x, model):
        if step == 1:
            with torch.no_grad():
                model.layers[2].weight[0, 0] = math.inf
        return x, model

    _train(model, wire, 3, poison)
    hit = wire.read()
    assert (hit.step, hit.layer, hit.quantity) == (1, 3, "preactivation")


def test_gradient_quantities_are_ordered_from_the_top():
    """A non-finite loss gradient appears first at the output layer's preactivation_grad."""
    model = MLP(12, 3, depth=2, width=9, seed=0)
    wire = Tripwire(model)
    x = torch.rand(4, 12)
    out = model(x)
    up = torch.zeros_like(out)
    up[0, 0] = math.inf
    out.backward(up)
    wire.update(7)
    hit = wire.read()
    assert (hit.step, hit.layer, hit.quantity) == (7, 3, "preactivation_grad")


def test_after_a_reset_new_hits_are_seen():
    model = MLP(12, 3, depth=1, width=9, seed=0)
    wire = Tripwire(model)
    x = torch.rand(4, 12)
    x[0, 0] = math.nan
    model(x)
    wire.update(0)
    assert wire.read().step == 0
    wire.reset()
    model.stats.reset()
    wire.rebase()
    model(torch.rand(4, 12))
    wire.update(1)
    assert wire.read() is None
    model(x)
    wire.update(2)
    assert wire.read().step == 2


def test_update_needs_no_host_read():
    """On the meta device any host read would fail: update() must still run."""
    with torch.device("meta"):
        model = MLP(12, 3, depth=2, width=9)
    wire = Tripwire(model)
    for step in range(3):
        wire.update(step)
    assert wire._first.is_meta
