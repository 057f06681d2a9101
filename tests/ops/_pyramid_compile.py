"""Compile PSA's Triton kernels for sm_90 without a GPU (run as a script, without TRITON_INTERPRET).

The interpreter accepts code that the compiler rejects (e.g. constexprs rebound per ``static_range``
iteration), so ``test_pyramid_compile.py`` runs this in a subprocess: frontend, TTGIR, LLVM and PTX.
Prints one line per kernel: ``OK name shared_bytes local_decls stack_bytes`` or ``FAIL name error``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from visattn.kernels import block_sparse as bs
from visattn.kernels import _pyramid_planning as pp
from visattn.kernels import pyramid as pk

PTRS = {n: "bf16" for n in ("Q", "K", "V", "O", "KP", "VP", "DO", "DQ", "QS", "KS")}
PTRS.update({n: "fp32" for n in ("LSE", "RECT_SCALE", "RECT_BIAS", "LSE2", "DELTA", "DK", "DV", "S", "W")})
PTRS.update({n: "i32" for n in ("KV_INDEX", "KV_COUNT", "TEXT_VALID", "LEVEL_PTR", "TILE_ORDER", "Q_INDEX",
                                "Q_COUNT")})
PTRS.update({n: "i64" for n in ("QROWS", "KPOS", "ROWS")})
PTRS.update({"X": "bf16", "OUT": "bf16", "ORDER": "i32"})


def _signature(fn, consts, ptrs=None):
    ptrs = {**PTRS, **(ptrs or {})}
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        elif n.startswith(("sm_scale", "tau")) or n in ("scale", "qk_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def _stack_bytes(k) -> int:
    """Per-thread stack frame of the SASS (register spills land there; the PTX never shows them), from
    ``cuobjdump --dump-resource-usage`` of the cubin; -1 where cuobjdump is not shipped with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() or "cubin" not in k.asm:
        return -1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(k.asm["cubin"])
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else -1


def check(name, fn, consts, warps=8, stages=3, ptrs=None, maxnreg=None) -> bool:
    opts = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    try:
        k = triton.compile(ASTSource(fn, _signature(fn, consts, ptrs), constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        print("OK", name, k.metadata.shared, k.asm["ptx"].count(".local"), _stack_bytes(k))
        return True
    except Exception as e:  # noqa: BLE001  (report every kernel, then fail)
        print("FAIL", name, str(e).replace("\n", " | ")[-600:])
        return False


def main() -> int:
    d = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, DOT_PRECISION="tf32")
    ok = True
    for bk, bn in ((64, 64), (32, 64), (128, 128)):
        c = dict(d, BLOCK_Q=128, BLOCK_M=128, BLOCK_K=bk, BLOCK_N=bn, TAIL_BRANCH=True, PREFETCH=True, SEGMENTS=True,
                 RECT=False, LEVELS=True, POOL_N=64, CAUSAL=bk == 32, ORDERED=True)
        ok &= check(f"fwd_levels_bk{bk}", bs._block_sparse_fwd_kernel, c)
    c = dict(d, BLOCK_Q=128, BLOCK_M=128, BLOCK_K=128, BLOCK_N=128, TAIL_BRANCH=True, PREFETCH=True, SEGMENTS=True,
             RECT=True, LEVELS=False, POOL_N=64, CAUSAL=False, ORDERED=False)
    ok &= check("fwd_segments_rect", bs._block_sparse_fwd_kernel, c)
    # the GPU tiles of 32-key blocks without segments: 2 stages, registers capped for two programs per SM
    c = dict(d, BLOCK_Q=128, BLOCK_M=128, BLOCK_K=32, BLOCK_N=32, TAIL_BRANCH=True, PREFETCH=True, SEGMENTS=False,
             RECT=False, LEVELS=True, POOL_N=32, CAUSAL=False, ORDERED=True)
    ok &= check("fwd_levels_bk32_capped", bs._block_sparse_fwd_kernel, c, stages=2, maxnreg=128)
    ok &= check("pool", pk._pyramid_pool_kernel,
                dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_K=64, SEGMENTS=True, DO2=True, DO4=True, DO8=True))
    ok &= check("bwd_dq", pk._pyramid_bwd_dq_kernel,
                dict(d, BLOCK_Q=128, BLOCK_K=32, BLOCK_M=64, TN=64, SEGMENTS=True, CAUSAL=True), warps=4, stages=2)
    for lvl in range(4):
        ok &= check(f"bwd_dkdv_l{lvl}", pk._pyramid_bwd_dkdv_kernel,
                    dict(d, LVL=lvl, BLOCK_Q=128, BLOCK_K=32, BLOCK_M=64, TNB=max(16, 32 >> lvl), SEGMENTS=True,
                         CAUSAL=True), warps=4, stages=2)
    ok &= check("estimator", pp._sampled_scores_kernel,
                dict(d, QB=4, SQ=32, SK=16, KC=128, JC=128, SOFTMAX=True, MEAN=False, CAUSAL=True, PERM=False, PARTS=2))
    ok &= check("estimator_perm", pp._sampled_scores_kernel,
                dict(d, QB=4, SQ=32, SK=16, KC=128, JC=128, SOFTMAX=False, MEAN=False, CAUSAL=False, PERM=True, PARTS=2))
    ok &= check("gather_rows", pp._gather_rows_kernel, dict(RB=64, HEAD_DIM=128, HEAD_DIM_PAD=128), warps=4)
    ok &= check("tile_order", pk._tile_order_kernel, dict(T_PAD=512), warps=4)
    ok &= check("planner", pp._pyramid_plan_kernel, dict(NK_PAD=512, NT_PAD=16, MODE=1), warps=8)
    ok &= _rectified()
    return 0 if ok else 1


RECT_PTRS = {n: "fp32" for n in ("QM", "KM", "VM", "DQ", "DK", "DKS", "RSCALE", "RBIAS", "PG", "DENSITY", "RFRAC")}
RECT_PTRS.update({n: "i32" for n in ("KCNT", "RCNT", "TV", "KV_COUNT", "TILE_ORDER", "DONE")})
RECT_PTRS.update(dict(KT="bf16", NBR="i1", FF="i1", RMAP="i8", LOGIT="fp32", TLSE="fp32", GAIN="i8"))


def _rectified() -> bool:
    """Rectified SpaAttn's statistics, scores and planner kernels (Wan 480p: 256 blocks, no text; with a
    text column) and the row-planner kernel, at the launchers' settings."""
    from visattn.kernels import _rectified_scores as rs
    from visattn.kernels import rectified as rk

    ok = check("rect_stats", rk._rectified_stats_kernel,
               dict(BLOCK=128, HEAD_DIM=128, HEAD_DIM_PAD=128, DC=rk.STATS_DC, UPSTREAM_TAIL=False),
               warps=rk.stats_warps(128, rk.STATS_DC), ptrs=RECT_PTRS)
    for name, text in (("rect_scores_wan", False), ("rect_scores_text", True)):
        c = dict(BLOCK=128, BM=rs.SCORE_TILE[0], BN=rs.SCORE_TILE[1], DK=32, TL=32, HEAD_DIM=128, HEAD_DIM_PAD=128,
                 PREC="tf32x3", HAS_TEXT_COL=text, IPAR=True, EXACT_TAIL=True, GAPR=True)
        ok &= check(name, rs._rectified_scores_kernel, c, warps=8, ptrs=RECT_PTRS)
    flags = dict(GAPR=True, HAS_NBR=True, KEEP_ALL=False, KEEP_PROBS=False)
    for name, bj, text in (("rect_plan_wan", 256, False), ("rect_plan_text", 256, True)):
        c = dict(flags, BLOCK=128, G=rk.PLAN_GROUP, BJ=bj, BT=16, DK=32, BV=256, BN=512 if text else 256, HEAD_DIM=128,
                 HEAD_DIM_PAD=128, PREC="tf32x3", HAS_TEXT_COL=text, HAS_TEXT_BLOCKS=text, HAS_FF=not text)
        ok &= check(name, rk._rectified_plan_kernel, c, warps=rk.PLAN_WARPS, ptrs=RECT_PTRS)
    # the row planner for 512-2047 visual blocks (HunyuanVideo 720p: 929), at its widest sorts
    from visattn.kernels import _rectified_rows as rr

    row_ptrs = {n: "fp32" for n in ("LOGIT", "TLSE", "RSCALE", "PG")}
    row_ptrs.update({n: "i32" for n in ("TV", "KV_INDEX", "KV_COUNT", "KCNT", "RCNT", "NBR", "FF")})
    row_ptrs.update(RMAP="i8", GAIN="i8")
    for bj in (1024, 2048):
        c = dict(BLOCK=128, BJ=bj, BT=16, HAS_TEXT_COL=True, HAS_TEXT_BLOCKS=True, GAPR=True, HAS_NBR=True,
                 HAS_FF=False, KEEP_ALL=False)
        ok &= check(f"rect_rows_{bj}", rr._rectified_row_plan_kernel, c, warps=8, ptrs=row_ptrs)
    return ok


if __name__ == "__main__":
    sys.exit(main())
