"""The writer interface and what every writer reads off a snapshot: scalar names and
figures, histogram names, JSON-safe rows.

A writer is anything with ``write(step, snapshot)`` and ``close()``
(:class:`Writer`); :class:`fastmlp.Monitor` calls ``write`` at every logged step, on
rank 0 only. Names are ``fastmlp/<module path>/<quantity>/<figure>`` for scalars and
``fastmlp/<module path>/<quantity>`` for histograms. The figures are read generically from
the snapshot's rows: every numeric field that is not the row's identity or its histogram,
so a figure added to the row schema is logged without changes here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from fastmlp.stats.snapshot import Snapshot

__all__ = [
    "PREFIX",
    "Writer",
    "figures",
    "histogram_buckets",
    "histograms",
    "json_safe",
    "module_path",
    "scalars",
]

#: First component of every logged name.
PREFIX = "fastmlp"
# Row fields that say which layer and quantity a row is, and the histogram's own fields:
# not figures.
_IDENTITY = frozenset({"layer", "name", "quantity"})
_HISTOGRAM = frozenset({"hist_edges", "hist_counts", "underflow", "overflow"})


@runtime_checkable
class Writer(Protocol):
    """Where a :class:`fastmlp.Monitor` sends each logged snapshot."""

    def write(self, step: int, snapshot: Snapshot) -> None:
        """Log ``snapshot``, the statistics recorded at ``step`` (and the window after it)."""
        ...

    def close(self) -> None:
        """Flush and release what the writer opened (not what it was given)."""
        ...


def json_safe(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def module_path(row: Mapping[str, Any]) -> str:
    """A row's module path (``mlp.c_fc``), or ``layer<N>`` for a layer without one."""
    return str(row.get("name") or f"layer{row['layer']}")


def _recorded(row: Mapping[str, Any]) -> bool:
    # count 0 and no non-finite value: the quantity saw nothing (a frozen layer's gradients)
    return bool(row.get("count") or row.get("nonfinite"))


def figures(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numeric figures by name (``mean``, ``std``, ``saturated``...; a nested
    figure such as ``formats`` as ``formats/bf16/overflow``); ``None`` values left out."""
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{name}/{k}", v)

    for key, value in row.items():
        if key not in _IDENTITY and key not in _HISTOGRAM:
            add(key, value)
    return out


def scalars(snapshot: Snapshot) -> dict[str, float]:
    """Every figure of every recorded quantity: ``fastmlp/<path>/<quantity>/<figure>``."""
    out: dict[str, float] = {}
    for row in snapshot.rows():
        if not _recorded(row):
            continue
        base = f"{PREFIX}/{module_path(row)}/{row['quantity']}"
        for fig, value in figures(row).items():
            out[f"{base}/{fig}"] = value
    return out


def histograms(snapshot: Snapshot) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(fastmlp/<path>/<quantity>, row)`` for every row holding a histogram with data."""
    for row in snapshot.rows():
        if row.get("hist_counts") is None or row.get("hist_edges") is None:
            continue
        if not row.get("count") or row.get("min") is None or row.get("max") is None:
            continue
        yield f"{PREFIX}/{module_path(row)}/{row['quantity']}", row


def histogram_buckets(row: Mapping[str, Any]) -> tuple[list[float], list[int]]:
    """``(edges, counts)`` of a row's histogram with its underflow and overflow as end
    buckets (``[min, first edge]`` and ``[last edge, max]``) where they hold values;
    ``len(edges) == len(counts) + 1``."""
    edges = [float(e) for e in row["hist_edges"]]
    counts = [int(c) for c in row["hist_counts"]]
    if row.get("underflow"):
        edges.insert(0, min(float(row["min"]), edges[0]))
        counts.insert(0, int(row["underflow"]))
    if row.get("overflow"):
        edges.append(max(float(row["max"]), edges[-1]))
        counts.append(int(row["overflow"]))
    return edges, counts
