"""Weight initializations of Glorot & Bengio (2010) and PyTorch's default.

- ``standard`` (paper eq. 1): ``W ~ U[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.
- ``normalized`` (paper eq. 16): ``W ~ U[-sqrt(6/(fan_in+fan_out)), +...]``, the
  same distribution as ``torch.nn.init.xavier_uniform_`` with gain 1.
- ``pytorch``: ``nn.Linear``'s default (kaiming-uniform weights with
  ``a=sqrt(5)``, which is ``U[+-1/sqrt(fan_in)]``, and uniform biases).

Biases start at zero (as in the paper) unless ``zero_bias=False``, in which
case they are drawn as ``nn.Linear`` draws them, ``U[+-1/sqrt(fan_in)]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["INITS", "init_bound", "initialize_"]

INITS = ("standard", "normalized", "pytorch")


def init_bound(scheme: str, fan_in: int, fan_out: int) -> float:
    """Half-width of the uniform weight distribution of ``scheme``."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; expected one of {list(INITS)}")
    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"fan_in and fan_out must be positive, got {fan_in} and {fan_out}")
    if scheme == "normalized":
        return math.sqrt(6.0 / (fan_in + fan_out))
    return 1.0 / math.sqrt(fan_in)


@torch.no_grad()
def initialize_(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str = "normalized",
    *,
    zero_bias: bool | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Fill ``weight`` (shape ``[fan_out, fan_in]``) and ``bias`` in place.

    Args:
        scheme: one of ``standard``, ``normalized``, ``pytorch``.
        zero_bias: start biases at zero; defaults to ``True`` for the paper's
            schemes and ``False`` for ``pytorch``.
        generator: a ``torch.Generator`` for reproducible draws (on the
            weight's device).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [fan_out, fan_in], got shape {tuple(weight.shape)}")
    fan_out, fan_in = weight.shape
    bound = init_bound(scheme, fan_in, fan_out)
    weight.uniform_(-bound, bound, generator=generator)
    if bias is None:
        return
    if zero_bias is None:
        zero_bias = scheme != "pytorch"
    if zero_bias:
        bias.zero_()
    else:
        b = 1.0 / math.sqrt(fan_in)
        bias.uniform_(-b, b, generator=generator)
