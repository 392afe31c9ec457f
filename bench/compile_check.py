"""Compile every kernel variant for a CUDA target without a GPU (ahead-of-time, to cubin).

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy code and
accepts programs the GPU compiler rejects (loop-carried type changes, unsupported
dtypes in atomics, ...). This check lowers each kernel through the real
NVIDIA backend (``ptxas`` ships with triton) so such errors surface in CI:

    python -m bench.compile_check --arch 90

It must run in a process where ``TRITON_INTERPRET`` is not set.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _sig(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
    return sig


def variants(quick: bool = False) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, signature types, constexprs, options) for every variant to compile."""
    from fastmlp.kernels import bwd_dw_kernel, bwd_dx_kernel, fwd_kernel

    from fastmlp.backends.fused import _FIXED_CFG, _FIXED_STAGES, _FIXED_WARPS
    from fastmlp.stats.layout import NEXP

    out = []
    dtypes = [("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")]
    acts = range(8)
    if quick:
        dtypes = dtypes[:3]
    cfg = dict(_FIXED_CFG)
    for (dt, prec), act, stats, det in itertools.product(
        dtypes, acts, (True, False), (False, True)
    ):
        if det and not stats:
            continue
        if quick and act not in (0, 2) and not (dt == "fp32" and prec == "ieee"):
            continue
        # The output layer (identity, 10 classes) gets no alignment hint; hidden layers do.
        align = 1 if act == 0 else 8
        ptr = f"*{dt}"
        f64 = "*fp64"
        i64 = "*i64"
        common = {"M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "part_stride": "i32"}
        types = {
            "x_ptr": ptr,
            "w_ptr": ptr,
            "b_ptr": ptr,
            "h_ptr": ptr,
            "z_ptr": ptr,
            "acc_ptr": f64,
            "shift_ptr": f64,
            "hist_ptr": i64,
            "range_ptr": f64,
            "ext_ptr": f64,
            "part_ptr": f64,
            "units_ptr": f64,
            "exph_ptr": i64,
            "ticket_ptr": "*i32",
            "sat_lo": "fp32",
            "sat_hi": "fp32",
            **common,
        }
        for s in ("xm", "xk", "wn", "wk", "hm", "hn"):
            types[f"stride_{s}"] = "i32"
        ce = dict(
            ACT=act,
            HAS_BIAS=act % 2 == 0,
            STORE_Z=act >= 5,
            STATS=stats,
            SAT=stats and act in (1, 2, 3),
            HIST=stats,
            ZEROS=stats and act == 4,
            MOM4=stats and act == 2,
            UNITS=stats and act == 4,
            EXPS=stats and act == 0,
            NEXP=NEXP,
            HE=512 if stats and act == 0 else 2,
            FIXED_ACT=act in (1, 2, 3),
            BINS=64,
            HB=128,
            DETERMINISTIC=det,
            PRECISION=prec,
            ALIGN=align,
            **cfg,
        )
        out.append((f"fwd {dt}/{prec} act={act} stats={stats} det={det}", fwd_kernel, types, ce))
        types_dw = {
            "dh_ptr": ptr,
            "h_ptr": ptr,
            "x_ptr": ptr,
            "dw_ptr": ptr,
            "db_ptr": ptr,
            "acc_ptr": f64,
            "shift_ptr": f64,
            "hist_ptr": i64,
            "range_ptr": f64,
            "ext_ptr": f64,
            "part_ptr": f64,
            "exph_ptr": i64,
            "ticket_ptr": "*i32",
            **common,
        }
        for s in ("dhm", "dhn", "hm", "hn", "xm", "xk", "dwn", "dwk"):
            types_dw[f"stride_{s}"] = "i32"
        ce_dw = dict(
            ACT=act,
            HAS_DB=act % 2 == 0,
            STORE_DW=True,
            STATS=stats,
            HIST=stats,
            ZEROS=stats and act == 4,
            MOM4=stats and act == 2,
            EXPS=stats and act == 0,
            NEXP=NEXP,
            HE=512 if stats and act == 0 else 2,
            BINS=64,
            HB=128,
            DETERMINISTIC=det,
            PRECISION=prec,
            ALIGN=align,
            **cfg,
        )
        out.append(
            (f"dw {dt}/{prec} act={act} stats={stats} det={det}", bwd_dw_kernel, types_dw, ce_dw)
        )
        if stats and not det:
            types_dx = {"dh_ptr": ptr, "h_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr, **common}
            for s in ("dhm", "dhn", "hm", "hn", "wn", "wk", "dxm", "dxk"):
                types_dx[f"stride_{s}"] = "i32"
            types_dx.pop("part_stride")
            ce_dx = dict(ACT=act, PRECISION=prec, ALIGN=align, **cfg)
            out.append((f"dx {dt}/{prec} act={act}", bwd_dx_kernel, types_dx, ce_dx))
    fixed = {"num_warps": _FIXED_WARPS, "num_stages": _FIXED_STAGES}
    return [(label, fn, types, ce, fixed) for label, fn, types, ce in out]


MAX_SHARED = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # bytes per block (opt-in)


def resources(kernel, arch: int) -> dict:
    """Registers, spill bytes (``ptxas -v`` on the kernel's PTX) and shared memory."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run(
        [get_ptxas(arch).path, "-v", f"--gpu-name={sm}", f.name, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "shared": int(kernel.metadata.shared),
    }


_OPT_IN_OFF = {"ZEROS": False, "MOM4": False, "UNITS": False, "EXPS": False, "HE": 2}


def selectable(quick: bool = False) -> list[tuple[str, object, dict, dict, dict]]:
    """Every configuration the dispatcher can select for the paper's shapes (widths 1000 and
    1024, batch 10/256/4096 -> the small/medium/large buckets' candidates, and the dW
    candidates), for float32 (IEEE and TF32) and bfloat16, with the default statistics
    (moments, saturation, histograms; the opt-in groups are compiled by :func:`variants`):
    the hidden tanh layers (``ALIGN=8``) and the identity output layer (10 classes,
    ``ALIGN=1``)."""
    from fastmlp.backends.fused import (
        _DW_CONFIGS,
        _DX_CONFIGS,
        _FIXED_CFG,
        _FIXED_STAGES,
        _FIXED_WARPS,
        _FWD_CONFIGS,
    )

    base = {v[0]: v for v in variants()}
    dtypes = ["fp32/ieee", "fp32/tf32", "bf16/ieee"]
    if quick:
        dtypes = dtypes[2:]
    out = []
    for dt in dtypes:
        for kind, configs in (
            ("fwd", _FWD_CONFIGS),
            ("dx", _DX_CONFIGS),
            ("dw", _DW_CONFIGS),
        ):
            for act in (2, 0):  # hidden tanh layers (aligned), output layer (identity, N=10)
                label = f"{kind} {dt} act={act}"
                label += "" if kind == "dx" else " stats=True det=False"
                if label not in base:
                    continue
                _, fn, types, ce, _ = base[label]
                # the default statistics: the opt-in groups (zeros, moments4, per-unit,
                # exponents) are compiled by variants(), not held to zero spills here
                default = {k: v for k, v in _OPT_IN_OFF.items() if k in ce}
                for c in configs:
                    ce2 = {**ce, **default, **c.kwargs}
                    opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
                    tag = f"{kind} {dt} act={act} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x"
                    tag += f"{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
                    out.append((tag, fn, types, ce2, opts))
        # deterministic mode: the fixed configuration
        fixed = {"num_warps": _FIXED_WARPS, "num_stages": _FIXED_STAGES}
        for kind in ("fwd", "dw"):
            label = f"{kind} {dt} act=2 stats=True det=True"
            _, fn, types, ce, _ = base[label]
            out.append((f"{label} (fixed config)", fn, types, {**ce, **_FIXED_CFG}, fixed))
    return out


def main(argv: list[str] | None = None) -> int:
    """Compile all variants; print one line per failure; exit status 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="a representative subset")
    parser.add_argument(
        "--smoke", action="store_true", help="a handful of variants (about 30 s on 2 CPU cores)"
    )
    parser.add_argument(
        "--configs",
        action="store_true",
        help="every selectable tile configuration (tanh, all statistics, fp32/TF32/bf16): "
        "report registers/spills/shared memory; fail on spills or shared memory over the limit",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    todo = variants(args.quick or args.smoke)
    if args.configs:
        todo = selectable(args.quick)
    if args.smoke:
        keep = (
            "fwd fp32/ieee act=2 stats=True det=True",
            "dw fp32/tf32 act=2 stats=True det=False",
            "dw bf16/ieee act=0 stats=True det=True",
            "dx bf16/ieee act=2",
            "fwd bf16/ieee act=0 stats=True det=False",
        )
        todo = [v for v in todo if v[0] in keep]
        if len(todo) != len(keep):
            print(f"compile_check: smoke list out of date ({len(todo)}/{len(keep)} found)")
            return 1
    failures = 0
    t0 = time.time()
    for label, fn, types, ce, opts in todo:
        try:
            src = ASTSource(fn=fn, signature=_sig(fn, types, ce), constexprs=ce)
            k = triton.compile(
                src, target=target, options={"num_warps": 4, "num_stages": 3, **opts}
            )
            if args.configs:
                r = resources(k, args.arch)
                bad = r["spill_stores"] or r["spill_loads"]
                bad = bad or r["shared"] > MAX_SHARED.get(args.arch, 232448)
                failures += bool(bad)
                print(
                    f"{'FAIL' if bad else 'ok  '} {label}: {r['registers']} registers, "
                    f"spills {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared']} B",
                    flush=True,
                )
        except Exception as e:  # report every failing variant, keep going
            failures += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL {label}: {type(e).__name__}: {' | '.join(msg[-6:])}")
    print(
        f"compiled {len(todo) - failures}/{len(todo)} variants for sm_{args.arch} "
        f"in {time.time() - t0:.1f}s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
