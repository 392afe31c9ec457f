"""``python -m bench``: see :mod:`bench.cli` (``--help`` for the options).

OpenMP threads are told to sleep rather than spin between parallel regions
(``OMP_WAIT_POLICY=PASSIVE``, unless set already; it must be set before torch
loads OpenMP): on a CPU, threads spinning after ``torch.compile``'d kernels
otherwise slow down the eager variants timed between them (measured here: a tiny
eager step went from 0.4 ms to 400 ms when interleaved with compiled steps).
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402 - after the environment is set

sys.exit(main())
