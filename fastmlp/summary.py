"""The end of a training run, for the person who started it: figures, diagnosis, a per-layer table.

:func:`finish_run` is what ``fastmlp train`` does after its last step: it reads
the run directory (so it works the same for a resumed run), writes
``diagnosis.json`` (the findings of :mod:`fastmlp.diagnosis` on the last probe,
and on the first one), draws the paper's figures into ``figures/``
(:func:`fastmlp.plot.plot_run`) and returns the text to print: a compact
per-layer table of the last probe, the diagnosis and where everything is.

With ``twin`` (:func:`twin_at_init`: the same network with the other paper
initialization, probed once at initialization, no training) it also shows the
contrast the paper is about (Fig 7): the back-propagated gradient std of each
layer at initialization under this run's init and under the other one. With
``prediction`` (:func:`prediction_at_init`) it shows the paper's eq. 5-6 for the run's own
network at initialization: the activation and back-propagated gradient variances the
linear regime predicts per layer, beside the measured ones.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmlp.run import METRICS, load_run_snapshot, read_jsonl
from fastmlp.stats.diagnosis import (
    Finding,
    diagnose,
    findings_json,
    format_findings,
    worst,
)
from fastmlp.stats.snapshot import Snapshot

if TYPE_CHECKING:
    import torch

    from fastmlp.mlp import MLP

__all__ = [
    "DIAGNOSIS",
    "compact_finding",
    "finish_run",
    "init_contrast",
    "layer_table",
    "prediction_at_init",
    "read_diagnosis",
    "twin_at_init",
]

# The two initializations of the paper, each with the other to compare against.
_OTHER_INIT = {"normalized": "standard", "standard": "normalized"}

DIAGNOSIS = "diagnosis.json"


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def layer_table(snapshot: Snapshot) -> str:
    """One line per layer: activation mean/std/saturation %, back-propagated gradient std
    (``preactivation_grad``) and weight-gradient std."""
    header = ("layer", "name", "act mean", "act std", "sat %", "dC/ds std", "dC/dW std")
    lines = [header]
    for i in sorted(snapshot.layers):
        q = snapshot.layers[i]
        a, g, w = q.get("activation"), q.get("preactivation_grad"), q.get("weight_grad")
        sat = None if a is None or a.saturated is None else 100 * a.saturated
        lines.append(
            (
                f"{i}",
                (a.name if a is not None else None) or "-",
                _fmt(a.mean if a else None, ".3f"),
                _fmt(a.std if a else None, ".3f"),
                _fmt(sat, ".1f"),
                _fmt(g.std if g else None, ".2e"),
                _fmt(w.std if w else None, ".2e"),
            )
        )
    widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
    out = []
    for row in lines:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [
            c.rjust(wd) for c, wd in zip(row[2:], widths[2:], strict=True)
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


def compact_finding(snapshot: Snapshot | None) -> str:
    """The worst finding at warning level or above as ``code@layer`` (``""`` when none),
    for a progress bar."""
    if snapshot is None:
        return ""
    f = worst(diagnose(snapshot))
    if f is None or f.rank < 1:
        return ""
    return f"{f.code}@{f.layer}"


def _final_error(run_dir: Path) -> str:
    rows = [r for r in read_jsonl(run_dir / METRICS) if r.get("split") == "test"]
    if not rows:
        return ""
    first, last = rows[0], rows[-1]
    return (
        f"test error {first['error']:.1f}% at step {first['step']} -> "
        f"{last['error']:.1f}% at step {last['step']}"
    )


def _fresh(model: MLP, init: str, seed: int | None) -> MLP:
    """``model``'s architecture freshly initialized with ``init`` (seeded by ``seed``)."""
    from fastmlp.mlp import MLP

    first, last = model.layers[0], model.layers[-1]
    return MLP(
        first.in_features,
        last.out_features,
        width=list(model.widths),
        activation=model.activation,
        init=init,
        seed=seed,
        device=first.weight.device,
    )


def twin_at_init(
    model: MLP, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None
) -> tuple[str, Snapshot] | None:
    """``(init, probe snapshot)`` of ``model``'s architecture freshly initialized with the other
    paper init (standard <-> normalized), probed on ``(x, y)``; ``None`` for other inits.

    Costs one forward and backward on the probe set, no training."""
    from fastmlp.probe import probe

    other = _OTHER_INIT.get(model.layers[0].init)
    if other is None:
        return None
    return other, probe(_fresh(model, other, seed), x, y)


def prediction_at_init(
    model: MLP, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None
) -> list[dict] | None:
    """The paper's eq. 5-6 beside the measured variances (:func:`fastmlp.coordcheck.
    predict_variances`) for ``model``'s network as initialized: its architecture and init,
    seeded by ``seed`` (the run's seed gives the run's own initial weights), on ``(x, y)``.
    ``None`` where the linear regime does not describe the activation (sigmoid, relu, ...:
    :func:`fastmlp.coordcheck.linear_at_zero`). Costs one forward and backward, no training."""
    from fastmlp.coordcheck import linear_at_zero, predict_variances

    if not linear_at_zero(model.activation):
        return None
    return predict_variances(_fresh(model, model.layers[0].init, seed), x, y)


def init_contrast(this_init: str, this: Snapshot, other_init: str, other: Snapshot) -> str:
    """Back-propagated gradient std per layer at initialization, two inits side by side, with
    the top-to-bottom ratio and each one's gradient finding (paper Fig 7)."""
    layers = sorted(set(this.layers) & set(other.layers))

    def std(snap: Snapshot, i: int) -> float | None:
        g = snap.layers[i].get("preactivation_grad")
        return None if g is None else g.std

    head = ("layer", f"{this_init} (this run)", f"{other_init} (same network)")
    rows = [head] + [
        (str(i), _fmt(std(this, i), ".2e"), _fmt(std(other, i), ".2e")) for i in layers
    ]
    verdict = []
    for snap in (this, other):
        flow = [f for f in diagnose(snap) if f.code in ("vanishing_gradient", "exploding_gradient")]
        if flow:
            e = flow[0].evidence
            verdict.append(f"x{_fmt(e['per_layer'], '.2f')}/layer: {flow[0].code}")
        else:
            verdict.append("no gradient finding")
    rows.append(("", *verdict))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2])])
        for r in rows
    )


def finish_run(
    run_dir: str | os.PathLike,
    *,
    figures: bool = True,
    twin: tuple[str, Snapshot] | None = None,
    prediction: list[dict] | None = None,
) -> str:
    """Write ``diagnosis.json`` and (with ``figures``) the PNG figures of ``run_dir``; return
    the summary to print. ``twin``: :func:`twin_at_init`'s result, shown beside this run's
    first probe; ``prediction``: :func:`prediction_at_init`'s, the eq. 5-6 table (also
    written to ``diagnosis.json`` as ``prediction_at_init``). A missing optional piece (no
    probe yet, matplotlib not importable) is said in the text, never raised."""
    run = Path(run_dir)
    lines: list[str] = []
    err = _final_error(run)
    if err:
        lines.append(err)
    try:
        step, snap = load_run_snapshot(run)
    except (OSError, ValueError) as e:
        lines.append(f"no diagnosis: {e}")
        return "\n".join(lines)
    findings = diagnose(snap)
    initial: list[Finding] = []
    first_step, first = None, None
    try:
        first_step, first = load_run_snapshot(run, 0)
        initial = diagnose(first) if first_step != step else findings
    except ValueError:
        pass
    extra: dict[str, Any] = {"step": step, "source": "probe"}
    if first_step is not None:
        extra["initial"] = {
            "step": first_step,
            "findings": [f.to_dict() for f in initial],
        }
    if twin is not None:
        extra["twin_at_init"] = {
            "init": twin[0],
            "findings": [f.to_dict() for f in diagnose(twin[1])],
        }
    if prediction is not None:
        extra["prediction_at_init"] = prediction
    (run / DIAGNOSIS).write_text(findings_json(findings, **extra) + "\n")

    lines += ["", f"per layer, probe at step {step}:", layer_table(snap), ""]
    lines.append(f"diagnosis at step {step}:")
    lines.append(_indent(format_findings(findings)))
    if first_step is not None and first_step != step:
        lines.append(f"diagnosis at step {first_step} (initialization):")
        lines.append(_indent(format_findings(initial, "warning")))
    lines.append(f"  all findings with their numbers: {run / DIAGNOSIS}; fastmlp diagnose {run}")
    lines.append("")
    if twin is not None and first is not None:
        this_init = _config_init(run)
        lines.append("back-propagated gradient std dC/ds at initialization (paper Fig 7):")
        lines.append(_indent(init_contrast(this_init, first, twin[0], twin[1])))
        lines.append("")
    if prediction is not None:
        from fastmlp.coordcheck import format_predictions

        lines.append("variances at initialization, eq. 5-6 (linear regime) and measured:")
        lines.append(_indent(format_predictions(prediction)))
        lines.append(
            "  ratio: predicted / measured; eq. 5-6 assume units in the linear regime f(s) ~ s,"
            " a ratio above 1 says they are not (tanh compresses large inputs)"
        )
        lines.append("")
    if figures:
        lines.append(_draw(run))
    tb = run / "tb"
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        lines.append(f"TensorBoard events: {tb} (tensorboard --logdir {run})")
    return "\n".join(lines)


def _config_init(run: Path) -> str:
    try:
        return str(json.loads((run / "config.json").read_text()).get("init", "this init"))
    except (OSError, ValueError):
        return "this init"


def _draw(run: Path) -> str:
    try:
        from fastmlp.plot import plot_run

        paths = plot_run(run)
    except ImportError as e:
        return f"no figures: {e} (pip install matplotlib, then fastmlp plot {run})"
    folder = paths[0].parent if paths else run / "figures"
    return f"figures ({len(paths)} PNG): {folder}"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def read_diagnosis(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``diagnosis.json`` of a run, ``None`` when it has none (or it cannot be read)."""
    path = Path(run_dir) / DIAGNOSIS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
