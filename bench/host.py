"""Host cost per training step of the GPU path, measured on a machine without a GPU.

    python -m bench.host [--batches 10,256] [--steps 30] [--repeats 5] [--out bench/results]

On a GPU a small-batch step is bound by what the CPU does to issue it, not by the
GPU. This benchmark measures that CPU work here, without a GPU, for one SGD training
step (zero_grad, forward, cross-entropy, backward, ``SGD.step``) of a network with the
structure of the paper's (5 hidden tanh layers, 10 classes, float32), side by side in one
process:

- ``plain``: ``nn.Linear`` + ``nn.Tanh`` in eager PyTorch;
- ``fastmlp``: :class:`fastmlp.MLP` with ``backend="triton"``, every statistic on
  (moments, saturation, histograms; calibrated, as after the first step), routed as CUDA
  tensors are: ``fastmlp.backends.fused.supported`` is patched to its checks of the
  inputs alone (``takes``), so the op routes the CPU tensors to the fused backend, whose
  prepared launches (:mod:`fastmlp.backends.launch`) run for real, first launches through
  Triton's binder, autotuner and kernel cache, with the kernels compiled for sm_90 by the
  real compiler (``ptxas``). Only Triton's C launch function (argument packing and
  ``cuLaunchKernelEx``) is a no-op (:class:`MockCudaDriver`), and the driver's device and
  stream queries return constants. It runs under Triton 3.6 and 3.8 (whose launchers take
  their arguments differently; see :mod:`fastmlp.backends.launch`).

Both run on CPU tensors whose widths are scaled down (``--width``/``--in-features``, 4 by
default, the batch as given) so that the arithmetic PyTorch's CPU kernels do, which a GPU
would do, stays small; the host work per operator (Python, dispatcher, autograd, Triton's
launch path) does not depend on the width. What is left of that arithmetic grows with
the batch and counts against ``plain`` (its matmuls run here; fastmlp's kernels do not),
so at batch 256 the ratio flatters fastmlp by a few per cent (0.95 at width 16 became
1.00 at width 4 in one comparison on the machine that produced the committed JSON).
What this leaves out on both sides is the CUDA backend's own cost
per kernel (caching allocator, cuBLAS heuristics, ``cudaLaunchKernel``, a few microseconds
each): plain PyTorch issues more kernels per step than fastmlp, so that omission is, if
anything, unfavourable to fastmlp. Launches per step are counted:
Triton launches at the mocked launcher, PyTorch kernels as the ATen operators of a step
that would launch one on CUDA (views, ``empty`` and metadata operators excluded), in an
extra untimed step. Timings are the median over ``--repeats`` of the mean per step over
``--steps`` steps of this thread's CPU time (``time.thread_time``: the host work, not the
waits of a shared machine), the two variants interleaved, after warm-up; one thread.

The last line of the output is
``host time per step, fastmlp / plain eager: batch 10 R10, batch 256 R256``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import types
import unittest.mock
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .command import entry, output_dir, positive_int, positive_ints, write_text_atomically
from .machine import machine_info, machine_slug
from .report import RESULTS_DIR

__all__ = ["MockCudaDriver", "mock_gpu", "main", "measure"]

ARCH = 90
MAX_SHARED = 232448  # H100/H200: 227 KiB of shared memory per block (opt-in)


class MockCudaDriver:
    """Triton's CUDA driver with the C parts replaced: no device, nothing launched.

    The real ``CudaLauncher`` (Python) is used; its C ``launch`` is :meth:`_Utils.launch`, a
    counter. Where Triton builds that launch function per kernel as a C module (Triton 3.6),
    the build is replaced (see :func:`mock_gpu`); where it takes argument descriptors
    (``PyKernelArg``, Triton 3.8), plain tuples stand in for the C type. ``load_binary``
    returns the register and spill counts parsed from the kernel's ``ptxas`` info only
    where available (here: zeros).
    """

    def __init__(self) -> None:
        from collections import namedtuple

        from triton.backends.nvidia import driver as nvidia
        from triton.backends.nvidia.driver import CudaLauncher

        #: Whether Triton compiles a C launch module per kernel (its ``launch`` then takes
        #: the kernel's arguments unpacked after 13 fixed ones; else as one tuple, last).
        self.per_kernel_module = hasattr(nvidia, "make_launcher")
        if not self.per_kernel_module and getattr(nvidia, "PyKernelArg", 0) is None:
            # (set when the C utils module loads, which needs libcuda)
            nvidia.PyKernelArg = namedtuple("PyKernelArg", "nested_tuple type")
            nvidia.ARG_KERNEL, nvidia.ARG_CONSTEXPR, nvidia.ARG_TUPLE = 0, 1, 2

        self.launches = 0
        # Every launch's arguments when a list, the launch metadata (for profilers' hooks,
        # made where any is set) left out.
        self.record: list | None = None
        self.launcher_cls = CudaLauncher
        driver = self
        metadata_at = 10 if self.per_kernel_module else 8

        class _Utils:
            @staticmethod
            def launch(*args):  # the C launcher's place: count (and record) only
                driver.launches += 1
                if driver.record is not None:
                    driver.record.append(args[:metadata_at] + args[metadata_at + 1 :])

            @staticmethod
            def load_binary(name, kernel, shared, device):
                return 1, 1, 0, 0, 1024

            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": 132}

            @staticmethod
            def build_signature_metadata(kernel_signature):  # C: packs the types once
                return tuple(kernel_signature)

            @staticmethod
            def unload_module(module):
                return None

        self.utils = _Utils()

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        return None

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return ARCH // 10, ARCH % 10

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("no GPU: nothing to benchmark")


_MOCK: MockCudaDriver | None = None


@contextlib.contextmanager
def mock_gpu() -> Iterator[MockCudaDriver]:
    """Route CPU tensors to fastmlp's CUDA path with Triton's launch mocked (see the module):
    the fused backend takes CPU tensors (what it checks of the inputs is unchanged) for
    layers built with ``backend="triton"``."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import autotuner
    from triton.runtime.driver import driver

    from fastmlp.backends import fused

    global _MOCK
    if _MOCK is None:  # one for the process: compiled kernels keep their launcher's launch
        _MOCK = MockCudaDriver()
    mock = _MOCK
    previous = driver._active
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(unittest.mock.patch.object(fused, "supported", fused.takes))
        # Autotuning cannot time anything here: every candidate "takes" the same time, so
        # the first one is chosen (a first-call cost; the steady state measured is the same).
        bench = lambda self, *a, config, **k: [1.0, 1.0, 1.0]  # noqa: E731
        patch(unittest.mock.patch.object(autotuner.Autotuner, "_bench", bench))
        if mock.per_kernel_module:
            # The launcher's C module (which links libcuda): its launch is the mock's.
            module = types.SimpleNamespace(launch=mock.utils.launch)
            patch(unittest.mock.patch.object(nvidia, "library_dirs", lambda: []))
            build = lambda **kw: module  # noqa: E731
            patch(unittest.mock.patch.object(nvidia, "compile_module_from_src", build))
        driver.set_active(mock)
        try:
            yield mock
        finally:
            driver._active = previous  # (reset_active() would look for a real GPU)


# ATen operators that launch no kernel on CUDA.
_NO_KERNEL = (
    "empty",
    "view",
    "_unsafe_view",
    "t.",
    "transpose",
    "expand",
    "reshape",
    "alias",
    "detach",
    "as_strided",
    "unsqueeze",
    "squeeze",
    "permute",
    "select",
    "slice",
    "lift_fresh",
    "new_empty",
    "is_same_size",
)


class _CountKernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.name()).split("::", 1)[-1]
        if not name.startswith(_NO_KERNEL) and name != "t":
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _networks(batch: int, width: int, depth: int, in_features: int):
    import fastmlp

    ref = fastmlp.MLP(
        in_features, 10, depth=depth, width=width, activation="tanh", backend="triton", seed=0
    )
    mods: list[nn.Module] = []
    for i, layer in enumerate(ref.layers):
        mods.append(nn.Linear(layer.in_features, layer.out_features))
        if i < len(ref.layers) - 1:
            mods.append(nn.Tanh())
    plain = nn.Sequential(*mods)
    fm = ref
    fm.stats.histograms = True
    fm.stats.enabled = True
    for layer in fm.layers:
        layer.stats.calibrated = [True] * 4  # as after the first (PyTorch-path) step
    x = torch.rand(batch, in_features)
    y = torch.zeros(batch, dtype=torch.long)
    return plain, fm, x, y


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _same_launches(first: list, second: list) -> None:
    """Every launch of two steps got the same arguments, in the C launch function's order:
    the plans' launches against those of Triton's JIT path (grid, stream, function, launch
    options, hooks, scalars and constexprs equal, per-call tensors of the same shape, dtype
    and strides)."""
    assert len(first) == len(second), (len(first), len(second))
    for a1, a2 in zip(first, second, strict=True):
        _same_arguments(a1, a2)


def _same_arguments(u, v) -> None:
    if isinstance(u, torch.Tensor):
        same = isinstance(v, torch.Tensor)
        assert same and (u.shape, u.dtype, u.stride()) == (v.shape, v.dtype, v.stride()), (u, v)
    elif isinstance(u, (tuple, list)):
        assert type(u) is type(v) and len(u) == len(v), (u, v)
        for a, b in zip(u, v, strict=True):
            _same_arguments(a, b)
    else:
        assert u == v or (u != u and v != v), (u, v)


def _time(fn: Callable[[], None], steps: int, repeats: int) -> list[float]:
    per_step = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(steps):
                fn()
            per_step.append((time.thread_time() - t0) / steps)
    finally:
        gc.enable()
    return per_step


def measure(
    batch: int, steps: int, repeats: int, width: int = 4, depth: int = 5, in_features: int = 4
) -> dict:
    """Host time per step (seconds) of plain eager and fastmlp at ``batch``, and launches."""
    with mock_gpu() as mock:
        plain, fm, x, y = _networks(batch, width, depth, in_features)
        fns = {"plain": _step_fn(plain, x, y), "fastmlp": _step_fn(fm, x, y)}
        # First step: Triton's JIT path (tune, compile) records the arguments it launches
        # with; later steps launch the prepared plans, which must pass the same.
        mock.record = []
        fns["fastmlp"]()
        jit_launches, mock.record = mock.record, None
        plan_launches = []
        mock.record = plan_launches
        fns["fastmlp"]()
        mock.record = None
        _same_launches(jit_launches, plan_launches)
        for fn in fns.values():  # fill every cache
            for _ in range(3):
                fn()
        launches = {}
        for name, fn in fns.items():
            before = mock.launches
            with _CountKernels() as counter:
                fn()
            launches[name] = {
                "triton": mock.launches - before,
                "torch": len(counter.ops),
                "torch_ops": counter.ops,
            }
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(repeats):  # interleaved, so drifts hit both alike
            for name, fn in fns.items():
                times[name] += _time(fn, steps, 1)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {
        "batch": batch,
        "width": width,
        "in_features": in_features,
        "depth": depth,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "host_s_per_step": med,
        "host_s_per_step_all": times,
        "ratio_fastmlp_over_plain": med["fastmlp"] / med["plain"],
        "launches_per_step": launches,
        "plan_launches_checked": len(plan_launches),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.host", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--batches", type=positive_ints, default=[10, 256], help="comma-separated batch sizes"
    )
    parser.add_argument("--steps", type=positive_int, default=30, help="steps per timed repeat")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed repeats (median)")
    parser.add_argument(
        "--width", type=positive_int, default=4, help="hidden width of the stand-in"
    )
    parser.add_argument(
        "--in-features", type=positive_int, default=4, help="inputs of the stand-in"
    )
    parser.add_argument(
        "--out", type=output_dir, default=RESULTS_DIR, help="directory for the JSON"
    )
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # The mocked kernels leave their outputs uninitialised: no denormal slow paths in the
    # CPU loss on either side.
    torch.set_flush_denormal(True)
    batches = args.batches
    results = [
        measure(b, args.steps, args.repeats, args.width, 5, args.in_features) for b in batches
    ]
    for r in results:
        med = r["host_s_per_step"]
        la = r["launches_per_step"]
        print(
            f"batch {r['batch']:5d}: plain {med['plain'] * 1e3:7.3f} ms "
            f"({la['plain']['torch']} kernels), fastmlp {med['fastmlp'] * 1e3:7.3f} ms "
            f"({la['fastmlp']['triton']} Triton + {la['fastmlp']['torch']} torch kernels), "
            f"ratio {r['ratio_fastmlp_over_plain']:.2f}"
        )
    info = machine_info(torch.device("cpu"))
    doc = {
        "what": "host time per SGD step of a 5-hidden-layer tanh MLP (10 classes, fp32, "
        "widths scaled down), CPU tensors, fastmlp on its CUDA path with Triton's C launch "
        "mocked (kernels compiled for sm_90); see bench/host.py",
        "machine": info,
        "mock_target": f"sm_{ARCH}",
        "results": results,
    }
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"host-{machine_slug(info)}.json"
        write_text_atomically(path, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    ratios = {r["batch"]: r["ratio_fastmlp_over_plain"] for r in results}
    tail = ", ".join(f"batch {b} {ratios[b]:.2f}" for b in batches)
    print(f"host time per step, fastmlp / plain eager: {tail}")
    return 0


if __name__ == "__main__":
    entry("python -m bench.host", main)
