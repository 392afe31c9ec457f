"""Singular values of each hidden layer's Jacobian (Glorot & Bengio 2010, eq. 17).

For hidden layer ``i`` with ``s^i = z^i W^i + b^i`` and ``z^{i+1} = f(s^i)``, the
Jacobian of the layer's output with respect to its input is, per example,
``J^i = dz^{i+1}/dz^i = diag(f'(s^i)) W^i`` (shape ``[out, in]`` in PyTorch's
weight layout). The paper reports the average singular value: about 0.8 with
normalized init and about 0.5 with standard init (tanh, width 1000).

Every example needs its own ``svdvals`` of an ``[out, in]`` matrix (cubic in the
width), so the function takes a limited number of examples (``max_examples``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmlp.model_stats import instrumented_layers

__all__ = ["jacobian_singular_values"]

_CHUNK = 16  # examples per batched svdvals call (bounds memory: 16 x out x in floats)


@torch.no_grad()
def jacobian_singular_values(
    model: nn.Module, x: torch.Tensor, *, max_examples: int | None = 10
) -> list[dict]:
    """Summary of the singular values of every hidden layer's Jacobian on examples ``x``.

    Args:
        model: a :class:`~fastmlp.MLP` (or any model whose instrumented layers are
            applied one after the other).
        x: inputs ``[n, in_features]`` (images are flattened).
        max_examples: use only the first ``max_examples`` examples (``None``: all).

    Returns:
        One dict per hidden layer (the output layer is skipped): ``layer``
        (1-based), ``examples``, ``nonfinite`` (examples left out because their
        Jacobian holds NaN or +-Inf, as a diverged network's does, or its singular
        values are not finite), and ``mean``, ``std`` (population), ``min``,
        ``max``, ``median`` of the singular values pooled over the other examples
        (``None`` when none is left). Statistics accumulators are not touched.
    """
    layers = instrumented_layers(model)
    if x.dim() > 2:
        x = x.flatten(1)
    if max_examples is not None:
        if max_examples <= 0:
            raise ValueError(f"max_examples must be positive or None, got {max_examples}")
        x = x[:max_examples]
    if x.shape[0] == 0:
        raise ValueError("need at least one example")
    rows = []
    z = x
    for layer in layers:
        if layer.activation.name == "identity" and layer is layers[-1]:
            break  # the output layer: logits, no nonlinearity
        w = layer.weight
        s = z.to(w.dtype) @ w.T
        if layer.bias is not None:
            s = s + layer.bias
        h = layer.activation.forward(s)
        dh = layer.activation.derivative(s, h)  # f'(s), [n, out]
        sv, nonfinite = _singular_values(dh.float(), w.float())
        row = {"layer": layer.layer_index, "examples": int(x.shape[0]), "nonfinite": nonfinite}
        if sv.numel():
            row |= {
                "mean": float(sv.mean()),
                "std": float(sv.std(correction=0)),
                "min": float(sv.min()),
                "max": float(sv.max()),
                "median": float(sv.median()),
            }
        else:
            row |= dict.fromkeys(("mean", "std", "min", "max", "median"))
        rows.append(row)
        z = h
    return rows


def _singular_values(dh: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Singular values (float64, pooled) of ``diag(dh[k]) W`` for every example ``k`` whose
    matrix and singular values are finite, and the number of examples left out."""
    w_finite = bool(torch.isfinite(w).all())
    parts, left_out = [], 0
    for d in dh.split(_CHUNK):
        ok = torch.isfinite(d).all(1) if w_finite else torch.zeros(d.shape[0], dtype=torch.bool)
        m = d[ok].unsqueeze(-1) * w.unsqueeze(0)  # diag(f'(s)) W: [chunk, out, in]
        ok_m = torch.isfinite(m).flatten(1).all(1)  # products can overflow
        m = m[ok_m]
        left_out += d.shape[0] - m.shape[0]
        if not m.shape[0]:
            continue
        try:
            sv = torch.linalg.svdvals(m)
        except torch.linalg.LinAlgError:  # no convergence in float32: one by one in float64
            sv = torch.stack([_svdvals_or_nan(mk.double()) for mk in m])
        good = torch.isfinite(sv).all(1)
        left_out += int((~good).sum())
        parts.append(sv[good].reshape(-1).double())
    sv = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return sv, left_out


def _svdvals_or_nan(m: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.svdvals(m).float()
    except torch.linalg.LinAlgError:
        return torch.full((min(m.shape),), float("nan"), device=m.device)
