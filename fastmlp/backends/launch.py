"""A kernel launch prepared once, for :mod:`fastmlp.backends.fused` (private to it).

:func:`prepare` compiles (or finds compiled) one kernel for one kind of pass and returns a
:class:`Plan`: the compiled kernel, its grid and every argument after the per-call tensors,
in the kernel's order (constexprs included, as Triton's launcher takes them). Calling the
plan does what ``JITFunction.run`` does on a cache hit, minus the work that cannot change
for that kind of pass (binding and specialising the arguments, the cache key, re-checking
the kernel's global constants, computing the grid).

Where Triton's ``CudaLauncher.__call__`` would only forward its arguments to the C launch
function (no global or profiling scratch memory to allocate, no sanitizer), the plan calls
that function itself, with the argument list of the Triton version it knows: 3.6 and 3.8
(:data:`_DIRECT`). Any other version or launcher is called as ``JITFunction.run`` calls it.
Profilers' launch hooks, when any are set, get their launch metadata either way.
"""

from __future__ import annotations

import triton
from triton import knobs

__all__ = ["Plan", "prepare"]


def _version() -> str:
    """Triton's ``major.minor``."""
    return ".".join(triton.__version__.split(".")[:2])


class Plan:
    """One prepared kernel launch; ``plan(head)`` launches it with the per-call tensors
    ``head`` (the kernel's first arguments). This one calls the launcher as
    ``JITFunction.run`` does (any Triton version); those of :data:`_DIRECT` call its C
    launch function directly."""

    __slots__ = (
        "device",
        "function",
        "get_stream",
        "grid",
        "kernel",
        "launcher",
        "packed",
        "tail",
    )

    def __init__(self, kernel, grid: int, tail: tuple) -> None:
        from triton.runtime.driver import driver

        self.kernel = kernel
        self.launcher = kernel.run  # (loads the binary, builds the launcher)
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.grid = grid
        self.tail = tail
        # The current stream of the device the plan was made on, asked at every launch.
        self.device = driver.active.get_current_device()
        self.get_stream = driver.active.get_current_stream

    def __call__(self, head: tuple) -> None:
        args = head + self.tail
        stream = self.get_stream(self.device)
        hooks = knobs.runtime
        enter = hooks.launch_enter_hook
        meta = None
        if getattr(enter, "calls", True):  # launch metadata only for profilers' hooks
            meta = self.kernel.launch_metadata((self.grid, 1, 1), stream, *args)
        exit_hook = hooks.launch_exit_hook
        self.launcher(
            self.grid, 1, 1, stream, self.function, self.packed, meta, enter, exit_hook, *args
        )


class _Plan38(Plan):
    """Triton 3.8: ``CudaLauncher.launch(gridX, gridY, gridZ, stream, function,
    cooperative, pdl, kernel_metadata, launch_metadata, enter_hook, exit_hook, global_scratch,
    profile_scratch, arg_annotations, kernel_signature, args)``."""

    __slots__ = ("annotations", "coop", "launch", "pdl", "signature")

    def __init__(self, kernel, grid: int, tail: tuple) -> None:
        super().__init__(kernel, grid, tail)
        run = self.launcher
        self.launch, self.coop, self.pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
        self.annotations, self.signature = run.arg_annotations, run.kernel_signature

    def __call__(self, head: tuple) -> None:
        args = head + self.tail
        stream = self.get_stream(self.device)
        hooks = knobs.runtime
        enter = hooks.launch_enter_hook
        meta = None
        if enter.calls:
            meta = self.kernel.launch_metadata((self.grid, 1, 1), stream, *args)
        self.launch(
            self.grid,
            1,
            1,
            stream,
            self.function,
            self.coop,
            self.pdl,
            self.packed,
            meta,
            enter,
            hooks.launch_exit_hook,
            None,  # global scratch
            None,  # profiling scratch
            self.annotations,
            self.signature,
            args,
        )


class _Plan36(Plan):
    """Triton 3.6: ``CudaLauncher.launch(gridX, gridY, gridZ, stream, function, cooperative,
    pdl, global_scratch, profile_scratch, kernel_metadata, launch_metadata, enter_hook,
    exit_hook, *args)``."""

    __slots__ = ("coop", "launch", "pdl")

    def __init__(self, kernel, grid: int, tail: tuple) -> None:
        super().__init__(kernel, grid, tail)
        run = self.launcher
        self.launch, self.coop, self.pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl

    def __call__(self, head: tuple) -> None:
        args = head + self.tail
        stream = self.get_stream(self.device)
        hooks = knobs.runtime
        enter = hooks.launch_enter_hook
        meta = None
        if enter.calls:
            meta = self.kernel.launch_metadata((self.grid, 1, 1), stream, *args)
        self.launch(
            self.grid,
            1,
            1,
            stream,
            self.function,
            self.coop,
            self.pdl,
            None,  # global scratch
            None,  # profiling scratch
            self.packed,
            meta,
            enter,
            hooks.launch_exit_hook,
            *args,
        )


#: Triton ``major.minor`` -> the plan that calls ``CudaLauncher.launch`` with that
#: version's arguments.
_DIRECT: dict[str, type[Plan]] = {"3.6": _Plan36, "3.8": _Plan38}


def _plan_class(launcher) -> type[Plan]:
    """The plan for ``launcher``: direct where its ``__call__`` is this Triton version's
    ``CudaLauncher.__call__``, which would only forward to its C launch function."""
    direct = _DIRECT.get(_version())
    if direct is None:
        return Plan
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:
        return Plan
    if type(launcher).__call__ is not CudaLauncher.__call__:
        return Plan
    if launcher.global_scratch_size or launcher.profile_scratch_size:
        return Plan  # (its __call__ allocates them)
    if getattr(launcher, "gsan_enabled", False):
        return Plan  # (its __call__ adds the sanitizer's state)
    return direct


def prepare(jit_fn, grid: int, args: tuple, meta: dict, n_head: int) -> Plan:
    """The plan that launches ``jit_fn`` on ``grid`` programs with ``args`` (positional, in
    the kernel's order) and ``meta`` (the other arguments by name, and ``num_warps`` and
    ``num_stages`` where given), the first ``n_head`` of ``args`` being the per-call
    tensors. Compiles the kernel unless Triton's cache has it (a launch through
    ``jit_fn[grid]`` with the same arguments puts it there)."""
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    named = {k: v for k, v in meta.items() if k not in options}
    names = jit_fn.arg_names
    if len(args) + len(named) != len(names) or set(named) & set(names[: len(args)]):
        raise TypeError(f"{jit_fn.__name__}: every argument must be positional or in meta")
    kernel = jit_fn.warmup(*args, grid=(grid,), **named, **options)
    bound = dict(zip(names, args, strict=False))
    bound.update(named)
    tail = tuple(bound[name] for name in names)[n_head:]
    return _plan_class(kernel.run)(kernel, grid, tail)
