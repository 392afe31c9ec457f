"""PNG scaling curves (step time and ratio to ``plain`` vs batch size and vs width)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write ``{stem}-{batch|width}[-dtype].png`` for each curve in ``doc``; returns the paths.

    Raises ``ImportError`` when matplotlib is missing (``pip install fastmlp[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for section in ("batch", "width"):
        rows = [r for r in doc["rows"] if r["section"] == section and r.get("status") == "ok"]
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            sel = [r for r in rows if r["dtype"] == dtype]
            fixed = "width" if section == "batch" else "batch"
            fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
            for v in dict.fromkeys(r["variant"] for r in sel):
                pts = sorted((r[section], r) for r in sel if r["variant"] == v)
                xs = [x for x, _ in pts]
                med = [r["median_s"] * 1e3 for _, r in pts]
                lo = [r["q25_s"] * 1e3 for _, r in pts]
                hi = [r["q75_s"] * 1e3 for _, r in pts]
                (line,) = ax_t.plot(xs, med, marker="o", label=v)
                ax_t.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
                rp = [(x, r["ratio"]) for x, r in pts if "ratio" in r]
                if rp:
                    ax_r.plot(*zip(*rp, strict=True), marker="o", label=v, color=line.get_color())
            ax_t.set(xscale="log", yscale="log", xlabel=section, ylabel="training step (ms)")
            ax_r.set(xscale="log", xlabel=section, ylabel="time / plain")
            ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
            for ax in (ax_t, ax_r):
                ax.grid(True, which="both", alpha=0.3)
            ax_r.legend(fontsize=8)
            label = doc["machine"].get("gpu") or doc["machine"].get("cpu", "")
            fig.suptitle(
                f"{doc['config']['depth']}-layer tanh MLP, {fixed} {sel[0][fixed]}, {dtype} "
                f"- {label}",
                fontsize=10,
            )
            fig.tight_layout()
            suffix = "" if dtype == "fp32" else f"-{dtype}"
            path = out_dir / f"{stem}-{section}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
