"""Coordinate checks across widths (Tensor Programs V) and the paper's variance predictions.

:func:`coord_check` trains a model built at several widths for a few SGD steps on one fixed
data stream and records, per instrumented layer and step, the coordinate sizes that say
whether a parametrization is right: a figure that stays flat in width is ``stable``.
Figures (``quantity``, ``figure``), all from the layers' own statistics of the training
pass at that step (activation ``l1`` and ``rms``, back-propagated gradient ``rms``) except
two that need the weights or elementwise differences:

- ``activation l1``, ``activation rms``: mean ``|h|`` and root mean square of the layer's
  output on the step's training batch;
- ``preactivation_grad rms``: root mean square of ``dC/ds`` (the back-propagated gradient)
  on that batch;
- ``preactivation dz_l1``: mean ``|z_t - z_0|`` of the layer's pre-activation on a fixed
  probe batch, against its value at initialization (a mean of elementwise differences,
  which running statistics cannot hold: the probe pass keeps each instrumented layer's
  input, through the layer's ``forward`` patched for that pass, and the differences are
  taken in float64);
- ``preactivation dwx_l1``: mean ``|(W_t - W_0) x_t|`` on the probe batch, the part of that
  change the layer's own weight update makes (``x_t`` the layer's input now). The rest,
  ``W_0 (x_t - x_0)`` and the bias' change, is the change of the layers below seen through
  this one: at widths of a few hundred it can dominate ``dz_l1`` of the output layer under
  the standard parametrization (whose own-update part grows about linearly in width);
- ``weight update``: ``||W_t - W_0|| / ||W_0||`` (Frobenius norms).

``dz_l1``, ``dwx_l1`` and ``update`` are 0 at step 0 and have rows from step 1 on.

Per layer, step and figure, the slope of ``log(figure)`` against ``log(width)`` (least
squares) gives the verdict: ``stable`` when ``|slope| <= 0.25`` (:data:`STABLE_SLOPE`),
else ``growing`` or ``shrinking``.

:func:`mlp_builder` builds the paper's MLP in three parametrizations for SGD:

- ``standard``: PyTorch's default initialization (``nn.Linear``'s: weights and biases
  ``U[+-1/sqrt(fan_in)]``) and one learning rate;
- ``normalized``: the paper's normalized initialization (eq. 16), zero biases, one rate;
- ``mup``: the Maximal Update Parametrization for SGD, Table 3 of Tensor Programs V (Yang
  et al. 2022, "muP formulation in the style of [Tensor Programs IV]"), with widths
  relative to a base width ``n0`` (so that at ``n0`` it is the standard parametrization's
  scale): input weights and all hidden biases init variance ``1/fan_in``, SGD learning rate
  ``lr * fan_out / n0``; hidden weights variance ``1/fan_in``, rate ``lr``; output weights
  variance ``n0 / fan_in**2``, rate ``lr * n0 / fan_in``; the output bias rate ``lr``.
  Table 3 is the form with the output multiplier absorbed into the output weights: Table 8's
  multiplier ``n0 / fan_in`` on weights of variance ``1/fan_in`` trained at rate
  ``lr * fan_in / n0`` is the same function and the same SGD trajectory. Weights are
  uniform with these variances (the paper's family), biases start at zero.

:func:`predict_variances` is the paper's eq. 5-6 in the linear regime (``f(s) ~ f'(0) s``)
beside the measured variances at initialization: per layer, the activation variance the
input's second moment times the products of ``n_in Var[W]`` predicts (plus each layer's
bias second moment where biases are not zero), and the back-propagated gradient variance
that the output layer's measured one times the products of ``n_out Var[W]`` predicts.
``Var[W]`` is each weight matrix's realized mean square (the chosen initialization as
drawn); the paper's standard initialization gives a factor 1/3 a layer, the normalized
one 1 for equal widths.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastmlp.activations import get_activation
from fastmlp.mlp import MLP
from fastmlp.model_stats import ModelStats, instrumented_layers
from fastmlp.probe import probe

__all__ = [
    "FIGURES",
    "PARAMETRIZATIONS",
    "STABLE_SLOPE",
    "CoordCheck",
    "coord_check",
    "coord_check_mlp",
    "format_predictions",
    "linear_at_zero",
    "mlp_builder",
    "plot_predictions",
    "predict_variances",
    "slope",
    "verdict",
]

PARAMETRIZATIONS = ("standard", "normalized", "mup")
#: ``|slope|`` of log figure against log width up to which a figure is ``stable``.
STABLE_SLOPE = 0.25
#: ``(quantity, figure)`` pairs recorded per layer and step, in row order.
FIGURES = (
    ("activation", "l1"),
    ("activation", "rms"),
    ("preactivation_grad", "rms"),
    ("preactivation", "dz_l1"),
    ("preactivation", "dwx_l1"),
    ("weight", "update"),
)
DATA = ("shapeset", "random")
SHAPESET_FEATURES, SHAPESET_CLASSES = 32 * 32, 9

#: ``build(width) -> (model, optimizer)``: what :func:`coord_check` trains at each width.
Build = Callable[[int], tuple[nn.Module, torch.optim.Optimizer]]


# ----------------------------------------------------------------------------- fits


def slope(widths: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(values)`` against ``log(widths)``; ``None`` when a value
    is not a positive finite number or fewer than two widths."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64)
    if v.size < 2 or not np.all(np.isfinite(v)) or not np.all(v > 0):
        return None
    x, y = np.log(w), np.log(v)
    x = x - x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def verdict(s: float | None, stable: float = STABLE_SLOPE) -> str:
    """``stable`` (``|s| <= stable``), ``growing``, ``shrinking``, or ``undefined``
    (``s`` is ``None``)."""
    if s is None:
        return "undefined"
    if abs(s) <= stable:
        return "stable"
    return "growing" if s > 0 else "shrinking"


# ----------------------------------------------------------------------------- builders


@torch.no_grad()
def _uniform_(t: torch.Tensor, var: float, generator: torch.Generator) -> None:
    bound = math.sqrt(3.0 * var)
    t.uniform_(-bound, bound, generator=generator)


def mlp_builder(
    parametrization: str,
    *,
    depth: int = 3,
    activation: str = "tanh",
    lr: float = 0.1,
    in_features: int = SHAPESET_FEATURES,
    classes: int = SHAPESET_CLASSES,
    base_width: int = 64,
    seed: int = 0,
    backend: str = "auto",
) -> Callable[[int], tuple[MLP, torch.optim.Optimizer]]:
    """``build(width) -> (MLP, SGD)`` for :func:`coord_check`: the paper's MLP with ``depth``
    hidden layers of ``width`` units in ``parametrization`` (module docstring), SGD at
    ``lr`` (muP: ``lr`` at the base width ``base_width``, scaled per layer)."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"unknown parametrization {parametrization!r}; expected one of {list(PARAMETRIZATIONS)}"
        )
    get_activation(activation)  # an unknown name fails here, before any width is built
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width must be a positive int, got {base_width!r}")

    def build(width: int) -> tuple[MLP, torch.optim.Optimizer]:
        init = {"standard": "pytorch", "normalized": "normalized", "mup": "normalized"}
        model = MLP(
            in_features,
            classes,
            depth,
            width,
            activation,
            init[parametrization],
            backend=backend,
            seed=seed,
        )
        if parametrization != "mup":
            return model, torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        groups = []
        layers = list(model.layers)
        n0 = base_width
        for i, layer in enumerate(layers):
            fan_out, fan_in = layer.weight.shape
            with torch.no_grad():
                layer.bias.zero_()
            if i == len(layers) - 1:  # output: variance n0/fan_in^2, rate lr n0/fan_in
                _uniform_(layer.weight, n0 / fan_in**2, g)
                groups += [
                    {"params": [layer.weight], "lr": lr * n0 / fan_in},
                    {"params": [layer.bias], "lr": lr},
                ]
            elif i == 0:  # input: variance 1/fan_in, rate lr fan_out/n0 (biases too)
                _uniform_(layer.weight, 1.0 / fan_in, g)
                groups.append({"params": [layer.weight, layer.bias], "lr": lr * fan_out / n0})
            else:  # hidden: variance 1/fan_in, rate lr; biases lr fan_out/n0
                _uniform_(layer.weight, 1.0 / fan_in, g)
                groups += [
                    {"params": [layer.weight], "lr": lr},
                    {"params": [layer.bias], "lr": lr * fan_out / n0},
                ]
        return model, torch.optim.SGD(groups, lr=lr)

    return build


# ----------------------------------------------------------------------------- data


def _data(
    kind: str,
    steps: int,
    batch: int,
    probe_batch: int | None,
    seed: int,
    in_features: int,
    classes: int,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """``steps + 1`` training batches and the probe batch, the same for every width: the
    first training batch (``probe_batch=None``) or ``probe_batch`` held-out examples."""
    n = (steps + 1) * batch + (probe_batch or 0)
    if kind == "shapeset":
        from fastmlp.data.shapes import shapeset

        x, y = shapeset(n, seed=seed, device="cpu")
        x = x.flatten(1)
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, in_features, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
    else:
        raise ValueError(f"unknown data {kind!r}; expected one of {list(DATA)}")
    batches = [
        (x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(steps + 1)
    ]
    if probe_batch is None:
        return batches, batches[0]
    return batches, (x[-probe_batch:], y[-probe_batch:])


# ----------------------------------------------------------------------------- the check


@dataclass
class CoordCheck:
    """The rows of one or more coordinate checks (:func:`coord_check`).

    Each row: ``parametrization``, ``step``, ``layer`` (module path), ``layer_index``
    (1-based), ``output`` (the last instrumented layer), ``quantity``, ``figure``,
    ``widths``, ``values`` (one per width, averaged over seeds), ``slope``, ``verdict``.
    ``predictions``: per parametrization, :func:`predict_variances`' rows at init (largest
    width), where computed.
    """

    rows: list[dict] = field(default_factory=list)
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0

    def __add__(self, other: CoordCheck) -> CoordCheck:
        return CoordCheck(
            self.rows + other.rows,
            {**self.predictions, **other.predictions},
            self.seconds + other.seconds,
        )

    @property
    def parametrizations(self) -> list[str]:
        """The parametrizations present, in row order."""
        return list(dict.fromkeys(r["parametrization"] for r in self.rows))

    def select(self, **match: Any) -> list[dict]:
        """The rows whose fields equal ``match`` (e.g. ``figure="dz_l1", step=2``)."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    @classmethod
    def read(cls, path: str | Path) -> CoordCheck:
        """A check written by :meth:`write` (``path``: the JSON file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "coordcheck.json"
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise ValueError(f"{path}: not a coordcheck.json (no 'rows' list)")
        return cls(doc["rows"], doc.get("predictions", {}))

    def to_json(self) -> dict:
        """``{"rows": [...], "predictions": {...}}`` (the ``coordcheck.json`` schema)."""
        return {"rows": self.rows, "predictions": self.predictions}

    def write(self, out: str | Path) -> Path:
        """Write ``out/coordcheck.json`` and return its path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "coordcheck.json"
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def summary(self, max_lines: int = 8) -> str:
        """One screen: per parametrization, which layers' figures grow or shrink with width,
        from which step and by what slope."""
        lines = []
        for p in self.parametrizations:
            rows = self.select(parametrization=p)
            bad = [r for r in rows if r["verdict"] in ("growing", "shrinking")]
            n_steps = max(r["step"] for r in rows)
            if not bad:
                lines.append(f"{p}: every figure stable in width at every step 0..{n_steps}")
                continue
            lines.append(f"{p}: {len(bad)} of {len(rows)} (layer, step, figure) not stable")
            # per (layer, figure): the first step it moves, and its largest |slope|
            first: dict[tuple, dict] = {}
            for r in bad:
                key = (r["layer_index"], r["quantity"], r["figure"])
                cur = first.setdefault(key, {"row": r, "worst": r})
                if abs(r["slope"]) > abs(cur["worst"]["slope"]):
                    cur["worst"] = r
            items = sorted(first.values(), key=lambda c: -abs(c["worst"]["slope"]))
            for c in items[:max_lines]:
                r, w = c["row"], c["worst"]
                tag = " (output)" if r["output"] else ""
                lines.append(
                    f"  layer {r['layer_index']}{tag} {r['quantity']} {r['figure']}: "
                    f"{w['verdict']} from step {r['step']}, slope up to {w['slope']:+.2f} "
                    f"(step {w['step']})"
                )
            if len(items) > max_lines:
                lines.append(f"  ... and {len(items) - max_lines} more")
        return "\n".join(lines)

    def plot(self, out: str | Path) -> list[Path]:
        """One figure a parametrization, ``out/coordcheck_<parametrization>.png``, in the
        layout of the muP paper: a column a step, a row a figure, width on a log x axis,
        a line a layer. Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for p in self.parametrizations:
            rows = self.select(parametrization=p)
            steps = sorted({r["step"] for r in rows})
            figs = [f for f in FIGURES if any((r["quantity"], r["figure"]) == f for r in rows)]
            fig, axes = plt.subplots(
                len(figs),
                len(steps),
                figsize=(2.6 * len(steps), 2.2 * len(figs)),
                squeeze=False,
                sharex=True,
            )
            for i, (q, f) in enumerate(figs):
                for j, t in enumerate(steps):
                    ax = axes[i][j]
                    sel = [
                        r for r in rows if r["step"] == t and (r["quantity"], r["figure"]) == (q, f)
                    ]
                    for r in sel:
                        v = np.asarray(r["values"], dtype=np.float64)
                        if np.all(v > 0):
                            label = f"{r['layer_index']}" + (" (out)" if r["output"] else "")
                            ax.plot(r["widths"], v, marker="o", ms=3, label=label)
                    if not sel:  # a figure measured since init: none at step 0
                        ax.set_axis_off()
                    ax.set_xscale("log", base=2)
                    if sel and all(np.all(np.asarray(r["values"]) > 0) for r in sel):
                        ax.set_yscale("log")
                    if i == 0:
                        ax.set_title(f"step {t}", fontsize=9)
                    if j == 0:
                        ax.set_ylabel(f"{q}\n{f}", fontsize=8)
                    if i == len(figs) - 1:
                        ax.set_xlabel("width", fontsize=8)
                    ax.tick_params(labelsize=7)
            handles, labels = axes[0][-1].get_legend_handles_labels()
            if handles:
                fig.legend(handles, labels, title="layer", loc="upper right", fontsize=7)
            fig.suptitle(f"coordinate check: {p}", fontsize=10)
            fig.tight_layout(rect=(0, 0, 0.93, 0.97))
            path = out / f"coordcheck_{p}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
        return paths


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    out = list(values)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in out):
        raise ValueError(f"{what} must be positive ints, got {values!r}")
    return out


@torch.no_grad()
def _probe_preactivations(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each instrumented layer's pre-activation on ``x`` and its input ``[M, in]`` (float64),
    from the inputs the layers receive in a forward pass (their ``forward`` patched for this
    pass only)."""
    layers = instrumented_layers(model)
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    for i, layer in enumerate(layers):
        own = layer.forward

        def keep(t: torch.Tensor, *a: Any, _own=own, _i=i, **k: Any) -> torch.Tensor:
            inputs[_i] = t.detach()
            return _own(t, *a, **k)

        layer.forward = keep
    try:
        model(x)
    finally:
        for layer in layers:
            del layer.forward
    zs, xs = [], []
    for layer, t in zip(layers, inputs, strict=True):
        if t is None:
            raise ValueError("an instrumented layer did not run in the probe's forward pass")
        t = t.reshape(-1, t.shape[-1]).double()
        b = None if layer.bias is None else layer.bias.detach().double()
        zs.append(F.linear(t, _weight(layer, t.shape[-1]), b))
        xs.append(t)
    return zs, xs


def _weight(layer: nn.Module, n_in: int) -> torch.Tensor:
    """The layer's weight as float64 ``[out, in]`` (HF Conv1D stores ``[in, out]``)."""
    w = layer.weight.detach().double()
    return w.T if w.shape[1] != n_in else w


def _one_width(
    build: Build,
    width: int,
    batches: list,
    probe_x: torch.Tensor,
    loss_fn: Callable,
) -> tuple[list[str], dict]:
    """Train ``len(batches) - 1`` steps at ``width``: per (layer, quantity, figure, step),
    the figure."""
    built = build(width)
    if not (
        isinstance(built, tuple)
        and len(built) == 2
        and isinstance(built[0], nn.Module)
        and isinstance(built[1], torch.optim.Optimizer)
    ):
        raise TypeError(
            f"build({width}) must return (model, optimizer), got {type(built).__name__}"
        )
    model, opt = built
    model.train()
    stats = ModelStats(model)
    stats.configure(histograms=False)  # moments and l1 are all a coordinate check reads
    layers = instrumented_layers(model)
    if not layers:
        raise ValueError("build(width) made a model without instrumented layers")
    names = [n or str(i + 1) for i, n in enumerate(stats.names)]
    z0, x0 = _probe_preactivations(model, probe_x)
    w0 = [_weight(layer, t.shape[-1]).clone() for layer, t in zip(layers, x0, strict=True)]
    figures: dict = {}
    for step, (x, y) in enumerate(batches):
        stats.reset()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        snap = stats.snapshot()
        for k, (index, _) in enumerate(stats.layer_stats()):
            q = snap[index]
            figures[(k, "activation", "l1", step)] = q["activation"].l1
            figures[(k, "activation", "rms", step)] = q["activation"].rms
            figures[(k, "preactivation_grad", "rms", step)] = q["preactivation_grad"].rms
        if step:
            zt, xt = _probe_preactivations(model, probe_x)
            for k, layer in enumerate(layers):
                w = _weight(layer, xt[k].shape[-1])
                dz = (zt[k] - z0[k]).abs().mean()
                figures[(k, "preactivation", "dz_l1", step)] = float(dz)
                dwx = F.linear(xt[k], w - w0[k]).abs().mean()
                figures[(k, "preactivation", "dwx_l1", step)] = float(dwx)
                figures[(k, "weight", "update", step)] = float(
                    torch.linalg.norm(w - w0[k]) / torch.linalg.norm(w0[k])
                )
        if step < len(batches) - 1:
            opt.step()
    stats.reset()
    return names, figures


def coord_check(
    build: Build,
    widths: Sequence[int],
    steps: int = 4,
    *,
    data: str = "shapeset",
    batch: int = 64,
    probe_batch: int | None = None,
    seeds: int = 1,
    seed: int = 0,
    in_features: int = SHAPESET_FEATURES,
    classes: int = SHAPESET_CLASSES,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    label: str = "custom",
) -> CoordCheck:
    """A coordinate check: for each width, ``build(width) -> (model, optimizer)``, train
    ``steps`` optimizer steps on one fixed data stream (``data``: ``shapeset``, 32x32 images
    and 9 classes, or ``random`` normal inputs of ``in_features`` and random labels of
    ``classes``), and record each instrumented layer's figures (:data:`FIGURES`) at steps
    ``0..steps`` (step ``t``: after ``t`` updates), averaged over ``seeds`` data streams.
    ``dz_l1`` is taken on the first training batch (the change of a batch's features
    that its own update caused: what muP keeps of order one), or with ``probe_batch`` on
    that many held-out examples.
    Rows are labelled with ``label`` as their ``parametrization``.
    """
    widths = sorted(_positive_ints(widths, "widths"))
    if len(set(widths)) < 2:
        raise ValueError(f"a coordinate check needs at least two different widths, got {widths}")
    for name, v in (("steps", steps), ("batch", batch), ("probe_batch", probe_batch or 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
            kind = "non-negative" if name == "steps" else "positive"
            raise ValueError(f"{name} must be a {kind} int, got {v!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; expected one of {list(DATA)}")
    start = time.perf_counter()
    acc: dict = {}
    names: list[str] = []
    for s in range(seeds):
        batches, (px, _) = _data(data, steps, batch, probe_batch, seed + s, in_features, classes)
        for w in widths:
            names, figs = _one_width(build, w, batches, px, loss_fn)
            for key, v in figs.items():
                acc.setdefault(key, {}).setdefault(w, []).append(np.nan if v is None else v)
    rows = []
    n_layers = len(names)
    for step in range(steps + 1):
        for k in range(n_layers):
            for q, f in FIGURES:
                if (k, q, f, step) not in acc:
                    continue
                per = acc[(k, q, f, step)]
                values = [float(np.mean(per[w])) for w in widths]
                s_ = slope(widths, values)
                rows.append(
                    {
                        "parametrization": label,
                        "step": step,
                        "layer": names[k],
                        "layer_index": k + 1,
                        "output": k == n_layers - 1,
                        "quantity": q,
                        "figure": f,
                        "widths": widths,
                        "values": values,
                        "slope": s_,
                        "verdict": verdict(s_),
                    }
                )
    return CoordCheck(rows, {}, time.perf_counter() - start)


# ----------------------------------------------------------------------------- eq. 5-6


@torch.no_grad()
def _gain_at_zero(activation: Any) -> float:
    """``f'(0)`` of the activation (central difference in float64)."""
    act = get_activation(activation) if isinstance(activation, str) else activation
    e = torch.tensor([-1e-6, 1e-6], dtype=torch.float64)
    v = act.forward(e)
    return float((v[1] - v[0]) / 2e-6)


@torch.no_grad()
def linear_at_zero(activation: Any) -> bool:
    """Whether eq. 5-6's linear regime describes ``activation``: ``f(0) = 0``, ``f'(0) = 1``
    and ``f`` odd, so that a layer's output has the variance of ``f'(0) z`` for small ``z``
    (tanh, softsign, identity; not sigmoid, whose mean is 1/2, nor relu, which halves it)."""
    act = get_activation(activation) if isinstance(activation, str) else activation
    z = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    f, g = act.forward(z), act.forward(-z)
    return (
        abs(float(f[0])) < 1e-12
        and abs(_gain_at_zero(act) - 1.0) < 1e-4
        and bool(torch.allclose(g, -f, rtol=1e-9, atol=1e-12))
    )


def predict_variances(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> list[dict]:
    """The paper's eq. 5-6 in the linear regime beside the variances measured on ``(x, y)``.

    ``model``: instrumented layers applied one after the other (an :class:`~fastmlp.MLP`).
    Forward (eq. 5): the second moment of the layer's input, starting from ``x``'s, times
    ``n_in Var[W]`` (plus the bias' mean square), times ``f'(0)**2`` for the activation.
    Backward (eq. 6): from the output layer's measured back-propagated gradient variance,
    times ``n_out Var[W]`` of the layer above and ``f'(0)**2``. ``Var[W]`` is the realized
    mean square of each weight matrix. Measured: the layers' own statistics of one
    forward and backward pass (:func:`fastmlp.probe`; the model's accumulators are left
    alone). One dict per layer: ``layer``, ``name``, ``n_in``, ``n_out``, ``forward_factor``
    (``n_in Var[W]``), ``backward_factor`` (``n_out Var[W]``), ``activation_var`` and
    ``grad_var`` each ``predicted`` / ``measured`` / ``ratio`` (predicted over measured).
    """
    layers = instrumented_layers(model)
    if not layers:
        raise ValueError("model has no instrumented layers")
    if x.dim() > 2:
        x = x.flatten(1)
    snap = probe(model, x, y, loss_fn)
    names = ModelStats(model).names
    index = sorted(snap.layers)
    ms = float((x.double() ** 2).mean())
    rows = []
    for k, layer in enumerate(layers):
        w = layer.weight.detach().double()
        n_out, n_in = w.shape
        var_w = float((w**2).mean())
        b2 = 0.0 if layer.bias is None else float((layer.bias.detach().double() ** 2).mean())
        gain = _gain_at_zero(layer.activation)
        pre = n_in * var_w * ms + b2
        act = gain**2 * pre
        ms = act
        qs = snap[index[k]]
        rows.append(
            {
                "layer": index[k],
                "name": names[k],
                "n_in": n_in,
                "n_out": n_out,
                "forward_factor": n_in * var_w,
                "backward_factor": n_out * var_w,
                "activation_var": {"predicted": act, "measured": qs["activation"].var},
                "grad_var": {"predicted": None, "measured": qs["preactivation_grad"].var},
            }
        )
    # backward: anchored at the output layer's measured dC/ds variance
    g = rows[-1]["grad_var"]["measured"]
    rows[-1]["grad_var"]["predicted"] = g
    for k in range(len(rows) - 2, -1, -1):
        gain = _gain_at_zero(layers[k].activation)
        g = gain**2 * rows[k + 1]["backward_factor"] * g
        rows[k]["grad_var"]["predicted"] = g
    for r in rows:
        for key in ("activation_var", "grad_var"):
            p, m = r[key]["predicted"], r[key]["measured"]
            r[key]["ratio"] = p / m if p is not None and m else None
    return rows


def format_predictions(rows: list[dict], title: str = "") -> str:
    """The eq. 5-6 table of :func:`predict_variances` as text."""
    head = (
        f"{'layer':>5} {'n_in Var[W]':>11} {'act var pred':>12} {'measured':>10} {'ratio':>6}"
        f" {'grad var pred':>13} {'measured':>10} {'ratio':>6}"
    )
    lines = [title] if title else []
    lines.append(head)
    for r in rows:
        a, g = r["activation_var"], r["grad_var"]
        lines.append(
            f"{r['layer']:>5} {r['forward_factor']:>11.3f} {a['predicted']:>12.3e} "
            f"{a['measured']:>10.3e} {_fmt_ratio(a['ratio'])} {g['predicted']:>13.3e} "
            f"{g['measured']:>10.3e} {_fmt_ratio(g['ratio'])}"
        )
    return "\n".join(lines)


def _fmt_ratio(r: float | None) -> str:
    return f"{r:>6.3f}" if r is not None else f"{'-':>6}"


def plot_predictions(predictions: dict[str, list[dict]], path: str | Path) -> Path:
    """Predicted (dashed) and measured (solid) activation and back-propagated gradient
    variances per layer, one line pair per label of ``predictions``; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (label, rows), color in zip(predictions.items(), plt.cm.tab10.colors, strict=False):
        layers = [r["layer"] for r in rows]
        for ax, key in zip(axes, ("activation_var", "grad_var"), strict=True):
            ax.plot(
                layers,
                [r[key]["measured"] for r in rows],
                "-o",
                color=color,
                ms=3,
                label=f"{label} measured",
            )
            ax.plot(
                layers,
                [r[key]["predicted"] for r in rows],
                "--",
                color=color,
                label=f"{label} eq. 5-6",
            )
    for ax, t in zip(
        axes,
        ("activation variance (eq. 5)", "back-propagated gradient variance (eq. 6)"),
        strict=True,
    ):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(t, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def coord_check_mlp(
    parametrizations: Sequence[str] = PARAMETRIZATIONS,
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    *,
    depth: int = 3,
    activation: str = "tanh",
    steps: int = 4,
    lr: float = 0.1,
    batch: int = 64,
    data: str = "shapeset",
    seeds: int = 1,
    seed: int = 0,
    base_width: int = 64,
    predictions: bool = True,
) -> CoordCheck:
    """:func:`coord_check` of the paper's MLP in each of ``parametrizations``
    (:func:`mlp_builder`), with, when ``predictions``, each one's eq. 5-6 table at
    initialization for the largest width on the probe batch."""
    result = CoordCheck()
    for p in parametrizations:
        build = mlp_builder(
            p, depth=depth, activation=activation, lr=lr, base_width=base_width, seed=seed
        )
        result = result + coord_check(
            build, widths, steps, data=data, batch=batch, seeds=seeds, seed=seed, label=p
        )
        if predictions:
            model, _ = build(max(widths))
            _, (px, py) = _data(data, 0, batch, batch, seed, SHAPESET_FEATURES, SHAPESET_CLASSES)
            result.predictions[p] = predict_variances(model, px, py)
    return result
