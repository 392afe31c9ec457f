"""Shapeset-3x2, generated in torch, vectorized over the batch, on any device.

The generator follows the dataset description of Glorot & Bengio (2010): 32x32
grey images holding one or two filled objects (count uniform over {1, 2}), each
a triangle, a parallelogram or an ellipse drawn as a 20-gon (type uniform), with
random shape parameters, an anisotropic scale of 0.2..0.8 of the image per axis,
a rotation uniform over a full turn and a position uniform among those that keep
the object inside the image with a 1-pixel margin. Foreground grey is uniform in
[0.55, 1], background in [0, 0.45], and with probability 0.5 the two are swapped.
The label is the unordered multiset of the shape types present: 3 single-object
classes and 6 pairs, 9 classes with natural frequencies 1/6 (each single), 1/9
(each mixed pair) and 1/18 (each same-type pair).

Geometry, in pixel units with pixel ``(row i, column j)`` centred at
``(x, y) = (j + 0.5, i + 0.5)`` on the ``[0, 32]^2`` image plane:

- canonical shapes live in the unit square ``[0, 1]^2`` and touch all four of
  its sides: triangle ``(0,0), (1,0), (u,1)`` with ``u ~ U[0,1]`` (apex
  position, which sets the relative side lengths and angles); parallelogram
  with horizontal sides of length ``1 - |s|`` sheared by ``s ~ U[-0.6, 0.6]``
  (``s = 0`` is a rectangle); ellipse: regular 20-gon inscribed in the square.
- the shape is centred, scaled by ``(sx, sy) * 32`` with ``sx, sy ~ U[0.2,
  0.8]`` independently, rotated by ``theta ~ U[0, 2 pi)``, then shrunk
  uniformly (about its centre) only if its rotated bounding box is wider or
  taller than the 30 pixels available inside the margin (e.g. a 0.8 x 0.8
  square turned by 45 degrees); rotation stays uniform, the scale of such
  large rotated objects is reduced to what fits.
- the bounding box is placed uniformly inside ``[1, 31]^2``: the object never
  covers a pixel centre of the outer 1-pixel ring.
- a pixel belongs to an object when its centre lies inside the (convex) polygon.
  Rasterization is done per row: each edge's half-plane gives a lower or upper
  bound on ``x`` along the row's centre line, so each object becomes one column
  interval per row. Areas and overlaps are then exact pixel counts computed from
  the intervals without building masks.

Overlap rule: the second object may cover at most 50% of the first object's
pixels. We apply it symmetrically (overlap <= 50% of the *smaller* object's
pixel area), which satisfies both readings of the paper's "50% of its area"
and, since both objects share one grey level, guarantees each object shows at
least half of its own silhouette. The second object's geometry (shape
parameters, scale, rotation, position; never its type) is redrawn until the
rule holds, for at most 50 tries. When all 50 fail (rare, and nearly always
because the first object is so large that no second object keeps half of its
pixels outside it; :func:`shapeset_sample` counts these images in ``redrawn``),
we give up on that first object: it is redrawn (same type) and the 50 tries start
over, up to 20 times; an image that still fails keeps only its first object and
is labelled as that single shape (counted in ``fallbacks``). Labels therefore
always describe what is drawn, and the class frequencies stay at 1/6, 1/9 and
1/18 instead of leaking mass from pair classes to single-object classes, as
keeping one object after the first 50 failures would.

Randomness comes from one ``torch.Generator`` seeded with ``seed`` on the target
device: the same seed gives the same images on a given device (CPU and CUDA
random streams differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SHAPESET_CLASSES",
    "SHAPE_TYPES",
    "ShapesetSample",
    "shapeset",
    "shapeset_sample",
]

SIZE = 32
"""Image side, pixels."""
MARGIN = 1.0
"""Objects stay this many pixels away from the image border."""
MAX_TRIES = 50
"""Rejection-sampling budget for the second object (tries in all)."""
MAX_RESTARTS = 20
"""After 50 failed tries the first object is redrawn too, at most this many times."""
MAX_OVERLAP = 0.5
"""Largest allowed overlap, as a fraction of the smaller object's pixel area."""
SCALE_RANGE = (0.2, 0.8)
"""Per-axis object scale, as a fraction of the image side."""
FG_RANGE = (0.55, 1.0)
BG_RANGE = (0.0, 0.45)
SHEAR_MAX = 0.6
"""Parallelogram shear ``s ~ U[-SHEAR_MAX, SHEAR_MAX]`` (horizontal sides 1 - |s|)."""
ELLIPSE_SIDES = 20
NUM_EDGES = ELLIPSE_SIDES
"""Edges per polygon; triangles and parallelograms repeat a real edge as padding."""

SHAPE_TYPES: tuple[str, ...] = ("triangle", "parallelogram", "ellipse")
"""Object types, in the order of their type index."""

_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))

SHAPESET_CLASSES: tuple[str, ...] = SHAPE_TYPES + tuple(
    f"{SHAPE_TYPES[a]}+{SHAPE_TYPES[b]}" for a, b in _PAIRS
)
"""The nine class names in label order: three single objects, then six unordered pairs."""

# Edge (start, end) vertex indices of the padded triangle and parallelogram.
_TRI_START = [0, 1, 2] + [2] * (NUM_EDGES - 3)
_TRI_END = [1, 2, 0] + [0] * (NUM_EDGES - 3)
_PAR_START = [0, 1, 2, 3] + [3] * (NUM_EDGES - 4)
_PAR_END = [1, 2, 3, 0] + [0] * (NUM_EDGES - 4)

# Rejection tries for the second object, drawn in rounds of parallel candidates
# (the first acceptable candidate in try order wins, exactly as in sequential
# rejection sampling); later rounds only concern the few images still pending.
_ROUNDS = (2, 4, 8, 16, 20)
assert sum(_ROUNDS) == MAX_TRIES

_BIG = 1e30


def _vertex_table() -> torch.Tensor:
    """Canonical polygons as a linear map of per-object parameters.

    Returns float32 ``[3 * 4, NUM_EDGES * 4]``: for shape type ``t`` and coefficient
    ``k`` of ``(1, u, s+, s-)``, the contribution to each edge's ``(start x, start y,
    end x, end y)``, centred on the unit square. ``u`` is the triangle's apex position,
    ``s+ = max(s, 0)`` and ``s- = max(-s, 0)`` the parallelogram's shear.
    """
    table = torch.zeros(3, 4, NUM_EDGES, 2, 2, dtype=torch.float64)
    # Triangle (0,0), (1,0), (u,1); per vertex: (constant, u coefficient).
    tri = [((0, 0), (0, 0)), ((1, 0), (0, 0)), ((0, 1), (1, 0))]
    # Parallelogram (s-,0), (1-s+,0), (1-s-,1), (s+,1); per vertex: constant, s+, s-.
    par = [
        ((0, 0), (0, 0), (1, 0)),
        ((1, 0), (-1, 0), (0, 0)),
        ((1, 1), (0, 0), (-1, 0)),
        ((0, 1), (1, 0), (0, 0)),
    ]
    for e in range(NUM_EDGES):
        for side, (ti, pi) in enumerate(
            ((_TRI_START[e], _PAR_START[e]), (_TRI_END[e], _PAR_END[e]))
        ):
            const, du = tri[ti]
            table[0, 0, e, side] = torch.tensor(const, dtype=torch.float64)
            table[0, 1, e, side] = torch.tensor(du, dtype=torch.float64)
            const, dp, dm = par[pi]
            table[1, 0, e, side] = torch.tensor(const, dtype=torch.float64)
            table[1, 2, e, side] = torch.tensor(dp, dtype=torch.float64)
            table[1, 3, e, side] = torch.tensor(dm, dtype=torch.float64)
            k = (e + side) % ELLIPSE_SIDES
            angle = torch.tensor(2.0 * math.pi * k / ELLIPSE_SIDES, dtype=torch.float64)
            table[2, 0, e, side, 0] = 0.5 + 0.5 * torch.cos(angle)
            table[2, 0, e, side, 1] = 0.5 + 0.5 * torch.sin(angle)
    table[:, 0] -= 0.5  # centre on the origin (the constant term carries it)
    return table.reshape(3 * 4, NUM_EDGES * 4).float()


def _pair_label_table(device: torch.device) -> torch.Tensor:
    """int64 ``[3, 3]``: label of the unordered pair of types ``(a, b)``."""
    table = torch.empty(3, 3, dtype=torch.int64)
    for k, (a, b) in enumerate(_PAIRS):
        table[a, b] = table[b, a] = len(SHAPE_TYPES) + k
    return table.to(device)


_TABLES: dict[torch.device, torch.Tensor] = {}
_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        _TABLES[device] = _vertex_table().to(device)
    return _TABLES[device]


def _byte_bits(device: torch.device) -> torch.Tensor:
    """uint8 ``[256, 8]``: bit ``i`` of byte ``b`` (8 pixels of a row, lowest bit first)."""
    if device not in _BYTE_BITS:
        b = torch.arange(256).unsqueeze(1)
        _BYTE_BITS[device] = ((b >> torch.arange(8)) & 1).to(torch.uint8).to(device)
    return _BYTE_BITS[device]


@dataclass
class _Objects:
    """Geometry of ``m`` objects: polygon edges and the per-row column intervals."""

    edges: torch.Tensor  # [m, NUM_EDGES, 2, 2]: (start, end) x (x, y), pixels
    first: torch.Tensor  # [m, SIZE] int64 first covered column per row
    count: torch.Tensor  # [m, SIZE] int64 covered pixels per row (0: none)
    area: torch.Tensor  # [m] int64 covered pixels


def _sample_objects(types: torch.Tensor, gen: torch.Generator) -> _Objects:
    """Draw geometry for objects of the given types (int64 ``[m]`` in 0..2)."""
    m = types.shape[0]
    dev = types.device
    r = torch.rand(m, 7, generator=gen, device=dev)
    # Shape parameters -> canonical centred edges, one matmul over a per-type table.
    shear = (2.0 * r[:, 1] - 1.0) * SHEAR_MAX
    coef = torch.stack(
        [torch.ones_like(shear), r[:, 0], shear.clamp(min=0), (-shear).clamp(min=0)], 1
    )
    onehot = torch.nn.functional.one_hot(types, 3).to(coef.dtype)
    coef = (onehot.unsqueeze(2) * coef.unsqueeze(1)).view(m, 12)
    pts = (coef @ _table(dev)).view(m, 2 * NUM_EDGES, 2)
    # Anisotropic scale then rotation: p' = p @ M^T.
    lo, hi = SCALE_RANGE
    sx, sy = (lo + (hi - lo) * r[:, 2:4]).mul(SIZE).unbind(1)
    theta = (2.0 * math.pi) * r[:, 4]
    cos, sin = torch.cos(theta), torch.sin(theta)
    mt = torch.stack([cos * sx, sin * sx, -sin * sy, cos * sy], 1).view(m, 2, 2)
    pts = torch.bmm(pts, mt)
    # Shrink to fit inside the margin if needed, then place uniformly.
    low, high = pts.amin(1), pts.amax(1)  # [m, 2]
    room = SIZE - 2.0 * MARGIN
    shrink = (room / (high - low)).amin(1, keepdim=True).clamp(max=1.0)  # [m, 1]
    low, high = low * shrink, high * shrink
    offset = (MARGIN - low) + r[:, 5:7] * (room - (high - low))  # [m, 2]
    edges = torch.addcmul(offset.unsqueeze(1), pts, shrink.unsqueeze(2)).view(m, NUM_EDGES, 2, 2)
    first, count = _row_intervals(edges)
    return _Objects(edges=edges, first=first, count=count, area=count.sum(1))


def _row_intervals(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel columns covered by convex polygons on each row's centre line.

    The polygons are oriented so that the interior of edge ``v -> v + e`` is where
    ``e_x (y - v_y) - e_y (x - v_x) >= 0``. On the centre line ``y = c`` of a row this
    is ``x >= v_x + e_x/e_y (c - v_y)`` when ``e_y < 0`` and ``x <= ...`` when ``e_y > 0``.
    Horizontal edges (``|e_y| < 1e-6``) are tilted by 1e-6 towards ``e_y < 0``: their
    bound is then far outside the image on rows inside the polygon and excludes the
    whole row on rows outside it.

    Returns ``(first, count)``, int64 ``[m, SIZE]``: first covered column (pixel column
    ``j`` has centre ``j + 0.5``) and number of covered pixels of each row.
    """
    m = edges.shape[0]
    tiny = 1e-6
    vx, vy = edges[:, :, 0, 0], edges[:, :, 0, 1]  # [m, E]
    ex, ey = edges[:, :, 1, 0] - vx, edges[:, :, 1, 1] - vy
    ey = torch.where(ey.abs() < tiny, torch.full_like(ey, -tiny), ey)
    slope = ex / ey
    offset = vx - slope * vy  # bound(c) = offset + slope * c
    lower = ey < 0
    # Lower bounds as they are, upper bounds negated, so one max gives both.
    big = torch.full_like(offset, -_BIG)
    zero = torch.zeros_like(slope)
    a = torch.cat([torch.where(lower, offset, big), torch.where(lower, big, -offset)], 1)
    b = torch.cat([torch.where(lower, slope, zero), torch.where(lower, zero, -slope)], 1)
    centres = torch.arange(SIZE, device=edges.device, dtype=edges.dtype).add_(0.5)
    bounds = (b.unsqueeze(2) * centres).add_(a.unsqueeze(2))  # [m, 2E, SIZE]
    x_min, neg_x_max = bounds.view(m, 2, NUM_EDGES, SIZE).amax(2).unbind(1)  # [m, SIZE]
    first = torch.ceil(x_min - 0.5).clamp_(0.0, float(SIZE))
    stop = torch.floor(-0.5 - neg_x_max).clamp_(-1.0, float(SIZE - 1)).add_(1.0)
    count = (stop - first).clamp_(min=0.0)
    return first.long(), count.long()


def _overlap(a: _Objects, b_first: torch.Tensor, b_count: torch.Tensor) -> torch.Tensor:
    first = torch.maximum(a.first, b_first)
    stop = torch.minimum(a.first + a.count, b_first + b_count)
    return (stop - first).clamp_(min=0).sum(-1)


def _row_bits(first: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """int64 bit mask of each row's covered columns (bit ``j`` = column ``j``)."""
    return ((1 << count) - 1) << first.clamp(max=SIZE - 1)


def _bits_to_pixels(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[..., SIZE, SIZE]`` pixels from ``[..., SIZE]`` row bit masks."""
    shifts = torch.arange(0, SIZE, 8, device=bits.device)
    by = (bits.unsqueeze(-1) >> shifts) & 255  # [..., SIZE, 4]
    pixels = torch.index_select(_byte_bits(bits.device), 0, by.flatten())
    return pixels.view(torch.bool).view(*bits.shape, SIZE)


@dataclass
class ShapesetSample:
    """Shapeset images with the ground truth used to draw them (for tests and inspection).

    Attributes:
        images: float32 ``[n, 32, 32]`` in [0, 1].
        labels: int64 ``[n]`` in 0..8, indices into ``SHAPESET_CLASSES``.
        num_objects: int64 ``[n]``, 1 or 2 (after any fall-back).
        types: int64 ``[n, 2]`` object types (indices into ``SHAPE_TYPES``); -1 where absent.
        masks: bool ``[n, 2, 32, 32]`` pixels covered by each object (second all False if absent).
        edges: float32 ``[n, 2, 20, 2, 2]``: each object's polygon as 20 edges, (start, end)
            x (x, y) in pixels, x along columns and y along rows, pixel ``(i, j)`` centred at
            ``(j + 0.5, i + 0.5)``; the interior of edge ``v -> w`` is where
            ``(w - v) x (p - v) >= 0``. Triangles and parallelograms repeat a real edge as
            padding. Zeros where absent.
        foreground: float32 ``[n]`` grey level of the objects.
        background: float32 ``[n]`` grey level of the background.
        redrawn: two-object images whose second object failed all 50 tries at least once,
            so that their first object was redrawn (counted once per restart).
        fallbacks: two-object images that failed every restart and were drawn with one
            object instead (labelled as that single shape).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_objects: torch.Tensor
    types: torch.Tensor
    masks: torch.Tensor
    edges: torch.Tensor
    foreground: torch.Tensor
    background: torch.Tensor
    redrawn: int
    fallbacks: int


def _generate(
    n: int,
    gen: torch.Generator,
    device: torch.device,
    detail: bool,
    out: torch.Tensor | None = None,
):
    r = torch.rand(n, 4, generator=gen, device=device)
    two = r[:, 0] < 0.5
    types = torch.randint(0, 3, (n, 2), generator=gen, device=device)
    fg_lo, fg_hi = FG_RANGE
    bg_lo, bg_hi = BG_RANGE
    fg = fg_lo + (fg_hi - fg_lo) * r[:, 1]
    bg = bg_lo + (bg_hi - bg_lo) * r[:, 2]
    swap = r[:, 3] < 0.5
    fg, bg = torch.where(swap, bg, fg), torch.where(swap, fg, bg)

    obj1 = _sample_objects(types[:, 0], gen)
    first2 = torch.zeros(n, SIZE, dtype=torch.int64, device=device)
    count2 = torch.zeros(n, SIZE, dtype=torch.int64, device=device)
    edges2 = torch.zeros(n, NUM_EDGES, 2, 2, device=device) if detail else None

    pending = two.nonzero().squeeze(1)
    redrawn = 0
    for restart in range(MAX_RESTARTS + 1):
        if pending.numel() == 0:
            break
        if restart:  # 50 tries failed: redraw the first object as well and start over
            redrawn += pending.numel()
            new1 = _sample_objects(types[pending, 0], gen)
            for name in ("edges", "first", "count", "area"):
                getattr(obj1, name)[pending] = getattr(new1, name)
        for k in _ROUNDS:
            p = pending.numel()
            if p == 0:
                break
            cand = _sample_objects(types[pending, 1].repeat_interleave(k), gen)
            first1 = obj1.first[pending].repeat_interleave(k, 0)
            count1 = obj1.count[pending].repeat_interleave(k, 0)
            area1 = obj1.area[pending].repeat_interleave(k)
            overlap = _overlap(_Objects(None, first1, count1, area1), cand.first, cand.count)
            ok = (overlap <= MAX_OVERLAP * torch.minimum(area1, cand.area)).view(p, k)
            found = ok.any(1)
            pick = torch.arange(p, device=device) * k + ok.to(torch.uint8).argmax(1)
            accepted, pick = pending[found], pick[found]
            first2[accepted] = cand.first[pick]
            count2[accepted] = cand.count[pick]
            if detail:
                edges2[accepted] = cand.edges[pick]
            pending = pending[~found]
    fallbacks = int(pending.numel())
    if fallbacks:
        two[pending] = False

    labels = torch.where(two, _pair_label_table(device)[types[:, 0], types[:, 1]], types[:, 0])
    bits1 = _row_bits(obj1.first, obj1.count)
    bits2 = _row_bits(first2, count2)
    cover = _bits_to_pixels(bits1 | bits2)  # [n, SIZE, SIZE]
    images = torch.where(cover, fg.view(n, 1, 1), bg.view(n, 1, 1), out=out)
    if not detail:
        return images, labels
    types = types.clone()
    types[~two, 1] = -1
    masks = _bits_to_pixels(torch.stack([bits1, bits2], 1))
    return ShapesetSample(
        images=images,
        labels=labels,
        num_objects=two.long() + 1,
        types=types,
        masks=masks,
        edges=torch.stack([obj1.edges, edges2], 1),
        foreground=fg,
        background=bg,
        redrawn=redrawn,
        fallbacks=fallbacks,
    )


_CHUNK = 4096


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.get_default_device()
    return torch.device(device)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % (2**63))
    return gen


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def shapeset(
    n: int, *, seed: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` Shapeset-3x2 images.

    Args:
        n: number of images.
        seed: random seed; the same seed gives the same images on a given device.
        device: where to generate (default: ``torch.get_default_device()``).

    Returns:
        ``(images, labels)``: float32 ``[n, 32, 32]`` in [0, 1] and int64 ``[n]`` in 0..8
        (class names in ``SHAPESET_CLASSES``).
    """
    _check_n(n)
    dev = _resolve_device(device)
    gen = _generator(seed, dev)
    images = torch.empty(n, SIZE, SIZE, device=dev)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        _, labels[lo:hi] = _generate(hi - lo, gen, dev, detail=False, out=images[lo:hi])
    return images, labels


def shapeset_sample(
    n: int, *, seed: int, device: torch.device | str | None = None
) -> ShapesetSample:
    """Like :func:`shapeset`, and also return the masks, types and polygons drawn.

    Images and labels equal ``shapeset(n, seed=seed, device=device)`` for ``n <= 4096``
    (larger requests are generated in one piece here, in chunks there).
    """
    _check_n(n)
    dev = _resolve_device(device)
    return _generate(n, _generator(seed, dev), dev, detail=True)
