"""A device-side tripwire: the first step, layer and quantity where a non-finite value appeared.

:class:`Tripwire` watches the non-finite counts that every instrumented layer already keeps
on its device. :meth:`Tripwire.update` (after each training step) compares them on the
device, with no host synchronisation, and keeps the first hit; :meth:`Tripwire.read` (at
the trainer's next host read) says what it was, or ``None``.

"First" follows the computation: forward quantities from layer 1 up, then gradient
quantities from the top layer down, so NaN in the input is reported at layer 1's
``preactivation``, and an infinite loss at the top layer's ``preactivation_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastmlp.model_stats import ModelStats
from fastmlp.stats.layout import NONFINITE, QUANTITIES

__all__ = ["NonFinite", "Tripwire"]

_FORWARD = (0, 1)  # preactivation, activation


@dataclass(frozen=True)
class NonFinite:
    """Where the first non-finite value was recorded."""

    step: int
    layer: int
    name: str | None
    quantity: str

    def __str__(self) -> str:
        where = f"layer {self.layer}" + (f" ({self.name})" if self.name else "")
        return f"first non-finite value at step {self.step}, {where} {self.quantity}"


class Tripwire:
    """The first non-finite value of a model's instrumented layers, found on the device.

    Args:
        model: any module with :class:`~fastmlp.InstrumentedLinear` layers.
    """

    def __init__(self, model: nn.Module) -> None:
        self._stats = ModelStats(model)
        pairs = self._stats.layer_stats()
        self._numbers = [i for i, _ in pairs]
        self._names = self._stats.names
        self._accs = [s.acc for _, s in pairs]
        device = self._accs[0].device
        n = len(pairs)
        # Rank of each (layer, quantity) cell in computation order.
        order = torch.empty(n, len(QUANTITIES), dtype=torch.float64)
        for k in range(n):
            for q in range(len(QUANTITIES)):
                order[k, q] = k * 2 + q if q in _FORWARD else 2 * n + (n - 1 - k) * 2 + (q - 2)
        self._order = order.to(device)
        # Counts already there (a resumed run's) are not news.
        self._seen = self._counts()
        # (step, flat cell index); step -1: nothing yet.
        self._first = torch.tensor([-1.0, -1.0], dtype=torch.float64, device=device)

    def update(self, step: int) -> None:
        """Look for non-finite values recorded since the last call (device ops only).

        Call :meth:`rebase` after resetting the statistics.
        """
        counts = self._counts()
        fresh = counts > self._seen
        self._seen = counts
        rank = torch.where(fresh, self._order, torch.inf)
        best = rank.flatten().argmin().to(torch.float64)
        hit = fresh.any() & (self._first[0] < 0)
        self._first = torch.where(
            hit, torch.stack([best.new_tensor(float(step)), best]), self._first
        )

    def _counts(self) -> torch.Tensor:
        return torch.stack([acc[:, NONFINITE] for acc in self._accs])

    def read(self) -> NonFinite | None:
        """The first hit so far (one host read), or ``None``."""
        step, cell = (int(v) for v in self._first.tolist())
        if step < 0:
            return None
        k, q = divmod(cell, len(QUANTITIES))
        return NonFinite(step, self._numbers[k], self._names[k], QUANTITIES[q])

    def rebase(self) -> None:
        """The statistics were reset: count non-finite values from zero again."""
        self._seen.zero_()

    def reset(self) -> None:
        """Forget the hit (the baseline of counts stays)."""
        self._first.fill_(-1.0)
