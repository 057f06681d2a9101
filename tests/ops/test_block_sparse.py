"""CPU tests of ``visattn.ops.block_sparse`` and ``BlockSparsePlan``.

Oracles: dense ``F.scaled_dot_product_attention`` (every block kept) and an independent float64
dense-mask computation (``_block_sparse_utils.dense_oracle``) check the reference; the reference
(float64, autograd) then checks the Triton kernels, which run here under ``TRITON_INTERPRET=1``
(set by ``tests/conftest.py``) on tiny shapes, and the FlexAttention backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import visattn
from visattn import BlockSparsePlan, block_sparse_attention, block_sparse_attention_ref
from visattn.ops import _dispatch

from ._block_sparse_utils import (
    assert_close,
    assert_no_nan,
    cdiv,
    dense_oracle,
    make_qkv,
    plan_block_mask,
    plan_from_random_mask,
)

CPU = torch.device("cpu")


def _triton_cpu_reasons() -> list[str]:
    return _dispatch.triton_reasons(CPU)


needs_interpreter = pytest.mark.skipif(
    bool(_triton_cpu_reasons()), reason=f"Triton cannot run on CPU tensors here: {_triton_cpu_reasons()}"
)

# bf16 is not run through the kernels here: Triton 3.9's interpreter multiplies the raw uint16 storage
# of bfloat16 operands in tl.dot (triton/runtime/interpreter.py, create_dot). The Triton backend must
# refuse bf16 CPU tensors or get them right (test_auto_backend_bf16_on_cpu_is_correct_or_refused);
# the bf16 kernels are compared with the reference on the GPU (test_block_sparse_cuda.py).


# =============================================================================================
# reference vs dense SDPA (every block kept)


@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
@pytest.mark.parametrize(
    "B, Nq, Nk, H, Hk, D, bq, bk, scale",
    [
        (2, 100, 100, 4, 2, 32, 16, 32, None),  # GQA, odd N, partial last blocks
        (1, 77, 77, 2, 2, 16, 32, 16, None),
        (2, 77, 100, 4, 4, 8, 128, 128, 0.3),  # one partial tile covers everything; N_q != N_k
        (3, 33, 17, 4, 1, 24, 16, 16, 1.7),  # MQA
    ],
)
def test_reference_matches_sdpa_when_every_block_is_kept(layout, B, Nq, Nk, H, Hk, D, bq, bk, scale):
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, D, layout=layout, dtype=torch.float64)
    plan = BlockSparsePlan.dense(Nq, Nk, bq, bk)
    out, lse = block_sparse_attention_ref(q, k, v, plan, scale=scale, layout=layout, return_lse=True)

    qh, kh, vh = (t.transpose(1, 2) if layout == "BNHD" else t for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    if layout == "BNHD":
        sdpa = sdpa.transpose(1, 2)
    s = scale if scale is not None else D**-0.5
    logits = qh @ kh.repeat_interleave(H // Hk, dim=1).transpose(-1, -2) * s
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert lse.shape == (B, H, Nq)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-12)


# =============================================================================================
# reference vs an independent dense-mask computation on random plans

REF_CASES = [
    # B, Nq, Nk, H, Hk, D, bq, bk, plan_shape, layout
    pytest.param(2, 100, 100, 2, 2, 16, 16, 16, "BH", "BNHD", id="per-batch-head"),
    pytest.param(2, 77, 50, 4, 2, 16, 32, 16, "1H", "BHND", id="per-head-gqa-nq!=nk"),
    pytest.param(3, 50, 77, 2, 1, 8, 16, 64, "B1", "BNHD", id="per-batch-mqa-bq!=bk"),
    pytest.param(1, 17, 130, 3, 3, 8, 64, 32, "11", "BHND", id="broadcast-single-tile"),
    pytest.param(2, 130, 9, 2, 2, 8, 16, 16, "BH", "BNHD", id="one-partial-key-block"),
]


@pytest.mark.parametrize("B, Nq, Nk, H, Hk, D, bq, bk, plan_shape, layout", REF_CASES)
def test_reference_matches_dense_mask_oracle(B, Nq, Nk, H, Hk, D, bq, bk, plan_shape, layout):
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, D, layout=layout, dtype=torch.float64)
    plan, mask = plan_from_random_mask(B, H, Nq, Nk, bq, bk, plan_shape)
    out, lse = block_sparse_attention_ref(q, k, v, plan, layout=layout, return_lse=True)
    want_out, want_lse = dense_oracle(q, k, v, mask, bq, bk, layout=layout)
    assert out.shape == q.shape and lse.shape == (B, H, Nq)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)  # -inf rows must match too
    empty = torch.isinf(want_lse)
    assert empty.any() or cdiv(Nq, bq) == 1, "the plan was meant to contain an empty row"
    assert (torch.isinf(lse) == empty).all() and (lse[empty] < 0).all()


@pytest.mark.parametrize("upcast", [True, False])
def test_reference_low_precision_input(upcast):
    q, k, v = make_qkv(2, 70, 45, 2, 1, 16, dtype=torch.float16)
    plan, mask = plan_from_random_mask(2, 2, 70, 45, 16, 16)
    out, lse = block_sparse_attention_ref(q, k, v, plan, return_lse=True, upcast=upcast)
    want_out, want_lse = dense_oracle(q, k, v, mask, 16, 16)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_close("out", out, want_out, dtype=torch.float16)
    assert_close("lse", lse, want_lse, dtype=torch.float16)
    if upcast:  # float64 math: only the final rounding to fp16 remains
        torch.testing.assert_close(out.double(), want_out, rtol=1e-3, atol=1e-3)


def test_reference_chunking_does_not_change_the_result():
    q, k, v = make_qkv(2, 100, 60, 2, 2, 8, dtype=torch.float64, layout="BHND")
    plan, _ = plan_from_random_mask(2, 2, 100, 60, 16, 32)
    whole = block_sparse_attention_ref(q, k, v, plan, layout="BHND", return_lse=True, chunk_rows=10**6)
    for rows in (1, 16, 40):  # one tile per chunk, and chunk boundaries inside the partial last tile
        part = block_sparse_attention_ref(q, k, v, plan, layout="BHND", return_lse=True, chunk_rows=rows)
        torch.testing.assert_close(part, whole, rtol=0, atol=0)


def test_reference_gradients_pass_gradcheck_with_empty_rows():
    q, k, v = make_qkv(1, 40, 36, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, True]])
    plan = BlockSparsePlan.from_mask(mask, 16, 16)

    def f(q, k, v):
        out, lse = block_sparse_attention_ref(q, k, v, plan, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


# =============================================================================================
# property test: the "torch" backend (the reference) vs the oracle on random small problems


@st.composite
def _problems(draw):
    B = draw(st.integers(1, 2))
    Hk = draw(st.integers(1, 2))
    H = Hk * draw(st.integers(1, 2))
    Nq = draw(st.integers(1, 70))
    Nk = draw(st.integers(1, 70))
    bq = draw(st.sampled_from([16, 32]))
    bk = draw(st.sampled_from([16, 32]))
    Bp = draw(st.sampled_from([1, B]))
    Hp = draw(st.sampled_from([1, H]))
    nq, nk = cdiv(Nq, bq), cdiv(Nk, bk)
    max_kv = draw(st.integers(0, nk + 2))
    # entries may repeat out-of-range values; in-range entries of a row are distinct, as documented
    rows = []
    for _ in range(Bp * Hp * nq):
        valid = draw(st.lists(st.integers(0, nk - 1), unique=True, max_size=max_kv))
        junk = draw(st.lists(st.sampled_from([-1, nk, nk + 3]), min_size=max_kv - len(valid),
                             max_size=max_kv - len(valid)))
        row = draw(st.permutations(valid + junk)) if max_kv else []
        rows.append(row)
    kv_index = torch.tensor(rows, dtype=torch.int32).reshape(Bp, Hp, nq, max_kv)
    kv_count = torch.tensor(draw(st.lists(st.integers(-1, max_kv + 2), min_size=Bp * Hp * nq,
                                          max_size=Bp * Hp * nq)), dtype=torch.int32).reshape(Bp, Hp, nq)
    layout = draw(st.sampled_from(["BNHD", "BHND"]))
    scale = draw(st.sampled_from([None, 0.25, 2.0]))
    return B, H, Hk, Nq, Nk, BlockSparsePlan(kv_index, kv_count, bq, bk), layout, scale


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_torch_backend_matches_oracle_property(problem):
    B, H, Hk, Nq, Nk, plan, layout, scale = problem
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, 8, layout=layout, dtype=torch.float64)
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, layout=layout, return_lse=True, backend="torch")
    mask = plan_block_mask(plan, cdiv(Nk, plan.block_k))
    want_out, want_lse = dense_oracle(q, k, v, mask, plan.block_q, plan.block_k, scale=scale, layout=layout)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


# =============================================================================================
# Triton backend (interpreter) vs the float64 reference: forward, LSE and gradients


def _check_triton(B, Nq, Nk, H, Hk, D, bq, bk, layout, dtype, plan_shape="BH", scale=None, plan=None):
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, D, layout=layout, dtype=dtype, requires_grad=True)
    if plan is None:
        plan, _ = plan_from_random_mask(B, H, Nq, Nk, bq, bk, plan_shape)
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, layout=layout, return_lse=True,
                                      backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Nq)

    # float64 reference and the reference run in the low precision (for the ratio rule)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_ref(*leaves64, plan, scale=scale, layout=layout, return_lse=True)
    leaves_lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    lo_out, lo_lse = block_sparse_attention_ref(*leaves_lo, plan, scale=scale, layout=layout, return_lse=True,
                                                upcast=False)

    finite = torch.isfinite(ref_lse)
    dout = torch.randn(out.shape, dtype=torch.float64)
    w = torch.randn(B, H, Nq, dtype=torch.float64)

    def loss(o, l):  # gradient through out and through the LSE of rows that attend something
        l = torch.where(finite, l.double(), torch.zeros_like(l, dtype=torch.float64))
        return (o.double() * dout).sum() + (l * w).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), leaves64)
    lo_grads = torch.autograd.grad(loss(lo_out, lo_lse), leaves_lo)

    assert_close("out", out, ref_out, dtype=dtype, low_ref=lo_out)
    assert_close("lse", lse, ref_lse, dtype=dtype, low_ref=lo_lse)
    for name, g, r, lo, t in zip(("dq", "dk", "dv"), grads, ref_grads, lo_grads, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape
        assert_close(name, g, r, dtype=dtype, low_ref=lo, grad=True)

    # rows that attend nothing: exact zeros, -inf LSE, zero dq
    empty = ~finite  # [B, H, Nq]
    out_bhnd = out.transpose(1, 2) if layout == "BNHD" else out
    dq_bhnd = grads[0].transpose(1, 2) if layout == "BNHD" else grads[0]
    assert (out_bhnd[empty] == 0).all() and (dq_bhnd[empty] == 0).all()
    assert (lse[empty] == float("-inf")).all()
    return plan


HEAD_DIM_CASES = [
    # B, Nq, Nk, H, Hk, D, bq, bk, layout, plan_shape
    pytest.param(2, 100, 77, 2, 1, 32, 16, 16, "BNHD", "BH", id="d32-16x16-BNHD-gqa"),
    pytest.param(1, 77, 130, 4, 2, 64, 32, 64, "BHND", "1H", id="d64-32x64-BHND-gqa4:2"),
    pytest.param(2, 130, 100, 2, 1, 96, 64, 32, "BNHD", "B1", id="d96-64x32-BNHD-gqa"),
    pytest.param(1, 50, 70, 2, 1, 128, 32, 32, "BHND", "11", id="d128-32x32-BHND-gqa"),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, Nq, Nk, H, Hk, D, bq, bk, layout, plan_shape", HEAD_DIM_CASES)
def test_triton_matches_reference_head_dims(B, Nq, Nk, H, Hk, D, bq, bk, layout, plan_shape, dtype):
    _check_triton(B, Nq, Nk, H, Hk, D, bq, bk, layout, dtype, plan_shape)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
@pytest.mark.parametrize("bq, bk", [(16, 16), (32, 64), (64, 32)], ids=["16x16", "32x64", "64x32"])
def test_triton_matches_reference_blocks_and_layouts(bq, bk, layout, dtype):
    # GQA in one layout, plain MHA in the other; N_q != N_k, both with partial last blocks
    Hk = 1 if layout == "BHND" else 2
    _check_triton(2, 70, 99, 2, Hk, 32, bq, bk, layout, dtype, "BH", scale=0.3 if bq == 64 else None)


@needs_interpreter
@pytest.mark.parametrize("Nq, Nk", [(5, 9), (1, 130), (130, 1)])
def test_triton_sequences_shorter_than_a_block(Nq, Nk):
    plan = BlockSparsePlan.dense(Nq, Nk, 32, 64)
    _check_triton(1, Nq, Nk, 2, 2, 16, 32, 64, "BNHD", torch.float32, plan=plan)


@needs_interpreter
def test_triton_plan_with_no_entries():
    B, N, H, D = 1, 40, 2, 32
    plan = BlockSparsePlan(torch.zeros(1, 1, 3, 0, dtype=torch.int32), torch.zeros(1, 1, 3, dtype=torch.int32),
                           16, 16)
    q, k, v = make_qkv(B, N, N, H, H, D, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    for g in grads:
        assert (g == 0).all()


@needs_interpreter
@pytest.mark.parametrize(
    "tail_branch, prefetch, tile",
    [(False, False, 32), (True, False, 16), (False, True, 16)],
    ids=["plain", "tail-branch-only", "prefetch-only"],
)
def test_triton_other_kernel_variants(monkeypatch, tail_branch, prefetch, tile):
    # the default interpreter tiles take tail_branch=prefetch=True; the GPU table may pick others, and
    # 16-wide tiles walk each 32/64-key plan block as several sub-tiles (fwd, dK/dV and dQ passes)
    from visattn.kernels import _configs

    monkeypatch.setitem(_configs.OVERRIDES, "fwd", _configs.TileConfig(tile, tile, 4, 1, tail_branch, prefetch))
    monkeypatch.setitem(_configs.OVERRIDES, "dkdv", _configs.TileConfig(16, 16, 4, 1))
    monkeypatch.setitem(_configs.OVERRIDES, "dq", _configs.TileConfig(16, 16, 4, 1))
    _check_triton(1, 70, 99, 2, 1, 32, 32, 64, "BNHD", torch.float32, "BH")


# A used entry naming a block that does not exist attends nothing; counts are clamped to [0, max_kv].
# 2**28 * block_k(16) = 2**32 wraps to 0 in int32 arithmetic: it must still attend nothing.
@needs_interpreter
@pytest.mark.parametrize("bad", [-1, -(2**31), 7, 1000, 2**28], ids=lambda b: f"entry={b}")
def test_triton_out_of_range_entries_attend_nothing(bad):
    B, Nq, Nk, H, D, bq, bk = 1, 70, 100, 2, 32, 16, 16
    nq, nk = cdiv(Nq, bq), cdiv(Nk, bk)  # 5, 7
    kv_index = torch.tensor(
        [[[0, bad, 3], [bad, bad, bad], [6, 2, bad], [1, 4, 5], [bad, 6, 0]],
         [[bad, 1, 2], [5, 6, bad], [0, 1, 2], [bad, 0, 1], [2, 3, 4]]], dtype=torch.int32)[None]
    kv_count = torch.tensor([[[3, 3, 2, 9, 3], [1, 3, -4, 3, 0]]], dtype=torch.int32)  # 9 > max_kv, -4 < 0
    plan = BlockSparsePlan(kv_index, kv_count, bq, bk)
    mask = plan_block_mask(plan, nk)
    assert torch.equal(plan.to_mask(nk), mask)
    q, k, v = make_qkv(B, Nq, Nk, H, H, D, dtype=torch.float64)
    want_out, want_lse = dense_oracle(q, k, v, mask, bq, bk)
    ref_out, ref_lse = block_sparse_attention_ref(q, k, v, plan, return_lse=True)
    torch.testing.assert_close(ref_out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_lse, want_lse, rtol=0, atol=1e-12)
    _check_triton(B, Nq, Nk, H, H, D, bq, bk, "BNHD", torch.float32, plan=plan)


_HUGE_INDEX_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from visattn import BlockSparsePlan, block_sparse_attention, block_sparse_attention_ref
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 1, 16) for _ in range(3))
    worst = 0.0
    for bad in (2**31 - 1, 2**27 + 1, 2**30):
        kv_index = torch.tensor([[[[bad, 1], [0, bad], [bad, bad]]]], dtype=torch.int32)
        plan = BlockSparsePlan(kv_index, torch.full((1, 1, 3), 2, dtype=torch.int32), 16, 16)
        out = block_sparse_attention(q, k, v, plan, backend="triton")
        ref = block_sparse_attention_ref(q, k, v, plan)
        worst = max(worst, (out - ref).abs().max().nan_to_num(float("inf")).item())
    print("max_err", worst)
    """
)


@needs_interpreter
def test_triton_huge_out_of_range_entries_are_memory_safe():
    # blk * BLOCK_K overflows int32 for these entries; a negative key offset would read before k/v
    # (the kernel docstring promises "a bad plan cannot read out of bounds"). Run in a subprocess so
    # that a segfault fails this test instead of killing the test session.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _HUGE_INDEX_SCRIPT], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, f"subprocess died with return code {proc.returncode}: {proc.stderr[-2000:]}"
    err = float(re.search(r"max_err (\S+)", proc.stdout).group(1))
    assert err <= 1e-4, f"huge out-of-range entries changed the output: max abs error {err}"


@needs_interpreter
@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
def test_triton_non_contiguous_inputs(layout):
    # q, k, v as views into one packed qkv tensor (the common projection layout)
    B, N, H, D = 2, 50, 2, 32
    shape = (B, N, 3, H, D) if layout == "BNHD" else (B, 3, H, N, D)
    qkv = torch.randn(shape, requires_grad=True)
    q, k, v = qkv.unbind(2 if layout == "BNHD" else 1)
    assert not q.is_contiguous()
    plan, _ = plan_from_random_mask(B, H, N, N, 16, 32)
    out = block_sparse_attention(q, k, v, plan, layout=layout, backend="triton")
    ref = block_sparse_attention_ref(q, k, v, plan, layout=layout)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * dout).sum(), qkv)
    (gr,) = torch.autograd.grad((ref * dout).sum(), qkv)
    assert_close("out", out, ref, dtype=torch.float32)
    assert_close("dqkv", g, gr, dtype=torch.float32, grad=True)


@needs_interpreter
def test_triton_gradient_without_return_lse():
    B, Nq, Nk, H, D = 2, 60, 45, 2, 32
    q, k, v = make_qkv(B, Nq, Nk, H, 1, D, requires_grad=True)
    plan, _ = plan_from_random_mask(B, H, Nq, Nk, 16, 16)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    assert isinstance(out, torch.Tensor)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_ref(*leaves, plan)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout).sum(), leaves)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, dtype=torch.float32, grad=True)


@needs_interpreter
def test_triton_lse_gradient_from_a_broadcast_upstream_gradient():
    # lse.sum() hands the backward an expanded (stride-0) gradient for the LSE
    B, N, H, D = 1, 40, 2, 16
    q, k, v = make_qkv(B, N, N, H, H, D, requires_grad=True)
    plan = BlockSparsePlan.dense(N, N, 16, 16)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_ref(*leaves, plan, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), leaves)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, dtype=torch.float32, grad=True)


@needs_interpreter
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_on_cpu_is_correct_or_refused(backend):
    # under TRITON_INTERPRET=1 "auto" prefers Triton for CPU tensors; for bf16 the interpreter's
    # tl.dot is wrong, so Triton must either refuse bf16 there (with a reason) or get it right
    q, k, v = make_qkv(1, 40, 40, 2, 2, 32, dtype=torch.bfloat16)
    plan = BlockSparsePlan.dense(40, 40, 16, 16)
    try:
        out = block_sparse_attention(q, k, v, plan, backend=backend)
    except NotImplementedError as e:
        assert backend == "triton", f"'auto' found no backend for bf16 CPU tensors: {e}"
        assert "bfloat16" in str(e), str(e)
        return
    ref = block_sparse_attention_ref(q, k, v, plan)
    low = block_sparse_attention_ref(q, k, v, plan, upcast=False)
    assert_close("out", out, ref, dtype=torch.bfloat16, low_ref=low)


# =============================================================================================
# other backends on the CPU: "torch" in low precision, "flex" (no grad)


def test_torch_backend_fp16_and_lse_dtype():
    q, k, v = make_qkv(2, 70, 50, 2, 1, 16, dtype=torch.float16)
    plan, mask = plan_from_random_mask(2, 2, 70, 50, 16, 32)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    want_out, want_lse = dense_oracle(q, k, v, mask, 16, 32)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_close("out", out, want_out, dtype=torch.float16)
    assert_close("lse", lse, want_lse, dtype=torch.float16)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "B, Nq, Nk, H, Hk, bq, bk, plan_shape, layout",
    [
        pytest.param(2, 77, 50, 4, 2, 32, 16, "1H", "BNHD", id="gqa-per-head-BNHD"),
        pytest.param(2, 100, 100, 2, 2, 16, 16, "BH", "BHND", id="per-batch-head-BHND"),
        pytest.param(1, 40, 130, 2, 1, 16, 64, "11", "BNHD", id="broadcast-mqa"),
    ],
)
def test_flex_backend_matches_reference(B, Nq, Nk, H, Hk, bq, bk, plan_shape, layout, dtype):
    q, k, v = make_qkv(B, Nq, Nk, H, Hk, 16, layout=layout, dtype=dtype)
    plan, _ = plan_from_random_mask(B, H, Nq, Nk, bq, bk, plan_shape)
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, plan, layout=layout, return_lse=True, backend="flex")
    ref_out, ref_lse = block_sparse_attention_ref(q, k, v, plan, layout=layout, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("out", out, ref_out, dtype=torch.float32)
    assert_close("lse", lse, ref_lse, dtype=torch.float32)
    assert torch.isinf(ref_lse).any()  # an empty row was exercised


def test_flex_backend_refuses_cpu_backward():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, requires_grad=True)
    plan = BlockSparsePlan.dense(40, 40, 16, 16)
    with pytest.raises(NotImplementedError, match="FlexAttention has no backward on the CPU"):
        block_sparse_attention(q, k, v, plan, backend="flex")


# =============================================================================================
# error paths: every message names the argument and the value


def _base(B=2, N=40, H=2, Hk=2, D=16, layout="BNHD"):
    q, k, v = make_qkv(B, N, N, H, Hk, D, layout=layout)
    return q, k, v, BlockSparsePlan.dense(N, N, 16, 16)


def _call(q, k, v, plan, **kw):
    return block_sparse_attention(q, k, v, plan, backend="torch", **kw)


ERROR_CASES = [
    ("q rank", lambda q, k, v, p: _call(q[0], k, v, p),
     "expected q of rank 4 in layout BNHD [B, N, H, D], got q.shape=(40, 2, 16)"),
    ("v rank BHND", lambda q, k, v, p: _call(q, k, v[..., None], p, layout="BHND"),
     "expected v of rank 4 in layout BHND [B, H, N, D], got v.shape=(2, 2, 40, 16, 1)"),
    ("layout", lambda q, k, v, p: _call(q, k, v, p, layout="BSHD"),
     "expected layout to be one of ('BNHD', 'BHND'), got layout='BSHD'"),
    ("layout case", lambda q, k, v, p: _call(q, k, v, p, layout="bnhd"), "got layout='bnhd'"),
    ("dtype mismatch", lambda q, k, v, p: _call(q, k.half(), v, p),
     "expected q, k and v to share one dtype, got q.dtype=torch.float32, k.dtype=torch.float16, "
     "v.dtype=torch.float32"),
    ("integer dtype", lambda q, k, v, p: _call(q.long(), k, v, p),
     "expected q.dtype in (float16, bfloat16, float32, float64), got q.dtype=torch.int64"),
    ("device mismatch", lambda q, k, v, p: _call(q, k.to("meta"), v, p),
     "expected q, k and v on one device, got q.device=cpu, k.device=meta, v.device=cpu"),
    ("head dim", lambda q, k, v, p: _call(q, k[..., :8], v[..., :8], p),
     "expected q, k and v to share the head dim (axis 3), got q.shape[3]=16, k.shape[3]=8, v.shape[3]=8"),
    ("batch", lambda q, k, v, p: _call(q, k[:1], v[:1], p),
     "expected q, k and v to share the batch size (axis 0), got q.shape[0]=2, k.shape[0]=1, v.shape[0]=1"),
    ("k vs v tokens", lambda q, k, v, p: _call(q, k, v[:, :30], p),
     "expected k and v to share the token count (axis 1), got k.shape[1]=40, v.shape[1]=30"),
    ("k vs v tokens BHND", lambda q, k, v, p: _call(q, k, v[:, :, :30], p, layout="BHND"),
     "expected k and v to share the token count (axis 2), got k.shape[2]=40, v.shape[2]=30"),
    ("k vs v heads", lambda q, k, v, p: _call(q, k, v[:, :, :1], p),
     "expected k and v to share the head count (axis 2), got k.shape[2]=2, v.shape[2]=1"),
    ("H % H_kv", lambda q, k, v, p: _call(torch.cat([q, q[:, :, :1]], 2), k, v, p),
     "expected the query heads to be a multiple of the key/value heads (axis 2), got q.shape[2]=3, "
     "k.shape[2]=2"),
    ("empty", lambda q, k, v, p: _call(q[:, :0], k, v, BlockSparsePlan.dense(1, 40, 16, 16)),
     "expected non-empty q/k/v"),
    ("plan type", lambda q, k, v, p: _call(q, k, v, p.to_mask(3)),
     "expected plan to be a visattn.ops.BlockSparsePlan, got plan=Tensor"),
    ("plan tiles", lambda q, k, v, p: _call(q, k, v, BlockSparsePlan.dense(80, 40, 16, 16)),
     "expected plan.kv_index.shape[2] == ceil(N_q / block_q) = ceil(40 / 16) = 3, got plan.kv_index.shape[2]=5"),
    ("plan batch", lambda q, k, v, p: _call(q, k, v, BlockSparsePlan.from_mask(torch.ones(3, 1, 3, 3) > 0, 16, 16)),
     "expected plan.kv_index.shape[0] in (1, B=2), got plan.kv_index.shape[0]=3"),
    ("plan heads", lambda q, k, v, p: _call(q, k, v, BlockSparsePlan.from_mask(torch.ones(1, 3, 3, 3) > 0, 16, 16)),
     "expected plan.kv_index.shape[1] in (1, H=2), got plan.kv_index.shape[1]=3"),
    ("plan device", lambda q, k, v, p: _call(q, k, v, p.to("meta")),
     "expected the plan on q's device cpu, got plan.device=meta"),
    ("scale zero", lambda q, k, v, p: _call(q, k, v, p, scale=0.0),
     "expected scale to be a finite positive float, got scale=0.0"),
    ("scale negative", lambda q, k, v, p: _call(q, k, v, p, scale=-1),
     "expected scale to be a finite positive float, got scale=-1"),
    ("scale nan", lambda q, k, v, p: _call(q, k, v, p, scale=float("nan")),
     "expected scale to be a finite positive float, got scale=nan"),
    ("scale inf", lambda q, k, v, p: _call(q, k, v, p, scale=float("inf")),
     "expected scale to be a finite positive float, got scale=inf"),
    ("scale tensor", lambda q, k, v, p: _call(q, k, v, p, scale=torch.tensor(0.5)),
     "expected scale to be a Python float or None, got scale=tensor(0.5000)"),
    ("backend name", lambda q, k, v, p: block_sparse_attention(q, k, v, p, backend="nonsense"),
     "expected backend to be 'auto' or one of ['triton', 'torch', 'flex'], got backend='nonsense'"),
]


@pytest.mark.parametrize("case, fn, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_op_errors(case, fn, message):
    layout = "BHND" if "BHND" in case else "BNHD"
    q, k, v, plan = _base(layout=layout)
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(q, k, v, plan)



def test_triton_refuses_float64_with_reasons():
    q, k, v, plan = _base()
    q, k, v = q.double(), k.double(), v.double()
    with pytest.raises(NotImplementedError) as info:
        block_sparse_attention(q, k, v, plan, backend="triton")
    msg = str(info.value)
    assert msg.startswith("No visattn backend can run block sparse attention for these inputs.")
    assert "q: shape=(2, 40, 2, 16) dtype=torch.float64 device=cpu" in msg  # the input summary
    assert re.search(r"backend 'triton':\n\s+- dtype torch.float64 is not supported", msg), msg
    assert "backend 'torch'" not in msg  # only the requested backend is listed


def test_unimplemented_backend_name():
    q, k, v, plan = _base()
    with pytest.raises(NotImplementedError, match=r"backend 'natten' is not implemented for block_sparse"):
        block_sparse_attention(q, k, v, plan, backend="natten")


def test_auto_failure_lists_every_backend_tried():
    # meta tensors: Triton cannot run them, and "auto" may pick the reference only for CPU tensors
    q, k, v, plan = _base()
    q, k, v, plan = q.to("meta"), k.to("meta"), v.to("meta"), plan.to("meta")
    with pytest.raises(NotImplementedError) as info:
        block_sparse_attention(q, k, v, plan)
    lines = str(info.value).splitlines()
    assert lines[0] == "No visattn backend can run block sparse attention for these inputs."
    assert lines[1].startswith("  inputs: q: shape=(2, 40, 2, 16) dtype=torch.float32 device=meta")
    text = "\n".join(lines)
    assert re.search(r"  backend 'triton':\n    - device type 'meta' is not supported", text), text
    assert re.search(r"  backend 'torch':\n    - 'auto' picks the 'torch' backend only for cpu tensors, got "
                     r"device=meta", text), text
    assert "'flex'" not in text  # comparison backends are never tried by "auto"
    assert lines[-1].startswith("Most likely fix:")


# =============================================================================================
# use_backend


def test_use_backend_restores_the_previous_backend():
    assert _dispatch.current_backend() == "auto"
    with visattn.use_backend("torch"):
        assert _dispatch.current_backend() == "torch"
        with visattn.use_backend(_dispatch.BackendName.FLEX):
            assert _dispatch.current_backend() == "flex"
        assert _dispatch.current_backend() == "torch"
    assert _dispatch.current_backend() == "auto"


def test_use_backend_restores_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with visattn.use_backend("torch"):
            raise RuntimeError("boom")
    assert _dispatch.current_backend() == "auto"


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=re.escape("got name='bogus'")):
        with visattn.use_backend("bogus"):
            pass
    assert _dispatch.current_backend() == "auto"


def test_use_backend_steers_dispatch():
    q, k, v, plan = _base()
    q, k, v = q.double(), k.double(), v.double()
    block_sparse_attention(q, k, v, plan)  # "auto" falls through to the reference for float64
    with visattn.use_backend("triton"):
        with pytest.raises(NotImplementedError, match="dtype torch.float64 is not supported"):
            block_sparse_attention(q, k, v, plan)
        out = block_sparse_attention(q, k, v, plan, backend="torch")  # an explicit backend wins
    want, _ = dense_oracle(q, k, v, plan_block_mask(plan, 3), 16, 16)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_no_nan_helper_detects_nan():
    with pytest.raises(AssertionError, match="NaN"):
        assert_no_nan("x", torch.tensor([0.0, float("nan")]))
