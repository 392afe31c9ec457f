"""Independent float64 references for the acceptance tests (no fastmlp code is used here).

``capture`` runs plain PyTorch (``F.linear`` + the activation written with torch ops) in
float64 and returns the four quantities; ``stream_stats`` computes, with numpy alone,
what a statistics accumulator must report after a sequence of batches: the contract below,
with the histogram semantics documented in ``fastmlp/stats/layout.py``:

- moments, min and max over finite values only; non-finite values only counted;
- bins ``[e_i, e_{i+1})``, the last closed; underflow ``x < low``, overflow ``x > high``;
- bounded activations on their fixed range; other quantities on ``+-R``, ``R`` the
  smallest power of two >= max|x| of the first batch (1 if that is 0), values beyond
  the current ``R`` counted as under/overflow, after which ``R`` doubles until it
  covers the batch (bins merge exactly, so in-range values end up binned at the final
  edges).

``ambiguous`` counts values whose float32 computation could legitimately fall on the
other side of an edge or a threshold than the float64 reference (closer than ``tol``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

QUANTITIES = ("preactivation", "activation", "preactivation_grad", "weight_grad")
ACTS = ("sigmoid", "tanh", "softsign", "relu", "identity", "gelu", "gelu_tanh", "silu")
#: Activations whose derivative is a function of the input z (the layer keeps z).
FROM_INPUT_ACTS = ("gelu", "gelu_tanh", "silu")
FIXED_RANGE = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}
SATURATION = {"sigmoid": (0.01, 0.99), "tanh": (-0.99, 0.99), "softsign": (-0.99, 0.99)}
# Row keys of Snapshot.rows(), written out here rather than imported from fastmlp.
ROW_KEYS = (
    "layer",
    "name",
    "quantity",
    "count",
    "mean",
    "var",
    "std",
    "l1",
    "rms",
    "min",
    "max",
    "absmax",
    "skewness",
    "kurtosis",
    "zero_fraction",
    "dead_fraction",
    "formats",
    "nonfinite",
    "saturated_low",
    "saturated_high",
    "saturated",
    "hist_edges",
    "hist_counts",
    "underflow",
    "overflow",
)


def torch_act(name: str, z: torch.Tensor) -> torch.Tensor:
    return {
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softsign": F.softsign,
        "relu": torch.relu,
        "identity": lambda t: t,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
    }[name](z)


# f'(z) written through h = f(z), as issue 2 specifies (the layer stores h, not z).
GRAD_FROM_OUTPUT = {
    "sigmoid": lambda h: h * (1 - h),
    "tanh": lambda h: 1 - h * h,
    "softsign": lambda h: (1 - np.abs(h)) ** 2,
    "relu": lambda h: (h > 0).astype(np.float64),
    "identity": lambda h: np.ones_like(h),
}


def capture(x, weight, bias, act: str, upstream, *, grad_from_h=None) -> dict[str, np.ndarray]:
    """z, h, dL/dz, dL/dW in float64 with plain PyTorch, for ``L = sum(h * upstream)``.

    By default dL/dz comes from float64 autograd. Otherwise it is computed in float64
    with numpy as ``upstream * f'(h)`` with ``f'`` written through ``h`` (the contract of
    issue 2): ``grad_from_h=True`` uses the float64 ``h``; a tensor uses those values of
    ``h`` (the layer's own output, whose last-ulp rounding decides ``1 - |h|`` when
    outputs are pinned near +-1). The contract's value also differs from autograd for
    relu at NaN (autograd passes the gradient, ``h > 0`` does not).
    """
    x64 = x.detach().to(torch.float64)
    w64 = weight.detach().to(torch.float64).clone().requires_grad_(True)
    b64 = None if bias is None else bias.detach().to(torch.float64)
    if x64.dim() == 1:
        x64 = x64[None]
    up = upstream.detach().to(torch.float64).reshape(x64.shape[0], -1)
    z = F.linear(x64, w64, b64)
    z.retain_grad()
    h = torch_act(act, z)
    h.backward(up)
    out = {
        "preactivation": z.detach().numpy(),
        "activation": h.detach().numpy(),
        "preactivation_grad": z.grad.numpy(),
        "weight_grad": w64.grad.numpy(),
    }
    if grad_from_h is not None and grad_from_h is not False:
        hr = h if grad_from_h is True else grad_from_h
        hr = hr.detach().to(torch.float64).reshape(h.shape).numpy()
        dz = up.numpy() * GRAD_FROM_OUTPUT[act](hr)
        with np.errstate(invalid="ignore", over="ignore"):
            out["preactivation_grad"] = dz
            out["weight_grad"] = dz.T @ x64.numpy()
    return out


def _rank_bracket(sorted_values: np.ndarray, q: float) -> tuple[float, float]:
    """The order statistics around rank ``q/100 * n`` (percentile definitions differ within it)."""
    n = sorted_values.size
    t = q / 100 * n
    lo = sorted_values[max(math.floor(t) - 1, 0)]
    hi = sorted_values[min(math.ceil(t), n - 1)]
    return float(lo), float(hi)


def pow2_above(m: float) -> float:
    """Smallest power of two strictly above ``m`` (1 for 0 or non-finite)."""
    if not math.isfinite(m) or m <= 0:
        return 1.0
    r = 2.0 ** math.floor(math.log2(m))
    while r <= m:  # guard against log2 rounding
        r *= 2
    while r / 2 > m:
        r /= 2
    return r


def _near(v: np.ndarray, points: np.ndarray, tol: float) -> np.ndarray:
    if v.size == 0:
        return np.zeros(0, dtype=bool)
    d = np.min(np.abs(v[:, None] - points[None, :]), axis=1)
    return (d > 0) & (d < tol)


def _near_edges(v: np.ndarray, lo: float, hi: float, bins: int, tol: float) -> np.ndarray:
    if v.size == 0:
        return np.zeros(0, dtype=bool)
    w = (hi - lo) / bins
    idx = (v - lo) / w
    d = np.abs(idx - np.round(idx)) * w
    return (d > 0) & (d < tol)


def stream_stats(
    batches,
    *,
    bins: int = 64,
    fixed_range: tuple[float, float] | None = None,
    thresholds: tuple[float, float] | None = None,
    tol: float = 0.0,
) -> dict:
    """What an accumulator must report after ``batches`` (float64 arrays) since a reset."""
    batches = [np.asarray(b, dtype=np.float64).ravel() for b in batches]
    allv = np.concatenate(batches) if batches else np.zeros(0)
    fin = allv[np.isfinite(allv)]
    out: dict = {"count": int(fin.size), "nonfinite": int(allv.size - fin.size)}
    if fin.size:
        out.update(
            mean=float(fin.mean()),
            var=float(fin.var()),
            std=float(fin.std()),
            min=float(fin.min()),
            max=float(fin.max()),
            p98=float(np.percentile(fin, 98)),
            p98_bracket=_rank_bracket(np.sort(fin), 98),
        )
    amb = 0
    if thresholds is not None and fin.size:
        lo_t, hi_t = thresholds
        out["sat_low"] = int((fin <= lo_t).sum())
        out["sat_high"] = int((fin >= hi_t).sum())
        amb += int(_near(fin, np.array([lo_t, hi_t]), tol).sum())
    # histogram, replaying the range policy batch by batch
    in_range = []
    under = over = 0
    lo = hi = None
    for b in batches:
        f = b[np.isfinite(b)]
        if fixed_range is not None:
            lo, hi = fixed_range
        elif lo is None:
            if not f.size:  # nothing finite: the first batch with finite values calibrates
                continue
            r = pow2_above(float(np.abs(f).max()))
            lo, hi = -r, r
        amb += int(_near_edges(f, lo, hi, bins, tol).sum())
        under += int((f < lo).sum())
        over += int((f > hi).sum())
        in_range.append(f[(f >= lo) & (f <= hi)])
        if fixed_range is None and f.size:
            m = float(np.abs(f).max())
            if m > hi:
                lo, hi = -pow2_above(m), pow2_above(m)
    if lo is not None:
        vals = np.concatenate(in_range)
        counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
        amb += int(_near_edges(vals, lo, hi, bins, tol).sum())
        out.update(hist_counts=counts, hist_edges=edges, underflow=under, overflow=over)
    out["ambiguous"] = amb
    return out


def assert_matches(
    qs, ref: dict, *, saturating: bool, check_percentile: bool = True, minmax_rel: float = 1e-5
) -> None:
    """Compare a fastmlp QuantityStats with ``stream_stats``' output.

    ``minmax_rel``: relative tolerance of min and max (the float32 rounding of the values).
    """
    where = f"layer {qs.layer} {qs.quantity}"
    assert qs.count == ref["count"], where
    assert qs.nonfinite == ref["nonfinite"], where
    figures = (qs.mean, qs.var, qs.std, qs.min, qs.max)
    if ref["count"] == 0:
        assert all(v is None for v in figures), where
        return
    for v in figures:
        assert v is not None and math.isfinite(v), where
    scale = abs(ref["mean"]) + ref["std"]
    assert abs(qs.mean - ref["mean"]) <= 1e-5 * scale + 1e-300, (where, qs.mean, ref["mean"])
    assert abs(qs.var - ref["var"]) <= 1e-4 * ref["var"] + 1e-12 * scale**2, (
        where,
        qs.var,
        ref["var"],
    )
    assert abs(qs.std - math.sqrt(qs.var)) <= 1e-12 * (qs.std + 1e-300), where
    span = max(abs(ref["min"]), abs(ref["max"]), 1e-300)
    assert abs(qs.min - ref["min"]) <= minmax_rel * span, (where, qs.min, ref["min"])
    assert abs(qs.max - ref["max"]) <= minmax_rel * span, (where, qs.max, ref["max"])
    amb = ref["ambiguous"]
    if saturating:
        n = ref["count"]
        assert qs.saturated_low is not None and qs.saturated_high is not None, where
        assert abs(qs.saturated_low * n - ref["sat_low"]) <= amb + 1e-6 * n, where
        assert abs(qs.saturated_high * n - ref["sat_high"]) <= amb + 1e-6 * n, where
        assert abs(qs.saturated - (qs.saturated_low + qs.saturated_high)) < 1e-12, where
    else:
        assert qs.saturated_low is None and qs.saturated_high is None, where
        assert qs.saturated is None, where
    if "hist_counts" in ref:
        assert qs.hist_counts is not None, where
        np.testing.assert_array_equal(np.asarray(qs.hist_edges), ref["hist_edges"], err_msg=where)
        counts = np.asarray(qs.hist_counts)
        total = counts.sum() + qs.underflow + qs.overflow
        assert total == ref["count"], (where, total, ref["count"])
        diff = np.abs(counts - ref["hist_counts"]).sum()
        diff += abs(qs.underflow - ref["underflow"]) + abs(qs.overflow - ref["overflow"])
        assert diff <= 2 * amb, (where, diff, amb, counts, ref["hist_counts"])
        if check_percentile and qs.underflow == 0 and qs.overflow == 0:
            width = ref["hist_edges"][1] - ref["hist_edges"][0]
            p = qs.percentile(98)
            lo, hi = ref["p98_bracket"]
            slack = width * (1 + 1e-9)
            assert lo - slack <= p <= hi + slack, (where, p, lo, hi, width)
            if ref["count"] >= 1000:  # dense enough for the definitions to agree
                assert abs(p - ref["p98"]) <= slack, (where, p, ref["p98"], width)
