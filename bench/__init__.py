"""Benchmarks: fastmlp vs hooks vs plain PyTorch (installed as ``fastmlp.bench``).

Run ``python -m bench --quick`` (or ``fastmlp bench --quick``); regenerate the
README tables from committed JSON with ``python -m bench.report``.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench`` / ``fastmlp bench`` (see :mod:`.cli`)."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
