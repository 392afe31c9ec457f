"""Reproduce Table 1 and the figures of Glorot & Bengio (2010) at a chosen compute budget.

``reproduce(dataset, budget)`` trains the paper's models (sigmoid, tanh, tanh N,
softsign, softsign N with 5 hidden layers, and sigmoid with 4) one after the
other, draws their figures and writes ``report.md``: the test error of each
model at this budget beside the paper's Table 1, and what :mod:`fastmlp.diagnosis`
reads in each model's last probe. Runs that already finished are
reused and interrupted ones resumed, so rerunning the command continues.

Budgets (all with SGD on minibatches of 10, as in the paper):

- ``smoke``: narrow layers (100 units), a few hundred steps; a quick check that
  the whole pipeline works, sized for a small CPU. Its errors say nothing about
  the paper.
- ``short``: the paper's 1000-unit layers, a few thousand steps; the early
  phase of training, where saturation is visible (sized for a CPU).
- ``paper``: 1000-unit layers and 5 million updates, the paper's training
  length, with full validation and test sets (sized for a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastmlp.plot import plot_run, plot_test_error
from fastmlp.run import CHECKPOINT, METRICS, load_checkpoint, load_run_snapshot, read_jsonl
from fastmlp.stats.diagnosis import Finding, diagnose
from fastmlp.summary import read_diagnosis
from fastmlp.train import TrainConfig, train

__all__ = ["BUDGETS", "MODELS", "PAPER_TABLE1", "Budget", "Model", "reproduce", "report_markdown"]


@dataclass(frozen=True)
class Budget:
    """How much training each model of a reproduction gets."""

    width: int
    steps: int
    eval_every: int
    probe_every: int
    valid_size: int | None
    test_size: int | None
    jacobian_every: int
    jacobian_examples: int
    lr: float


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        width=100, steps=400, eval_every=100, probe_every=100, valid_size=500, test_size=500,
        jacobian_every=0, jacobian_examples=4, lr=0.05,
    ),
    "short": Budget(
        width=1000, steps=3000, eval_every=250, probe_every=250, valid_size=2000,
        test_size=2000, jacobian_every=0, jacobian_examples=10, lr=0.05,
    ),
    "paper": Budget(
        width=1000, steps=5_000_000, eval_every=20_000, probe_every=20_000, valid_size=None,
        test_size=None, jacobian_every=500_000, jacobian_examples=50, lr=0.05,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Model:
    """One row of Table 1."""

    label: str
    activation: str
    init: str
    depth: int

    @property
    def slug(self) -> str:
        return f"{self.activation}-{self.init}-d{self.depth}"


MODELS: tuple[Model, ...] = (
    Model("Sigmoid", "sigmoid", "standard", 5),
    Model("Sigmoid (depth 4)", "sigmoid", "standard", 4),
    Model("Tanh", "tanh", "standard", 5),
    Model("Tanh N", "tanh", "normalized", 5),
    Model("Softsign", "softsign", "standard", 5),
    Model("Softsign N", "softsign", "normalized", 5),
)

# Table 1 of the paper: test error (%), 5 hidden layers.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Softsign": {"shapeset": 16.27, "mnist": 1.64, "cifar10": 55.78, "imagefolder": 69.14},
    "Softsign N": {"shapeset": 16.06, "mnist": 1.72, "cifar10": 53.8, "imagefolder": 68.13},
    "Tanh": {"shapeset": 27.15, "mnist": 1.76, "cifar10": 55.9, "imagefolder": 70.58},
    "Tanh N": {"shapeset": 15.60, "mnist": 1.64, "cifar10": 52.92, "imagefolder": 68.57},
    "Sigmoid": {"shapeset": 82.61, "mnist": 2.21, "cifar10": 57.28, "imagefolder": 70.66},
}
PAPER_DATASET_NAMES = {
    "shapeset": "Shapeset-3x2",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "imagefolder": "Small-ImageNet",
}


def model_config(
    model: Model, budget: Budget, dataset: str, run_dir: Path, **overrides: object
) -> TrainConfig:
    """The :class:`TrainConfig` of one model at one budget."""
    fields = {
        "dataset": dataset,
        "depth": model.depth,
        "width": budget.width,
        "activation": model.activation,
        "init": model.init,
        "lr": budget.lr,
        "steps": budget.steps,
        "eval_every": budget.eval_every,
        "probe_every": budget.probe_every,
        "valid_size": budget.valid_size,
        "test_size": budget.test_size,
        "jacobian_every": budget.jacobian_every,
        "jacobian_examples": budget.jacobian_examples,
        "out": str(run_dir),
        "extra": {"label": model.label},
    }
    if budget.test_size is not None:
        fields["probe_size"] = min(300, budget.test_size)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**fields)


def _run_state(run_dir: Path) -> int | None:
    """Step of the run's checkpoint, ``None`` when there is no run yet."""
    ckpt = run_dir / CHECKPOINT
    if not ckpt.exists():
        return None
    return int(load_checkpoint(ckpt)["step"])


def summarize(run_dir: Path) -> dict:
    """Final test error, and the test error at the evaluation with the lowest validation error."""
    rows = read_jsonl(run_dir / METRICS)
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["split"]] = r["error"]
    evals = [(s, d) for s, d in sorted(by_step.items()) if "valid" in d and "test" in d]
    if not evals:
        return {"final_step": None, "final_test": None, "best_step": None, "best_test": None}
    best_step, best = min(evals, key=lambda e: (e[1]["valid"], e[0]))
    final_step, final = evals[-1]
    return {
        "final_step": final_step,
        "final_test": final["test"],
        "best_step": best_step,
        "best_valid": best["valid"],
        "best_test": best["test"],
    }


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _diagnosis_line(run: Path) -> str:
    """The findings at warning level or above of a run's last probe, for the report."""
    saved = read_diagnosis(run)
    if saved is not None:
        step, findings = saved.get("step"), [Finding.from_dict(d) for d in saved["findings"]]
    else:  # no readable diagnosis.json: diagnose the run's stats.jsonl
        try:
            step, snap = load_run_snapshot(run)
        except (OSError, ValueError) as e:
            return f"no diagnosis ({e})"
        findings = diagnose(snap)
    shown = [f for f in findings if f.rank >= 1]
    if not shown:
        return f"step {step}: no warning"
    return f"step {step}: " + "; ".join(
        f"`{f.code}` layer {f.layer} ({f.severity}): {f.message}" for f in shown
    )


def report_markdown(
    dataset: str,
    budget_name: str,
    budget: Budget,
    runs: list[tuple[Model, Path]],
    out: Path,
    seconds: float,
) -> str:
    """The reproduction report (markdown) for finished runs."""
    paper_name = PAPER_DATASET_NAMES.get(dataset, dataset)
    lines = [
        f"# Glorot & Bengio (2010), Table 1 on {paper_name}: budget `{budget_name}`",
        "",
        f"Command: `fastmlp reproduce --budget {budget_name} --dataset {dataset}`",
        "",
        f"Budget: {budget.steps} SGD steps of minibatch 10, hidden width {budget.width}, "
        f"learning rate {budget.lr}, evaluation every {budget.eval_every} steps, "
        f"validation/test sets of {budget.valid_size or 'all'}/{budget.test_size or 'all'} "
        f"examples. Wall time of this invocation: {seconds:.0f} s.",
        "",
        "Test error (%). *Selected*: at the evaluation with the lowest validation error "
        "(the paper selects on validation error after 5 million updates); "
        "*paper*: Table 1 (5 hidden layers).",
        "",
        "| model | depth | final test error | step | selected test error | step | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, run in runs:
        s = summarize(run)
        paper = PAPER_TABLE1.get(model.label, {}).get(dataset)
        lines.append(
            f"| {model.label} | {model.depth} | {_fmt(s['final_test'])} | {s['final_step']} | "
            f"{_fmt(s['best_test'])} | {s['best_step']} | {_fmt(paper)} |"
        )
    if budget_name != "paper":
        lines += [
            "",
            f"The `{budget_name}` budget trains for {budget.steps} steps instead of the paper's "
            "5 million: compare the ranking and the early dynamics, not the numbers.",
        ]
    lines += ["", "## Diagnosis", ""]
    lines += [
        "What `fastmlp diagnose` reads in each model's last probe (warnings and errors; "
        "every finding with its numbers is in the run's `diagnosis.json`):",
        "",
    ]
    for model, run in runs:
        lines.append(f"- **{model.label}** (depth {model.depth}), {_diagnosis_line(run)}")
    lines += ["", "## Figures", "", "Test error of every model during training (Fig 11):", ""]
    lines.append("![test error](fig11_test_error.png)")
    lines.append("")
    for model, run in runs:
        rel = Path(run).relative_to(out) if Path(run).is_relative_to(out) else Path(run)
        lines.append(f"### {model.label} (depth {model.depth})")
        lines.append("")
        for name, title in (
            ("fig02_activation_mean_std.png", "activation mean and std (Fig 2)"),
            ("fig03_activation_p98_std.png", "98th percentile and std (Fig 3/10)"),
            ("fig04_06_activation_hist.png", "activation histograms (Fig 4/6)"),
            ("fig07_backprop_grad_hist.png", "back-propagated gradients (Fig 7)"),
            ("fig08_weight_grad_hist.png", "weight gradients at init (Fig 8)"),
            ("fig09_weight_grad_std.png", "weight-gradient std (Fig 9)"),
            ("jacobian_singular_values.png", "Jacobian singular values"),
        ):
            lines.append(f"- [{title}]({rel / 'figures' / name})")
        lines.append("")
    return "\n".join(lines)


def reproduce(
    dataset: str = "shapeset",
    budget: str = "smoke",
    *,
    out: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
    lr: float | None = None,
    progress: bool = True,
    models: tuple[Model, ...] = MODELS,
) -> Path:
    """Train every model of Table 1 at ``budget`` on ``dataset``; returns the report's path.

    Each model's run goes to ``out/<activation>-<init>-d<depth>``; finished runs
    are reused and interrupted ones resumed.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
    out = Path(out) if out is not None else Path("runs") / f"reproduce-{dataset}-{budget}"
    out.mkdir(parents=True, exist_ok=True)
    b = BUDGETS[budget]
    if lr is not None:
        b = dataclasses.replace(b, lr=lr)
    t0 = time.perf_counter()
    runs = []
    for i, model in enumerate(models, 1):
        run_dir = out / model.slug
        config = model_config(
            model, b, dataset, run_dir, device=device, seed=seed, data_dir=data_dir,
            download=download or None, progress=progress,
        )  # fmt: skip
        state = _run_state(run_dir)
        if progress:
            print(f"[{i}/{len(models)}] {model.label}, depth {model.depth}", file=sys.stderr)
        if state is None:
            train(config)  # draws the run's figures and writes diagnosis.json at its end
        elif state < config.steps:
            saved = json.loads((run_dir / "config.json").read_text())
            if saved.get("steps") != config.steps:
                raise ValueError(f"{run_dir} was made with another budget; use another --out")
            train(config, resume=True)
        else:  # finished: draw its figures, in case the run's own end did not (killed there)
            plot_run(run_dir)
        runs.append((model, run_dir))
    plot_test_error([r for _, r in runs], out / "fig11_test_error.png")
    report = out / "report.md"
    text = report_markdown(dataset, budget, b, runs, out, time.perf_counter() - t0)
    report.write_text(text + "\n")
    return report
