"""Markdown tables from benchmark JSON: the only source of the README's speed figures.

Usage (from the repository root)::

    python -m bench.report                      # every bench/results/*.json, to stdout
    python -m bench.report bench/results/X.json # one file
    python -m bench.report --readme README.md   # replace the README's bench block

The README block lies between ``<!-- bench-results:start -->`` and
``<!-- bench-results:end -->``; everything between the markers is regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .command import entry, write_text_atomically
from .machine import cpu_summary

__all__ = ["RESULTS_DIR", "load", "render", "render_all", "update_readme", "main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_PREFIX = "fastmlp-bench/"
START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def load(path: str | Path) -> dict:
    """Read one result document; raises ``ValueError`` if it is not a bench result."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise ValueError(f"{path} is not a fastmlp bench result (no '{SCHEMA_PREFIX}*' schema)")
    return doc


def _ms(row: dict) -> str:
    if row.get("status") != "ok":
        return "n/a"
    med, lo, hi = row["median_s"] * 1e3, row["q25_s"] * 1e3, row["q75_s"] * 1e3
    digits = 2 if med < 10 else 1 if med < 100 else 0
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _ratio(row: dict | None, key: str = "ratio") -> str:
    if row is None or row.get("status") != "ok" or key not in row:
        return "n/a" if row is not None and row.get("status") != "ok" else "-"
    text = f"{row[key]:.2f}"
    if key == "ratio" and "ratio_q25" in row:
        text += f" ({row['ratio_q25']:.2f}-{row['ratio_q75']:.2f})"
    return text


def machine_label(doc: dict) -> str:
    """``NVIDIA H200`` or ``AMD EPYC (family 26 model 2, AVX-512, ...), 2 cores``."""
    m = doc["machine"]
    if m.get("device_type") == "cuda" and m.get("gpu"):
        return str(m["gpu"])
    return f"{cpu_summary(m)}, {m['cpu_cores']} cores"


def _header(doc: dict) -> list[str]:
    m = doc["machine"]
    versions = f"torch {m['torch']}, triton {m.get('triton') or 'n/a'}"
    lines = [
        f"### {machine_label(doc)}",
        "",
        f"`{doc['command'].strip()}`, {doc['timestamp']}, {versions}, "
        f"float32 matmul precision `{m.get('float32_matmul_precision')}`, "
        f"{m.get('torch_threads')} torch threads; run took {doc.get('elapsed_s', 0):.0f} s.",
    ]
    if m.get("env"):
        lines[-1] += " Environment: " + ", ".join(f"`{k}={v}`" for k, v in m["env"].items()) + "."
    if doc.get("note"):
        lines += ["", f"Note: {doc['note']}"]
    if doc.get("errors"):
        lines += ["", "Errors: " + "; ".join(str(e).replace("|", "/") for e in doc["errors"])]
    return lines


def _main_tables(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r["section"] == "main"]
    out: list[str] = []
    cases = list(dict.fromkeys((r["dtype"], r["batch"], r["width"], r["depth"]) for r in rows))
    for dtype, batch, width, depth in cases:
        sel = [
            r
            for r in rows
            if (r["dtype"], r["batch"], r["width"], r["depth"]) == (dtype, batch, width, depth)
        ]
        by = {(r["variant"], r["mode"]): r for r in sel}
        variants = list(dict.fromkeys(r["variant"] for r in sel))
        compiled = any("ratio_compiled" in r for r in sel if r["mode"] == "step")
        head = "| variant | step ms (IQR) | step / plain | forward ms (IQR) | forward / plain |"
        sep = "|---|---:|---:|---:|---:|"
        if compiled:
            head += " step / plain-compiled |"
            sep += "---:|"
        head += " notes |"
        sep += "---|"
        out += [
            "",
            f"Training step (forward + backward + SGD) and forward alone, {depth}x{width} "
            f"{sel[0].get('in_features', '')}->{sel[0].get('out_features', '')} network, "
            f"batch {batch}, {dtype}. Median over interleaved repeats (inter-quartile range); "
            "ratios against `plain` from the same run: median of the per-repeat ratios "
            "(their IQR).",
            "",
            head,
            sep,
        ]
        for v in variants:
            step, fwd = by.get((v, "step")), by.get((v, "forward"))
            notes = []
            for r in (step, fwd):
                if r is None:
                    continue
                if r.get("status") != "ok" and r.get("reason") and r["reason"] not in notes:
                    notes.append(r["reason"])
                if r.get("note") and r["note"] not in notes:
                    notes.append(f"{r['mode']}: {r['note']}")
            cells = [
                f"`{v}`",
                _ms(step) if step else "-",
                _ratio(step),
                _ms(fwd) if fwd else "-",
                _ratio(fwd),
            ]
            if compiled:
                cells.append(_ratio(step, "ratio_compiled"))
            cells.append("; ".join(n.replace("|", "/") for n in notes))
            out.append("| " + " | ".join(cells) + " |")
    return out


def _curve_tables(doc: dict) -> list[str]:
    out: list[str] = []
    for section, axis in (("batch", "batch"), ("width", "width")):
        rows = [r for r in doc["rows"] if r["section"] == section]
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            sel = [r for r in rows if r["dtype"] == dtype]
            xs = sorted({r[axis] for r in sel})
            fixed = "width" if axis == "batch" else "batch"
            fixed_val = sel[0][fixed]
            by = {(r["variant"], r[axis]): r for r in sel}
            out += [
                "",
                f"Training step vs {axis} ({fixed} {fixed_val}, {dtype}): ratio to `plain` "
                "(median step time in ms).",
                "",
                "| variant | " + " | ".join(f"{axis} {x}" for x in xs) + " |",
                "|---|" + "---:|" * len(xs),
            ]
            for v in dict.fromkeys(r["variant"] for r in sel):
                cells = []
                for x in xs:
                    r = by.get((v, x))
                    if r is None or r.get("status") != "ok":
                        cells.append("n/a" if r is not None else "-")
                    else:
                        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
                        cells.append(f"{ratio} ({r['median_s'] * 1e3:.3g})")
                out.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return out


def _kernel_table(doc: dict) -> list[str]:
    rows = doc.get("kernel_rows") or []
    if not rows:
        return []
    out = [
        "",
        "One layer alone (tanh), `triton.testing.do_bench` medians; `vs cuBLAS` is the "
        "fraction of the cuBLAS reference's throughput (matmul alone for forward, the three "
        "GEMMs for forward+backward).",
        "",
        "| op | precision | M x K x N | variant | ms | TFLOP/s | vs cuBLAS |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['m']}x{r['k']}x{r['n']}"
        if r.get("status") != "ok":
            reason = str(r.get("reason", "")).replace("|", "/")
            out.append(
                f"| {r['op']} | {r['dtype']} | {shape} | `{r['variant']}` | n/a | | {reason} |"
            )
            continue
        vs = f"{r['vs_cublas']:.2f}" if "vs_cublas" in r else "-"
        out.append(
            f"| {r['op']} | {r['dtype']} | {shape} | `{r['variant']}` | "
            f"{r['median_s'] * 1e3:.3f} | {r['tflops']:.1f} | {vs} |"
        )
    return out


def _shapeset_line(doc: dict) -> list[str]:
    s = doc.get("shapeset")
    if not s:
        return []
    if s.get("status") != "ok":
        return ["", f"Shapeset-3x2 generation: not measured ({s.get('reason')})."]
    return [
        "",
        f"Shapeset-3x2 generation: {s['images_per_s']:,.0f} images/s "
        f"({s['images']} images per call, median of {s['repeats']}).",
    ]


def _plots(doc: dict, image_prefix: str) -> list[str]:
    plots = doc.get("plots") or []
    if not plots:
        return []
    return [""] + [f"![{Path(p).stem}]({image_prefix}{Path(p).name})" for p in plots]


# (variant, limit) at batch 256 on a CPU (issue 5); (variant, key, limit) on a GPU (issue 3).
CPU_TARGETS = (("fastmlp-moments", 1.10), ("fastmlp-all", 1.25))
GPU_TARGETS = (("fastmlp-all", "ratio", 1.00), ("fastmlp-all", "ratio_compiled", 1.05))
GPU_KERNEL_TARGET = ((4096, 4096, 4096), ("bf16", "tf32"), 0.80)


def _verdict(value: float, limit: float, higher_is_better: bool = False) -> str:
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "NOT met"


def _targets(doc: dict) -> list[str]:
    """The acceptance targets, checked against this run's numbers (thresholds only here)."""
    step = {
        (r["variant"], r["batch"]): r
        for r in doc["rows"]
        if r["section"] == "main" and r["mode"] == "step" and r["dtype"] == "fp32"
    }
    out: list[str] = []

    def ratio(variant: str, batch: int, key: str = "ratio") -> float | None:
        r = step.get((variant, batch))
        return r.get(key) if r is not None and r.get("status") == "ok" else None

    if doc["machine"].get("device_type") != "cuda":
        if ("plain", 256) not in step:
            return []
        for variant, limit in CPU_TARGETS:
            v = ratio(variant, 256)
            text = "n/a" if v is None else f"{v:.2f} ({_verdict(v, limit)})"
            out.append(f"- `{variant}` / `plain`, batch 256 step: {text}; target <= {limit:.2f}")
        hooks = [
            f"`{h}` {ratio(h, 256):.2f}"
            for h in ("hooks", "hooks-all", "hooks-naive")
            if ratio(h, 256) is not None
        ]
        if hooks:
            out.append("- beside them, hooks / `plain`: " + ", ".join(hooks))
        out += _statistics_alone(step, 256)
    else:
        for batch in sorted({b for _, b in step}):
            for variant, key, limit in GPU_TARGETS:
                v = ratio(variant, batch, key)
                ref = "plain" if key == "ratio" else "plain-compiled"
                text = "n/a" if v is None else f"{v:.2f} ({_verdict(v, limit)})"
                out.append(
                    f"- `{variant}` / `{ref}`, batch {batch} step fp32: {text}; "
                    f"target <= {limit:.2f}"
                )
            hooks = ratio("hooks", batch)
            if hooks is not None:
                out.append(f"- beside them, `hooks` / `plain`, batch {batch}: {hooks:.2f}")
            out += _statistics_alone(step, batch)
        shape, precisions, limit = GPU_KERNEL_TARGET
        for prec in precisions:
            rows = [
                r
                for r in doc.get("kernel_rows") or []
                if (r["m"], r["k"], r["n"]) == shape
                and r["dtype"] == prec
                and r["op"] == "forward"
                and r["variant"] == "fastmlp-all"
            ]
            v = rows[0].get("vs_cublas") if rows and rows[0].get("status") == "ok" else None
            text = "n/a" if v is None else f"{v:.2f} ({_verdict(v, limit, True)})"
            out.append(
                f"- forward kernel (all statistics) / cuBLAS matmul throughput, "
                f"{'x'.join(map(str, shape))} {prec}: {text}; target >= {limit:.2f}"
            )
    return ["", "Targets (this run):", "", *out] if out else []


def _statistics_alone(step: dict, batch: int) -> list[str]:
    """What the statistics cost on top of fastmlp's own uninstrumented step (same run)."""
    off = step.get(("fastmlp-off", batch))
    if off is None or off.get("status") != "ok":
        return []
    parts = [
        f"`{v}` {step[(v, batch)]['median_s'] / off['median_s']:.2f}"
        for v in ("fastmlp-moments", "fastmlp-all")
        if (v, batch) in step and step[(v, batch)].get("status") == "ok"
    ]
    if not parts:
        return []
    return [
        f"- the statistics alone, / `fastmlp-off` (same layers, statistics disabled), "
        f"batch {batch}: " + ", ".join(parts)
    ]


def _legend(doc: dict) -> list[str]:
    variants = doc.get("variants") or {}
    if not variants:
        return []
    return ["", "Variants: " + "; ".join(f"`{k}`: {v}" for k, v in variants.items()) + "."]


def render(doc: dict, *, image_prefix: str = "bench/results/", plots: bool = True) -> str:
    """Markdown for one result document: header, main table(s), curves, kernels, Shapeset."""
    lines = _header(doc) + _main_tables(doc) + _targets(doc) + _legend(doc)
    lines += _curve_tables(doc)
    lines += _kernel_table(doc)
    lines += _shapeset_line(doc)
    if plots:
        lines += _plots(doc, image_prefix)
    return "\n".join(lines) + "\n"


def summary(doc: dict) -> str:
    """The short form printed at the end of a run: header and main table(s)."""
    lines = _header(doc) + _main_tables(doc) + _shapeset_line(doc) + _targets(doc)
    return "\n".join(lines) + "\n"


def result_files(directory: Path = RESULTS_DIR) -> list[Path]:
    """Bench result JSON files in ``directory`` (other JSON there is skipped)."""
    files = []
    for p in sorted(directory.glob("*.json")):
        try:
            load(p)
        except (ValueError, json.JSONDecodeError, KeyError):
            continue
        files.append(p)
    return files


def render_all(paths: list[Path], *, image_prefix: str = "bench/results/") -> str:
    """Markdown for several result files, one section each."""
    return "\n".join(render(load(p), image_prefix=image_prefix) for p in paths)


def update_readme(readme: Path, markdown: str) -> None:
    """Replace the text between the README's bench markers with ``markdown``."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{readme} has no '{START}' ... '{END}' block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text_atomically(readme, f"{head}{START}\n{markdown.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report``: print (or write into the README) the tables from JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Markdown tables from committed bench JSON (bench/results/*.json).",
    )
    parser.add_argument("files", nargs="*", type=Path, help="result JSON (default: all)")
    parser.add_argument("--readme", type=Path, help="replace this README's bench block")
    parser.add_argument(
        "--image-prefix", default="bench/results/", help="path prefix of plot links"
    )
    args = parser.parse_args(argv)
    paths = args.files or result_files()
    if not paths:
        print(f"no bench results in {RESULTS_DIR}", file=sys.stderr)
        return 1
    markdown = render_all(paths, image_prefix=args.image_prefix)
    if args.readme:
        update_readme(args.readme, markdown)
        print(f"updated {args.readme} from {len(paths)} result file(s)", file=sys.stderr)
    else:
        sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    entry("python -m bench.report", main)
