"""The CPU backend: dense + bias + activation with statistics, fast on the CPU.

The same numbers as :mod:`fastmlp.backends.reference` (up to float rounding), from fewer
and cheaper passes over the data, since host reads are free on the CPU: no non-finite
masks when a batch's min and max are finite (else the reference's masked accumulation),
float32 sums centred where they stay accurate (merged in float64, squares summed by
ATen's cascade sum), the moments of dW from its factors where that is cheaper than a pass
over it, scalars updated through NumPy views of the buffers, histogram slots (over the
span between the extremes) and exponents (read from the exponent bits) counted several to
an index by one ``bincount``, no range bookkeeping when nothing left the histogram range;
float32 matmuls in oneDNN (the activation fused when nothing needs the pre-activation) or
``addmm``, whichever is faster for the shape on this CPU, measured at first use.

Interface as the reference's: :func:`forward` and :func:`backward`, for CPU tensors.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from fastmlp.activations import Activation
from fastmlp.backends import determinism, reference
from fastmlp.stats.algebra import grow_range_, reshift
from fastmlp.stats.buffers import calibration_flags
from fastmlp.stats.config import StatsConfig
from fastmlp.stats.layout import (
    ABS_SUM,
    ACTIVATION,
    CALIBRATED,
    CENTER,
    COUNT,
    EXP_MAX,
    EXP_MIN,
    MAX,
    MIN,
    PREACTIVATION,
    PREACTIVATION_GRAD,
    SAT_HIGH,
    SAT_LOW,
    SUM,
    SUM3,
    SUM4,
    SUMSQ,
    WEIGHT_GRAD,
    ZEROS,
    Buffers,
    as_float32,
    saturation_bounds,
)

__all__ = ["accumulate", "backward", "forward", "record", "scratch"]


def accumulate(
    bufs: Buffers,
    settings: StatsConfig,
    q: int,
    x: torch.Tensor,
    total: Callable[[], torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    fixed: bool = False,
) -> None:
    """:func:`fastmlp.backends.reference.accumulate` for a CPU ``x``.

    ``total``, when the caller has a cheaper way to it, returns the sum of ``x``'s elements
    (in ``x``'s precision); ``factors`` ``(a, b)`` say that ``x = a.T @ b``. Both are used
    instead of passes over ``x`` where cheaper. ``x`` is detached first, so no autograd
    graph is recorded (no ``no_grad`` context needed on this hot path).
    """
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        return
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if settings.exponents:
        _exponents_on_host(bufs, q, x)
    mn, mx = (float(v) for v in torch.aminmax(x))
    # aminmax propagates NaN and returns an infinity if there is one: finite extremes
    # mean every element is finite.
    if math.isfinite(mn) and math.isfinite(mx):
        _accumulate_finite_on_host(bufs, settings, q, x, mn, mx, total, factors, fixed)
    else:
        reference.accumulate(bufs, settings, q, x, fixed=fixed, exponents=False)


# The exponent field of float32 and float64: (bits shifted right, mask, bias: frexp's
# exponent of a normal number is the field minus the bias).
_EXPONENT_FIELD = {
    torch.float32: (torch.int32, 23, 0xFF, 126),
    torch.float64: (torch.int64, 52, 0x7FF, 1022),
}


def _exponents_on_host(bufs: Buffers, q: int, x: torch.Tensor) -> None:
    """:func:`record_exponents` for a CPU ``x`` (float32 or float64), from the exponent bits:
    two integer passes and a packed ``bincount`` over the exponents present, instead of
    ``frexp``, which the CPU computes one value at a time."""
    itype, shift, top, bias = _EXPONENT_FIELD[x.dtype]
    n = x.numel()
    field = torch.bitwise_right_shift(
        x.view(itype), shift, out=scratch(n, torch.int16, x.device, slot=1)
    )
    field.bitwise_and_(top)  # the sign bit off: the biased exponent, 0 .. top
    lo, hi = (int(v) for v in torch.aminmax(field))
    k, _ = _packing(hi - lo + 1, n, hi)
    counts = _packed_counts(field, lo, hi - lo + 1, k)
    biased = np.arange(lo, hi + 1)
    normal = (biased > 0) & (biased < top)  # top: infinities and NaN, not counted
    slots = np.clip(biased - bias, EXP_MIN, EXP_MAX) - (EXP_MIN - 1)
    row = bufs.exp_hist.numpy()[q]
    np.add.at(row, slots[normal], counts[normal])
    if lo == 0 and counts[0]:  # zeros and subnormal numbers
        zeros = _count(torch.eq(x, 0, out=scratch(n, x.dtype, x.device)))
        row[0] += zeros
        if counts[0] > zeros:  # subnormals: rare, each exponent from frexp
            tiny = x[(x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)]
            _, e = torch.frexp(tiny)
            np.add.at(row, e.clamp_(EXP_MIN, EXP_MAX).numpy() - (EXP_MIN - 1), 1)


def _accumulate_finite_on_host(
    bufs: Buffers,
    settings: StatsConfig,
    q: int,
    x: torch.Tensor,
    mn: float,
    mx: float,
    total: Callable[[], torch.Tensor] | None,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
    fixed: bool,
) -> None:
    """:func:`accumulate` for an all-finite ``x``: few passes, scratch buffers, host-side
    scalars."""
    n = x.numel()
    d = scratch(n, x.dtype, x.device)
    acc, shift, state = bufs.acc.numpy(), bufs.shift.numpy(), bufs.state.numpy()
    if factors is not None and not settings.moments4 and _factored_is_cheaper(*factors):
        c, (s1, s2) = 0.0, _factored_moments(*factors)
        dev = sq = None
    else:
        c, s1, s2, dev, sq = _centred_sums(
            x, d, float(state[CENTER, q]), total, keep=settings.moments4
        )
    s3 = s4 = 0.0
    if settings.moments4:
        # (x - c)**3 and **4 around the same centre as s2, by ATen's cascade sum
        work = scratch(n, x.dtype, x.device, slot=1)
        s3 = float(torch.mul(sq, dev, out=work).sum())
        s4 = float(torch.mul(sq, sq, out=work).sum())
    # sum |x| (the l1 figure): ATen's cascade sum, as for the squares (the work buffer d
    # is free again: the centred values are used up)
    sa = float(torch.abs(x, out=d).sum())
    if not all(math.isfinite(s) for s in (s1, s2, s3, s4, sa)):
        # Huge finite values overflowed float32 sums: the reference's float64 sums instead.
        reference.accumulate(bufs, settings, q, x, fixed=fixed, exponents=False)
        return
    mean = c + s1 / n
    var = max(s2 / n - (s1 / n) ** 2, 0.0)
    state[CENTER, q] = 0.0 if mean * mean <= var else as_float32(mean)
    row = acc[q]
    delta = c - float(shift[q])
    row[COUNT] += n
    row[SUM] += s1 + n * delta
    row[SUMSQ] += s2 + delta * (2 * s1 + n * delta)
    if settings.moments4:
        _, _, r3, r4 = reshift(n, s1, s2, s3, s4, delta)
        row[SUM3] += r3
        row[SUM4] += r4
    row[ABS_SUM] += sa
    row[MIN] = min(row[MIN], mn)
    row[MAX] = max(row[MAX], mx)
    if q == ACTIVATION and settings.saturation:
        lo, hi = saturation_bounds(*settings.saturation_thresholds, x.dtype)
        row[SAT_LOW] += _count(torch.le(x, lo, out=d))
        row[SAT_HIGH] += _count(torch.ge(x, hi, out=d))
    if settings.zeros:
        row[ZEROS] += _count(torch.eq(x, 0, out=d))
    if settings.histograms:
        _histogram_on_host(bufs, q, x, mn, mx, fixed)


def _centred_sums(
    x: torch.Tensor,
    d: torch.Tensor,
    c: float,
    total: Callable[[], torch.Tensor] | None,
    *,
    keep: bool,
) -> tuple[float, float, float, torch.Tensor, torch.Tensor]:
    """``(c, sum(x - c), sum((x - c)**2), x - c, (x - c)**2)`` in ``x``'s precision, ``d`` a
    work buffer. The last two are work buffers, both valid only with ``keep`` (else the
    squares overwrite ``d``, which stays in cache).

    Sums of x - c and (x - c)**2 in the input precision are accurate when the offset of the
    batch mean from c is at most the batch's spread (the error is relative to var +
    offset**2). c is the previous batch's hint (a float32 number, so x - c is computed
    against exactly c): 0 when that batch was centred enough (no subtraction pass at all),
    else its mean. If this batch is off, recentre.
    """
    sq = scratch(x.numel(), x.dtype, x.device, slot=2) if keep else d
    if c == 0:
        s1 = float(x.sum() if total is None else total())
        dev = x
    else:
        s1 = float(torch.sub(x, c, out=d).sum())
        dev = d
    s2 = _sum_of_squares(dev, sq)
    n = x.numel()
    offset = s1 / n
    if offset * offset > s2 / n - offset * offset:
        c = as_float32(c + offset)
        s1 = float(torch.sub(x, c, out=d).sum())
        dev = d
        s2 = _sum_of_squares(dev, sq)
    return c, s1, s2, dev, sq


def _factored_is_cheaper(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the moments of ``a.T @ b`` cost fewer multiply-adds from its factors (two
    ``[M, M]`` Gram matrices) than elements of the product (one pass over it)."""
    m, n = a.shape
    k = b.shape[1]
    return m * m * (n + k) <= n * k


def _factored_moments(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(sum(P), sum(P**2))`` of ``P = a.T @ b`` in float64 from its factors, without a pass
    over ``P``: ``sum(P) = a.sum(1) . b.sum(1)``, ``sum(P**2) = sum((a a.T) * (b b.T))``.

    Exact to float64 rounding for the product of the float32 factors (``P`` itself is that
    product rounded to float32, a relative difference of float32's epsilon per element).
    """
    # NumPy's BLAS for the small float64 products: less cost per call than ATen's.
    a64, b64 = (v.detach().to(torch.float64).numpy() for v in (a, b))
    s1 = float(a64.sum(1) @ b64.sum(1))
    s2 = float(np.vdot(a64 @ a64.T, b64 @ b64.T))
    return s1, s2


def _sum_of_squares(v: torch.Tensor, work: torch.Tensor) -> float:
    """``sum(v**2)`` through ``work`` (may be ``v``), summed by ATen's cascade sum.

    Not ``torch.dot``: BLAS dots accumulate in a few float32 lanes, whose error grows with
    the length and differs from CPU to CPU (up to 1e-3 relative over 4M values, which
    tests/test_cpu_exact.py checks); the
    cascade sum's stays near float32's rounding on every CPU.
    """
    return float(torch.mul(v, v, out=work).sum())


def _histogram_on_host(
    bufs: Buffers, q: int, x: torch.Tensor, mn: float, mx: float, fixed: bool
) -> None:
    """Histogram of the finite ``x`` (extremes ``mn``, ``mx``) into ``bufs.hist[q]``,
    growing the range (unless ``fixed``) when a value left it."""
    bins = bufs.bins
    hist, hist_range = bufs.hist.numpy(), bufs.hist_range.numpy()
    lo, hi = hist_range[q].tolist()
    # bin = floor(x * scale) + offset with scale = bins / (hi - lo), offset = -lo * scale (an
    # integer for every range used here, and x * scale is exact for power-of-two scales):
    # unlike floor((x - lo) * scale), values near an edge far from lo keep their side of it.
    scale = bins / (hi - lo)
    offset = int(-lo * scale)
    inside = mn >= lo and mx <= hi
    # Slot ``bins`` holds x == hi (or values rounding just below it): the last bin is closed.
    counts = _slot_counts(x, scale, offset, bins + 1, mn, mx)
    under = over = 0
    if not inside:
        work = scratch(x.numel(), x.dtype, x.device)
        under = _count(torch.lt(x, lo, out=work))  # range edges are powers of two: exact
        over = _count(torch.gt(x, hi, out=work))
    reference.add_slot_counts_(hist[q], counts, under, over)
    if not inside and not fixed:
        grow_range_(bufs, q, torch.tensor(max(abs(mn), abs(mx)), dtype=torch.float64))


def _slot_counts(
    x: torch.Tensor, scale: float, offset: int, slots: int, mn: float, mx: float
) -> np.ndarray:
    """Counts of the slots ``floor(x * scale) + offset``, clamped to ``[0, slots)``, as int64
    numpy; ``mn`` and ``mx`` are ``x``'s extremes.

    Only the span of slots between the extremes' is counted (a few slots for a weight
    gradient, whose values crowd the middle bins). ``k`` consecutive chunks of ``x`` are
    packed into one index in base ``span`` (integer arithmetic, exact), so the serial
    ``bincount`` reads ``n / k`` indices; ``k`` grows while the indices it saves cost more
    than the larger table of ``span**k`` counts to clear and fold, and while the packing
    fits int16 (half the bytes of int32 to write and read).
    """
    n = x.numel()
    first, last = (_slot_of(v, scale, offset, x.dtype) for v in (mn, mx))
    clamp = first < 0 or last >= slots
    first, last = (min(max(e, 0), slots - 1) for e in (first, last))
    span = last - first + 1
    counts = np.zeros(slots, dtype=np.int64)
    if span == 1:  # every value in one slot: nothing to count
        counts[first] = n
        return counts
    low = first - offset  # the floored value of slot ``first``
    k, itype = _packing(span, n, max(abs(low), abs(low + span - 1)))
    t = torch.mul(x, scale, out=scratch(n, x.dtype, x.device))
    t.floor_()
    if clamp:
        t.clamp_(low, low + span - 1)
    idx = scratch(n, itype, x.device, slot=1).copy_(t)  # exact: small integers
    counts[first : last + 1] = _packed_counts(idx, low, span, k)
    return counts


def _packed_counts(idx: torch.Tensor, low: int, span: int, k: int) -> np.ndarray:
    """Counts (int64 numpy) of the values ``low .. low + span - 1`` of the 1-D integer
    ``idx``, a work buffer (overwritten), counted ``k`` to an index (:func:`_packing`)."""
    n = idx.numel()
    if span == 1:
        return np.array([n], dtype=np.int64)
    m = n // k
    packed = idx[:m]
    for j in range(1, k):  # Horner: packed = packed * span + chunk j
        work = scratch(m, idx.dtype, idx.device, slot=2)
        packed = torch.add(idx[j * m : (j + 1) * m], packed, alpha=span, out=work)
    # Every chunk's value v stands for v - low: take low * (1 + span + ...) off.
    packed.sub_(low * (span**k - 1) // (span - 1))
    table = torch.bincount(packed, minlength=span**k).numpy()
    part = np.zeros(span, dtype=np.int64)
    for _ in range(1, k):  # peel the last digit off: its counts, and the table of the rest
        table = table.reshape(-1, span)
        part += table.sum(0)
        table = table.sum(1)
    part += table
    if n > k * m:  # the n % k values left over
        part += np.bincount(idx[k * m :].numpy().astype(np.int64) - low, minlength=span)
    return part


def _slot_of(v: float, scale: float, offset: int, dtype: torch.dtype) -> int:
    """``floor(v * scale) + offset`` with the product rounded in ``dtype`` as the pass over
    the tensor rounds it (far outside any slot: a value far outside, of the same sign)."""
    p = v * scale
    if not -(2.0**40) < p < 2.0**40:
        return -(2**40) if p < 0 else 2**40
    if dtype == torch.float32:
        p = float(np.float32(v) * np.float32(scale))
    return math.floor(p) + offset


_INT16_MAX = torch.iinfo(torch.int16).max
_PACK_OPS = 2**15


def _packing(span: int, n: int, largest: int) -> tuple[int, torch.dtype]:
    """``(k, dtype)`` for :func:`_packed_counts` over ``n`` values spanning ``span``: values
    to pack per index, and the index dtype (holding both the packed indices and the values,
    of magnitude up to ``largest``)."""
    k = 1
    if span == 1:  # one value: nothing to pack
        return 1, torch.int16 if largest <= _INT16_MAX else torch.int32
    # One more value per index saves n / (k (k + 1)) indices, at about 4 times the cost of
    # one index per table entry added (bincount's clearing, the fold), and adds a few small
    # ops, which cost as much as about 2**15 indices (``_PACK_OPS``). Only the speed
    # depends on these constants, never the counts.
    while k < 8 and (_PACK_OPS * k * (k + 1) <= n) and 4 * k * (k + 1) * span ** (k + 1) <= n:
        k += 1
    while k > 1 and max(largest * (span**k - 1) // (span - 1), span**k - 1) > _INT16_MAX:
        k -= 1
    if k > 1:
        return k, torch.int16
    itype = next(d for d in (torch.int16, torch.int32) if max(largest, span) <= torch.iinfo(d).max)
    return 1, itype


def _count(flags: torch.Tensor) -> int:
    """Number of ones in a 0/1 float tensor, exact (float64 sums past float32's 2**24)."""
    return int(flags.sum(dtype=torch.float64 if flags.numel() > 2**24 else None))


def record(
    bufs: Buffers,
    settings: StatsConfig,
    q: int,
    x: torch.Tensor,
    total: Callable[[], torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    fixed: bool = False,
) -> None:
    """Accumulate quantity ``q`` of ``x`` (:func:`accumulate`), calibrating it first if it
    is not yet (the reference's calibration, whose mean starts the centring hint)."""
    if not calibration_flags(bufs.state)[q]:
        if not _calibrate(bufs, q, x, fixed=fixed):
            return
        bufs.state[CENTER, q] = as_float32(float(bufs.shift[q]))
    accumulate(bufs, settings, q, x, total, factors, fixed=fixed)


def _calibrate(bufs: Buffers, q: int, x: torch.Tensor, *, fixed: bool) -> bool:
    """:func:`fastmlp.backends.reference.calibrate` for a CPU ``x``: where every value is
    finite (finite extremes), the mean by a sum in ``x``'s precision and the range from the
    extremes, in two passes over ``x`` instead of the reference's masked float64 copies
    (a recorded step after a reset, the first of each :class:`fastmlp.Monitor` window,
    calibrates every quantity: a weight gradient is a million values for a 1000x1000
    layer)."""
    flat = x.detach().reshape(-1)
    if flat.numel() == 0 or flat.dtype not in (torch.float32, torch.float64):
        return reference.calibrate(bufs, q, x, fixed=fixed)
    mn, mx = (float(v) for v in torch.aminmax(flat))
    if not (math.isfinite(mn) and math.isfinite(mx)):
        return reference.calibrate(bufs, q, x, fixed=fixed)
    # (the shift only centres the sums: ATen's cascade sum in x's precision is near enough,
    # where it does not overflow)
    total = float(flat.sum())
    if not math.isfinite(total):
        total = float(flat.sum(dtype=torch.float64))
    bufs.shift.numpy()[q] = total / flat.numel()
    if not fixed:
        m = max(abs(mn), abs(mx))  # the smallest power of two strictly above m (1 for 0)
        r = math.ldexp(1.0, math.frexp(m)[1]) if m > 0 else 1.0
        bufs.hist_range.numpy()[q] = (-r, r)
    bufs.state.numpy()[CALIBRATED, q] = 1.0
    return True


# Work buffers of the CPU path, per thread and shared by all layers: one set stays in cache.
_SCRATCH = threading.local()


def scratch(n: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A 1-D work buffer of ``n`` elements, shared by every layer in this thread.

    Its contents do not survive the next statistics update; distinct ``slot``s are
    distinct buffers.
    """
    pool: dict | None = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    key = (slot, dtype, device)
    entry = pool.get(key)
    if entry is None or entry[0].numel() < n:
        # A normal tensor even when first asked for under torch.inference_mode(), so it
        # stays usable outside it.
        with torch.inference_mode(False):
            entry = (torch.empty(n, dtype=dtype, device=device), {})
        pool[key] = entry
    buf, views = entry
    view = views.get(n)
    if view is None:
        view = views[n] = buf[:n]
    return view


# oneDNN's matmul with the bias and activation fused into its epilogue (the CPU kernel
# PyTorch's own compiler uses for linear layers) competes with MKL's sgemm (``addmm``, what
# nn.Linear runs) plus a separate activation pass. Which one wins depends on the CPU and the
# shape (oneDNN wins on some CPUs and loses on others), so it is measured
# per shape at first use, like ``torch.backends.cudnn.benchmark``, and cached.
_ONEDNN_POST = {"identity": "none", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
# (x shape, weight shape and strides, bias, post-op, threads) -> oneDNN is faster
_ONEDNN_CHOICE: dict[tuple, bool] = {}


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and torch.backends.mkldnn.enabled
        and _onednn_works()
    )


def _use_onednn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Activation | None
) -> bool:
    """Whether ``_dense`` runs oneDNN for these operands (measured once per shape)."""
    if determinism._on or not _onednn_usable(x, weight):
        return False  # (deterministic: addmm, whatever a timing would choose)
    post = "none" if act is None else act.name
    key = (x.shape, weight.shape, weight.stride(), bias is not None, post, torch.get_num_threads())
    choice = _ONEDNN_CHOICE.get(key)
    if choice is None:
        choice = _ONEDNN_CHOICE[key] = _onednn_is_faster(x, weight, bias, act)
    return choice


def _onednn_is_faster(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Activation | None
) -> bool:
    """Time both implementations on these operands: one warm-up call each, then the fastest
    of three alternating calls; oneDNN must win by 5% (ties go to what nn.Linear runs)."""

    def mkl() -> torch.Tensor:
        return _addmm(x, weight, bias, act)

    def onednn() -> torch.Tensor:
        return _linear_pointwise(x, weight, bias, act)

    best = {mkl: math.inf, onednn: math.inf}
    for f in best:
        f()
    for _ in range(3):
        for f in best:
            t0 = time.perf_counter()
            f()
            best[f] = min(best[f], time.perf_counter() - t0)
    return best[onednn] < 0.95 * best[mkl]


def _linear_pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Activation | None
) -> torch.Tensor:
    post = "none" if act is None else _ONEDNN_POST[act.name]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "")


def _addmm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Activation | None
) -> torch.Tensor:
    z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return z if act is None else act.forward(z)


@functools.cache
def _onednn_works() -> bool:
    """Whether this PyTorch build runs oneDNN's fused linear (checked once, on a tiny case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, w, torch.zeros(4), "tanh", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, torch.tanh(torch.full((2, 4), 3.0))))


def _dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation | None = None,
    *,
    onednn: bool = True,
) -> torch.Tensor:
    """``x @ weight.T + bias``, then ``activation`` if given (one of ``_ONEDNN_POST``'s):
    with ``onednn``, oneDNN with the activation fused where it measured faster for this
    shape, else ``addmm`` (cuBLAS/MKL) and the activation."""
    if onednn and _use_onednn(x, weight, bias, activation):
        return _linear_pointwise(x, weight, bias, activation)
    return _addmm(x, weight, bias, activation)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
    *,
    fuse_activation: bool = True,
    onednn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fastmlp.backends.reference.forward` for CPU tensors.

    With ``onednn``, the matmul may run in oneDNN where that timed faster for the shape, and
    with statistics off and ``fuse_activation`` too, oneDNN may apply the activation in it;
    ``fuse_activation=False`` computes ``z`` then ``h`` as with statistics on, bit for bit
    (what a checkpoint's recomputation of a recorded pass needs). Activations whose backward
    needs ``z`` (GELU, SiLU) never take oneDNN's fused activation: ``z`` must be kept for
    the backward anyway. The op passes ``onednn=False`` for a pass a backward follows:
    oneDNN's forward, faster alone, made training steps slower (bench.cadence, 5x1000 tanh
    network, batch 10, one thread, Intel Xeon family 6 model 167: statistics off at 1.22x
    plain PyTorch with it, 1.10x and 1.12x without, runs on the same idle machine)."""
    if not settings.enabled and fuse_activation and activation.name in _ONEDNN_POST:
        return _dense(x, weight, bias, activation, onednn=onednn), None
    z = _dense(x, weight, bias, onednn=onednn)
    h = activation.forward(z)
    if settings.enabled:
        record(bufs, settings, PREACTIVATION, z)
        record(bufs, settings, ACTIVATION, h, fixed=activation.bounded)
        if settings.per_unit:
            reference.record_units(bufs, settings, h)
    return h, (z if activation.from_input else None)


def backward(
    dh: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor,
    activation: Activation,
    bufs: Buffers,
    settings: StatsConfig,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`fastmlp.backends.reference.backward` for CPU tensors."""
    dz = activation.backward(dh, saved)
    stats = settings.enabled
    db = dz.sum(0) if need_b else None
    if stats:
        # (the bias gradient's sum as the batch total only where it is summed in float32 or
        # float64: in float16/bfloat16 it is rounded to the layer's precision)
        exact = db is not None and db.dtype in (torch.float32, torch.float64)
        record(bufs, settings, PREACTIVATION_GRAD, dz, total=db.sum if exact else None)
    dw = None
    if need_w or stats:
        dw = dz.t() @ x
        if stats:
            # Moments of dW = dz.T @ x from the small operands where cheaper than a pass.
            record(bufs, settings, WEIGHT_GRAD, dw, factors=(dz, x))
    # dx last: it is the next layer's first input, still in cache when that one starts.
    dx = _dense(dz, weight.t(), None) if need_x else None
    return dx, dw if need_w else None, db
