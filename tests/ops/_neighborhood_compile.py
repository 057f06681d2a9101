"""Compile the neighborhood forward and dQ kernels for sm_90 without a GPU (run as a script, without
TRITON_INTERPRET), at the GPU's tiles: the interpreter runs 4x4 boxes only and accepts code the compiler rejects.
Prints ``_pyramid_compile``'s lines (``OK name shared local_decls stack`` or ``FAIL name error``)."""

from __future__ import annotations

from _pyramid_compile import check

from visattn.kernels import neighborhood as nk

PTRS = {n: "i32" for n in ("ST0", "EN0", "ST1", "EN1", "ST2", "EN2")}
PTRS.update({n: "bf16" for n in ("Q", "K", "V", "O", "KE", "VE", "DO", "DQ")})
PTRS.update({n: "fp32" for n in ("LSE", "RPB", "LSE2", "DELTA", "DS")})
PTRS["KPM"] = "i8"


def _flags(fn, **on):
    c = dict(D=128, DP=128, DV=128, DVP=128, PRECISION="tf32")
    c.update({n: on.get(n, False) for n in fn.arg_names if n.startswith(("HAS_", "STORE_", "FOLD_"))})
    return c


def main() -> int:
    ok = True
    fwd, dq = nk._neighborhood_fwd_kernel, nk._neighborhood_bwd_dq_kernel
    for name, q, kv, on in (("na_fwd_2d", (1, 16, 8), (1, 16, 8), dict(FOLD_SCALE=True)),
                            ("na_fwd_3d", (2, 8, 8), (2, 4, 8), dict(FOLD_SCALE=True)),
                            ("na_fwd_3d_rpb_kpm", (2, 8, 8), (2, 4, 4), dict(HAS_RPB=True, HAS_KPM=True))):
        c = dict(_flags(fwd, **on), T0=q[0], T1=q[1], T2=q[2], K0=kv[0], K1=kv[1], K2=kv[2])
        ok &= check(name, fwd, c, warps=8, stages=3, ptrs=PTRS)
    c = dict(_flags(dq, HAS_RPB=True, STORE_DS=True), T0=2, T1=4, T2=8, K0=2, K1=4, K2=8)
    ok &= check("na_dq_3d_rpb", dq, c, warps=4, stages=2, ptrs=PTRS)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
