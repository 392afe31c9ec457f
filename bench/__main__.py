"""``python -m bench``: see :mod:`bench.cli` (``--help`` for the options)."""

from .cli import main
from .command import entry

entry("python -m bench", main)
