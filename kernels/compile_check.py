"""Compile every kernel variant for a CUDA target without a GPU (ahead-of-time, to cubin).

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy code and
accepts programs the GPU compiler rejects (loop-carried type changes, unsupported
dtypes in atomics, ...). This check lowers each kernel through the real
NVIDIA backend (``ptxas`` ships with triton) so such errors surface in CI:

    python -m fastmlp.kernels.compile_check --arch 90

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
    from fastmlp.stats.layout import NEXP

    from .linear_activation import _FIXED_CFG, _bwd_dw_kernel, _bwd_dx_kernel, _fwd_kernel

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
            **cfg,
        )
        out.append((f"fwd {dt}/{prec} act={act} stats={stats} det={det}", _fwd_kernel, types, ce))
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
            SAT=False,
            ZEROS=stats and act == 4,
            MOM4=stats and act == 2,
            EXPS=stats and act == 0,
            NEXP=NEXP,
            HE=512 if stats and act == 0 else 2,
            BINS=64,
            HB=128,
            DETERMINISTIC=det,
            PRECISION=prec,
            **cfg,
        )
        out.append(
            (f"dw {dt}/{prec} act={act} stats={stats} det={det}", _bwd_dw_kernel, types_dw, ce_dw)
        )
        if stats and not det:
            types_dx = {"dh_ptr": ptr, "h_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr, **common}
            for s in ("dhm", "dhn", "hm", "hn", "wn", "wk", "dxm", "dxk"):
                types_dx[f"stride_{s}"] = "i32"
            types_dx.pop("part_stride")
            ce_dx = dict(ACT=act, STATS=False, HIST=False, SAT=False, PRECISION=prec, **cfg)
            out.append((f"dx {dt}/{prec} act={act}", _bwd_dx_kernel, types_dx, ce_dx))
    return [(label, fn, types, ce, {}) for label, fn, types, ce in out]


def finalize_variants() -> list[tuple[str, object, dict, dict, dict]]:
    """The finalize kernel in its deterministic/grow combinations."""
    from fastmlp.stats.layout import NFIELDS

    from .utils import finalize_kernel

    out = []
    for det, g0, g1 in itertools.product((False, True), (False, True), (False, True)):
        types = {
            "acc_ptr": "*fp64",
            "hist_ptr": "*i64",
            "range_ptr": "*fp64",
            "ext_ptr": "*fp64",
            "part_ptr": "*fp64",
            "n_parts0": "i32",
            "n_parts1": "i32",
            "part_stride": "i32",
        }
        ce = dict(
            Q0=0,
            NFIELDS=NFIELDS,
            DETERMINISTIC=det,
            MOM4=det,
            GROW0=g0,
            GROW1=g1,
            BINS=64,
            HB=64,
            BLOCK_P=256,
        )
        out.append((f"finalize det={det} grow=({g0},{g1})", finalize_kernel, types, ce, {}))
    return out


def main(argv: list[str] | None = None) -> int:
    """Compile all variants; print one line per failure; exit status 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="a representative subset")
    parser.add_argument(
        "--smoke", action="store_true", help="a handful of variants (about 30 s on 2 CPU cores)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    todo = finalize_variants() + variants(args.quick or args.smoke)
    if args.smoke:
        keep = (
            "finalize det=True grow=(True,True)",
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
            triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3, **opts})
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
