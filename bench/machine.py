"""Describe the machine a benchmark ran on (CPU model and cores, or GPU; library versions)."""

from __future__ import annotations

import os
import platform
import re
import sys

import torch

__all__ = ["cpu_model", "machine_info", "machine_slug"]


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - triton is optional (absent on macOS/Windows)
        return None
    return str(triton.__version__)


def machine_info(device: torch.device) -> dict:
    """What produced the numbers: device, CPU/GPU model, library versions, precision settings."""
    info: dict = {
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_cores": _cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _triton_version(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            if k in os.environ
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            gpu_count=torch.cuda.device_count(),
        )
    return info


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(processor|cpu|with|radeon graphics)\b", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return re.sub(r"-+", "-", text)[:48] or "unknown"


def machine_slug(info: dict) -> str:
    """A file-name-safe machine name: ``cpu-<model>-<cores>c`` or ``cuda-<gpu>``."""
    if info.get("device_type") == "cuda" and info.get("gpu"):
        return f"cuda-{_slug(info['gpu'])}"
    return f"cpu-{_slug(info['cpu'])}-{info['cpu_cores']}c"
