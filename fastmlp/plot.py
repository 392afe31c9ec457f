"""Figures of Glorot & Bengio (2010) drawn from run directories (matplotlib, Agg backend).

Per run, under ``RUN/figures/``:

- ``fig02_activation_mean_std.png``: mean (line) and standard deviation (bars) of
  each hidden layer's activations over training (paper Fig 2);
- ``fig03_activation_p98_std.png``: 98th percentile (markers) and standard
  deviation (lines) of the activations over training (Fig 3; Fig 10 is this
  figure for a tanh run with normalized init);
- ``fig04_06_activation_hist.png``: normalized activation histograms per layer,
  at the first and the last probe (Fig 4, Fig 6);
- ``fig07_backprop_grad_hist.png``: back-propagated gradient ``dC/ds``
  histograms per layer, first and last probe (Fig 7);
- ``fig08_weight_grad_hist.png``: weight-gradient histograms per layer at the
  first probe, just after initialization (Fig 8);
- ``fig09_weight_grad_std.png``: standard deviation of the weight gradients per
  layer over training (Fig 9);
- ``fig11_test_error.png``: test error over training (Fig 11);
- ``jacobian_singular_values.png``: mean +- std of each layer's Jacobian
  singular values over training.

``fastmlp plot RUN --out DIR`` writes every figure into ``DIR`` instead (several runs:
``DIR/<run name>/``), and nothing into the run directories, which may then be read-only.
With several runs, ``fig11_test_error_all.png`` overlays all of them (in ``DIR``, default:
the first run's ``figures/``).
"""

from __future__ import annotations

import errno
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastmlp.run import CONFIG, JACOBIAN, METRICS, STATS, read_log
from fastmlp.stats.snapshot import QuantityStats

__all__ = ["FIGURES", "plot_run", "plot_runs", "plot_test_error", "run_label"]

FIGURES = (
    "fig02_activation_mean_std.png",
    "fig03_activation_p98_std.png",
    "fig04_06_activation_hist.png",
    "fig07_backprop_grad_hist.png",
    "fig08_weight_grad_hist.png",
    "fig09_weight_grad_std.png",
    "fig11_test_error.png",
    "jacobian_singular_values.png",
)

_QS_FIELDS = set(QuantityStats.__dataclass_fields__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def run_label(run: Path) -> str:
    """``tanh N d5`` style label from the run's config (``N``: normalized init)."""
    import json

    cfg_path = Path(run) / CONFIG
    if not cfg_path.exists():
        return Path(run).name
    cfg = json.loads(cfg_path.read_text())
    label = cfg.get("extra", {}).get("label")
    if label:
        return str(label)
    act = cfg.get("activation", "?")
    init = cfg.get("init", "")
    suffix = " N" if init == "normalized" else "" if init == "standard" else f" ({init})"
    return f"{act}{suffix} d{cfg.get('depth', '?')}"


def _quantity(row: dict) -> QuantityStats:
    return QuantityStats(**{k: v for k, v in row.items() if k in _QS_FIELDS})


class _Stats:
    """``stats.jsonl`` of one run, indexed by source, quantity, layer and step."""

    def __init__(self, run: Path) -> None:
        self.rows: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
        for r in read_log(run / STATS):
            self.rows[(r["source"], r["quantity"], r["layer"])][r["step"]] = r
        self.layers = sorted({k[2] for k in self.rows})
        self.hidden = self.layers[:-1]  # the last layer is the linear output layer

    def series(self, quantity: str, layer: int, source: str = "probe") -> list[dict]:
        d = self.rows.get((source, quantity, layer), {})
        return [d[s] for s in sorted(d) if d[s]["count"]]

    def steps(self, quantity: str, source: str = "probe") -> list[int]:
        out = set()
        for (src, q, _), d in self.rows.items():
            if src == source and q == quantity:
                out.update(d)
        return sorted(out)


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _no_data(ax, what: str) -> None:  # noqa: ANN001
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def _over_training(stats: _Stats, title: str, path: Path, kind: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colors = _colors(len(stats.hidden))
    any_data = False
    for c, layer in zip(colors, stats.hidden, strict=True):
        rows = stats.series("activation", layer)
        if not rows:
            continue
        any_data = True
        steps = np.array([r["step"] for r in rows])
        std = np.array([r["std"] for r in rows])
        if kind == "mean_std":
            mean = np.array([r["mean"] for r in rows])
            ax.errorbar(
                steps, mean, yerr=std, color=c, capsize=3, marker="o", ms=3, label=f"layer {layer}"
            )
            ax.set_ylabel("activation mean (bars: std)")
        else:
            p98 = [_quantity(r).percentile(98) for r in rows]
            p98 = np.array([np.nan if v is None else v for v in p98])
            ax.plot(
                steps, p98, linestyle="none", marker="+", ms=8, color=c, label=f"layer {layer} p98"
            )
            ax.plot(steps, std, color=c, label=f"layer {layer} std")
            ax.set_ylabel("98th percentile (+), std (line)")
    if not any_data:
        _no_data(ax, "activation statistics")
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("step (probe set)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _hist_density(row: dict) -> tuple[np.ndarray, np.ndarray] | None:
    if row.get("hist_counts") is None:
        return None
    edges = np.asarray(row["hist_edges"], dtype=float)
    counts = np.asarray(row["hist_counts"], dtype=float)
    total = counts.sum() + (row.get("underflow") or 0) + (row.get("overflow") or 0)
    if total <= 0:
        return None
    density = counts / (total * np.diff(edges))
    return edges, density


def _histograms(
    stats: _Stats, quantity: str, which: list[str], title: str, path: Path, xlabel: str
) -> Path:
    """One panel per entry of ``which`` (``first`` / ``last`` probe): a line per layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(which), figsize=(5.5 * len(which), 4.2), squeeze=False)
    colors = _colors(len(stats.hidden))
    steps = stats.steps(quantity)
    for ax, w in zip(axes[0], which, strict=True):
        step = None if not steps else steps[0] if w == "first" else steps[-1]
        drawn = False
        for c, layer in zip(colors, stats.hidden, strict=True):
            row = stats.rows.get(("probe", quantity, layer), {}).get(step)
            h = _hist_density(row) if row else None
            if h is None:
                continue
            edges, density = h
            ax.stairs(density, edges, color=c, label=f"layer {layer}")
            drawn = True
        if drawn:
            ax.legend(fontsize=7)
            if quantity != "activation":
                ax.set_yscale("log")
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        else:
            _no_data(ax, f"{quantity} histograms")
        ax.set_title(f"{w} probe (step {step})" if step is not None else w)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _weight_grad_std(stats: _Stats, title: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(len(stats.layers))
    any_data = False
    for c, layer in zip(colors, stats.layers, strict=True):
        rows = stats.series("weight_grad", layer)
        if not rows:
            continue
        any_data = True
        ax.plot(
            [r["step"] for r in rows],
            [r["std"] for r in rows],
            marker="o",
            ms=3,
            color=c,
            label=f"layer {layer}" + (" (output)" if layer == stats.layers[-1] else ""),
        )
    if any_data:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "weight-gradient statistics")
    ax.set_xlabel("step (probe set)")
    ax.set_ylabel("std of dC/dW")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _jacobian(run: Path, title: str, path: Path) -> Path:
    plt = _plt()
    rows = read_log(run / JACOBIAN)
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_layer[r["layer"]].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = sorted(by_layer)
    if not layers:
        _no_data(ax, "Jacobian singular values")
    steps = sorted({r["step"] for r in rows})
    width = 0.8 / max(len(steps), 1)
    colors = _colors(len(steps))
    for k, (c, step) in enumerate(zip(colors, steps, strict=True)):
        sel = [next((r for r in by_layer[layer] if r["step"] == step), None) for layer in layers]
        sel = [r if r and r["mean"] is not None else None for r in sel]  # None: non-finite
        xs = [i + (k - (len(steps) - 1) / 2) * width for i, r in enumerate(sel) if r]
        ax.bar(
            xs,
            [r["mean"] for r in sel if r],
            width=width,
            yerr=[r["std"] for r in sel if r],
            color=c,
            capsize=2,
            label=f"step {step}",
        )
    if layers:
        ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.legend(fontsize=7)
    ax.set_ylabel("singular values of dz^{i+1}/dz^i (mean, bars: std)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def plot_test_error(runs: list[Path], path: Path, split: str = "test") -> Path:
    """Error (%) of ``split`` over training, one line per run (paper Fig 11/12)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data = False
    for run in runs:
        rows = [r for r in read_log(Path(run) / METRICS) if r["split"] == split]
        if not rows:
            continue
        any_data = True
        ax.plot(
            [r["step"] for r in rows],
            [r["error"] for r in rows],
            marker="o",
            ms=3,
            label=run_label(Path(run)),
        )
    if any_data:
        ax.legend(fontsize=8)
    else:
        _no_data(ax, f"{split} metrics")
    ax.set_xlabel("SGD step")
    ax.set_ylabel(f"{split} error (%)")
    ax.set_title(f"{split} error during training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Draw every per-run figure into ``out`` (default: ``RUN/figures/``); returns the PNG
    paths. Nothing but ``out`` is written."""
    run = Path(run)
    if not (run / STATS).exists() and not (run / METRICS).exists():
        raise FileNotFoundError(f"{run} is not a run directory (no {STATS} or {METRICS})")
    stats = _Stats(run)
    fig_dir = Path(out) if out is not None else run / "figures"
    _check_dir(fig_dir)
    label = run_label(run)
    return [
        _over_training(
            stats, f"Fig 2: activations over training, {label}", fig_dir / FIGURES[0], "mean_std"
        ),
        _over_training(
            stats,
            f"Fig 3/10: 98th percentile and std of activations, {label}",
            fig_dir / FIGURES[1],
            "p98_std",
        ),
        _histograms(
            stats,
            "activation",
            ["first", "last"],
            f"Fig 4/6: activation histograms, {label}",
            fig_dir / FIGURES[2],
            "activation value",
        ),
        _histograms(
            stats,
            "preactivation_grad",
            ["first", "last"],
            f"Fig 7: back-propagated gradients dC/ds, {label}",
            fig_dir / FIGURES[3],
            "dC/ds",
        ),
        _histograms(
            stats,
            "weight_grad",
            ["first"],
            f"Fig 8: weight gradients after initialization, {label}",
            fig_dir / FIGURES[4],
            "dC/dW",
        ),
        _weight_grad_std(
            stats, f"Fig 9: weight-gradient std over training, {label}", fig_dir / FIGURES[5]
        ),
        plot_test_error([run], fig_dir / FIGURES[6]),
        _jacobian(run, f"Jacobian singular values, {label}", fig_dir / FIGURES[7]),
    ]


def _check_dir(path: Path) -> None:
    """Refuse a figure folder that is a file before drawing anything."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "cannot write figures there (a file, not a directory)", str(p)
                )
            return


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> list[Path]:
    """Per-run figures for every run, plus the overlaid test-error curves of several runs
    (``fig11_test_error_all.png``).

    ``out`` (default: none): the folder that receives every figure: one run's go straight
    into it, several runs' into ``out/<run name>/`` (``<run name>-2``... when names repeat),
    the overlay into ``out``; the run directories are only read. Without it each run's go
    into ``RUN/figures/`` and the overlay into the first run's.
    """
    if not runs:
        raise ValueError("no run directories given")
    paths = [Path(r) for r in runs]
    written: list[Path] = []
    names: set[str] = set()
    for run in paths:
        if out is None:
            target = None
        elif len(paths) == 1:
            target = Path(out)
        else:
            name, k = run.resolve().name or "run", 1
            while name in names:
                k += 1
                name = f"{run.resolve().name}-{k}"
            names.add(name)
            target = Path(out) / name
        written += plot_run(run, target)
    if len(paths) > 1:
        out_dir = Path(out) if out is not None else paths[0] / "figures"
        written.append(plot_test_error(paths, out_dir / "fig11_test_error_all.png"))
    return written
