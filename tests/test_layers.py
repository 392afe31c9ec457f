"""InstrumentedLinear and MLP against plain PyTorch; gradcheck; bad input (issue 2)."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from _reference import ACTS, torch_act
from torch import nn
from torch.func import functional_call

import fastmlp
from fastmlp import ACTIVATIONS, INITS, MLP, InstrumentedLinear, ModelStats, get_activation


def _plain(layer: InstrumentedLinear) -> nn.Linear:
    """nn.Linear with the same parameters (the uninstrumented reference)."""
    lin = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin


def _compare_with_plain(layer, x, up):
    lin = _plain(layer)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out = layer(xa)
    ref = torch_act(layer.activation.name, lin(xb))
    torch.testing.assert_close(out, ref)
    out.backward(up)
    ref.backward(up)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, lin.weight.grad)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("batch", [1, 10, 257])
def test_outputs_and_gradients_equal_plain_pytorch(act, batch, bias):
    g = torch.Generator().manual_seed(batch)
    layer = InstrumentedLinear(37, 29, act, bias=bias, zero_bias=False, generator=g)
    x = 2 * torch.randn(batch, 37, generator=g)
    up = torch.randn(batch, 29, generator=g)
    _compare_with_plain(layer, x, up)


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_onednn_path_equals_plain_pytorch(act, bias, stats, monkeypatch):
    """oneDNN's fused matmul (with the activation fused into it when no statistics need the
    pre-activation), forced here whatever the per-shape measurement would choose, still
    equals nn.Linear + activation, and equals the MKL path with oneDNN switched off. With
    statistics off, a pass with gradients is PyTorch's own linear and activation, and oneDNN
    runs where no gradient is taken."""
    from fastmlp.backends import cpu

    used = []
    usable = cpu._onednn_usable
    monkeypatch.setattr(cpu, "_onednn_usable", lambda x, w: used.append(usable(x, w)) or used[-1])
    monkeypatch.setattr(cpu, "_onednn_is_faster", lambda *a: True)
    monkeypatch.setattr(cpu, "_ONEDNN_CHOICE", {})
    g = torch.Generator().manual_seed(7)
    layer = InstrumentedLinear(300, 200, act, bias=bias, zero_bias=False, generator=g)
    layer.stats.enabled = stats
    x = torch.randn(257, 300, generator=g)
    up = torch.randn(257, 200, generator=g)
    # Float64 reference; 300-term float32 dot products summed in another order than
    # MKL's differ from it by ~1e-5 of the terms' magnitude, bf16-like errors by ~1e-2.
    close = {"rtol": 1e-5, "atol": 1e-4}
    lin = _plain(layer).double()
    x64 = x.double().requires_grad_(True)
    ref = torch_act(act, lin(x64))
    ref.backward(up.double())
    xa = x.clone().requires_grad_(True)
    out = layer(xa)
    out.backward(up)
    if not stats and act != "softsign":  # (softsign has no autograd node of PyTorch's)
        assert not any(used)  # PyTorch's own linear and activation, no CPU backend call
        assert torch.equal(out, torch_act(act, _plain(layer)(x)))
        layer.requires_grad_(False)  # no gradient: the CPU backend's forward, oneDNN
        torch.testing.assert_close(layer(x), out, **close)
        layer.requires_grad_(True)
    assert any(used) == cpu._onednn_works()
    if torch.backends.mkldnn.is_available() and platform.machine() in ("x86_64", "AMD64"):
        assert cpu._onednn_works()  # CI's machine: the oneDNN path is really tested
    torch.testing.assert_close(out, ref.float(), **close)
    torch.testing.assert_close(xa.grad, x64.grad.float(), **close)
    torch.testing.assert_close(layer.weight.grad, lin.weight.grad.float(), **close)
    if bias:
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad.float(), **close)
    with torch.backends.mkldnn.flags(enabled=False):
        used.clear()
        torch.testing.assert_close(layer(x), out, **close)
        assert not any(used)


@pytest.mark.parametrize("slow", ["onednn", "mkl"])
def test_onednn_or_addmm_is_chosen_by_measurement_once_per_shape(slow, monkeypatch):
    """The faster implementation is chosen per shape (here made slow on purpose), measured
    once and cached; both give the same result."""
    import time

    from fastmlp.backends import cpu

    if not cpu._onednn_usable(torch.ones(2, 2), torch.ones(2, 2)):
        pytest.skip("oneDNN's fused linear is not available in this PyTorch build")
    calls = {"onednn": 0, "mkl": 0}
    impls = {"onednn": cpu._linear_pointwise, "mkl": cpu._addmm}

    def timed(name):
        def run(*args):
            calls[name] += 1
            if name == slow:
                time.sleep(0.002)
            return impls[name](*args)

        return run

    monkeypatch.setattr(cpu, "_linear_pointwise", timed("onednn"))
    monkeypatch.setattr(cpu, "_addmm", timed("mkl"))
    monkeypatch.setattr(cpu, "_ONEDNN_CHOICE", {})
    x, w, b = torch.randn(7, 30), torch.randn(20, 30), torch.randn(20)
    act = get_activation("tanh")
    outs = [cpu._dense(x, w, b, act) for _ in range(5)]
    fast = "mkl" if slow == "onednn" else "onednn"
    assert calls[slow] == 4  # measured once: a warm-up and three timed calls, then never
    assert calls[fast] == 4 + 5
    assert list(cpu._ONEDNN_CHOICE.values()) == [fast == "onednn"]
    torch.testing.assert_close(outs[0], torch.tanh(torch.addmm(b, x, w.t())))
    cpu._dense(torch.randn(8, 30), w, b, act)  # a new shape is measured again
    assert len(cpu._ONEDNN_CHOICE) == 2


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    g = torch.Generator().manual_seed(0)
    layer = InstrumentedLinear(5, 3, act, zero_bias=False, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    if act == "relu":  # keep pre-activations away from the kink
        with torch.no_grad():
            z = x @ layer.weight.T + layer.bias
            layer.bias.add_(torch.where(z.abs().amin(0) < 0.05, 0.2, 0.0))
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x.requires_grad_(True)

    def f(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert ModelStats(layer).snapshot()[1]["weight_grad"].count > 0  # instrumented throughout


def test_gradcheck_without_bias_float64():
    layer = InstrumentedLinear(4, 6, "softsign", bias=False, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: functional_call(layer, {"weight": w}, (x,)), (x, w)
    )


def test_one_dimensional_input():
    g = torch.Generator().manual_seed(0)
    layer = InstrumentedLinear(7, 3, "tanh", zero_bias=False, generator=g)
    x = torch.randn(7, generator=g)
    out = layer(x)
    assert out.shape == (3,)
    out.sum().backward()
    snap = ModelStats(layer).snapshot()[1]
    assert snap["preactivation"].count == 3 and snap["weight_grad"].count == 21
    torch.testing.assert_close(out, layer(x[None])[0])


def test_leading_batch_dimensions():
    layer = InstrumentedLinear(7, 3, "sigmoid")
    x = torch.randn(2, 5, 7)
    out = layer(x)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out.reshape(10, 3), layer(x.reshape(10, 7)))


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    layer = InstrumentedLinear(6, 4, "softsign", zero_bias=False, generator=g)
    base = torch.randn(6, 11, generator=g)
    x = base.t()  # [11, 6], non-contiguous
    assert not x.is_contiguous()
    up = torch.randn(11, 4, generator=g)
    _compare_with_plain(layer, x, up)
    wide = torch.randn(11, 12, generator=g)[:, ::2]  # strided columns
    assert not wide.is_contiguous()
    torch.testing.assert_close(layer(wide), layer(wide.contiguous()))


def test_float64_layer_matches_plain():
    g = torch.Generator().manual_seed(2)
    layer = InstrumentedLinear(9, 5, "tanh", zero_bias=False, generator=g, dtype=torch.float64)
    x = torch.randn(8, 9, generator=g, dtype=torch.float64)
    up = torch.randn(8, 5, generator=g, dtype=torch.float64)
    _compare_with_plain(layer, x, up)


def test_mlp_equals_plain_sequential():
    model = MLP(12, 4, depth=3, width=[9, 7, 5], activation="tanh", seed=0, zero_bias=False)
    assert model.depth == 3
    assert [layer.layer_index for layer in model.layers] == [1, 2, 3, 4]
    assert [layer.activation.name for layer in model.layers] == ["tanh"] * 3 + ["identity"]
    mods = []
    for layer in model.layers:
        mods.append(_plain(layer))
        if layer.activation.name == "tanh":
            mods.append(nn.Tanh())
    plain = nn.Sequential(*mods)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 12, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    loss_a = nn.functional.cross_entropy(model(x), y)
    loss_b = nn.functional.cross_entropy(plain(x), y)
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    plain_linears = [m for m in plain if isinstance(m, nn.Linear)]
    for layer, lin in zip(model.layers, plain_linears, strict=True):
        torch.testing.assert_close(layer.weight.grad, lin.weight.grad)
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad)
    snap = model.stats.snapshot()
    assert sorted(snap.layers) == [1, 2, 3, 4]
    assert snap[4]["preactivation"].count == 40 and snap[4]["weight_grad"].count == 20


def test_mlp_default_is_the_papers_network():
    model = MLP(20, 10, seed=0)
    assert model.depth == 5
    shapes = [tuple(layer.weight.shape) for layer in model.layers]
    assert shapes == [(1000, 20)] + [(1000, 1000)] * 4 + [(10, 1000)]
    assert model.layers[0].activation.name == "tanh"


def test_mlp_flattens_images():
    model = MLP(16, 3, depth=1, width=5, seed=0)
    assert model(torch.randn(2, 4, 4)).shape == (2, 3)


# ---------------------------------------------------------------- bad input


def test_wrong_feature_count_names_shapes():
    layer = InstrumentedLinear(7, 3)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(4, 5))
    msg = str(info.value)
    assert "7" in msg and "(4, 5)" in msg
    with pytest.raises(ValueError):
        layer(torch.tensor(1.0))
    model = MLP(7, 3, depth=1, width=4)
    with pytest.raises(ValueError, match="7"):
        model(torch.randn(2, 6))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
)
def test_non_float_dtype_raises_type_error(dtype):
    layer = InstrumentedLinear(3, 2)
    x = torch.ones(2, 3).to(dtype)
    with pytest.raises(TypeError):
        layer(x)


def test_dtype_mismatch_raises_type_error():
    layer = InstrumentedLinear(3, 2)
    with pytest.raises(TypeError):
        layer(torch.randn(2, 3, dtype=torch.float64))


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError) as info:
        InstrumentedLinear(3, 2, "swish")
    for name in ACTIVATIONS:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        MLP(3, 2, depth=1, width=4, activation="mish")


def test_unknown_init_lists_valid_names():
    with pytest.raises(ValueError) as info:
        InstrumentedLinear(3, 2, init="he")
    for name in INITS:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        MLP(3, 2, depth=1, width=4, init="orthogonal")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        InstrumentedLinear(bad, 3)
    with pytest.raises(ValueError):
        InstrumentedLinear(3, bad)


def test_odd_bins_raise():
    with pytest.raises(ValueError):
        InstrumentedLinear(3, 2, bins=63)


def test_frozen_weight_still_records_weight_grad():
    g = torch.Generator().manual_seed(0)
    layer = InstrumentedLinear(6, 4, "tanh", zero_bias=False, generator=g)
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 6, generator=g, requires_grad=True)
    up = torch.randn(5, 4, generator=g)
    layer(x).backward(up)
    assert layer.weight.grad is None and layer.bias.grad is not None
    qs = ModelStats(layer).snapshot()[1]["weight_grad"]
    assert qs.count == 24
    lin = _plain(layer)
    xr = x.detach().clone().requires_grad_(True)
    torch.tanh(lin(xr)).backward(up)
    torch.testing.assert_close(x.grad, xr.grad)
    w = lin.weight.grad.double().numpy()
    assert abs(qs.mean - w.mean()) <= 1e-5 * (abs(w.mean()) + w.std())


def test_torch_compile_of_a_model_runs_the_layers_eagerly_with_statistics():
    torch.manual_seed(0)
    model = MLP(20, 5, depth=2, width=16)
    reference = MLP(20, 5, depth=2, width=16)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    compiled = torch.compile(model)
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    got, want = model.stats.snapshot(), reference.stats.snapshot()
    for layer in (1, 2, 3):
        for q in ("preactivation", "activation", "preactivation_grad", "weight_grad"):
            assert got[layer][q].count == want[layer][q].count > 0
            assert got[layer][q].mean == pytest.approx(want[layer][q].mean, rel=1e-5, abs=1e-9)
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad)


def test_inference_mode_then_training_records_everything():
    torch.manual_seed(1)
    model = MLP(10, 3, depth=2, width=8)
    with torch.inference_mode():
        model(torch.randn(4, 10))  # first use under inference_mode (buffers must stay usable)
    model(torch.randn(4, 10)).sum().backward()
    with torch.inference_mode():
        model(torch.randn(4, 10))
    snap = model.stats.snapshot()
    assert snap[1]["activation"].count == 3 * 4 * 8
    assert snap[1]["weight_grad"].count == 8 * 10


# ---------------------------------------------------------------- one node for the network


def _graph_nodes(t: torch.Tensor) -> list[str]:
    """Names of the autograd nodes that ``t`` depends on."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def _twins(act: str, bias: bool, **kw) -> tuple[MLP, MLP, list[int]]:
    """Two equal networks: the first runs as one autograd node, the second layer by layer
    (a forward hook on each layer, which counts its calls)."""
    chained = MLP(12, 4, depth=3, width=[9, 7, 5], activation=act, bias=bias, seed=5, **kw)
    layered = MLP(12, 4, depth=3, width=[9, 7, 5], activation=act, bias=bias, seed=5, **kw)
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1

    for layer in layered.layers:
        layer.register_forward_hook(hook)
    return chained, layered, calls


def _assert_same_statistics(a: MLP, b: MLP) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name, buf in la.stats.named_buffers():
            assert torch.equal(buf, lb.stats.get_buffer(name)), (la.layer_index, name)


@pytest.mark.parametrize("act, bias", [("tanh", True), ("gelu", True), ("relu", False)])
def test_mlp_runs_as_one_node_with_the_per_layer_values_gradients_and_statistics(act, bias):
    chained, layered, calls = _twins(act, bias, zero_bias=False)
    chained.stats.histograms = layered.stats.histograms = True
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (chained, layered)]
    g = torch.Generator().manual_seed(11)
    for step in range(4):
        x = torch.randn(6, 12, generator=g)
        y = torch.randint(0, 4, (6,), generator=g)
        xs = [x.clone().requires_grad_(step % 2 == 1) for _ in range(2)]
        outs = [m(xi) for m, xi in zip((chained, layered), xs, strict=True)]
        if step == 0:
            nodes = _graph_nodes(outs[0])
            assert nodes.count("ChainFunctionBackward") == 1
            assert not any("DenseFunction" in n for n in nodes)
            assert _graph_nodes(outs[1]).count("EagerDenseFunctionBackward") == 4
        assert torch.equal(outs[0], outs[1])
        for out, opt in zip(outs, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(out, y).backward()
        for pa, pb in zip(chained.parameters(), layered.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
        if step % 2 == 1:
            assert torch.equal(xs[0].grad, xs[1].grad)
        for opt in opts:
            opt.step()
    assert calls[0] == 4 * 4  # the hooked twin ran layer by layer
    _assert_same_statistics(chained, layered)
    assert chained.stats.snapshot()[1]["weight_grad"].count == 4 * 9 * 12


def test_frozen_first_layers_record_and_return_what_separate_layers_would():
    for x_grad in (False, True):
        chained, layered, _ = _twins("tanh", True)
        for m in (chained, layered):
            for layer in m.layers[:2]:
                layer.requires_grad_(False)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(5, 12, generator=g)
        xs = [x.clone().requires_grad_(x_grad) for _ in range(2)]
        for m, xi in zip((chained, layered), xs, strict=True):
            m(xi).square().sum().backward()
        for pa, pb in zip(chained.parameters(), layered.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.equal(pa.grad, pb.grad)
        if x_grad:
            assert torch.equal(xs[0].grad, xs[1].grad)
        _assert_same_statistics(chained, layered)
        # layer 2's backward runs only where something below it needs a gradient
        assert chained.stats.snapshot()[2]["preactivation_grad"].count == (35 if x_grad else 0)


def test_mlp_runs_layer_by_layer_where_a_layer_needs_its_own_call(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 12)

    def per_layer_nodes(model: MLP) -> int:
        return _graph_nodes(model(x)).count("EagerDenseFunctionBackward")

    model = MLP(12, 4, depth=2, width=6)
    assert per_layer_nodes(model) == 0
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert per_layer_nodes(model) == 3
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert per_layer_nodes(model) == 3
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert per_layer_nodes(model) == 3  # (DDP's buckets overlap with the backward)
    monkeypatch.undo()
    assert per_layer_nodes(model) == 0
    model.layers[1].register_full_backward_hook(lambda m, gi, go: None)
    assert per_layer_nodes(model) == 3
    model = MLP(12, 4, depth=2, width=6)
    torch.nn.utils.parametrize.register_parametrization(model.layers[0], "weight", nn.Identity())
    assert per_layer_nodes(model) == 3
    # wrong input: the layer's own call reports it
    with pytest.raises(TypeError):
        model(torch.randn(3, 12, dtype=torch.float64))


def test_mlp_chain_under_no_grad_records_the_forward():
    chained, layered, _ = _twins("tanh", True)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(chained(x), layered(x))
    with torch.inference_mode():
        assert torch.equal(chained(x), layered(x))
    _assert_same_statistics(chained, layered)
    assert chained.stats.snapshot()[3]["activation"].count == 2 * 4 * 5


def test_mlp_chain_through_the_kernels_under_the_interpreter(monkeypatch):
    """backend="triton" on CPU (TRITON_INTERPRET=1): the chain's passes take the kernels
    after calibration and give what separate layers give."""
    from fastmlp.backends import fused

    if not fused.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)")
    calls = []
    for name in ("forward", "backward"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    chained, layered, _ = _twins("tanh", True, backend="triton")
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(6, 12, generator=g)
        for m in (chained, layered):
            m.zero_grad()
            m(x).square().sum().backward()
        for pa, pb in zip(chained.parameters(), layered.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)
    # steps 2 and 3, both twins: four forward and four backward passes each
    assert calls.count("forward") == calls.count("backward") == 2 * 2 * 4
    _assert_same_statistics(chained, layered)


@pytest.mark.gpu
def test_mlp_chain_on_cuda_equals_separate_layers():
    """On CUDA (the kernels, deterministic statistics): the one-node network and the same
    network layer by layer give the same gradients and statistics."""
    from fastmlp.backends import fused as K

    K.set_deterministic(True)
    try:
        chained, layered, calls = _twins("tanh", True)
        chained, layered = chained.cuda(), layered.cuda()
        g = torch.Generator(device="cuda").manual_seed(6)
        for _ in range(3):
            x = torch.randn(64, 12, device="cuda", generator=g)
            for m in (chained, layered):
                m.zero_grad()
                m(x).square().sum().backward()
            for pa, pb in zip(chained.parameters(), layered.parameters(), strict=True):
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)
        torch.cuda.synchronize()
        assert calls[0] == 3 * 4
        _assert_same_statistics(chained, layered)
    finally:
        K.set_deterministic(False)


@pytest.mark.parametrize("how", ["layer", "chain", "compiled"])
def test_double_backward_is_refused_not_silently_wrong(how):
    """A gradient penalty differentiates the backward: the layers' backward records no
    graph, so its gradient would be dropped. It raises instead, wherever the op runs."""
    g = torch.Generator().manual_seed(0)
    if how == "layer":
        model = nn.Sequential(InstrumentedLinear(4, 5, "tanh"), InstrumentedLinear(5, 3))
    else:
        model = MLP(4, 3, depth=1, width=5, seed=0)
    run = torch.compile(model) if how == "compiled" else model
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    out = run(x).square().sum()
    # (compiled: PyTorch's own refusal, which names double backward or create_graph)
    with pytest.raises(RuntimeError, match="double backward|create_graph"):
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        grad.square().sum().backward()


@pytest.mark.parametrize("inplace", ["hardswish", "add"])
def test_a_lone_layer_output_modified_in_place_still_trains(inplace):
    """A lone layer (identity activation) keeps nothing of its output for the backward, so
    an in-place op on it afterwards (torchvision's mobilenet head, a residual ``+=``) is
    allowed, and the gradients equal the untouched model's."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            y = self.fc(x)
            y += x
            return y

    torch.manual_seed(0)
    if inplace == "hardswish":
        ref = nn.Sequential(nn.Linear(4, 5), nn.Hardswish(inplace=True), nn.Linear(5, 3))
    else:
        ref = nn.Sequential(nn.Linear(4, 5), Residual(), nn.Linear(5, 3))
    model = copy.deepcopy(ref)
    fastmlp.instrument(model)
    assert not model.fastmlp_report.fused
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert fastmlp.stats_of(model).snapshot()[1]["preactivation_grad"].count == 6 * 5


@pytest.mark.parametrize("build", ["instrument", "mlp"])
def test_statistics_off_training_step_is_plain_pytorch_bit_for_bit(build):
    """With statistics off (a Monitor's unrecorded steps), a CPU training step runs PyTorch's
    own linear and activation nodes: outputs and every gradient equal the uninstrumented
    network's bit for bit, and the autograd graph holds no fastmlp node."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(33, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(),
                          nn.Linear(40, 7))  # fmt: skip
    if build == "instrument":
        model = fastmlp.instrument(copy.deepcopy(plain))
    else:
        model = MLP(33, 7, width=[40, 40], activation="tanh")
        for layer, lin in zip(model.layers, plain[::2], strict=True):
            with torch.no_grad():
                layer.weight.copy_(lin.weight)
                layer.bias.copy_(lin.bias)
    ModelStats(model).enabled = False
    x = torch.randn(19, 33)
    y = torch.randint(0, 7, (19,))
    outs = []
    for net in (plain, model):
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert type(outs[1].grad_fn).__name__ == "AddmmBackward0"
    nodes, todo = set(), [outs[1].grad_fn]
    while todo:
        node = todo.pop()
        nodes.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions if n is not None]
    assert not any("Dense" in n or "Chain" in n for n in nodes), nodes
    plain_grads = [p.grad for p in plain.parameters()]
    model_grads = [p.grad for p in model.parameters()]
    assert len(plain_grads) == len(model_grads) == 6
    for a, b in zip(plain_grads, model_grads, strict=True):
        assert torch.equal(a, b)
