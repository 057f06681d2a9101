"""GPU tests of Rectified SpaAttn at real sizes (``pytest -m cuda`` on a CUDA machine).

The fused Triton path is compared with the same plan applied in float64 (kernel correctness, DESIGN
§5 floors: fp16 1e-2, bf16 2e-2), and the GPU planner's kept/𝒢 maps with the float64 reference
(selection; near-ties between fp32 and fp64 may flip a handful of pairs, so >= 99.5 % agreement).
"""

from __future__ import annotations

import pytest
import torch

from visattn.ops import (
    RectifiedConfig,
    SequenceLayout,
    rectified_attention,
    rectified_attention_ref,
    rectified_plan,
)
from visattn.ops.rectified import _apply_plan_torch

from .test_rectified import _valid_rows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _inputs(lay, B, H, D, dtype, block):
    x = []
    nv = -(-lay.num_video // block)
    for _ in range(3):
        t = torch.randn(B, lay.seq_len, H, D, device="cuda")
        off = (1.5 * torch.randn(B, nv, H, D, device="cuda")).repeat_interleave(block, 1)[:, : lay.num_video]
        t[:, lay.video_slice] += off  # block structure: GAPR rectifies some dropped pairs
        x.append(t.to(dtype))
    return x


LAYOUTS = [
    lambda B: SequenceLayout((5, 16, 20), token_order="gilbert"),
    lambda B: SequenceLayout(
        (4, 15, 22),
        text_len=77,
        text_position="end",
        token_order="gilbert",
        text_valid_len=torch.tensor([77, 30, 1][:B], device="cuda"),
    ),
    lambda B: SequenceLayout(
        (3, 17, 19),
        text_len=226,
        text_position="start",
        text_valid_len=torch.tensor([200, 226, 5][:B], device="cuda"),
    ),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H", [1, 5])
@pytest.mark.parametrize("lay_i", range(len(LAYOUTS)))
@pytest.mark.parametrize("block", [64, 128])
def test_kernel_matches_plan_in_float64(dtype, D, H, lay_i, block):
    B = 3
    lay = LAYOUTS[lay_i](B)
    cfg = RectifiedConfig(block_size=block, drop_rate=0.8, first_frame="curve_prefix" if lay_i == 0 else None)
    q, k, v = _inputs(lay, B, H, D, dtype, block)
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, return_plan=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ok = _valid_rows(lay, B).cuda()
    qd, kd, vd = (t.double() for t in (q, k, v))
    plan64 = plan
    want = _apply_plan_torch(qd, kd, vd, plan64, D**-0.5, "BNHD")
    err = (out.double() - want)[ok].abs().max().item()
    # DESIGN.md §5 floors are for outputs of magnitude <= 1: scale them by the output's magnitude
    assert err <= TOL[dtype] * max(1.0, want[ok].abs().max().item()), err
    # selection against the float64 reference on the same (rounded) inputs
    _, kept, rect, _, _ = rectified_attention_ref(qd, kd, vd, seq_layout=lay, config=cfg, return_maps=True)
    agree = (plan.kept_visual() == kept).double().mean().item()
    assert agree >= 0.995, agree
    assert (plan.rect_map == rect).double().mean().item() >= 0.995


@pytest.mark.parametrize("D", [16, 32, 96])
def test_other_head_dims(D):
    lay = LAYOUTS[1](2)
    cfg = RectifiedConfig(block_size=64)
    q, k, v = _inputs(lay, 2, 2, D, torch.float16, 64)
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, return_plan=True)
    want = _apply_plan_torch(q.double(), k.double(), v.double(), plan, D**-0.5, "BNHD")
    ok = _valid_rows(lay, 2).cuda()
    assert (out.double() - want)[ok].abs().max().item() <= 1e-2


def test_no_host_sync_and_cuda_graph():
    lay = LAYOUTS[1](3)
    q, k, v = _inputs(lay, 3, 4, 128, torch.bfloat16, 128)
    cfg = RectifiedConfig()
    rectified_attention(q, k, v, seq_layout=lay, config=cfg)  # compile kernels, build tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rectified_attention(q, k, v, seq_layout=lay, config=cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        rectified_attention(q, k, v, seq_layout=lay, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        static = rectified_attention(q, k, v, seq_layout=lay, config=cfg)
    g.replay()
    torch.cuda.synchronize()
    ok = _valid_rows(lay, 3).cuda()
    torch.testing.assert_close(static[ok], out[ok])


def test_torch_compile_with_plan():
    lay = LAYOUTS[0](1)
    q, k, v = _inputs(lay, 1, 2, 64, torch.float16, 128)
    plan = rectified_plan(q, k, v, seq_layout=lay)
    fn = torch.compile(lambda q, k, v: rectified_attention(q, k, v, plan=plan), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), rectified_attention(q, k, v, plan=plan))


def test_upstream_tail_and_switches_large():
    lay = SequenceLayout((21, 30, 52), token_order="gilbert")  # Wan2.1-1.3B 480p grid
    q, k, v = _inputs(lay, 1, 2, 128, torch.bfloat16, 128)
    for cfg in (
        RectifiedConfig(first_frame="curve_prefix"),
        RectifiedConfig(tail="upstream"),
        RectifiedConfig(ipar=False, gapr=False),
    ):
        out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, return_plan=True)
        assert torch.isfinite(out).all() and 0 < plan.density.mean().item() < 1
