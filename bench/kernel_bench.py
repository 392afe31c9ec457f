"""One layer alone on CUDA: fastmlp's fused kernels against cuBLAS.

For each shape ``(M, K, N)`` (``x [M, K]``, ``W [N, K]``) and precision (``fp32``
with IEEE dots, ``tf32``, ``bf16`` tensors), timed with
``triton.testing.do_bench`` (median), interleaved over repeats:

- ``forward``: ``cublas-matmul`` (``x @ W^T``), ``torch-linear-tanh``
  (``tanh(addmm(b, x, W^T))``), ``fastmlp-nostats`` and ``fastmlp-all``
  (:class:`fastmlp.InstrumentedLinear` with the Triton backend, no grad);
- ``forward+backward``: ``cublas-3mm`` (the three GEMMs alone), ``torch-linear-tanh``
  and ``fastmlp-all`` with autograd.

``tflops`` counts ``2MKN`` (forward) or ``6MKN`` (forward+backward) flops;
``vs_cublas`` is the fraction of the cuBLAS reference's throughput.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

import fastmlp

from .timing import quantiles

__all__ = ["kernel_rows"]

PRECISIONS = {"fp32": ("highest", torch.float32), "tf32": ("high", torch.float32)}
PRECISIONS["bf16"] = ("highest", torch.bfloat16)


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _fns(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device
) -> dict[tuple[str, str], tuple[Callable[[], object], list[torch.Tensor] | None]]:
    """``(op, variant) -> (fn, tensors whose grads do_bench clears)``."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype, generator=g) * 0.1
    dz = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))

    def layer(stats: bool) -> fastmlp.InstrumentedLinear:
        lay = fastmlp.InstrumentedLinear(k, n, "tanh", backend="triton", device=device, dtype=dtype)
        with torch.no_grad():
            lay.weight.copy_(w)
            lay.bias.copy_(b)
        lay.stats.enabled = stats
        return lay

    plain_layer, full_layer = layer(False), layer(True)
    full_train = layer(True)
    xt = x.clone().requires_grad_(True)

    def nograd(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn()

        return run

    def three_mm() -> None:
        torch.mm(x, w.t())
        torch.mm(dz, w)
        torch.mm(dz.t(), x)

    def torch_train() -> None:
        torch.tanh(torch.addmm(bg, xg, wg.t())).backward(dz)

    def fastmlp_train() -> None:
        full_train(xt).backward(dz)

    return {
        ("forward", "cublas-matmul"): (nograd(lambda: torch.mm(x, w.t())), None),
        ("forward", "torch-linear-tanh"): (
            nograd(lambda: torch.tanh(torch.addmm(b, x, w.t()))),
            None,
        ),
        ("forward", "fastmlp-nostats"): (nograd(lambda: plain_layer(x)), None),
        ("forward", "fastmlp-all"): (nograd(lambda: full_layer(x)), None),
        ("forward+backward", "cublas-3mm"): (three_mm, None),
        ("forward+backward", "torch-linear-tanh"): (torch_train, [xg, wg, bg]),
        ("forward+backward", "fastmlp-all"): (
            fastmlp_train,
            [xt, *full_train.parameters()],
        ),
    }


def kernel_rows(
    shapes: list[tuple[int, int, int]],
    device: torch.device,
    *,
    repeats: int = 5,
    precisions: tuple[str, ...] = ("fp32", "tf32", "bf16"),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Rows of the ``kernel`` section (see the module docstring)."""
    from triton.testing import do_bench

    rows: list[dict] = []
    for m, k, n in shapes:
        for prec in precisions:
            setting, dtype = PRECISIONS[prec]
            with _matmul_precision(setting):
                fns = _fns(m, k, n, dtype, device)
                times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
                errors: dict[tuple[str, str], str] = {}
                for _ in range(repeats):
                    for key, (fn, grads) in fns.items():
                        if key in errors:
                            continue
                        try:
                            ms = do_bench(
                                fn, warmup=10, rep=30, grad_to_none=grads, return_mode="median"
                            )
                            times[key].append(ms / 1e3)
                        except Exception as exc:  # noqa: BLE001 - reported as n/a
                            with contextlib.suppress(Exception):
                                torch.cuda.synchronize(device)
                            errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            refs = {"forward": "cublas-matmul", "forward+backward": "cublas-3mm"}
            for (op, variant), ts in times.items():
                row = {
                    "section": "kernel",
                    "op": op,
                    "dtype": prec,
                    "m": m,
                    "k": k,
                    "n": n,
                    "variant": variant,
                }
                if (op, variant) in errors or not ts:
                    reason = errors.get((op, variant), "not run")
                    rows.append(row | {"status": "n/a", "reason": reason})
                    continue
                q25, q50, q75 = quantiles(ts)
                flops = (2 if op == "forward" else 6) * m * k * n
                row |= {"status": "ok", "median_s": q50, "q25_s": q25, "q75_s": q75}
                row["tflops"] = flops / q50 / 1e12
                ref = times.get((op, refs[op]))
                if ref:
                    row["vs_cublas"] = quantiles(ref)[1] / q50
                rows.append(row)
                log(f"kernel {op:16s} {prec} {m}x{k}x{n} {variant:18s} {row['tflops']:.1f} TFLOP/s")
            del fns
            torch.cuda.empty_cache()
    return rows
