"""The custom op as PyTorch sees it: torch.compile(fullgraph=True), torch.export, torch.func,
pickling, the meta device, and checkpoints written before the op existed.

Compiled and exported models must record the same statistics as eager mode: same counts,
moments equal to float rounding, histograms covering every counted value.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmlp
from fastmlp import MLP, InstrumentedLinear, ModelStats

DATA = Path(__file__).parent / "data"


def _batches(n: int, k: int, classes: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, k, generator=g) * 2, torch.randint(0, classes, (n,), generator=g))
        for _ in range(steps)
    ]


def _train(model: nn.Module, step_fn, batches, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(step_fn(x), y).backward()
        opt.step()


def _assert_same_stats(a: ModelStats, b: ModelStats, rtol: float = 1e-6) -> None:
    ra, rb = a.snapshot().rows(), b.snapshot().rows()
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        where = (x["layer"], x["quantity"])
        assert x["count"] == y["count"] > 0, where
        assert x["nonfinite"] == y["nonfinite"], where
        for k in ("mean", "std", "min", "max", "saturated"):
            if y[k] is None:
                assert x[k] is None, (where, k)
            else:
                scale = abs(y["mean"]) + y["std"] + 1e-30
                assert abs(x[k] - y[k]) <= rtol * scale, (where, k, x[k], y[k])
        assert x["hist_edges"] == y["hist_edges"], where
        # Every counted value is in the histogram (bins + under/overflow), in both.
        for r in (x, y):
            assert sum(r["hist_counts"]) + r["underflow"] + r["overflow"] == r["count"], where
        assert (
            sum(abs(p - q) for p, q in zip(x["hist_counts"], y["hist_counts"], strict=True)) <= 2
        ), where


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_mlp_matches_eager_without_recompiles():
    eager = MLP(40, 5, depth=3, width=33, activation="tanh", init="standard", seed=3)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    batches = _batches(11, 40, 5, steps=5, seed=0)
    _train(eager, eager, batches[:1])
    _train(compiled_model, compiled, batches[:1])
    graphs = _compile_counters()["graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(eager, eager, batches[1:])
        _train(compiled_model, compiled, batches[1:])
    assert _compile_counters() == {"graphs": graphs, "breaks": 0}
    for p, q in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _assert_same_stats(compiled_model.stats, eager.stats)
    assert compiled_model.stats.snapshot()[2]["weight_grad"].count == 5 * 33 * 33


def test_compile_fullgraph_model_with_instrumented_layers_and_switches():
    """A user's model mixing InstrumentedLinear with other modules; statistics switched off
    and on between steps (each setting compiles once, no graph break)."""

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.LayerNorm(24),
            InstrumentedLinear(24, 30, "relu", init="pytorch"),
            nn.Dropout(0.0),
            InstrumentedLinear(30, 4, "identity", init="pytorch"),
        )

    eager, mine = build(), build()
    compiled = torch.compile(mine, fullgraph=True)
    stats_e, stats_c = ModelStats(eager), ModelStats(mine)
    for i, (x, y) in enumerate(_batches(9, 24, 4, steps=6, seed=1)):
        enabled = i != 2
        stats_e.enabled = stats_c.enabled = enabled
        _train(eager, eager, [(x, y)])
        _train(mine, compiled, [(x, y)])
    assert _compile_counters()["breaks"] == 0
    _assert_same_stats(stats_c, stats_e)
    # five of six steps were recorded
    assert stats_c.snapshot()[1]["activation"].count == 5 * 9 * 30
    assert [r["name"] for r in stats_c.snapshot().rows()][::4] == ["1", "3"]


def test_compile_triton_backend_under_interpreter():
    from fastmlp.backends import fused

    if not fused.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)")
    eager = MLP(21, 3, depth=1, width=37, activation="sigmoid", backend="triton", seed=2)
    mine = copy.deepcopy(eager)
    compiled = torch.compile(mine, fullgraph=True)
    batches = _batches(13, 21, 3, steps=3, seed=2)
    _train(eager, eager, batches)
    _train(mine, compiled, batches)
    assert _compile_counters()["breaks"] == 0
    _assert_same_stats(mine.stats, eager.stats)


def test_export_matches_eager_and_keeps_recording():
    model = MLP(16, 4, depth=2, width=12, activation="softsign", seed=5)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "fastmlp.dense_forward.default" in targets
    module = exported.module()
    for _ in range(2):
        out = module(x)
        ref = twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # The exported module's buffers are the statistics: two forward passes were recorded.
    acc = dict(module.named_buffers())["layers.0.stats.acc"]
    assert acc[1, 0].item() == 2 * 7 * 12  # activation count
    torch.testing.assert_close(acc, twin.layers[0].stats.acc)


def test_exported_program_saves_and_loads():
    """An exported program with the ops survives torch.export.save/load (the ops are found
    by name when fastmlp is imported) and computes what the model computes."""
    model = MLP(16, 4, depth=2, width=12, seed=5)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, (x,)), buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_torch_func_grad_equals_autograd():
    from torch.func import functional_call, grad

    model = MLP(10, 3, depth=2, width=8, activation="tanh", seed=7)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    g = grad(loss)(params)
    model.zero_grad()
    loss(dict(model.named_parameters())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-6, atol=1e-7)
    # Both passes were recorded: the func one and the autograd one.
    assert model.stats.snapshot()[1]["weight_grad"].count == 2 * 8 * 10


@pytest.mark.parametrize("activation", ["tanh", "gelu"])  # gelu: z is saved, not h
def test_ops_pass_torch_library_opcheck(activation):
    """Schema (the declared mutations and no aliasing), fake implementations and AOT dispatch
    of both ops agree with what the real implementations do."""
    from fastmlp.op import _flags

    g = torch.Generator().manual_seed(3)
    layer = InstrumentedLinear(6, 5, activation, generator=g)
    for group in ("zeros", "moments4", "per_unit", "exponents"):
        setattr(layer.stats, group, True)  # every buffer written
    x, dh = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
    with torch.no_grad():
        layer(x)  # calibrated: the ops then accumulate
    bufs, flags = layer.stats.buffers_tuple(), _flags(layer.stats.settings())
    w, b = layer.weight.detach(), layer.bias.detach()
    fwd = (x, w, b, *bufs, activation, "torch", *flags)
    h, z = torch.ops.fastmlp.dense_forward.default(*fwd)
    saved = z if z.numel() else h
    bwd = (dh, x, w, saved, *bufs, activation, "torch", True, True, True, *flags)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastmlp.dense_forward.default, fwd, test_utils=tests)
    torch.library.opcheck(torch.ops.fastmlp.dense_backward.default, bwd, test_utils=tests)


def test_vmap_fails_with_a_clear_message():
    layer = InstrumentedLinear(5, 4, "tanh")
    with pytest.raises(NotImplementedError, match="do not support torch.func.vmap"):
        torch.func.vmap(layer)(torch.randn(3, 2, 5))


def test_models_pickle_and_torch_save():
    model = MLP(6, 3, depth=2, width=5, activation="sigmoid", seed=0)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    clone = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    rows = model.stats.snapshot().rows()
    for other in (clone, loaded):
        assert other.stats.snapshot().rows() == rows
        assert other.layers[0].activation is fastmlp.get_activation("sigmoid")
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x))


def test_meta_device_construction_then_to_empty():
    with torch.device("meta"):
        model = MLP(6, 3, depth=2, width=5)
    assert model.layers[0].weight.is_meta
    model.to_empty(device="cpu")
    for layer in model.layers:
        fastmlp.initialize_(layer.weight, layer.bias, "normalized")
    model(torch.randn(4, 6)).sum().backward()
    snap = model.stats.snapshot()
    assert snap[1]["activation"].count == 20
    assert snap[1]["activation"].min >= -1 and math.isfinite(snap[1]["weight_grad"].std)
    assert model.layers[0].stats.state.device.type == "cpu"


def test_nn_sequential_of_instrumented_layers_is_numbered_in_order():
    model = nn.Sequential(InstrumentedLinear(4, 5), InstrumentedLinear(5, 2, "identity"))
    model(torch.randn(3, 4)).sum().backward()
    snap = ModelStats(model).snapshot()
    assert sorted(snap.layers) == [1, 2]
    assert snap["0"]["activation"].count == 15 and snap[2]["activation"].count == 6
    assert snap[1]["activation"].name == "0"


def test_checkpoint_written_before_the_op_still_loads():
    """A state_dict saved by fastmlp 0.1.0 before this change (tests/data) loads, and its
    statistics read exactly as they did then."""
    meta = json.loads((DATA / "mlp_state_dict_v0.1.0.json").read_text())
    a = meta["args"]
    model = MLP(
        a["in_features"],
        a["out_features"],
        depth=a["depth"],
        width=a["width"],
        activation=a["activation"],
        bins=a["bins"],
    )
    state = torch.load(DATA / "mlp_state_dict_v0.1.0.pt", weights_only=True)
    model.load_state_dict(state)
    rows = model.stats.snapshot().rows()
    for old, new in zip(meta["rows"], rows, strict=True):
        # the figures of 0.1.0 read as then (rows have gained name, absmax, zero_fraction)
        assert {k: v for k, v in new.items() if k in old} == old
        added = {"name", "absmax", "skewness", "kurtosis", "zero_fraction", "dead_fraction"}
        added |= {"formats", "l1", "rms"}
        assert set(new) - set(old) == added
        assert new["zero_fraction"] is None  # not recorded then (and off by default)
        assert new["l1"] is None  # no abs_sum field then: unknown until a reset
        assert new["rms"] == pytest.approx(math.hypot(new["std"], new["mean"]), rel=1e-12)
    # and training continues from the loaded calibration
    assert all(model.layers[0].stats.calibrated)
    model(torch.rand(2, a["in_features"])).sum().backward()
    assert model.stats.snapshot()[1]["activation"].count == meta["rows"][1]["count"] + 14


# ----------------------------------------------------------------------------- eager mode


_REFERENCE_ACTIVATIONS = {
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("activation", sorted(_REFERENCE_ACTIVATIONS))
def test_eager_gradients_match_plain_pytorch(activation: str, backend: str):
    """Eager mode's autograd function (one output; GELU and SiLU save z instead of
    returning it) gives plain PyTorch's gradients, on the PyTorch path (the first,
    calibrating pass) and on the kernels (the second pass, under the interpreter)."""
    from fastmlp.op import _eager

    assert _eager()
    g = torch.Generator().manual_seed(3)
    layer = InstrumentedLinear(7, 5, activation, init="pytorch", backend=backend, generator=g)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    for _ in range(2):
        x = torch.randn(6, 7, generator=g, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        dh = torch.randn(6, 5, generator=g)
        layer.zero_grad()
        h = layer(x)
        assert isinstance(h, torch.Tensor) and h.shape == (6, 5)
        h.backward(dh)
        h_ref = _REFERENCE_ACTIVATIONS[activation](F.linear(x_ref, weight, bias))
        weight.grad = bias.grad = None
        h_ref.backward(dh)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-5, atol=1e-6)
    assert layer.stats.calibrated == [True] * 4


def _kernels_or_skip():
    from fastmlp import op

    fused = op._fused()
    if fused is None or not fused.INTERPRET:
        pytest.skip("needs the kernels under TRITON_INTERPRET=1")
    return fused


def test_route_reads_the_calibration_flags_every_pass():
    from fastmlp import op
    from fastmlp.stats.layout import ACTIVATION, PREACTIVATION

    _kernels_or_skip()
    layer = InstrumentedLinear(7, 5, "tanh", backend="triton")
    stats, x = layer.stats, torch.randn(6, 7)
    args = ("triton", x, layer.weight, layer.activation, stats.buffers_tuple())
    quantities = (PREACTIVATION, ACTIVATION)
    on, off = stats.settings(), stats.settings().replace(enabled=False)
    assert op.route(*args, on, quantities) == "cpu"  # not calibrated: the CPU backend
    stats.calibrated = [True, True, False, False]
    assert op.route(*args, on, quantities) == "triton"
    stats.calibrated = [True, False, False, False]
    assert op.route(*args, on, quantities) == "cpu"
    assert op.route(*args, off, quantities) == "triton"  # statistics off: nothing to calibrate
    stats.reset()
    assert op.route(*args, on, quantities) == "cpu"


def test_route_is_a_function_of_its_inputs(monkeypatch):
    """Nothing is kept between calls: what the kernels take is asked every pass (so a
    benchmark can patch it from outside), and ``auto`` sends only CUDA tensors to them."""
    from fastmlp import op
    from fastmlp.stats.layout import ACTIVATION, PREACTIVATION

    fused = _kernels_or_skip()
    layer = InstrumentedLinear(7, 5, "tanh")
    layer.stats.calibrated = [True] * 4
    bufs, settings = layer.stats.buffers_tuple(), layer.stats.settings()
    rest = (torch.randn(6, 7), layer.weight, layer.activation, bufs, settings)
    rest += ((PREACTIVATION, ACTIVATION),)
    assert op.route("auto", *rest) == "cpu"  # CPU tensors, backend auto
    assert op.route("triton", *rest) == "triton"
    monkeypatch.setattr(fused, "supported", lambda *args: False)
    assert op.route("triton", *rest) == "cpu"
    assert op.route("torch", *rest) == "cpu"


def test_layer_settings_follow_every_switch():
    """LayerStats.settings() is kept between passes and made again after any switch."""
    stats = InstrumentedLinear(3, 2, "tanh").stats
    first = stats.settings()
    assert stats.settings() is first and first.enabled and first.histograms
    switches = [
        ("enabled", False, lambda s: not s.enabled),
        ("histograms", False, lambda s: not s.histograms),
        ("saturation", False, lambda s: not s.saturation),
        ("zeros", True, lambda s: s.zeros),
        ("moments4", True, lambda s: s.moments4),
        ("per_unit", True, lambda s: s.per_unit),
        ("exponents", True, lambda s: s.exponents),
        ("thresholds", (-0.5, 0.25), lambda s: s.saturation_thresholds == (-0.5, 0.25)),
    ]
    for name, value, holds in switches:
        before = stats.settings()
        assert not holds(before), name
        setattr(stats, name, value)
        assert holds(stats.settings()), name
    # a copy keeps them
    assert copy.deepcopy(stats).settings() == stats.settings()
