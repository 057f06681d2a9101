"""GPU tests of block-sparse attention at real sizes (run with ``pytest -m cuda`` on a CUDA machine).

Pass rule (DESIGN §5, flash-attn style): the Triton error against the float64 reference is at most
2x the error of the reference itself run in the same low precision, with per-dtype floors.
"""

from __future__ import annotations

import pytest
import torch

from visattn import BlockSparsePlan, block_sparse_attention, block_sparse_attention_ref

from ._block_sparse_utils import FLOORS, assert_close, assert_no_nan, cdiv, make_qkv, random_block_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


def _plan(B, H, Nq, Nk, bq, bk, density=0.3, plan_shape="BH", device="cuda"):
    Bp = B if plan_shape[0] == "B" else 1
    Hp = H if plan_shape[1] == "H" else 1
    mask = random_block_mask(Bp, Hp, cdiv(Nq, bq), cdiv(Nk, bk), density=density)
    return BlockSparsePlan.from_mask(mask.to(device), bq, bk)


def _fwd_bwd(fn, leaves, plan, layout, dout, w, finite, **kw):
    out, lse = fn(*leaves, plan, layout=layout, return_lse=True, **kw)
    l = torch.where(finite, lse.double(), torch.zeros_like(lse, dtype=torch.float64))
    loss = (out.double() * dout).sum() + (l * w).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize(
    "B, Nq, Nk, H, Hk, bq, bk, layout, plan_shape",
    [
        pytest.param(2, 1000, 1000, 4, 4, 64, 64, "BNHD", "BH", id="N1000-64x64-BNHD"),
        pytest.param(2, 1000, 777, 4, 2, 128, 64, "BHND", "1H", id="N1000x777-128x64-BHND-gqa"),
        pytest.param(2, 4096, 4096, 4, 2, 128, 128, "BNHD", "BH", id="N4096-128x128-BNHD-gqa"),
    ],
)
def test_triton_matches_reference_at_real_sizes(B, Nq, Nk, H, Hk, bq, bk, layout, plan_shape, D, dtype):
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, D, layout=layout, dtype=dtype, device="cuda", requires_grad=True)
    plan = _plan(B, H, Nq, Nk, bq, bk, plan_shape=plan_shape)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        finite = torch.isfinite(block_sparse_attention_ref(*leaves64, plan, layout=layout, return_lse=True)[1])
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    w = torch.randn(B, H, Nq, device="cuda", dtype=torch.float64)

    out, lse, grads = _fwd_bwd(block_sparse_attention, [q, k, v], plan, layout, dout, w, finite, backend="triton")
    ref_out, ref_lse, ref_grads = _fwd_bwd(block_sparse_attention_ref, leaves64, plan, layout, dout, w, finite)
    lo_out, lo_lse, lo_grads = _fwd_bwd(block_sparse_attention_ref, leaves_lo, plan, layout, dout, w, finite,
                                        upcast=False)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, ref_out, dtype=dtype, low_ref=lo_out)
    assert_close("lse", lse, ref_lse, dtype=dtype, low_ref=lo_lse)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, lo_grads):
        assert_close(name, g, r, dtype=dtype, low_ref=lo, grad=True)


def _compile_inputs(dtype=torch.float16, B=2, N=1000, H=4, Hk=2, D=64, bq=64, bk=64):
    q, k, v = make_qkv(B, N, N, H, Hk, D, dtype=dtype, device="cuda", requires_grad=True)
    return q, k, v, _plan(B, H, N, N, bq, bk)


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, plan = _compile_inputs()

    def f(q, k, v, plan):
        out, lse = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True)
        return out * 2.0, lse

    compiled = torch.compile(f, fullgraph=True)
    out_c, lse_c = compiled(q, k, v, plan)
    dout = torch.randn_like(out_c)
    grads_c = torch.autograd.grad((out_c * dout).sum(), (q, k, v))
    out_e, lse_e = f(q, k, v, plan)
    grads_e = torch.autograd.grad((out_e * dout).sum(), (q, k, v))
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        assert_no_nan("grad", gc)
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


def test_torch_compile_fullgraph_with_the_plan_built_inside():
    q, k, v, plan = _compile_inputs()

    @torch.compile(fullgraph=True)
    def f(q, k, v, kv_index, kv_count):
        p = BlockSparsePlan(kv_index, kv_count, 64, 64)
        return block_sparse_attention(q, k, v, p, backend="triton")

    out = f(q, k, v, plan.kv_index, plan.kv_count)
    (dq,) = torch.autograd.grad(out.float().sum(), (q,))
    want = block_sparse_attention(q, k, v, plan, backend="triton")
    (dq_want,) = torch.autograd.grad(want.float().sum(), (q,))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(dq, dq_want, rtol=0, atol=0)


def test_cuda_graph_capture_of_the_forward():
    q, k, v, plan = _compile_inputs()
    q, k, v = q.detach(), k.detach(), v.detach()
    block_sparse_attention(q, k, v, plan, backend="triton")  # warm-up: compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        block_sparse_attention(q, k, v, plan, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True)

    for _ in range(2):  # new inputs copied into the captured buffers, then replay
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)
        torch.testing.assert_close(static_lse, want_lse, rtol=0, atol=0)


def test_cuda_graph_capture_of_forward_and_backward():
    q, k, v, plan = _compile_inputs()
    dout = torch.randn_like(q)

    def step():
        out = block_sparse_attention(q, k, v, plan, backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for g, want in zip(static_grads, step()):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
def test_flex_matches_triton(dtype, layout):
    B, N, H, Hk, D = 2, 1000, 4, 2, 64
    q, k, v = make_qkv(B, N, N, H, Hk, D, layout=layout, dtype=dtype, device="cuda")
    plan = _plan(B, H, N, N, 128, 128, plan_shape="1H")
    out_f, lse_f = block_sparse_attention(q, k, v, plan, layout=layout, return_lse=True, backend="flex")
    out_t, lse_t = block_sparse_attention(q, k, v, plan, layout=layout, return_lse=True, backend="triton")
    ref_out, ref_lse = block_sparse_attention_ref(q, k, v, plan, layout=layout, return_lse=True)
    lo_out = block_sparse_attention_ref(q, k, v, plan, layout=layout, upcast=False)
    assert_close("flex out", out_f, ref_out, dtype=dtype, low_ref=lo_out)
    assert_close("triton out", out_t, ref_out, dtype=dtype, low_ref=lo_out)
    assert_close("flex lse", lse_f, ref_lse, dtype=dtype)
    assert_close("triton lse", lse_t, ref_lse, dtype=dtype)
    floor = 2 * FLOORS[dtype]  # two approximations of one result
    torch.testing.assert_close(out_t.float(), out_f.float(), rtol=0, atol=floor)


def test_auto_on_cuda_picks_triton():
    from visattn.ops import _dispatch

    q, k, v, plan = _compile_inputs()
    assert _dispatch.select("block_sparse", "auto", q.device, "", q, k, v, plan).name == "triton"
