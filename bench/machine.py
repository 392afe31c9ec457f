"""Describe the machine a benchmark ran on (CPU model and cores, or GPU; library versions)."""

from __future__ import annotations

import os
import platform
import re
import sys

import torch

__all__ = ["cpu_id", "cpu_model", "cpu_summary", "machine_info", "machine_slug"]


def _cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The fields of the first processor in ``/proc/cpuinfo`` (or in the text ``cpuinfo``),
    keys lower-case; empty where there is no such file."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    name = _cpuinfo_fields().get("model name")
    return name or platform.processor() or platform.machine() or "unknown CPU"


# Instruction-set levels, best first: the /proc/cpuinfo flag that marks each.
_ISA_LEVELS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))
# Where Linux describes cpu0's caches.
_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


def cpu_id(cpuinfo: str | None = None, cache_dir: str = _CACHE_DIR) -> dict:
    """What tells two CPUs of one model name apart (virtual machines often report only
    "AMD EPYC"): vendor, family, model and stepping numbers, the best vector instruction
    set, PyTorch's CPU kernel level, and the L2 and L3 sizes. ``cpuinfo``: the text of
    ``/proc/cpuinfo`` (read if ``None``); fields it lacks are left out."""
    fields = _cpuinfo_fields(cpuinfo)
    out: dict = {}
    for key, name in (("vendor_id", "vendor"), ("cpu family", "family"), ("model", "model")):
        if key in fields:
            out[name] = fields[key]
    if "stepping" in fields:
        out["stepping"] = fields["stepping"]
    flags = set(fields.get("flags", "").split())
    isa = next((label for flag, label in _ISA_LEVELS if flag in flags), None)
    if isa:
        out["isa"] = isa
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if get_capability is not None:
        out["torch_cpu_capability"] = get_capability()
    for level in (2, 3):
        size = _cache_size(cache_dir, level)
        if size:
            out[f"l{level}"] = size
    return out


def _cache_size(cache_dir: str, level: int) -> str | None:
    """The size of cpu0's unified level-``level`` cache (``1024K``), from sysfs."""
    try:
        entries = sorted(os.listdir(cache_dir))
    except OSError:
        return None
    for entry in entries:
        path = os.path.join(cache_dir, entry)
        try:
            with open(os.path.join(path, "level"), encoding="utf-8") as f:
                if int(f.read().strip()) != level:
                    continue
            with open(os.path.join(path, "size"), encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, ValueError):
            continue
    return None


def cpu_summary(info: dict) -> str:
    """``AMD EPYC (family 26 model 2, AVX-512, L2 1024K, L3 32768K)`` from a
    :func:`machine_info` dict; for results recorded without :func:`cpu_id`, it says so."""
    ident = info.get("cpu_id")
    if ident is None:
        return f"{info['cpu']} (family and model not recorded)"
    parts = []
    if "family" in ident:
        parts.append(f"family {ident['family']} model {ident.get('model', '?')}")
    parts += [ident[k] for k in ("isa",) if k in ident]
    parts += [f"{k.upper()} {ident[k]}" for k in ("l2", "l3") if k in ident]
    return f"{info['cpu']} ({', '.join(parts)})" if parts else str(info["cpu"])


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
        "cpu_id": cpu_id(),
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
    """A file-name-safe machine name: ``cpu-<model>[-f<family>m<model>]-<cores>c`` or
    ``cuda-<gpu>``."""
    if info.get("device_type") == "cuda" and info.get("gpu"):
        return f"cuda-{_slug(info['gpu'])}"
    ident = info.get("cpu_id") or {}
    numbers = ""
    if "family" in ident:
        numbers = f"-f{_slug(ident['family'])}m{_slug(str(ident.get('model', 'x')))}"
    return f"cpu-{_slug(info['cpu'])}{numbers}-{info['cpu_cores']}c"
