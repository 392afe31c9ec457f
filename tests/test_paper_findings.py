"""The paper's early findings, checked at initialization: back-propagated gradients shrink
towards the input under the standard init (Fig 7), weight gradients do not (Fig 8), and the
layers' Jacobian singular values (eq. 17).

Tanh networks of 5 hidden layers on a probe set of 300 Shapeset-3x2 images, as in
the paper's monitoring. The statistics come from :func:`fastmlp.probe`; the
Jacobian singular values from :func:`fastmlp.jacobian.jacobian_singular_values`.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastmlp
from fastmlp.data import shapeset
from fastmlp.jacobian import jacobian_singular_values

DEPTH = 5


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def probe_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = shapeset(300, seed=2010)
    return x.flatten(1), y


def _variances(
    init: str, probe_set, width: int = 200
) -> tuple[list[float | None], list[float | None]]:
    model = fastmlp.MLP(1024, 9, depth=DEPTH, width=width, activation="tanh", init=init, seed=0)
    snap = fastmlp.probe(model, *probe_set)
    layers = range(1, DEPTH + 1)
    backprop = [snap[i]["preactivation_grad"].var for i in layers]
    weight = [snap[i]["weight_grad"].var for i in layers]
    return backprop, weight


def test_backprop_gradients_shrink_towards_the_input_under_standard_init(probe_set) -> None:
    std_bp, _ = _variances("standard", probe_set)
    norm_bp, _ = _variances("normalized", probe_set)
    # Var[dC/ds] decreases from the top hidden layer down to the first one...
    assert all(a < b for a, b in zip(std_bp, std_bp[1:], strict=False)), std_bp
    std_ratio = std_bp[-1] / std_bp[0]
    norm_ratio = norm_bp[-1] / norm_bp[0]
    # ...by orders of magnitude with standard init (linear regime: (1/3)^4 ~ 1/81)...
    assert math.log10(std_ratio) > 1.5, std_ratio
    # ...and far less with normalized init.
    assert norm_ratio < 10, norm_ratio
    assert std_ratio > 10 * norm_ratio


@pytest.mark.parametrize("init", ["standard", "normalized"])
def test_weight_gradient_variance_does_not_shrink_with_depth(init: str, probe_set) -> None:
    bp, weight = _variances(init, probe_set)
    # Var[dC/dW^i] stays within a small factor across layers (Fig 8) even where the
    # back-propagated gradients span two orders of magnitude.
    assert max(weight) / min(weight) < 3, weight
    assert max(weight) / min(weight) < max(bp) / min(bp)


def test_jacobian_singular_values_standard_half_normalized_point_eight(probe_set) -> None:
    x, _ = probe_set
    means = {}
    for init in ("standard", "normalized"):
        model = fastmlp.MLP(1024, 9, depth=DEPTH, width=1000, activation="tanh", init=init, seed=0)
        rows = jacobian_singular_values(model, x, max_examples=2)
        assert [r["layer"] for r in rows] == list(range(1, DEPTH + 1))
        means[init] = sum(r["mean"] for r in rows) / len(rows)
    assert 0.4 < means["standard"] < 0.6, means  # paper: about 0.5
    assert 0.65 < means["normalized"] < 0.9, means  # paper: about 0.8
    assert means["normalized"] - means["standard"] > 0.2


def test_jacobian_matches_autograd() -> None:
    torch.manual_seed(0)
    model = fastmlp.MLP(7, 3, depth=2, width=[5, 6], activation="softsign", init="standard", seed=1)
    x = torch.rand(3, 7, dtype=torch.float32)
    rows = jacobian_singular_values(model, x, max_examples=None)
    z = x
    expected = []
    for layer in model.layers[:-1]:
        for i in range(z.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v, layer=layer: layer(v[None])[0], z[i])
            expected.append(torch.linalg.svdvals(jac.double()))
        sv = torch.cat(expected)
        expected = []
        row = rows[layer.layer_index - 1]
        assert row["examples"] == 3
        assert row["mean"] == pytest.approx(float(sv.mean()), rel=1e-5)
        assert row["std"] == pytest.approx(float(sv.std(correction=0)), rel=1e-4)
        assert row["max"] == pytest.approx(float(sv.max()), rel=1e-5)
        with torch.no_grad():
            z = layer(z)
