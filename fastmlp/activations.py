"""Activation functions with their derivative written in terms of the output or the input.

Each activation knows its output range and saturation thresholds, so the
statistics code can histogram it on a fixed range and count saturated units
(Glorot & Bengio, 2010, section 3).

The paper's activations (sigmoid, tanh, softsign) and relu have a derivative that is a
function of their output ``h``, so the backward pass needs only ``h``. GELU and SiLU do not
(``f'`` is not a function of ``f``: GELU is not even monotone), so their backward takes the
pre-activation ``z``: ``Activation.from_input`` says which one the layer keeps for backward.
GELU and SiLU are unbounded and do not saturate (no saturation thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``h = f(z)``.

    Attributes:
        name: registry name.
        forward: ``f(z)``.
        grad_from_output: ``f'(z)`` expressed through ``h = f(z)``, so backward
            only needs the stored output; ``None`` for activations whose derivative is
            not a function of the output (then ``grad_from_input`` is given).
        backward: ``dL/dz`` from ``dL/dh`` and the saved tensor (``h``, or ``z`` when
            :attr:`from_input`), i.e. ``dh * f'``, using PyTorch's fused backward op where
            one exists.
        output_range: ``(low, high)`` bounds of ``h``, or ``None`` if unbounded.
        saturation: default ``(low, high)`` thresholds: ``h <= low`` counts as
            saturated low, ``h >= high`` as saturated high; ``None`` if the
            activation does not saturate.
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    grad_from_output: Callable[[torch.Tensor], torch.Tensor] | None
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    output_range: tuple[float, float] | None
    saturation: tuple[float, float] | None
    grad_from_input: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def from_input(self) -> bool:
        """Whether the backward needs the pre-activation ``z`` (not the output ``h``)."""
        return self.grad_from_output is None

    def derivative(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``f'(z)``, from ``z`` or from ``h = f(z)``, whichever this activation uses."""
        if self.from_input:
            return self.grad_from_input(z)
        return self.grad_from_output(h)

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


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    # Phi(z) + z * phi(z)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
        2 * math.pi
    )


def _gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    k = math.sqrt(2 / math.pi)
    u = k * (z + 0.044715 * z**3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


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
    # Derivatives from the input: the layer keeps z for the backward.
    "gelu": Activation(
        "gelu",
        torch.nn.functional.gelu,
        None,
        lambda dh, z: torch.ops.aten.gelu_backward(dh, z, approximate="none"),
        None,
        None,
        _gelu_grad,
    ),
    "gelu_tanh": Activation(
        "gelu_tanh",
        lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
        None,
        lambda dh, z: torch.ops.aten.gelu_backward(dh, z, approximate="tanh"),
        None,
        None,
        _gelu_tanh_grad,
    ),
    "silu": Activation(
        "silu", torch.nn.functional.silu, None, torch.ops.aten.silu_backward, None, None, _silu_grad
    ),
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
