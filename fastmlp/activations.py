"""Activation functions with their derivative written in terms of the output.

Each activation knows its output range and saturation thresholds, so the
statistics code can histogram it on a fixed range and count saturated units
(Glorot & Bengio, 2010, section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``h = f(z)`` whose derivative is a function of ``h``.

    Attributes:
        name: registry name.
        forward: ``f(z)``.
        grad_from_output: ``f'(z)`` expressed through ``h = f(z)``, so backward
            only needs the stored output.
        backward: ``dL/dz`` from ``dL/dh`` and ``h``, i.e. ``dh * grad_from_output(h)``,
            using PyTorch's fused backward op where one exists.
        output_range: ``(low, high)`` bounds of ``h``, or ``None`` if unbounded.
        saturation: default ``(low, high)`` thresholds: ``h <= low`` counts as
            saturated low, ``h >= high`` as saturated high; ``None`` if the
            activation does not saturate.
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    grad_from_output: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    output_range: tuple[float, float] | None
    saturation: tuple[float, float] | None

    @property
    def bounded(self) -> bool:
        """Whether the output lies in a fixed finite range."""
        return self.output_range is not None

    def __reduce__(self) -> tuple:
        # Pickled by name (the functions are lambdas): models pickle and ``torch.save``.
        return (get_activation, (self.name,))


def _softsign(z: torch.Tensor) -> torch.Tensor:
    return z / (1 + z.abs())


def _softsign_grad(h: torch.Tensor) -> torch.Tensor:
    return (1 - h.abs()).square()


def _softsign_backward(dh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h.abs().neg_().add_(1).square_().mul_(dh)


def _relu_backward(dh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(dh, h, 0)


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(
        "sigmoid",
        torch.sigmoid,
        lambda h: h * (1 - h),
        torch.ops.aten.sigmoid_backward,
        (0.0, 1.0),
        (0.01, 0.99),
    ),
    "tanh": Activation(
        "tanh",
        torch.tanh,
        lambda h: 1 - h * h,
        torch.ops.aten.tanh_backward,
        (-1.0, 1.0),
        (-0.99, 0.99),
    ),
    "softsign": Activation(
        "softsign", _softsign, _softsign_grad, _softsign_backward, (-1.0, 1.0), (-0.99, 0.99)
    ),
    "relu": Activation(
        "relu", torch.relu, lambda h: (h > 0).to(h.dtype), _relu_backward, None, None
    ),
    "identity": Activation("identity", lambda z: z, torch.ones_like, lambda dh, h: dh, None, None),
}


def get_activation(name: str | Activation) -> Activation:
    """Return the activation called ``name`` (or ``name`` itself if already one).

    An :class:`Activation` not yet in :data:`ACTIVATIONS` is added to it (the op refers to
    activations by name); another activation under a taken name is an error.
    """
    if isinstance(name, Activation):
        known = ACTIVATIONS.setdefault(name.name, name)
        if known is not name and known != name:
            raise ValueError(f"an activation named {name.name!r} is already registered")
        return known
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
