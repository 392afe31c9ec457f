"""The baselines: the same statistics gathered with module and tensor hooks on a plain network.

:class:`HookStats` is how a careful user would write it with PyTorch's hooks: forward hooks on
``nn.Linear`` (pre-activation) and on the activation module, a tensor hook on
the pre-activation for its gradient and a parameter hook for the weight
gradient; every statistic stays on the device (moments merged with Chan's
formula in float64, min/max, non-finite count, saturation counts, and in the
"all" flavour a fixed-range histogram), with no ``.item()`` in the loop, so on a
GPU nothing waits for the host.

:class:`NaiveHookStats` is the tutorial way: the same hooks, but each call
reads ``mean().item()``, ``var().item()``, ... and ``torch.histc(...).cpu()``,
appending the numbers to Python lists.

Both watch the same four quantities as fastmlp (``preactivation``,
``activation``, ``preactivation_grad``, ``weight_grad``) of every ``nn.Linear``,
the output layer included (its activation is the identity).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookStats", "NaiveHookStats", "linear_activation_pairs"]

QUANTITIES = ("preactivation", "activation", "preactivation_grad", "weight_grad")
_ACTIVATION_MODULES = (nn.Tanh, nn.Sigmoid, nn.Softsign, nn.ReLU)
# Saturation thresholds and fixed output ranges of the bounded activations (as in fastmlp).
_SATURATION = {nn.Tanh: (-0.99, 0.99), nn.Softsign: (-0.99, 0.99), nn.Sigmoid: (0.01, 0.99)}
_RANGE = {nn.Tanh: (-1.0, 1.0), nn.Softsign: (-1.0, 1.0), nn.Sigmoid: (0.0, 1.0)}


def linear_activation_pairs(model: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]]:
    """Each ``nn.Linear`` of ``model`` with the activation module that follows it (or ``None``)."""
    mods = list(model.modules())
    pairs = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            pairs.append((m, nxt if isinstance(nxt, _ACTIVATION_MODULES) else None))
    if not pairs:
        raise ValueError("model has no nn.Linear layers to watch")
    return pairs


class _DeviceAccumulator:
    """Running statistics of one quantity, kept on the device; ``update`` never syncs."""

    def __init__(
        self,
        device: torch.device,
        *,
        saturation: tuple[float, float] | None,
        histogram: bool,
        fixed_range: tuple[float, float] | None,
        bins: int,
    ) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros((), **f64)
        self.mean = torch.zeros((), **f64)
        self.m2 = torch.zeros((), **f64)
        self.min = torch.full((), float("inf"), **f64)
        self.max = torch.full((), float("-inf"), **f64)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.saturation = saturation
        self.sat = torch.zeros(2, dtype=torch.int64, device=device)
        self.histogram = histogram
        self.bins = bins
        self.hist = torch.zeros(bins + 2, dtype=torch.int64, device=device)  # under, bins, over
        self.range: tuple[torch.Tensor, torch.Tensor] | None = None
        if fixed_range is not None:
            self.range = (torch.tensor(fixed_range[0], **f64), torch.tensor(fixed_range[1], **f64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1)
        if x.dtype != torch.float32:
            x = x.float()
        fin = torch.isfinite(x)
        n = fin.sum()
        self.nonfinite += x.numel() - n
        # Batch moments around the batch mean in float32, merged in float64 (Chan et al.).
        xz = torch.where(fin, x, 0.0)
        nb = n.to(torch.float64)
        mb = xz.sum() / n.clamp(min=1)
        d = torch.where(fin, x - mb, 0.0)
        m2b = torch.dot(d, d).to(torch.float64)
        mb = mb.to(torch.float64)
        total = self.count + nb
        delta = mb - self.mean
        w = nb / total.clamp(min=1)
        self.mean += delta * w
        self.m2 += m2b + delta * delta * self.count * w
        self.count.copy_(total)
        torch.minimum(self.min, torch.where(fin, x, float("inf")).amin().double(), out=self.min)
        torch.maximum(self.max, torch.where(fin, x, float("-inf")).amax().double(), out=self.max)
        if self.saturation is not None:
            lo, hi = self.saturation
            self.sat[0] += (x <= lo).sum()
            self.sat[1] += (x >= hi).sum()
        if self.histogram:
            self._histogram(xz, fin, n)

    def _histogram(self, xz: torch.Tensor, fin: torch.Tensor, n: torch.Tensor) -> None:
        if self.range is None:  # calibrate on the first batch, on the device: +-2^ceil(log2 max|x|)
            m = xz.abs().amax().double().clamp(min=1e-30)
            r = torch.exp2(torch.ceil(torch.log2(m)))
            self.range = (-r, r)
        lo, hi = self.range
        scale = (self.bins / (hi - lo)).float()
        idx = ((xz - lo.float()) * scale).floor_().add_(1).clamp_(0, self.bins + 1).long()
        idx = torch.where(xz == hi.float(), self.bins, idx)  # the last bin is closed
        idx = torch.where(fin, idx, 0)  # non-finite values are taken out of slot 0 below
        if xz.is_cuda:  # bincount would read its size on the host
            self.hist.index_add_(0, idx, torch.ones_like(idx))
        else:
            self.hist += torch.bincount(idx, minlength=self.bins + 2)
        self.hist[0] -= xz.numel() - n


class HookStats:
    """Statistics of every ``nn.Linear`` (+ activation) of ``model`` gathered with hooks, on device.

    Args:
        model: a network of ``nn.Linear`` layers each followed by an activation module
            (the last may have none).
        histograms: also record fixed-range histograms (``bins`` bins + under/overflow).
        bins: histogram bins.
    """

    def __init__(self, model: nn.Module, *, histograms: bool = False, bins: int = 64) -> None:
        device = next(model.parameters()).device
        self.handles: list[RemovableHandle] = []
        self.acc: dict[tuple[int, str], _DeviceAccumulator] = {}
        for i, (linear, act) in enumerate(linear_activation_pairs(model), start=1):
            kind = type(act) if act is not None else None
            for q in QUANTITIES:
                is_act = q == "activation"
                self.acc[i, q] = _DeviceAccumulator(
                    device,
                    saturation=_SATURATION.get(kind) if is_act else None,
                    histogram=histograms,
                    fixed_range=_RANGE.get(kind) if is_act else None,
                    bins=bins,
                )
            self._watch(i, linear, act)

    def _watch(self, i: int, linear: nn.Linear, act: nn.Module | None) -> None:
        pre, grad = self.acc[i, "preactivation"], self.acc[i, "preactivation_grad"]
        activation = self.acc[i, "activation"]

        def on_linear(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            pre.update(out)
            if act is None:  # identity activation: h = z
                activation.update(out)
            if out.requires_grad:
                out.register_hook(grad.update)

        self.handles.append(linear.register_forward_hook(on_linear))
        if act is not None:
            self.handles.append(act.register_forward_hook(lambda m, i, out: activation.update(out)))
        self.handles.append(linear.weight.register_hook(self.acc[i, "weight_grad"].update))

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


class NaiveHookStats:
    """The tutorial way: the same hooks, reading every statistic on the host with ``.item()``."""

    def __init__(self, model: nn.Module, *, bins: int = 64) -> None:
        self.bins = bins
        self.log: dict[tuple[int, str], list[dict]] = defaultdict(list)
        self.handles: list[RemovableHandle] = []
        for i, (linear, act) in enumerate(linear_activation_pairs(model), start=1):
            self._watch(i, linear, act)

    def record(self, i: int, q: str, x: torch.Tensor, saturating: bool = False) -> None:
        x = x.detach().float()
        row = {
            "mean": x.mean().item(),
            "var": x.var().item(),
            "min": x.min().item(),
            "max": x.max().item(),
            "nonfinite": (~torch.isfinite(x)).sum().item(),
            "hist": torch.histc(x, bins=self.bins).cpu(),
        }
        if saturating:
            row["saturated"] = (x.abs() >= 0.99).float().mean().item()
        self.log[i, q].append(row)

    def _watch(self, i: int, linear: nn.Linear, act: nn.Module | None) -> None:
        def on_linear(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            self.record(i, "preactivation", out)
            if act is None:
                self.record(i, "activation", out)
            if out.requires_grad:
                out.register_hook(lambda g: self.record(i, "preactivation_grad", g))

        def on_act(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            self.record(i, "activation", out, saturating=isinstance(module, tuple(_SATURATION)))

        self.handles.append(linear.register_forward_hook(on_linear))
        if act is not None:
            self.handles.append(act.register_forward_hook(on_act))
        self.handles.append(linear.weight.register_hook(lambda g: self.record(i, "weight_grad", g)))

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
