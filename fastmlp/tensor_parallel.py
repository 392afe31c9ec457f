"""An instrumented layer sharded by PyTorch's tensor parallelism (``parallelize_module``).

``ColwiseParallel`` and ``RowwiseParallel`` replace an ``nn.Linear``'s weight and bias by
DTensors on a 1-D device mesh (the tensor-parallel dimension) and convert its input and
output around the call. An instrumented layer (an ``nn.Linear``) then gets DTensors, and
runs its pass on each rank's local shards:

- **column-sharded** (weight ``Shard(0)``: this rank's output features ``n``; input
  replicated): the usual fused pass on ``x W[n]^T + b[n]`` (:func:`fastmlp.op.dense`), its
  output sharded on the last dimension. The rank records the statistics of its own
  features; per-unit counts go to its slice of the layer's units;
- **row-sharded** (weight ``Shard(1)``: this rank's input features ``k``; input sharded on
  its last dimension): the partial products are all-reduced before the bias, the
  activation and any statistic (:func:`fastmlp.op.dense_rowwise`), so the statistics of
  the pre-activation, the activation and their gradient are those of the whole layer,
  recorded by the mesh's first rank only (every rank holds the same values); each rank
  records its own columns of the weight gradient. The output is replicated.

Every rank's statistics thus hold a disjoint share of the layer's, and the usual
cross-rank merge (:meth:`fastmlp.ModelStats.snapshot`, over every rank of the job: the
tensor-parallel and any data-parallel dimension) assembles the layer's statistics
exactly, each value counted once.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastmlp.op import dense_rowwise
from fastmlp.stats.layout import Buffers

__all__ = ["forward", "is_dtensor"]

_PLAIN = (torch.Tensor, nn.Parameter)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (cheap for plain tensors)."""
    if type(t) in _PLAIN:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (torch built without distributed)
        return False
    return isinstance(t, DTensor)


def forward(layer: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:  # noqa: ANN001
    """The layer's pass on DTensor ``weight`` (``[out, in]``) and ``bias``; ``x`` as the
    parallel style's input hook left it. Returns a DTensor, for the style's output hook."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import Partial

    mesh = weight.device_mesh
    placement = weight.placements[0] if len(weight.placements) == 1 else None
    if mesh.ndim != 1 or not isinstance(placement, Shard) or placement.dim not in (0, 1):
        raise NotImplementedError(
            f"{type(layer).__name__}: fastmlp runs tensor-parallel layers whose weight is "
            f"sharded by rows or columns on a 1-D mesh (ColwiseParallel, RowwiseParallel on "
            f"the tensor-parallel mesh dimension); got placements {weight.placements} on a "
            f"{mesh.ndim}-D mesh"
        )
    if bias is not None and not isinstance(bias, DTensor):
        raise TypeError(f"{type(layer).__name__}: the weight is a DTensor but the bias is not")
    if not isinstance(x, DTensor):
        # (called without the parallel style's input hook: the input as it would have made it)
        x = DTensor.from_local(x, mesh, [Replicate() if placement.dim == 0 else Shard(-1)])
    bufs = layer._modules["stats"].buffers_tuple()
    lead = x.shape[:-1]
    coordinate = mesh.get_local_rank()
    if placement.dim == 0:  # column-sharded: this rank's output features
        if x.placements[0] != Replicate():
            x = x.redistribute(mesh, [Replicate()])
        # The input gradient from this rank's features is a partial sum over the ranks.
        xl = x.to_local(grad_placements=[Partial()])
        wl = weight.to_local()
        bl = bias.to_local() if bias is not None else None
        bufs = _unit_slice(bufs, layer.out_features, mesh.size(), coordinate)
        h = layer.local_pass(xl, wl, bl, bufs)
        global_shape = (*lead, layer.out_features)
        return DTensor.from_local(
            h,
            mesh,
            [Shard(h.dim() - 1)],
            run_check=False,
            shape=torch.Size(global_shape),
            stride=_contiguous_strides(global_shape),
        )
    # row-sharded: this rank's input features
    if x.placements[0] not in (Shard(-1), Shard(x.dim() - 1)):
        x = x.redistribute(mesh, [Shard(x.dim() - 1)])
    bl = bias.full_tensor() if bias is not None else None
    op = functools.partial(dense_rowwise, group=mesh.get_group(), record_replicated=coordinate == 0)
    h = layer.local_pass(x.to_local(), weight.to_local(), bl, bufs, op)
    return DTensor.from_local(h, mesh, [Replicate()], run_check=False)


def _unit_slice(bufs: Buffers, units: int, ranks: int, coordinate: int) -> Buffers:
    """``bufs`` with its per-unit counts narrowed to this rank's output features, as
    ``Shard(0)`` splits ``units`` over ``ranks`` (``torch.chunk``'s split)."""
    if bufs.units.shape[1] != units:  # (a layer built without per-unit counts)
        return bufs
    chunk = -(-units // ranks)
    start = min(coordinate * chunk, units)
    return bufs._replace(units=bufs.units[:, start : start + chunk])


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))
