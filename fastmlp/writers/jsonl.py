"""JSONL: one line per row, the schema of a run directory's ``stats.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from fastmlp.stats.snapshot import Snapshot
from fastmlp.writers.base import json_safe

__all__ = ["JSONL"]


class JSONL:
    """Append every row of each snapshot to a JSONL file, as ``{"step", "source", **row}``
    (the rows of :meth:`fastmlp.Snapshot.rows`, non-finite numbers as ``null``): the lines
    of a run directory's ``stats.jsonl``, readable with
    :func:`fastmlp.run.load_run_snapshot` and :meth:`fastmlp.Snapshot.from_rows`.

    Args:
        path: the file (appended to; its folder is created).
        source: the rows' ``source`` (``"train"``: statistics of training steps).
    """

    def __init__(self, path: str | os.PathLike, *, source: str = "train") -> None:
        self.path = Path(path)
        self.source = source
        self._file: IO[str] | None = None

    def write(self, step: int, snapshot: Snapshot) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        lines = (
            json.dumps(json_safe({"step": step, "source": self.source, **r}), separators=(",", ":"))
            for r in snapshot.rows()
        )
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
