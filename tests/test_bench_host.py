"""``python -m bench.host``: the CUDA path's host work with Triton's launch mocked (no GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="measured with the launch mocked")
def test_host_benchmark_runs_and_checks_plan_launches():
    """One short run: the kernels compile for sm_90, the prepared plans launch with the same
    arguments as Triton's JIT path (checked inside), and the last line gives the ratio."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.host", "--batches", "10", "--steps", "1", "--repeats", "1"]
        + ["--no-save"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"cannot compile here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"host time per step, fastmlp / plain eager: batch 10 \d+\.\d\d", last)
    assert "17 Triton" in proc.stdout  # one launch per pass: 6 forward + 5 dX + 6 dW
