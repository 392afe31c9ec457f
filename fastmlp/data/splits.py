"""Train/valid/test splits on a device, with deterministic, resumable training batches."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fastmlp.data.shapes import SIZE, shapeset

__all__ = ["ArrayStream", "ShapesetStream", "Splits", "derive_seed"]

Batch = tuple[torch.Tensor, torch.Tensor]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across runs and platforms."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, str):
            h.update(b"s" + p.encode() + b"\0")
        else:
            h.update(b"i" + struct.pack("<q", int(p) % (2**63)))
    return int.from_bytes(h.digest(), "little") >> 1


def _check_rank(batch_size: int, rank: int, world_size: int, start_step: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")


class ShapesetStream:
    """Infinite online Shapeset-3x2 training stream, generated on ``device``.

    Images are generated in blocks of ``ceil(BLOCK_IMAGES / batch_size)`` steps: block
    ``j`` of rank ``r`` comes from ``shapeset(..., seed=derive_seed("shapeset-train",
    seed, r, world_size, batch_size, j))``, so any step can be regenerated on its own
    (exact resume) and ranks draw from independent seeds.
    """

    BLOCK_IMAGES = 2048

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        _check_rank(batch_size, rank, world_size, start_step)
        return self._iterate(batch_size, seed, start_step, rank, world_size)

    def _iterate(
        self, batch_size: int, seed: int, start_step: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        steps = max(1, -(-self.BLOCK_IMAGES // batch_size))
        block, offset = divmod(start_step, steps)
        while True:
            x, y = shapeset(
                steps * batch_size,
                seed=derive_seed("shapeset-train", seed, rank, world_size, batch_size, block),
                device=self.device,
            )
            x = x.view(steps, batch_size, SIZE * SIZE)
            y = y.view(steps, batch_size)
            for k in range(offset, steps):
                yield x[k], y[k]
            block, offset = block + 1, 0


class ArrayStream:
    """Infinite training batches over a finite in-memory training set.

    The stream of rank ``r`` is the concatenation of epochs. Epoch ``e`` is a random
    permutation drawn from ``derive_seed("epoch", seed, e)`` (on the CPU, so the order
    is the same on every device), cut like ``torch.utils.data.DistributedSampler``
    with ``drop_last=True``: the first ``world_size * (N // world_size)`` indices,
    rank ``r`` taking every ``world_size``-th from position ``r``. Ranks are therefore
    disjoint within an epoch; the few examples dropped change from epoch to epoch.
    Batch ``k`` holds positions ``k * batch_size ... (k + 1) * batch_size - 1`` of the
    stream and may straddle two epochs.

    Args:
        x: ``[N, F]`` training inputs (uint8 in 0..255, scaled to [0, 1] per batch, or
            float already in [0, 1]).
        y: int64 ``[N]`` labels.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y disagree on the number of examples: {x.shape[0]} vs {y.shape[0]}"
            )
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def _epoch(self, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
        n = len(self)
        gen = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
        perm = torch.randperm(n, generator=gen)
        per_rank = n // world_size
        return perm[rank : per_rank * world_size : world_size].to(self.x.device)

    def _take(self, idx: torch.Tensor) -> Batch:
        x = self.x[idx]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return x, self.y[idx]

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        _check_rank(batch_size, rank, world_size, start_step)
        per_rank = len(self) // world_size
        if per_rank == 0:
            raise ValueError(
                f"training set of {len(self)} examples is too small for world_size={world_size}"
            )
        return self._iterate(batch_size, seed, start_step, rank, world_size, per_rank)

    def _iterate(
        self, batch_size: int, seed: int, start_step: int, rank: int, world_size: int, per_rank: int
    ) -> Iterator[Batch]:
        epoch, pos = divmod(start_step * batch_size, per_rank)
        order = self._epoch(seed, epoch, rank, world_size)
        while True:
            parts, need = [], batch_size
            while need:
                if pos == per_rank:
                    epoch, pos = epoch + 1, 0
                    order = self._epoch(seed, epoch, rank, world_size)
                take = min(need, per_rank - pos)
                parts.append(order[pos : pos + take])
                pos, need = pos + take, need - take
            yield self._take(parts[0] if len(parts) == 1 else torch.cat(parts))


@dataclass(eq=False)
class Splits:
    """A dataset ready for training: validation and test tensors plus a training stream.

    Attributes:
        name: dataset name (one of ``fastmlp.data.DATASETS``).
        in_features: flattened input size.
        num_classes: number of classes.
        class_names: class names in label order.
        valid: ``(x, y)``: float32 ``[n, in_features]`` in [0, 1] and int64 ``[n]``, on the device.
        test: the same for the test set.
        train_size: number of training examples, or ``None`` for an infinite online stream.
    """

    name: str
    in_features: int
    num_classes: int
    class_names: list[str]
    valid: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_size: int | None = None
    _train: ShapesetStream | ArrayStream | None = field(default=None, repr=False)

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Infinite iterator of training batches ``(x [b, in_features], y [b])`` on the device.

        Deterministic: the ``k``-th batch is the same whether iteration started at step 0
        or was resumed with ``start_step=k``, and depends only on ``(seed, rank,
        world_size, batch_size)``. Different ranks see different data (disjoint within
        an epoch for finite datasets; independently seeded for Shapeset). ``batch_size``
        is per rank.
        """
        if self._train is None:
            raise RuntimeError(f"dataset {self.name!r} was built without a training set")
        return self._train.batches(
            batch_size, seed=seed, start_step=start_step, rank=rank, world_size=world_size
        )
