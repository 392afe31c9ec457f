"""Statistics added for watching real models: absolute max and the fraction of exact zeros,
on the PyTorch path, in the kernels (interpreter) and merged across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmlp import InstrumentedLinear, ModelStats
from fastmlp.stats import QUANTITIES
from fastmlp.stats.algebra import LayerBuffers, merge_buffers
from fastmlp.stats.layout import ZEROS
from fastmlp.stats.ranks import snapshot_from_buffers
from fastmlp.stats.snapshot import Snapshot


def _backends():
    out = ["torch"]
    try:
        from fastmlp.backends import fused as K

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
    c = snapshot_from_buffers([(1, whole.stats)], [merged])[1]
    for q in QUANTITIES:
        assert a[q].zero_fraction == b[q].zero_fraction == c[q].zero_fraction, q
        assert a[q].absmax == b[q].absmax == c[q].absmax, q
    np.testing.assert_array_equal(merged.acc[:, ZEROS], one.acc[:, ZEROS])


# ----------------------------------------------------------------------------- moments4


def _central(v: np.ndarray) -> tuple[float, float]:
    d = v - v.mean()
    m2 = float(np.mean(d * d))
    return float(np.mean(d**3)) / m2**1.5, float(np.mean(d**4)) / m2**2


def _pinned_sigmoid(backend, seed=0, deterministic=False):
    """A sigmoid layer whose outputs sit at 0.999 +- 1e-4 (as the variance tests do)."""
    g = torch.Generator().manual_seed(seed)
    layer = InstrumentedLinear(11, 7, "sigmoid", zero_bias=False, init="pytorch", generator=g)
    layer.backend = backend
    layer.stats.moments4 = True
    with torch.no_grad():
        layer.weight.mul_(0.02 / layer.weight.std())
        layer.bias.fill_(float(np.log(0.999 / 0.001)))
    return layer


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", _backends())
def test_skewness_kurtosis_near_saturation_match_float64(backend, deterministic):
    if deterministic and backend != "triton":
        pytest.skip("deterministic mode is a kernel mode")
    if deterministic:
        from fastmlp.backends import fused as K

        K.set_deterministic(True)
    try:
        layer = _pinned_sigmoid(backend)
        g = torch.Generator().manual_seed(4)
        seen = {q: [] for q in QUANTITIES}
        for step in range(3):  # first step calibrates; later batches are shifted and wider
            x = (1 + step) * torch.randn(37, 11, generator=g) + 0.5 * step
            up = torch.randn(37, 7, generator=g)
            h = layer(x)
            w, b = layer.weight.detach().double(), layer.bias.detach().double()
            z64 = x.double() @ w.T + b
            # the layer's own float32 outputs (their rounding, not the statistics, differs
            # from float64 at 0.999); f'(h) = h (1 - h) through them, as the kernels do
            h32 = h.detach().double()
            dz = up.double() * h32 * (1 - h32)
            ref = {
                "preactivation": z64,
                "activation": h32,
                "preactivation_grad": dz,
                "weight_grad": dz.T @ x.double(),
            }
            for q, v in ref.items():
                seen[q].append(v.numpy().ravel())
            h.backward(up)
    finally:
        if deterministic:
            K.set_deterministic(False)
    snap = ModelStats(layer).snapshot()[1]
    a = np.concatenate(seen["activation"])
    assert abs(a.mean() - 0.999) < 1e-4 and a.std() < 5e-4  # the setup pins the outputs
    for q in QUANTITIES:
        skew, kurt = _central(np.concatenate(seen[q]))
        qs = snap[q]
        # as exact as the variance: relative 1e-4 of the figure (plus a hair for skew ~ 0)
        assert abs(qs.kurtosis - kurt) <= 1e-4 * kurt, (q, qs.kurtosis, kurt)
        assert abs(qs.skewness - skew) <= 1e-4 * (abs(skew) + 1e-2), (q, qs.skewness, skew)


def test_moments4_merge_across_ranks_exact():
    """Pebay's merge of (n, mean, M2, M3, M4) across ranks equals one process."""
    parts, whole = [], _pinned_sigmoid("torch", seed=2)
    g = torch.Generator().manual_seed(8)
    for r in range(3):
        rank = _pinned_sigmoid("torch", seed=2)
        for _ in range(2):
            x = (1 + r) * torch.randn(19, 11, generator=g) + r  # ranks see different data
            up = torch.randn(19, 7, generator=g)
            rank(x).backward(up)
            whole(x).backward(up)
        parts.append(LayerBuffers.from_stats(rank.stats))
    merged = merge_buffers(parts, whole.stats.fixed_range)
    target = _pinned_sigmoid("torch", seed=2)
    merged.load_into(target.stats)
    a = Snapshot.from_layers([(1, target.stats)])[1]
    b = Snapshot.from_layers([(1, whole.stats)])[1]
    for q in QUANTITIES:
        for f in ("mean", "var", "skewness", "kurtosis"):
            va, vb = getattr(a[q], f), getattr(b[q], f)
            # float32 partial sums, summed in another order: 1e-6 of the figure
            assert va == pytest.approx(vb, rel=1e-6, abs=1e-9 * (abs(b[q].mean) + 1)), (q, f)
    # the cross-rank snapshot (fastmlp.stats.ranks) reads the merged buffers the same way
    c = snapshot_from_buffers([(1, whole.stats)], [merged])[1]
    for q in QUANTITIES:
        assert c[q].kurtosis == a[q].kurtosis and c[q].skewness == a[q].skewness, q
    # merged buffers keep accumulating: one more batch on top of the merge
    x, up = torch.randn(5, 11, generator=g), torch.randn(5, 7, generator=g)
    target(x).backward(up)
    whole(x).backward(up)
    a = Snapshot.from_layers([(1, target.stats)])[1]
    b = Snapshot.from_layers([(1, whole.stats)])[1]
    for q in QUANTITIES:
        assert a[q].kurtosis == pytest.approx(b[q].kurtosis, rel=1e-6), q


def test_group_switched_mid_window_reads_as_not_recorded():
    layer = InstrumentedLinear(3, 2, "tanh")
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    layer.stats.moments4 = True
    layer.stats.zeros = True
    layer(x).sum().backward()
    snap = ModelStats(layer).snapshot()[1]["activation"]
    assert snap.kurtosis is None and snap.zero_fraction is None  # half a window: not shown
    layer.stats.reset()
    layer(x).sum().backward()
    snap = ModelStats(layer).snapshot()[1]["activation"]
    assert snap.kurtosis is not None and snap.zero_fraction is not None


# ----------------------------------------------------------------------------- per unit


def _unit_layer(backend, act="relu", seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = InstrumentedLinear(6, 10, act, zero_bias=False, init="pytorch", generator=g)
    layer.backend = backend
    layer.stats.per_unit = True
    with torch.no_grad():
        layer.bias[:3] = -50.0  # units 0..2 are dead (relu) / saturated low (tanh)
        layer.bias[3] = 50.0  # unit 3 saturated high (tanh)
    return layer


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("backend", _backends())
def test_per_unit_counts_match_reference(backend, act):
    layer = _unit_layer(backend, act)
    hs = []
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second step runs the kernels on the triton backend
        x = torch.randn(23, 6, generator=g)
        x[0, 0] = float("nan")  # a non-finite row: excluded from every unit's counts
        h = layer(x)
        hs.append(h.detach().double())
        h.sum().backward()
    h = torch.cat(hs).numpy()
    fin = np.isfinite(h)
    a = ModelStats(layer).snapshot()[1]["activation"]
    seen = fin.sum(0)
    active = ((h > 0) & fin).sum(0) / seen
    assert a.unit_active == pytest.approx(active.tolist())
    assert a.dead_fraction == np.mean(((h > 0) & fin).sum(0) == 0)
    if act == "relu":
        assert a.dead_fraction >= 0.3 and a.unit_saturated is None
    else:
        sat = (((h <= -0.99) | (h >= 0.99)) & fin).sum(0) / seen
        assert a.unit_saturated == pytest.approx(sat.tolist())
        assert a.unit_saturated[0] == 1.0 and a.unit_saturated[3] == 1.0
    assert a.row()["dead_fraction"] == a.dead_fraction
    assert ModelStats(layer).snapshot()[1]["preactivation"].dead_fraction is None


def test_per_unit_counts_merge_across_ranks():
    parts, whole = [], _unit_layer("torch", "tanh", seed=4)
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        rank = _unit_layer("torch", "tanh", seed=4)
        x = torch.randn(17, 6, generator=g)
        rank(x).sum().backward()
        whole(x).sum().backward()
        parts.append(LayerBuffers.from_stats(rank.stats))
    merged = merge_buffers(parts, whole.stats.fixed_range)
    np.testing.assert_array_equal(merged.units, LayerBuffers.from_stats(whole.stats).units)
    a = snapshot_from_buffers([(1, whole.stats)], [merged])[1]["activation"]
    b = ModelStats(whole).snapshot()[1]["activation"]
    assert a.unit_active == b.unit_active and a.unit_saturated == b.unit_saturated
    assert a.dead_fraction == b.dead_fraction


# ----------------------------------------------------------------------------- exponents

from fastmlp.stats.layout import EXP_MAX, EXP_MIN, FORMATS  # noqa: E402

# exact powers of two and each format's limits (float32 values)
_SPECIAL = [
    2.0**-149,  # smallest float32 subnormal
    2.0**-134,
    2.0**-133,  # bf16's smallest subnormal
    2.0**-127,
    2.0**-126,  # float32/bf16 smallest normal
    2.0**-25,
    2.0**-24,  # fp16 smallest subnormal
    2.0**-17,
    2.0**-16,  # e5m2 smallest subnormal
    2.0**-15,
    2.0**-14,  # fp16/e5m2 smallest normal
    2.0**-10,
    2.0**-9,  # e4m3 smallest subnormal
    2.0**-6,  # e4m3 smallest normal
    0.75,
    1.0,
    448.0,  # e4m3 max
    511.0,
    512.0,
    57344.0,  # e5m2 max
    65504.0,  # fp16 max
    65536.0,
    3.0e38,
    0.0,
    -0.0,
    -(2.0**-140),
    -65536.0,
]


def _frexp_counts(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    _, e = np.frexp(v)
    e = np.clip(e[v != 0], EXP_MIN, EXP_MAX)
    out: dict = {int(k): int(c) for k, c in zip(*np.unique(e, return_counts=True), strict=True)}
    out["zero"] = int(np.count_nonzero(v == 0))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_exponent_bins_at_powers_of_two_and_format_limits(backend):
    n = len(_SPECIAL)
    layer = InstrumentedLinear(n, n, "identity", bias=False)
    layer.backend = backend
    layer.stats.exponents = True
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))  # z = x exactly
    x = torch.tensor(_SPECIAL, dtype=torch.float32)
    rows = torch.stack([x, x.flip(0), x * 0.5, x.roll(3)])
    up = rows.clone()
    seen = {q: [] for q in ("preactivation", "activation", "preactivation_grad")}
    for step in range(2):  # calibration step, then the backend's own pass
        xb = rows.clone()
        if step:
            xb[1, 2] = float("nan")  # a NaN row of z (NaN * 0): excluded
        z64 = (xb.double() @ layer.weight.detach().double().T).numpy()
        seen["preactivation"].append(z64.ravel())
        seen["activation"].append(z64.ravel())
        seen["preactivation_grad"].append(up.double().numpy().ravel())
        layer(xb).backward(up)
    snap = ModelStats(layer).snapshot()[1]
    for q, vals in seen.items():
        v = np.concatenate(vals)
        qs = snap[q]
        assert qs.exponent_counts == _frexp_counts(v), q
        fin = v[np.isfinite(v)]
        _, e = np.frexp(fin)
        nz = fin != 0
        for fmt, lim in FORMATS.items():
            f = qs.formats[fmt]
            assert f["overflow"] == np.count_nonzero(nz & (e > lim["overflow_e"])) / fin.size
            assert f["underflow"] == np.count_nonzero(nz & (e <= lim["underflow_e"])) / fin.size
            assert f["subnormal"] == np.count_nonzero(nz & (e <= lim["subnormal_e"])) / fin.size
    g = snap["weight_grad"]
    assert sum(g.exponent_counts.values()) == g.count
    # the figures the issue names: 65536 and -65536 overflow fp16, 512 and up e4m3
    a = snap["activation"]
    assert a.formats["fp16"]["overflow"] > 0 and a.formats["bf16"]["overflow"] == 0
    assert a.formats["fp8_e4m3"]["overflow"] > a.formats["fp16"]["overflow"]
    assert a.row()["formats"] == a.formats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 1001, 300_001, 1_000_003])
def test_exponent_counts_of_large_tensors_match_frexp(dtype, n):
    """The CPU path's exponent histogram (read from the exponent bits, packed counting)
    equals frexp's on large tensors: many binades or a single one, zeros, subnormals,
    infinities and NaN (not counted), float64 exponents beyond the histogram (clamped)."""
    from _helpers import update

    from fastmlp.stats import PREACTIVATION

    rng = np.random.default_rng(n)
    for spread in (0.0, 2.0, 40.0):  # one binade (of a power of two) to many
        mags = np.exp2(np.round(rng.normal(-10, spread, n)) if spread else np.full(n, -3.0))
        v = mags * rng.choice([-1.0, 1.0], n)
        if spread:
            v *= rng.uniform(1, 2, n)
        if n > 10 and spread:  # (one binade alone too: a single exponent to count)
            v[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300 if dtype == torch.float64 else 0]
            v[6:9] = (
                [2.0**-149, -(2.0**-140), 3e-39]
                if dtype == torch.float32
                else [1e60, 5e-324, 1e-310]
            )
        x = torch.from_numpy(v).to(dtype)
        layer = InstrumentedLinear(4, 4, "identity")
        layer.stats.exponents = True
        update(layer.stats, PREACTIVATION, x)
        qs = ModelStats(layer).snapshot()[1]["preactivation"]
        assert qs.exponent_counts == _frexp_counts(x.double().numpy()), spread


def test_exponent_counts_merge_across_ranks():
    parts, whole = [], None
    g = torch.Generator().manual_seed(12)

    def make():
        layer = InstrumentedLinear(5, 4, "tanh", init="pytorch", generator=torch.Generator())
        layer.stats.exponents = True
        return layer

    whole = make()
    for r in range(2):
        rank = make()
        x = torch.randn(9, 5, generator=g) * 10.0 ** (3 * r)
        rank(x).sum().backward()
        whole(x).sum().backward()
        parts.append(LayerBuffers.from_stats(rank.stats))
    merged = merge_buffers(parts, whole.stats.fixed_range)
    np.testing.assert_array_equal(merged.exp_hist, LayerBuffers.from_stats(whole.stats).exp_hist)
    a = snapshot_from_buffers([(1, whole.stats)], [merged])[1]
    b = ModelStats(whole).snapshot()[1]
    for q in QUANTITIES:
        assert a[q].exponent_counts == b[q].exponent_counts and a[q].formats == b[q].formats
