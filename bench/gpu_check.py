"""One GPU check: GPU-marked tests, then kernel and training-step benchmarks (about 6 minutes).

    pip install --no-deps --no-build-isolation -e . && python -m bench.gpu_check --out DIR

(installs nothing the GPU image lacks; ``--budget`` seconds, 360 by default, so that a
15-minute slot leaves room for a rerun)

1. ``pytest -m gpu`` on the test suite (a subprocess with a time limit);
2. forward kernel vs cuBLAS at 4096x4096x4096 in bf16 and TF32
   (``triton.testing.do_bench`` medians; fused tanh + all statistics, and without
   statistics), as TFLOP/s and the fraction of cuBLAS;
3. a full SGD training step of the paper's 5x1000 tanh network (1024 inputs,
   10 classes) at batch 10, 256 and 4096, bf16 autocast and TF32: fastmlp
   instrumented (Triton kernels, every statistic on) vs the plain eager network
   (``nn.Linear`` + ``nn.Tanh``, cuBLAS) vs the same with the hooks baseline of
   ``bench.hooks`` vs ``torch.compile`` of the plain and of the instrumented network;
   and the plain and instrumented steps captured whole in CUDA graphs (launch
   overhead removed);
4. registers, spills and shared memory of every kernel launched, as the driver loaded
   them (the GPU's check of ``python -m bench.compile_check --configs``).

Each part is guarded: a failure is recorded and the check goes on; parts that
would run past the time budget are skipped and say so. Writes
``DIR/gpu_check-<gpu>.json`` (GPU name, torch/triton/CUDA versions, tests
summary, every measurement) and prints a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

# Reuse autotuning results across the test subprocess and this process.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def machine() -> dict:
    """GPU name and library versions."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_gpu_tests(timeout: float) -> dict:
    """``pytest -m gpu`` in a subprocess; returns the counts and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1)
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "timeout", "seconds": round(time.time() - t0, 1), "tail": out[-3000:]}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    counts = {
        k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)
    }
    return {
        "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
        "seconds": round(time.time() - t0, 1),
        "summary": summary,
        "counts": counts,
        "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:30],
        "tail": proc.stdout[-3000:] if proc.returncode else "",
    }


def _median_ms(fn: Callable[[], object], warmup_calls: int = 3) -> float:
    import triton.testing

    for _ in range(warmup_calls):
        fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def _kernel_fns(x, w, b, layer) -> dict[str, Callable[[], object]]:
    def run(stats: bool) -> torch.Tensor:
        layer.stats.enabled = stats
        return layer(x)

    return {
        "cublas-matmul": lambda: x @ w.t(),
        "fastmlp-fwd-nostats": lambda: run(False),
        "fastmlp-fwd-allstats": lambda: run(True),
    }


def kernel_bench(size: int = 4096) -> list[dict]:
    """Forward kernel vs cuBLAS at ``size``^3 in bf16 and TF32."""
    from fastmlp.layers import InstrumentedLinear

    rows = []
    for name, mm, dtype in (("bf16", "highest", torch.bfloat16), ("tf32", "high", torch.float32)):
        with _matmul_precision(mm):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(size, size, device="cuda", dtype=dtype, generator=g)
            w = torch.randn(size, size, device="cuda", dtype=dtype, generator=g) / size**0.5
            b = torch.randn(size, device="cuda", dtype=dtype, generator=g) * 0.1
            layer = InstrumentedLinear(size, size, "tanh", backend="triton", device="cuda")
            layer.to(dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
                layer(x)  # calibration pass (PyTorch)
                fns = _kernel_fns(x, w, b, layer)
                flops = 2 * size**3
                base = None
                for variant, fn in fns.items():
                    try:
                        ms = _median_ms(fn)
                        tflops = flops / ms / 1e9
                        base = tflops if variant == "cublas-matmul" else base
                        rows.append(
                            {
                                "part": "kernel",
                                "precision": name,
                                "shape": f"{size}x{size}x{size}",
                                "variant": variant,
                                "ms": round(ms, 4),
                                "tflops": round(tflops, 1),
                                "vs_cublas": round(tflops / base, 3) if base else None,
                            }
                        )
                    except Exception as e:  # report and continue
                        rows.append(
                            {
                                "part": "kernel",
                                "precision": name,
                                "variant": variant,
                                "error": f"{type(e).__name__}: {e}"[:500],
                            }
                        )
            del x, w, b, layer
            torch.cuda.empty_cache()
    return rows


def _plain(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [1024] + [1000] * 5
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(1000, 10))
    return nn.Sequential(*layers).cuda()


def _instrumented(seed: int) -> nn.Module:
    from fastmlp.mlp import MLP

    return MLP(1024, 10, depth=5, width=1000, activation="tanh", backend="triton", seed=seed).cuda()


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None):
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        ctx = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.01)

    return step


def _train_variants(x, y, dtype) -> dict[str, Callable[[], Callable[[], None]]]:
    """Builders of the four training-step variants (built lazily, one at a time)."""
    return {
        "plain-eager": lambda: _step_fn(_plain(0), x, y, dtype),
        "fastmlp-instrumented": lambda: _step_fn(_instrumented(0), x, y, dtype),
        "hooks-all": lambda: _hooked(x, y, dtype),
        "plain-compile": lambda: _step_fn(torch.compile(_plain(0)), x, y, dtype),
        "fastmlp-instrumented-compile": lambda: _step_fn(
            torch.compile(_instrumented(0)), x, y, dtype
        ),
        "plain-eager-graph": lambda: _graphed(_step_fn(_plain(0), x, y, dtype)),
        "fastmlp-instrumented-graph": lambda: _graphed(_step_fn(_instrumented(0), x, y, dtype)),
    }


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The whole training step captured in a CUDA graph (no launch overhead); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # calibration, autotuning and allocations happen outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


_TRAIN_ORDER = (
    "plain-eager",
    "fastmlp-instrumented",
    "hooks-all",
    "plain-eager-graph",
    "fastmlp-instrumented-graph",
    "plain-compile",  # last: compilation is the slowest part
    "fastmlp-instrumented-compile",
)


def train_bench(batches: tuple[int, ...], deadline: float) -> list[dict]:
    """Full training step of the 5x1000 tanh network, the variants side by side.

    Variants run in the order of ``_TRAIN_ORDER`` across every precision and batch,
    so a tight time budget drops the slowest ones (``torch.compile``) first.
    """
    precisions = (("bf16", "highest", torch.bfloat16), ("tf32", "high", None))
    data = {}
    for batch in batches:
        g = torch.Generator(device="cuda").manual_seed(batch)
        x = torch.rand(batch, 1024, device="cuda", generator=g) * 2 - 1
        y = torch.randint(0, 10, (batch,), device="cuda", generator=g)
        data[batch] = (x, y)
    rows = []
    for variant in _TRAIN_ORDER:
        for prec, mm, dtype in precisions:
            for batch in batches:
                row = {"part": "train_step", "precision": prec, "batch": batch, "variant": variant}
                rows.append(row)
                if time.time() > deadline:
                    row["error"] = "skipped: time budget"
                    continue
                try:
                    with _matmul_precision(mm):
                        build = _train_variants(*data[batch], dtype)[variant]
                        row["ms"] = round(_median_ms(build(), warmup_calls=3), 4)
                except Exception as e:  # report and continue
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    _log(traceback.format_exc(limit=3))
                torch.cuda.empty_cache()
    ms = {(r["variant"], r["precision"], r["batch"]): r.get("ms") for r in rows}
    for r in rows:
        if r.get("ms") is None:
            continue
        for field, ref in (
            ("vs_eager", "plain-eager"),
            ("vs_compile", "plain-compile"),
            ("vs_eager_graph", "plain-eager-graph"),
        ):
            base = ms.get((ref, r["precision"], r["batch"]))
            if (
                base
                and r["variant"] != ref
                and (field != "vs_eager_graph" or "graph" in r["variant"])
            ):
                r[field] = round(r["ms"] / base, 3)
        if r["variant"] == "plain-eager":
            r["vs_eager"] = 1.0
    return rows


def _hooked(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    from .hooks import HookStats

    model = _plain(0)
    HookStats(model, histograms=True)  # hooks stay registered on the model
    return _step_fn(model, x, y, dtype)


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel the runs above launched (as the
    driver loaded them): the GPU's view of ``compile_check --configs``."""
    from fastmlp.backends import fused as la

    rows = []
    for key, plan in la._PLANS.items():
        k = plan.kernel
        rows.append(
            {
                "part": "resources",
                "kernel": key[0],
                "shape": list(key[1:4]),
                "dtype": str(key[6] if key[0] == "fwd" else key[5]),
                "tile": list(plan.tail[-4:-1]),  # BLOCK_M, BLOCK_N, BLOCK_K
                "registers": getattr(k, "n_regs", None),
                "spills": getattr(k, "n_spills", None),
                "shared": int(k.metadata.shared),
                "num_warps": k.metadata.num_warps,
            }
        )
    return rows


def _f(v: float | None, width: int, digits: int = 3) -> str:
    return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else " " * width


def table(doc: dict) -> str:
    """The short summary printed last."""
    lines = [
        f"GPU check on {doc['machine'].get('gpu', '?')} "
        f"(torch {doc['machine'].get('torch')}, triton {doc['machine'].get('triton')})"
    ]
    t = doc.get("tests", {})
    lines.append(
        f"tests (pytest -m gpu): {t.get('status')} - {t.get('summary', '')} "
        f"[{t.get('seconds', '?')} s]"
    )
    lines.append("")
    lines.append(f"{'kernel 4096^3':<28}{'prec':<6}{'ms':>9}{'TFLOP/s':>10}{'vs cuBLAS':>11}")
    for r in doc.get("kernel", []):
        head = f"{r['variant']:<28}{r['precision']:<6}"
        if "error" in r:
            lines.append(f"{head}  error: {r['error'][:60]}")
            continue
        lines.append(
            f"{head}{_f(r.get('ms'), 9)}{_f(r.get('tflops'), 10, 1)}{_f(r.get('vs_cublas'), 11)}"
        )
    lines.append("")
    res = doc.get("resources", [])
    if res:
        spilled = [r for r in res if r.get("spills")]
        lines.append(
            f"kernels launched: {len(res)}, max registers "
            f"{max((r.get('registers') or 0) for r in res)}, with spills: {len(spilled)}"
        )
    lines.append(
        f"{'train step 5x1000 tanh':<28}{'prec':<6}{'batch':>6}{'ms':>9}"
        f"{'vs eager':>10}{'vs compile':>11}{'vs graph':>10}"
    )
    order = {v: i for i, v in enumerate(_TRAIN_ORDER)}
    train = sorted(
        doc.get("train", []),
        key=lambda r: (r["precision"], r["batch"], order.get(r["variant"], 99)),
    )
    for r in train:
        head = f"{r['variant']:<28}{r['precision']:<6}{r['batch']:>6}"
        if "error" in r:
            lines.append(f"{head}  {r['error'][:60]}")
            continue
        lines.append(
            f"{head}{_f(r.get('ms'), 9)}{_f(r.get('vs_eager'), 10)}"
            f"{_f(r.get('vs_compile'), 11)}{_f(r.get('vs_eager_graph'), 10)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit status 0 when it ran (see the JSON for pass/fail), 2 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON")
    parser.add_argument(
        "--budget", type=float, default=360.0, help="seconds for the whole check (6 min)"
    )
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for pytest")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": machine(), "tests": {}, "kernel": [], "train": []}
    _log(f"{doc['machine']['gpu']}")

    if not args.skip_tests:
        _log("pytest -m gpu ...")
        doc["tests"] = run_gpu_tests(min(args.tests_timeout, deadline - time.time() - 90))
        _log(f"tests: {doc['tests'].get('status')} {doc['tests'].get('summary', '')}")
    else:
        doc["tests"] = {"status": "skipped"}

    for part, fn in (
        ("kernel", lambda: kernel_bench()),
        ("train", lambda: train_bench((10, 256, 4096), deadline - 5)),
        ("resources", kernel_resources),
    ):
        if time.time() > deadline - 10:
            doc[part] = []
            doc.setdefault("skipped", []).append(part)
            continue
        _log(f"{part} benchmark ...")
        try:
            doc[part] = fn()
        except Exception as e:  # report and continue
            doc.setdefault("errors", {})[part] = f"{type(e).__name__}: {e}"[:2000]
            _log(traceback.format_exc())
    doc["seconds"] = round(time.time() - t0, 1)
    slug = re.sub(r"[^a-z0-9]+", "-", doc["machine"]["gpu"].lower()).strip("-")
    path = args.out / f"gpu_check-{slug}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    _log(f"wrote {path} ({doc['seconds']} s)")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
