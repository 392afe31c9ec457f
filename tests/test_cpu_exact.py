"""The CPU path's moments within the contract at sizes where float32 sums drift: layers of a
million weights and more, every activation, against float64 statistics of the very same
float32 tensors the statistics saw (captured as they were recorded).

Contract: mean error <= 1e-5 of |mean| + std, variance <= 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import update

from fastmlp import InstrumentedLinear, ModelStats
from fastmlp.backends import cpu
from fastmlp.stats import QUANTITIES, WEIGHT_GRAD, Snapshot

ACTS = ("sigmoid", "tanh", "softsign", "relu", "identity")


def _check(qs, values: list[np.ndarray]) -> None:
    v = np.concatenate([a.astype(np.float64).ravel() for a in values])
    mean, var = v.mean(), v.var()
    where = (qs.layer, qs.quantity)
    assert qs.count == v.size, where
    assert abs(qs.mean - mean) <= 1e-5 * (abs(mean) + np.sqrt(var)), (where, qs.mean, mean)
    assert abs(qs.var - var) <= 1e-4 * var, (where, qs.var, var, abs(qs.var - var) / var)


@pytest.fixture
def recorded(monkeypatch):
    """Every tensor the PyTorch path records, by quantity, as it was recorded."""
    seen: dict[str, list[np.ndarray]] = {q: [] for q in QUANTITIES}
    original = cpu.record

    def spy(bufs, settings, q, x, total=None, factors=None, *, fixed=False):
        seen[QUANTITIES[q]].append(x.detach().clone().numpy())
        original(bufs, settings, q, x, total, factors, fixed=fixed)

    monkeypatch.setattr(cpu, "record", spy)
    return seen


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "batch, n_in, n_out",
    [(10, 1024, 1000), (10, 2048, 2048), (300, 1024, 1000)],
    ids=["b10-1M", "b10-4M", "b300-1M"],  # batch 10: dW's moments from its factors
)
def test_million_weight_layers_match_float64(recorded, act, batch, n_in, n_out):
    g = torch.Generator().manual_seed(n_in + len(act))
    layer = InstrumentedLinear(n_in, n_out, act, init="standard", generator=g)
    with torch.no_grad():  # a bias, so pre-activations are off-centre
        layer.bias.uniform_(-0.5, 0.5, generator=g)
    for _ in range(2):  # two passes: the accumulation across them too
        x = torch.rand(batch, n_in, generator=g)
        out = layer(x)
        out.backward(torch.randn(out.shape, generator=g))
    snap = ModelStats(layer).snapshot()[1]
    assert snap["weight_grad"].count == 2 * n_in * n_out
    for q in QUANTITIES:
        _check(snap[q], recorded[q])


def test_long_tensor_of_equal_magnitudes_keeps_its_variance():
    """4M values +-(1 + U(0, 1e-3)) with random signs (mean ~0, so no centring): a float32
    BLAS dot of them is off by about 1e-3 relative on the CPU this was written on; the
    variance must still hold to 1e-4."""
    g = torch.Generator().manual_seed(0)
    layer = InstrumentedLinear(4, 4, "identity")
    stats = layer.stats
    n = 2**22
    batches = [
        (1 + 1e-3 * torch.rand(n, generator=g)) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
        for _ in range(2)
    ]
    for x in batches:
        update(stats, WEIGHT_GRAD, x)
    qs = Snapshot.from_layers([(1, stats)])[1]["weight_grad"]
    _check(qs, [b.numpy() for b in batches])


@pytest.mark.parametrize(
    "case", ["normal", "offset", "power_of_two_max", "zeros", "float32_sum_overflows", "nan"]
)
def test_calibration_matches_the_reference(case):
    """The CPU path's calibration (each quantity's first batch after a reset) fixes what the
    reference's does: the same histogram range, bit for bit, and the shift at the batch mean
    (within float32 summation error of the float64 mean); non-finite batches as the
    reference treats them."""
    from fastmlp import get_activation
    from fastmlp.backends import reference
    from fastmlp.stats import LayerStats
    from fastmlp.stats.layout import CALIBRATED, NONFINITE

    g = torch.Generator().manual_seed(sum(map(ord, case)))
    x = torch.randn(300_000, generator=g) * 0.01
    if case == "offset":
        x += 3.0
    elif case == "power_of_two_max":
        x[123] = -0.5  # |x| max exactly a power of two: the range is the next one, 1
    elif case == "zeros":
        x.zero_()
    elif case == "float32_sum_overflows":
        x[:10] = 3e38
    elif case == "nan":
        x[7] = float("nan")
    got, want = (LayerStats(get_activation("identity")) for _ in range(2))
    for q in range(len(QUANTITIES)):
        cpu._calibrate(got.buffers_tuple(), q, x, fixed=False)
        reference.calibrate(want.buffers_tuple(), q, x, fixed=False)
    assert torch.equal(got.hist_range, want.hist_range)
    assert torch.equal(got.state[CALIBRATED], want.state[CALIBRATED])
    assert torch.equal(got.acc[:, NONFINITE], want.acc[:, NONFINITE])
    spread = float(x[torch.isfinite(x)].double().std()) + 1e-30
    torch.testing.assert_close(got.shift, want.shift, rtol=1e-6, atol=1e-6 * spread)
    if case == "power_of_two_max":
        assert got.hist_range[0].tolist() == [-1.0, 1.0]
