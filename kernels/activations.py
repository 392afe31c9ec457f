"""The activations inside the kernels: their ids, ``f(z)`` and ``dL/dz`` in float32.

The ids are compile-time constants (``ACT``) of the kernels; :data:`ACT_IDS` maps the names
of :mod:`fastmlp.activations` to them.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACT_IDS", "FROM_INPUT", "activation_backward", "apply_activation"]

#: Activation name -> constexpr id used by the kernels.
ACT_IDS = {
    "identity": 0,
    "sigmoid": 1,
    "tanh": 2,
    "softsign": 3,
    "relu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
    "silu": 7,
}
#: Ids of the activations whose derivative needs the pre-activation ``z``: the forward
#: kernel stores ``z`` beside ``h`` for them and the backward reads ``z`` instead of ``h``.
FROM_INPUT = (5, 6, 7)
# GELU's constants are written out inside the jitted functions: Triton 3.6 (the GPU
# image's) refuses plain float globals there, and the 3.8 interpreter mishandles constexpr
# ones: 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
# sqrt(2/pi) = 0.7978845608028654, and the tanh approximation's 0.044715.


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """``h = f(z)`` in float32 for the activation id ``ACT`` (see :data:`ACT_IDS`)."""
    if ACT == 1:  # sigmoid
        h = 1.0 / (1.0 + tl.exp(-z))
    elif ACT == 2:  # tanh
        h = _tanh(z)
    elif ACT == 3:  # softsign; +-inf gives NaN, exactly like z / (1 + |z|) in PyTorch
        h = z / (1.0 + tl.abs(z))
    elif ACT == 4:  # relu (propagates NaN like torch.relu)
        h = tl.where(z > 0.0, z, tl.where(z != z, z, 0.0))
    elif ACT == 5:  # gelu, exact: z * Phi(z)
        h = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 6:  # gelu, tanh approximation (PyTorch's approximate="tanh")
        h = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 7:  # silu: z * sigmoid(z)
        h = z / (1.0 + tl.exp(-z))
    else:
        h = z
    return h


@triton.jit
def _tanh(z):
    """tanh in float32, odd; a Taylor polynomial near 0 avoids the 1 - t cancellation."""
    a = tl.abs(z)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    a2 = a * a
    small = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    r = tl.where(a < 0.0625, small, big)
    h = tl.where(z < 0.0, -r, r)
    return tl.where(z != z, z, h)  # keep NaN


@triton.jit
def activation_backward(dh, h, ACT: tl.constexpr):
    """``dL/dz`` from ``dL/dh`` and the saved tensor (float32), as ``Activation.backward``.

    The saved tensor is the output ``h``, or the pre-activation ``z`` for the ids in
    :data:`FROM_INPUT` (GELU, SiLU: their derivative is not a function of ``h``).
    ``dh * f'``, except relu: ``where(h <= 0, 0, dh)`` (PyTorch's threshold_backward, so
    an infinite ``dh`` on an inactive unit gives 0, and a NaN ``h`` passes ``dh``).
    """
    if ACT == 1:
        dz = dh * (h * (1.0 - h))
    elif ACT == 2:
        dz = dh * (1.0 - h * h)
    elif ACT == 3:
        t = 1.0 - tl.abs(h)
        dz = dh * (t * t)
    elif ACT == 4:
        dz = tl.where(h <= 0.0, 0.0, dh)
    elif ACT == 5:  # h is z here: Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        dz = dh * (cdf + h * (0.3989422804014327 * tl.exp(-0.5 * h * h)))
    elif ACT == 6:  # h is z here
        z2 = h * h
        t = _tanh(0.7978845608028654 * (h + 0.044715 * z2 * h))
        inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z2)
        dz = dh * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * inner)
    elif ACT == 7:  # h is z here: s * (1 + z * (1 - s))
        sg = 1.0 / (1.0 + tl.exp(-h))
        dz = dh * (sg * (1.0 + h * (1.0 - sg)))
    else:
        dz = dh
    return dz
