"""PSA's Triton path (interpreter on the CPU, the GPU when present) against the reference:
forward, LSE and gradients through the op, with text segments, causal, layouts and B > 1."""

from __future__ import annotations

import pytest
import torch

from visattn.kernels import _configs
from visattn.ops import (
    PyramidConfig,
    PyramidPlan,
    SequenceLayout,
    pyramid_attention,
    pyramid_attention_ref,
    pyramid_plan,
)

from ._pyramid_utils import cdiv, max_abs, random_level_map

TOL = 5e-5  # fp32 kernel vs float64 reference at these sizes


def _grads(fn, q, k, v, do, dl):
    for t in (q, k, v):
        t.grad = None
    out, lse = fn()
    fin = torch.isfinite(lse)
    ((out.float() * do).sum() + (torch.where(fin, lse, 0.0) * dl).sum()).backward()
    return out.detach(), lse.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def _compare(device, q, k, v, plan, lay=None, layout="BNHD", rows_ok=None):
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    plan = plan.to(device)
    if lay is not None:  # the moved plan's layout (a layout's text-length tensor is compared by identity)
        lay = plan.seq_layout
    g = torch.Generator().manual_seed(11)
    do = torch.randn(q.shape, generator=g).to(device)
    B, H = q.shape[0], q.shape[2] if layout == "BNHD" else q.shape[1]
    dl = torch.randn(B, H, q.shape[1] if layout == "BNHD" else q.shape[2], generator=g).to(device)
    got = _grads(
        lambda: pyramid_attention(
            q, k, v, plan=plan, seq_layout=lay, layout=layout, backend="triton", return_lse=True
        ),
        q,
        k,
        v,
        do,
        dl,
    )
    want = _grads(
        lambda: pyramid_attention_ref(q, k, v, plan, layout=layout, return_lse=True), q, k, v, do, dl
    )
    if rows_ok is not None:  # padded text query rows: finite, ignored
        assert torch.isfinite(got[0]).all()
        got = (got[0][rows_ok], got[1].transpose(1, 2)[rows_ok], got[2])
        want = (want[0][rows_ok], want[1].transpose(1, 2)[rows_ok], want[2])
    assert max_abs(got[0], want[0]) < TOL
    fin = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(got[1]), fin) and max_abs(got[1][fin], want[1][fin]) < TOL
    for name, a, b in zip("qkv", got[2], want[2], strict=False):
        assert max_abs(a, b) < 4 * TOL, f"d{name}"


@pytest.mark.parametrize(
    "N, bq, bk, factors, layout",
    [
        (150, 32, 16, (1, 2, 4, 8), "BNHD"),
        (97, 16, 32, (4, 8), "BHND"),  # upstream's merge-bug case b_k = 32 with x4/x8
        (130, 32, 64, (1, 8), "BNHD"),  # b_k = 64 with x8
    ],
)
def test_triton_matches_reference_random_plans(device, N, bq, bk, factors, layout):
    g = torch.Generator().manual_seed(N)
    B, H, D = 2, 2, 16
    shape = (B, N, H, D) if layout == "BNHD" else (B, H, N, D)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    lmap = random_level_map(B, H, cdiv(N, bq), cdiv(N, bk), factors, gen=g)
    _compare(device, q, k, v, PyramidPlan.from_dense(lmap, block_q=bq, block_k=bk, seq_len=N), layout=layout)


@pytest.mark.parametrize("pos", ["start", "end"])
def test_triton_text_segments_with_valid_lengths(device, pos):
    lay = SequenceLayout((2, 5, 9), text_len=23, text_position=pos, text_valid_len=torch.tensor([23, 7]))
    N = lay.seq_len
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, N, 1, 16, generator=g) for _ in range(3))
    cfg = PyramidConfig(levels={1: 0.2, 2: 0.4, 4: 0.6, 8: 0.8}, align="none")._with_blocks(32, 16)
    plan = pyramid_plan(q, k, config=cfg, seq_layout=lay)
    rows_ok = torch.ones(2, N, dtype=torch.bool)
    rows_ok[1, lay.text_start + 7 : lay.text_start + 23] = False
    _compare(device, q, k, v, plan, lay=lay, rows_ok=rows_ok)


def test_triton_video_only_layout_runs_the_plain_path(device):
    """A layout without text (Wan's self-attention) runs the kernels without segments: same blocks cut
    from 0, a partial last block, gradients included."""
    from visattn.ops.pyramid import _kernel_args, _segments

    lay = SequenceLayout((3, 5, 9))
    N = lay.seq_len
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, N, 2, 16, generator=g) for _ in range(3))
    cfg = PyramidConfig(levels={1: 0.2, 2: 0.4, 4: 0.6, 8: 0.8}, align="none")._with_blocks(32, 32)
    plan = pyramid_plan(q, k, config=cfg, seq_layout=lay)
    seg, tv, use = _kernel_args(plan, 2, device)
    assert _segments(*seg, tv, use) is None  # the kernels get no segments
    _compare(device, q, k, v, plan, lay=lay)


def test_triton_causal_variant(device):
    g = torch.Generator().manual_seed(4)
    N = 120
    q, k, v = (torch.randn(1, N, 2, 16, generator=g) for _ in range(3))
    cfg = PyramidConfig(
        levels={1: 0.3, 2: 0.5, 4: 0.7, 8: 0.9}, align="none", causal=True, mode="thresholdbound"
    )._with_blocks(16, 32)
    _compare(device, q, k, v, pyramid_plan(q, k, config=cfg))


def test_triton_plans_itself_and_returns_plan(device):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 200, 2, 16, generator=g).to(device) for _ in range(3))
    cfg = PyramidConfig()._with_blocks(32, 32)
    out, plan = pyramid_attention(q, k, v, config=cfg, backend="triton", return_plan=True)
    assert isinstance(plan, PyramidPlan)
    assert max_abs(out, pyramid_attention_ref(q, k, v, plan)) < TOL


def test_triton_gradients_keep_the_inputs_memory_format(device):
    # the custom op's fake returns empty_like(q/k/v): torch.compile checks the real strides against it
    # (dk/dv used to come back as [B, H, N, D] buffers viewed as [B, N, H, D], failing on the GPU)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 96, 2, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    plan = pyramid_plan(q, k, config=PyramidConfig()._with_blocks(32, 32))
    out = pyramid_attention(q, k, v, plan=plan, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [t.stride() for t in grads] == [t.stride() for t in (q, k, v)]


@pytest.mark.parametrize("pool_n, block_m", [(64, 16), (16, 32)])
def test_triton_backward_tile_variants(device, pool_n, block_m, monkeypatch):
    monkeypatch.setitem(
        _configs.OVERRIDES, "pyramid_bwd", _configs.TileConfig(block_m, 16, 4, 1, True, True, pool_n)
    )
    g = torch.Generator().manual_seed(pool_n)
    N, bq, bk = 100, 32, 32
    q, k, v = (torch.randn(1, N, 1, 16, generator=g) for _ in range(3))
    lmap = random_level_map(1, 1, cdiv(N, bq), cdiv(N, bk), (1, 2, 4, 8), gen=g)
    _compare(device, q, k, v, PyramidPlan.from_dense(lmap, block_q=bq, block_k=bk, seq_len=N))
