"""Initializations and activations (issue 2): distributions, reproducibility, derivatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _reference import ACTS, FIXED_RANGE, FROM_INPUT_ACTS, SATURATION, torch_act
from torch import nn

from fastmlp import ACTIVATIONS, INITS, MLP, InstrumentedLinear, get_activation, initialize_


def _ks_uniform(sample: np.ndarray, bound: float) -> float:
    """Kolmogorov-Smirnov distance of ``sample`` to U[-bound, bound]."""
    s = np.sort(sample.ravel())
    n = s.size
    cdf = np.clip((s + bound) / (2 * bound), 0, 1)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


# 99.9% critical value of the one-sample KS statistic: 1.95 / sqrt(n)
def _ks_crit(n: int) -> float:
    return 1.95 / math.sqrt(n)


FAN_OUT, FAN_IN = 300, 500


@pytest.mark.parametrize(
    ("init", "bound"),
    [
        ("standard", 1 / math.sqrt(FAN_IN)),
        ("normalized", math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("pytorch", 1 / math.sqrt(FAN_IN)),
    ],
)
def test_init_distribution(init, bound):
    layer = InstrumentedLinear(
        FAN_IN, FAN_OUT, init=init, generator=torch.Generator().manual_seed(0)
    )
    w = layer.weight.detach().double().numpy()
    n = w.size
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() >= bound * (1 - 1e-3)  # the full range is used
    var = bound**2 / 3
    # sample variance of U[-a, a]: sd of the estimate is var * sqrt(4/5 / n)
    assert abs(w.var() - var) <= 5 * var * math.sqrt(0.8 / n)
    assert abs(w.mean()) <= 5 * bound / math.sqrt(3 * n)
    assert _ks_uniform(w, bound) <= _ks_crit(n)
    b = layer.bias.detach().numpy()
    if init == "pytorch":  # nn.Linear draws its biases too
        assert np.abs(b).max() <= 1 / math.sqrt(FAN_IN) * (1 + 1e-6) and np.any(b != 0)
        assert _ks_uniform(b, 1 / math.sqrt(FAN_IN)) <= _ks_crit(b.size)
    else:
        assert np.all(b == 0)  # paper: biases start at zero


def test_normalized_matches_xavier_uniform():
    a = InstrumentedLinear(FAN_IN, FAN_OUT, init="normalized").weight.detach().numpy()
    ref = torch.empty(FAN_OUT, FAN_IN)
    nn.init.xavier_uniform_(ref, gain=1.0, generator=torch.Generator().manual_seed(5))
    ref = ref.numpy()
    assert _ks_two_sample(a, ref) <= 1.95 * math.sqrt(2 / a.size)
    assert np.abs(a).max() <= np.abs(ref).max() * (1 + 2e-3)
    assert abs(a.var() / ref.var() - 1) < 0.02


def test_pytorch_init_matches_nn_linear():
    torch.manual_seed(123)
    lin = nn.Linear(FAN_IN, FAN_OUT)
    torch.manual_seed(123)
    layer = InstrumentedLinear(FAN_IN, FAN_OUT, init="pytorch")
    # same draws from the global generator, same bounds (up to the last bit of the bound)
    torch.testing.assert_close(layer.weight, lin.weight, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias, rtol=1e-6, atol=0)


def test_zero_bias_switch():
    layer = InstrumentedLinear(10, 7, init="normalized", zero_bias=False)
    assert torch.any(layer.bias != 0) and layer.bias.abs().max() <= 1 / math.sqrt(10)
    layer = InstrumentedLinear(10, 7, init="pytorch", zero_bias=True)
    assert torch.all(layer.bias == 0)


@pytest.mark.parametrize("init", INITS)
def test_init_reproducible(init):
    def make(seed):
        return InstrumentedLinear(
            40, 30, init=init, generator=torch.Generator().manual_seed(seed)
        ).state_dict()

    a, b, c = make(7), make(7), make(8)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
    assert not torch.equal(a["weight"], c["weight"])
    m1 = MLP(9, 4, depth=2, width=6, init=init, seed=3)
    m2 = MLP(9, 4, depth=2, width=6, init=init, seed=3)
    m3 = MLP(9, 4, depth=2, width=6, init=init, seed=4)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters(), strict=True))


def test_initialize_function_and_errors():
    w, b = torch.empty(6, 4), torch.empty(6)
    initialize_(w, b, "standard", generator=torch.Generator().manual_seed(0))
    assert w.abs().max() <= 0.5 and torch.all(b == 0)
    w2 = torch.empty(6, 4)
    initialize_(w2, None, "standard", generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, w2)
    with pytest.raises(ValueError) as info:
        initialize_(w, b, "kaiming")
    for name in INITS:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        initialize_(torch.empty(3), None, "standard")


def test_mlp_layers_use_their_own_fans():
    model = MLP(50, 10, depth=2, width=[200, 100], init="normalized", seed=0)
    for layer in model.layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound * (1 + 1e-6)
        assert layer.weight.abs().max() >= bound * 0.95


# ---------------------------------------------------------------- activations


def test_registry():
    assert set(ACTIVATIONS) == set(ACTS)
    for name in ACTS:
        assert get_activation(name).name == name
        assert get_activation(get_activation(name)) is get_activation(name)
    with pytest.raises(ValueError) as info:
        get_activation("swish")
    for name in ACTS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", [a for a in ACTS if a not in FROM_INPUT_ACTS])
def test_activation_forward_and_derivative_from_output(name):
    act = get_activation(name)
    g = torch.Generator().manual_seed(0)
    z = torch.cat(
        [
            3 * torch.randn(1000, generator=g, dtype=torch.float64),
            torch.tensor([-50.0, -5.0, -0.5, 0.3, 4.0, 40.0], dtype=torch.float64),
        ]
    )
    h = act.forward(z)
    torch.testing.assert_close(h, torch_act(name, z), rtol=1e-15, atol=1e-15)
    zz = z.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(torch_act(name, zz).sum(), zz)
    torch.testing.assert_close(act.grad_from_output(h), dz, rtol=1e-9, atol=1e-12)
    # the formulas the issue spells out
    hn = h.numpy()
    expected = {
        "sigmoid": hn * (1 - hn),
        "tanh": 1 - hn**2,
        "softsign": (1 - np.abs(hn)) ** 2,
        "relu": (hn > 0).astype(float),
        "identity": np.ones_like(hn),
    }[name]
    np.testing.assert_allclose(act.grad_from_output(h).numpy(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", FROM_INPUT_ACTS)
def test_gelu_silu_derivative_from_input(name):
    """GELU and SiLU: the derivative is a function of z (not of h); float64 autograd agrees,
    and the backward takes z."""
    act = get_activation(name)
    assert act.from_input and act.grad_from_output is None
    assert act.output_range is None and act.saturation is None  # unbounded, no saturation
    g = torch.Generator().manual_seed(1)
    z = torch.cat(
        [
            3 * torch.randn(1000, generator=g, dtype=torch.float64),
            torch.tensor([-50.0, -5.0, -0.5, 0.0, 0.3, 4.0, 40.0], dtype=torch.float64),
        ]
    )
    torch.testing.assert_close(act.forward(z), torch_act(name, z), rtol=1e-15, atol=1e-15)
    zz = z.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(torch_act(name, zz).sum(), zz)
    torch.testing.assert_close(act.grad_from_input(z), dz, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(act.derivative(z, act.forward(z)), dz, rtol=1e-12, atol=1e-14)
    up = torch.randn(z.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(act.backward(up, z), up * dz, rtol=1e-12, atol=1e-14)
    # not a function of h: two inputs with the same output, different slopes (GELU dips)
    if name.startswith("gelu"):
        a = torch.tensor([-0.3], dtype=torch.float64)
        assert act.grad_from_input(a) > 0 > act.grad_from_input(torch.tensor([-1.5]).double())


@pytest.mark.parametrize("name", ACTS)
def test_activation_range_and_saturation(name):
    act = get_activation(name)
    assert act.output_range == FIXED_RANGE.get(name)
    assert act.bounded == (name in FIXED_RANGE)
    assert act.saturation == SATURATION.get(name)
    if act.output_range is not None:
        lo, hi = act.output_range
        h = act.forward(torch.linspace(-1e4, 1e4, 10001, dtype=torch.float64))
        assert h.min() >= lo and h.max() <= hi


def test_softsign_is_x_over_one_plus_abs_x():
    z = torch.tensor([-3.0, -1.0, 0.0, 0.5, 99.0], dtype=torch.float64)
    expected = z / (1 + z.abs())
    assert torch.equal(get_activation("softsign").forward(z), expected)


def test_saturation_thresholds_configurable():
    layer = InstrumentedLinear(3, 4, "tanh", saturation_thresholds=(-0.5, 0.5))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
    x = torch.tensor([[0.1, 2.0, -2.0]])  # h = tanh([0.1, 2, -2, 2.1])
    layer(x).sum().backward()
    from fastmlp import ModelStats

    a = ModelStats(layer).snapshot()[1]["activation"]
    assert a.saturated_low == 0.25 and a.saturated_high == 0.5 and a.saturated == 0.75
    with pytest.raises(ValueError):
        InstrumentedLinear(3, 4, "tanh", saturation_thresholds=(0.5, -0.5))
