"""``python -m bench``: see :mod:`bench.cli` (``--help`` for the options)."""

import sys

from .cli import main

sys.exit(main())
