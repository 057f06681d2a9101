"""GPU tests of PSA at real sizes (``pytest -m cuda`` on a CUDA machine).

Pass rule (DESIGN §5): the Triton error against the float64 reference is at most 2x the error of the
reference itself run in the same low precision, with per-dtype floors. Plans come from random level
maps (every level set, every b_k incl. upstream's merge-bug cases) and from the planner.
"""

from __future__ import annotations

import pytest
import torch

from visattn.ops import (
    PyramidConfig,
    PyramidPlan,
    SequenceLayout,
    pyramid_attention,
    pyramid_attention_ref,
    pyramid_plan,
)

from ._block_sparse_utils import assert_close, assert_no_nan
from ._pyramid_utils import cdiv, random_level_map

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float16, torch.bfloat16]


def _fwd_bwd(fn, leaves, plan, dout, w, finite, **kw):
    out, lse = (
        fn(*leaves, plan=plan, return_lse=True, **kw)
        if fn is pyramid_attention
        else fn(*leaves, plan, return_lse=True, **kw)
    )
    l_ = torch.where(finite, lse.double(), torch.zeros_like(lse, dtype=torch.float64))
    loss = (out.double() * dout).sum() + (l_ * w).sum()
    grads = torch.autograd.grad(loss, leaves) if all(t.requires_grad for t in leaves) else None
    return out, lse, grads


def _check(q, k, v, plan, dtype, grads=True, rows_ok=None, **kw):
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        finite = torch.isfinite(pyramid_attention_ref(*leaves64, plan, return_lse=True)[1])
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    w = torch.randn(finite.shape, device="cuda", dtype=torch.float64)
    if rows_ok is not None:  # padded text queries are ignored
        dout = dout * rows_ok[:, :, None, None]
        w = w * rows_ok[:, None, :]
    out, lse, g = _fwd_bwd(pyramid_attention, [q, k, v], plan, dout, w, finite, backend="triton", **kw)
    ro, rl, rg = _fwd_bwd(pyramid_attention_ref, leaves64, plan, dout, w, finite)
    lo, ll, lg = _fwd_bwd(pyramid_attention_ref, leaves_lo, plan, dout, w, finite, upcast=False)
    sel = (lambda t: t[rows_ok]) if rows_ok is not None else (lambda t: t)
    sel_l = (lambda t: t.transpose(1, 2)[rows_ok]) if rows_ok is not None else (lambda t: t)
    assert_no_nan("out", out)
    assert_close("out", sel(out), sel(ro), dtype=dtype, low_ref=sel(lo))
    assert_close("lse", sel_l(lse), sel_l(rl), dtype=dtype, low_ref=sel_l(ll))
    if grads:
        for name, a, b, c in zip(("dq", "dk", "dv"), g, rg, lg, strict=False):
            assert_close(name, a, b, dtype=dtype, low_ref=c, grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize(
    "bq, bk, factors",
    [
        (128, 128, (1, 2, 4, 8)),
        (128, 64, (1, 8)),
        (64, 32, (4, 8)),
        (128, 32, (1, 2, 4, 8)),
        (64, 64, (8,)),
        (128, 128, (1,)),
        (128, 64, (1, 2)),
    ],
)
def test_random_plans_real_sizes(dtype, D, bq, bk, factors):
    B, N, H = 2, 4097, 3
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    lmap = random_level_map(B, H, cdiv(N, bq), cdiv(N, bk), factors, p_skip=0.6).cuda()
    _check(q, k, v, PyramidPlan.from_dense(lmap, block_q=bq, block_k=bk, seq_len=N), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("pos, text_len", [("end", 256), ("start", 226)])
def test_planned_text_segments(dtype, pos, text_len):
    lay = SequenceLayout(
        (4, 30, 52),
        text_len=text_len,
        text_position=pos,
        text_valid_len=torch.tensor([text_len, 77], device="cuda"),
    )
    N = lay.seq_len
    q, k, v = (torch.randn(2, N, 2, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    plan = pyramid_plan(q, k, config=PyramidConfig.from_preset("wan21_14b"), seq_layout=lay)
    rows_ok = torch.ones(2, N, dtype=torch.bool, device="cuda")
    rows_ok[1, lay.text_start + 77 : lay.text_start + text_len] = False
    _check(q, k, v, plan, dtype, rows_ok=rows_ok, seq_layout=lay)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_causal_variant(dtype):
    q, k, v = (torch.randn(1, 3000, 4, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    plan = pyramid_plan(q, k, config=PyramidConfig.from_preset("qwen25vl_videomme"))
    _check(q, k, v, plan, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_large_forward(dtype):
    q, k, v = (torch.randn(1, 16384, 2, 128, device="cuda", dtype=dtype) for _ in range(3))
    plan = pyramid_plan(q, k, config=PyramidConfig())
    _check(q, k, v, plan, dtype, grads=False)


def test_planning_and_attention_do_not_sync():
    q, k, v = (torch.randn(1, 8192, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = SequenceLayout((2, 64, 60), text_len=512, text_valid_len=torch.tensor([300], device="cuda"))
    for cfg in (
        PyramidConfig(),
        PyramidConfig.from_preset("wan21_1p3b"),
        PyramidConfig.from_preset("qwen25vl_videomme"),
    ):
        pyramid_attention(q, k, v, config=cfg, seq_layout=None if cfg.causal else lay)  # warm-up / compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pyramid_attention(q, k, v, config=cfg, seq_layout=None if cfg.causal else lay)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_of_plan_and_attention():
    q, k, v = (torch.randn(1, 4096, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    f = lambda: pyramid_attention(q, k, v, config=PyramidConfig())  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = f()
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, f(), rtol=0, atol=0)


def test_torch_compile_fullgraph_with_a_plan():
    q, k, v = (
        torch.randn(1, 2048, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)
    )
    plan = pyramid_plan(q, k, config=PyramidConfig())

    @torch.compile(fullgraph=True)
    def f(q, k, v, kv_index, level_ptr):
        p = PyramidPlan(kv_index, level_ptr, plan.block_q, plan.block_k, plan.seq_len)
        return pyramid_attention(q, k, v, plan=p, backend="triton")

    out = f(q, k, v, plan.kv_index, plan.level_ptr)
    want = pyramid_attention(q, k, v, plan=plan, backend="triton")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    (dq,) = torch.autograd.grad(out.float().sum(), (q,))
    (dq_want,) = torch.autograd.grad(want.float().sum(), (q,))
    torch.testing.assert_close(dq, dq_want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bq, bk, estimator, reduce, causal, text",
    [
        (128, 64, "sampled_max", "max", False, 0),  # 16 sampled keys per block, chunk order
        (128, 128, "sampled_max", "max", False, 77),  # 32 per block, text at the end
        (64, 32, "sampled_softmax_max", "mean", True, 0),  # 8 per block, causal
        (128, 64, "sampled_softmax_max", "max", False, 0),
    ],
)
def test_triton_estimator_matches_torch(bq, bk, estimator, reduce, causal, text):
    """The GPU estimator (128-key chunks in the chunk order, q read in place, fused normalisation)
    against the chunked torch estimator on the same sampled rows, at sizes with a partial last chunk."""
    g = torch.Generator(device="cuda").manual_seed(3)
    lay = SequenceLayout((5, 9, 23), text_len=text) if text else None
    N = 5 * 9 * 23 + text
    q, k = (torch.randn(2, N, 3, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    cfg = PyramidConfig(block_q=bq, block_k=bk, estimator=estimator, reduce=reduce, causal=causal)
    a = pyramid_plan(q, k, config=cfg, seq_layout=lay, keep_scores=True, backend="torch")
    b = pyramid_plan(q, k, config=cfg, seq_layout=lay, keep_scores=True, backend="triton")
    torch.testing.assert_close(b.scores, a.scores, atol=2e-6, rtol=1e-4)
