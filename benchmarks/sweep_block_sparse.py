"""GPU script: correctness at real sizes, then tile sweeps of the block-sparse kernels.

Usage (on the GPU machine, from the repo root):
    PYTHONPATH=. python benchmarks/sweep_block_sparse.py --out $OUT [--quick]

Prints tables of ms per tile configuration (fwd, dK/dV, dQ) on the Wan 480p shape at density 1.0
and 0.15, and relative errors vs a float64 reference on smaller shapes. Notes go to NOTES.md by hand.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl
import triton.testing

from visattn.kernels import _configs
from visattn.kernels._configs import TileConfig
from visattn.ops import BlockSparsePlan, block_sparse_attention, block_sparse_attention_ref


@triton.jit
def _dense_fwd(Q, K, V, O, N, H, stride_n, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    # calibration only: the plain flash-attention forward of Triton's tutorial, no sparsity
    pid_m, pid_h = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = pid_h * HEAD_DIM
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N - BLOCK_N + 1, BLOCK_N):
        kk = tl.load(K + base + (start + offs_n)[:, None] * stride_n + offs_d[None, :])
        vv = tl.load(V + base + (start + offs_n)[:, None] * stride_n + offs_d[None, :])
        qk = tl.dot(q, tl.trans(kk))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vv.dtype), vv, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * stride_n + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=offs_m[:, None] < N)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def correctness(log):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (32, 64, 96, 128):
            B, N, H = 2, 1000, 4
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            plan = BlockSparsePlan.from_mask(torch.rand(B, H, 8, 8, generator=gen) < 0.4, 128, 128).to("cuda")
            out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
            g = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            r, rl = block_sparse_attention_ref(q64, k64, v64, plan, return_lse=True)
            rq, rk, rv = torch.autograd.grad(r, (q64, k64, v64), g.double())
            # the same reference run in the low precision: the error budget
            lo = block_sparse_attention_ref(q.detach(), k.detach(), v.detach(), plan, upcast=False)
            fin = torch.isfinite(rl)
            log(f"{str(dtype):>15} D={D:3d}: out {rel(out, r):.2e} (ref-lowp {rel(lo, r):.2e}) "
                f"lse {float((lse - rl).abs()[fin].max()):.2e} dq {rel(dq, rq):.2e} dk {rel(dk, rk):.2e} "
                f"dv {rel(dv, rv):.2e} nan={bool(out.isnan().any() or dq.isnan().any())}")


def time_cfgs(kind, cfgs, q, k, v, plan, log, results):
    g = torch.randn_like(q)
    for cfg in cfgs:
        _configs.OVERRIDES.clear()
        _configs.OVERRIDES[kind] = cfg
        try:
            if kind == "fwd":
                fn = lambda: block_sparse_attention(q, k, v, plan, backend="triton")  # noqa: E731
                with torch.no_grad():
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            else:
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = block_sparse_attention(qq, kk, vv, plan, backend="triton")

                def fn():
                    torch.autograd.grad(out, (qq, kk, vv), g, retain_graph=True)
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a config that does not fit shared memory, etc.
            log(f"  {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:120]}")
            continue
        log(f"  {kind} {cfg}: {ms:.3f} ms")
        results.append({"kind": kind, "cfg": cfg.__dict__, "ms": ms})
    _configs.OVERRIDES.clear()


def bwd_grid(q, k, v, log, results):
    N = q.shape[1]
    dkdv = [TileConfig(*c) for c in [(64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 2),
                                      (32, 64, 4, 2)]]
    dq = [TileConfig(*c) for c in [(128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 3),
                                    (64, 128, 4, 2)]]
    g = torch.randn_like(q)
    for density in (1.0, 0.15):
        plan = BlockSparsePlan.random(N, N, density, generator=torch.Generator().manual_seed(0), device="cuda")
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = block_sparse_attention(qq, kk, vv, plan, backend="triton")
        for a in dkdv:
            for b in dq:
                _configs.OVERRIDES.clear()
                _configs.OVERRIDES.update(dkdv=a, dq=b)
                try:
                    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (qq, kk, vv), g, retain_graph=True),
                                                 warmup=25, rep=100, return_mode="median")
                except Exception as e:
                    log(f"  {density} {a} {b}: FAILED {type(e).__name__}")
                    continue
                log(f"  bwd density {density}: dkdv {a.block_m}x{a.block_n} w{a.num_warps} s{a.num_stages} | "
                    f"dq {b.block_m}x{b.block_n} w{b.num_warps} s{b.num_stages}: {ms:.3f} ms")
                results.append({"density": density, "dkdv": a.__dict__, "dq": b.__dict__, "ms": ms})
    _configs.OVERRIDES.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bwd-grid", action="store_true", help="time dK/dV x dQ tile pairs only")
    args = ap.parse_args()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if not args.quick:
        correctness(log)
    B, H, N, D = 1, 12, 32760, 128
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
        dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
                                        warmup=25, rep=100, return_mode="median")
    log(f"cuDNN dense fwd: {dense:.3f} ms")
    for bm, bn, w, st in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)):
        o = torch.empty_like(q)
        grid = (triton.cdiv(N, bm), B * H)
        fn = lambda: _dense_fwd[grid](q, k, v, o, N, H, q.stride(1), D ** -0.5 * 1.4426950408889634,
                                      BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, num_warps=w, num_stages=st)  # noqa
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        log(f"plain dense triton fwd calibration {bm}x{bn} w{w} s{st}: {ms:.3f} ms ({dense / ms:.2f}x cuDNN)")
    results = []
    if args.bwd_grid:
        bwd_grid(q, k, v, log, results)
        with open(f"{args.out}/bwd_grid.json", "w") as f:
            json.dump(results, f, indent=1)
        return
    fwd_cfgs = [TileConfig(m, n, w, s, tb, pf) for m, n, w, s in [(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3)]
                for tb in (True, False) for pf in (False, True)]
    dkdv_cfgs = [TileConfig(m, n, w, s) for m, n, w, s in [
        (64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
        (64, 64, 8, 3)]]
    dq_cfgs = [TileConfig(m, n, w, s) for m, n, w, s in [
        (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 2)]]
    if args.quick:
        dkdv_cfgs, dq_cfgs = dkdv_cfgs[:1], dq_cfgs[:1]
    for density in (1.0, 0.15):
        plan = BlockSparsePlan.random(N, N, density, generator=torch.Generator().manual_seed(0), device="cuda")
        log(f"density {float(plan.density(N, N)):.3f}")
        time_cfgs("fwd", fwd_cfgs, q, k, v, plan, log, results)
        # backward sweeps: fix the other kernel at its default while sweeping one
        time_cfgs("dkdv", dkdv_cfgs, q, k, v, plan, log, results)
        time_cfgs("dq", dq_cfgs, q, k, v, plan, log, results)
    with open(f"{args.out}/sweep.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{args.out}/sweep.log", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
