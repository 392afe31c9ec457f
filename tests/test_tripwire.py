"""The non-finite tripwire: the first step, layer and quantity, found without host reads."""

from __future__ import annotations

import math
import re

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


def _flags(run) -> list[str]:
    return [
        "train", "--depth", "2", "--width", "16", "--eval-every", "5", "--probe-every", "5",
        "--probe-size", "30", "--valid-size", "50", "--test-size", "50", "--jacobian-every",
        "-1", "--no-progress", "--no-tensorboard", "--no-figures", "--out", str(run),
    ]  # fmt: skip


def test_trainer_stops_on_nonfinite_and_keeps_the_checkpoint_from_before(tmp_path, capsys):
    """--lr 1e38 diverges within a few steps: --stop-on-nonfinite stops at the next host
    read with one line naming where, and the checkpoint is from before that step."""
    from fastmlp.cli import main
    from fastmlp.run import load_checkpoint

    run = tmp_path / "run"
    status = main([*_flags(run), "--steps", "40", "--lr", "1e38", "--stop-on-nonfinite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and "Traceback" not in err[0], err
    m = re.search(r"first non-finite value at step (\d+), layer (\d+)", err[0])
    assert m and "--stop-on-nonfinite" in err[0] and "is intact" in err[0], err[0]
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] < int(m.group(1)) <= ckpt["step"] + 5


def test_trainer_without_the_flag_warns_once_and_finishes(tmp_path, capsys):
    from fastmlp.cli import main

    run = tmp_path / "run"
    assert main([*_flags(run), "--steps", "20", "--lr", "1e38"]) == 0
    err = capsys.readouterr().err
    assert err.count("first non-finite value at step") == 1, err
