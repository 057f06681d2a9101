"""Rectified SpaAttn: planner and op against the float64 reference, brute force and degenerate cases.

These run the ``"torch"`` backend (device-side planner + masked softmax) in float64 on the CPU; the
Triton kernels are covered by ``test_rectified_triton.py`` (interpreter) and ``test_rectified_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visattn.ops import (
    BlockSparsePlan,
    RectifiedConfig,
    RectifiedPlan,
    SequenceLayout,
    block_sparse_attention,
    rectified_attention,
    rectified_attention_ref,
    rectified_plan,
)
from visattn.ops._token_order import block_neighbours, gilbert_order

B16 = RectifiedConfig(drop_rate=0.5)._with_block(16)

LAYOUTS = {
    "video": lambda B: SequenceLayout((3, 5, 7), token_order="gilbert"),
    "video_raster": lambda B: SequenceLayout((2, 6, 8)),
    "end_padded": lambda B: SequenceLayout(
        (3, 5, 7),
        text_len=20,
        text_position="end",
        text_valid_len=torch.tensor([20, 7, 0][:B]),
        token_order="gilbert",
    ),
    "start": lambda B: SequenceLayout((2, 7, 9), text_len=11, text_position="start", text_valid_len=5),
}


def _qkv(lay, B=2, H=3, D=32, dtype=torch.float64):
    return tuple(torch.randn(B, lay.seq_len, H, D, dtype=dtype) for _ in range(3))


def _valid_rows(lay, B):
    ok = torch.ones(B, lay.seq_len, dtype=torch.bool)
    tv = lay.valid_text(B)
    for b in range(B):
        ok[b, lay.text_start + int(tv[b]) : lay.text_start + lay.text_len] = False
    return ok


CONFIGS = {
    "default": B16,
    "no_nbr_curve_prefix": B16.replace(neighbours=False, first_frame="curve_prefix", drop_rate=0.8),
    "frame": B16.replace(neighbours=False, first_frame="frame", cum_threshold=0.2),
    "jenga": B16.replace(ipar=False, gapr=False, neighbours=False),
    "ipar_only": B16.replace(gapr=False, neighbours=False, drop_rate=0.9),
    "gapr_no_ipar": B16.replace(ipar=False, neighbours=False, drop_rate=0.9),
    "upstream_tail": B16.replace(tail="upstream", neighbours=False),
}


@pytest.mark.parametrize("lay_name", list(LAYOUTS))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_planner_and_torch_backend_match_reference(lay_name, cfg_name):
    B = 3 if lay_name == "end_padded" else 2
    lay, cfg = LAYOUTS[lay_name](B), CONFIGS[cfg_name]
    q, k, v = _qkv(lay, B)
    ref, kept, rect, R, C = rectified_attention_ref(q, k, v, seq_layout=lay, config=cfg, return_maps=True)
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="torch", return_plan=True)
    assert torch.equal(plan.kept_visual(), kept)
    assert torch.equal(plan.rect_map, rect)
    nv = plan.num_video_blocks
    torch.testing.assert_close(plan.rect_scale[..., :nv].double(), R, atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.rect_bias[..., :nv, :].double(), C, atol=1e-6, rtol=0)
    assert torch.all(plan.rect_scale[..., nv:] == 1) and torch.all(plan.rect_bias[..., nv:, :] == 0)
    ok = _valid_rows(lay, B)
    torch.testing.assert_close(out[ok], ref[ok], atol=1e-6, rtol=0)
    assert torch.isfinite(out).all()
    if not cfg.gapr:
        assert not rect.any() and torch.all(R == 1) and torch.all(C == 0)


def _brute_selection(cols, tau, k_min):
    order = sorted(range(len(cols)), key=lambda c: (-cols[c], c))
    total, n_le = 0.0, 0
    for c in order:
        total += cols[c]
        if total <= tau:
            n_le += 1
    count = min(len(cols), max(n_le + 1, k_min))
    return set(order[:count])


@pytest.mark.parametrize("text", [False, True])
def test_selection_brute_force_per_row(text):
    lay = SequenceLayout((2, 6, 10), text_len=9 if text else 0, text_valid_len=6 if text else None)
    cfg = B16.replace(neighbours=False, drop_rate=0.85, cum_threshold=0.35)
    q, k, v = _qkv(lay, B=1, H=2, D=16)
    q = q * 3  # sharper pooled softmax: selection thresholds bite
    plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch")
    kept = plan.kept_visual()
    b, Nv, nv = 16, lay.num_video, plan.num_video_blocks
    s = 16**-0.5
    for h in range(2):
        qv = q[0, lay.video_slice, h]
        kv_ = k[0, lay.video_slice, h]
        qm = [qv[j * b : (j + 1) * b].mean(0) for j in range(nv)]
        km = [kv_[j * b : (j + 1) * b].mean(0) for j in range(nv)]
        w = [min(b, Nv - j * b) for j in range(nv)]
        kt = k[0, lay.text_slice, h][:6] if text else k[0, :0, h]
        for i in range(nv):
            e = [w[j] * math.exp(s * float(qm[i] @ km[j])) for j in range(nv)]
            et = [math.exp(s * float(qm[i] @ kt[t])) for t in range(kt.shape[0])]
            z = sum(e) + sum(et)
            cols = [x / z for x in e] + ([sum(et) / z] if text else [])
            sel = _brute_selection(cols, cfg.cum_threshold, int((1 - cfg.drop_rate) * nv))
            want = {j for j in sel if j < nv}
            got = {j for j in range(nv) if kept[0, h, i, j]}
            assert got == want, (h, i)


@pytest.mark.parametrize("lay_name", ["video", "end_padded", "start"])
def test_all_blocks_kept_equals_dense(lay_name):
    lay = LAYOUTS[lay_name](2)
    q, k, v = _qkv(lay)
    key_ok = torch.ones(2, lay.seq_len, dtype=torch.bool)
    key_ok[:, lay.text_slice] = torch.arange(lay.text_len)[None] < lay.valid_text(2)[:, None]
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_ok[:, None, None, :]
    ).transpose(1, 2)
    ok = _valid_rows(lay, 2)
    cfgs = [B16.replace(cum_threshold=1.0, neighbours=False)]
    if not lay.text_len:  # k_min = n_v keeps every visual block only when no text column takes a slot
        cfgs.append(B16.replace(drop_rate=0.0, neighbours=False))
    for cfg in cfgs:
        out, plan = rectified_attention(
            q, k, v, seq_layout=lay, config=cfg, backend="torch", return_plan=True
        )
        assert torch.all(plan.density == 1)
        torch.testing.assert_close(out[ok], dense[ok], atol=1e-12, rtol=0)


def test_no_rectification_equals_block_sparse():
    lay = SequenceLayout((4, 6, 10))  # video only: blocks cut from 0, as the plain block-sparse op
    q, k, v = _qkv(lay, B=2, H=2)
    cfg = B16.replace(ipar=False, gapr=False, drop_rate=0.9)
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="torch", return_plan=True)
    assert plan.density.max() < 1
    bsp = BlockSparsePlan.from_mask(plan.kept_visual(), 16, 16)
    want = block_sparse_attention(q, k, v, bsp, backend="torch")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    # GAPR rectifying nothing: R = 1 and C = 0 whatever the selection
    plan2 = rectified_plan(
        q, k, v, seq_layout=lay, config=B16.replace(gapr=False, drop_rate=0.9), backend="torch"
    )
    assert torch.all(plan2.rect_scale == 1) and torch.all(plan2.rect_bias == 0)



def test_gapr_rectifying_nothing_equals_block_sparse():
    """Spec §2.6-2.7: with gapr=True but no dropped pair passing G > E, R = 1, C = 0, plain block-sparse.

    Every q entry is positive, so q̄_I > 0 element-wise. Every visual key is k̄_J ± a_J (signs
    alternating, so each block, the 6-token tail included, has as many + as -), a_J = 2|k̄_J| + 0.1:
    the block mean is k̄_J and δk_J = a_J, so E_IJ ≥ q̄_I·a_J > Σ q̄_I|k̄_J| ≥ |q̄_I·k̄_J| = G_IJ.
    """
    lay = SequenceLayout((2, 5, 7), text_len=12, text_position="end", text_valid_len=torch.tensor([12, 5]))
    B, H, D, b = 2, 2, 16, 16
    Nv = lay.num_video  # 70 = 4 full blocks + a tail of 6
    g = torch.Generator().manual_seed(3)
    q = 0.2 + 3 * torch.rand(B, lay.seq_len, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, lay.seq_len, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, lay.seq_len, H, D, generator=g, dtype=torch.float64)
    sign = 1.0 - 2.0 * (torch.arange(Nv) % 2).double()  # +, -, +, - ... from the video start
    for j in range(-(-Nv // b)):
        s, e = j * b, min((j + 1) * b, Nv)
        mean = torch.randn(B, 1, H, D, generator=g, dtype=torch.float64)
        k[:, s:e] = mean + sign[s:e, None, None] * (2 * mean.abs() + 0.1)
    cfg = B16.replace(drop_rate=0.75, cum_threshold=0.2, neighbours=False)
    assert cfg.gapr and cfg.ipar
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="torch", return_plan=True)
    kept = plan.kept_visual()  # [B, H, n_v, n_v]
    assert not kept.all() and not plan.rect_map.any()  # blocks were dropped, none rectified
    assert torch.all(plan.rect_scale == 1) and torch.all(plan.rect_bias == 0)
    ref, ref_kept, ref_rect, R, C = rectified_attention_ref(
        q, k, v, seq_layout=lay, config=cfg, return_maps=True
    )
    assert torch.equal(ref_kept, kept) and not ref_rect.any() and torch.all(R == 1) and torch.all(C == 0)
    # independent masked dense float64 attention: video rows see their kept blocks and valid text,
    # text rows see every valid key
    tv = lay.valid_text(B)
    blk = torch.arange(Nv) // b
    want = torch.zeros_like(q)
    for bi in range(B):
        key_ok = torch.ones(lay.seq_len, dtype=torch.bool)
        key_ok[Nv + int(tv[bi]) :] = False
        for h in range(H):
            allowed = key_ok.expand(lay.seq_len, -1).clone()
            allowed[:Nv, :Nv] = kept[bi, h][blk[:, None], blk[None, :]]
            logits = (q[bi, :, h] @ k[bi, :, h].T) * D**-0.5
            p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            want[bi, :, h] = p @ v[bi, :, h]
    ok = _valid_rows(lay, B)
    torch.testing.assert_close(out[ok], want[ok], atol=1e-12, rtol=0)
    torch.testing.assert_close(ref[ok], want[ok], atol=1e-12, rtol=0)

@pytest.mark.parametrize("lay_name", ["video", "end_padded", "start"])
def test_block_constant_qk_gives_dense_output(lay_name):
    lay = LAYOUTS[lay_name](2)
    B, H, D, b = 2, 2, 16, 16
    q, k, v = _qkv(lay, B, H, D)
    # q and k constant within every visual block (the partial tail included): pooling is exact, E = 0
    vs, nv = lay.video_start, -(-lay.num_video // b)
    for j in range(nv):
        s, e = vs + j * b, vs + min((j + 1) * b, lay.num_video)
        q[:, s:e] = q[:, s : s + 1]
        k[:, s:e] = k[:, s : s + 1]
    key_ok = torch.ones(B, lay.seq_len, dtype=torch.bool)
    key_ok[:, lay.text_slice] = torch.arange(lay.text_len)[None] < lay.valid_text(B)[:, None]
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_ok[:, None, None, :]
    ).transpose(1, 2)
    cfg = B16.replace(drop_rate=0.9, neighbours=False, cum_threshold=0.1)
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="torch", return_plan=True)
    assert plan.density.max() < 1 and plan.rect_fraction.min() > 0.99
    ok = _valid_rows(lay, B)
    torch.testing.assert_close(out[ok], dense[ok], atol=1e-12, rtol=0)
    ref = rectified_attention_ref(q, k, v, seq_layout=lay, config=cfg)
    torch.testing.assert_close(ref[ok], dense[ok], atol=1e-12, rtol=0)


def test_ipar_equals_upstream_two_step_form():
    lay = SequenceLayout((2, 4, 8), text_len=5)  # 64 video tokens: every block has w = b
    q, k, v = _qkv(lay, B=1, H=2, D=16)
    cfg = B16.replace(neighbours=False, drop_rate=0.9, cum_threshold=0.1)
    plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch", keep_probs=True)
    b, s = 16, 16**-0.5
    qv = q[0, :64].view(4, b, 2, 16).mean(1)
    kv_ = k[0, :64].view(4, b, 2, 16).mean(1)
    kt = k[0, 64:]
    logits = torch.einsum("ihd,jhd->hij", qv, kv_) * s
    lt = torch.einsum("ihd,thd->hit", qv, kt) * s
    p = torch.cat([logits, lt], -1).softmax(-1)  # upstream step 1: softmax over pooled + text columns
    pv, ptxt = p[..., :4], p[..., 4:].sum(-1, keepdim=True)
    P = b * pv / (b * pv.sum(-1, keepdim=True) + ptxt)  # upstream step 2
    assert torch.allclose(
        (P.sum(-1) + ptxt[..., 0] / (b * pv.sum(-1) + ptxt[..., 0])), torch.ones(2, 4, dtype=P.dtype)
    )
    rect = plan.rect_map[0]
    torch.testing.assert_close(plan.rect_prob[0].double(), (P * rect).float().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.rect_scale[0, :, :4].double(), 1 - (P * rect).sum(-1), atol=1e-6, rtol=0)


def test_plan_reuse_new_v_save_load(tmp_path):
    lay = LAYOUTS["end_padded"](2)
    q, k, v = _qkv(lay)
    v2 = torch.randn_like(v)
    cfg = B16.replace(neighbours=False, drop_rate=0.9)
    plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch")
    assert plan.rect_map.any()
    same = rectified_attention(q, k, v, plan=plan, backend="torch")
    torch.testing.assert_close(
        same, rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="torch")
    )
    with pytest.raises(ValueError, match="keep_probs"):
        rectified_attention(q, k, v2, plan=plan, backend="torch")
    plan_p = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch", keep_probs=True)
    ok = _valid_rows(lay, 2)
    got = rectified_attention(q, k, v2, plan=plan_p, backend="torch")
    want = rectified_attention(q, k, v2, seq_layout=lay, config=cfg, backend="torch")
    torch.testing.assert_close(got[ok], want[ok], atol=1e-6, rtol=0)
    plan_p.save(tmp_path / "p.pt")
    loaded = RectifiedPlan.load(tmp_path / "p.pt")
    assert loaded.block_size == 16 and loaded.config == plan_p.config
    kept, gmap = loaded.to_dense()
    assert kept.shape == (2, 3, plan.num_tiles, plan.num_tiles) and gmap.dtype == torch.int8
    got2 = rectified_attention(q, k, v2, plan=loaded, backend="torch")
    torch.testing.assert_close(got2[ok], want[ok], atol=1e-6, rtol=0)



def test_save_load_roundtrip_is_weights_only(tmp_path):
    # a preset config (tuples of strings and ints), an int text_valid_len, no rect_prob
    lay = SequenceLayout(
        (2, 5, 7), text_len=12, text_position="start", text_valid_len=9, token_order="gilbert"
    )
    cfg = RectifiedConfig.from_preset("flux_dev_4096")._with_block(16)
    q, k, v = _qkv(lay, B=2, H=2, D=16, dtype=torch.float32)
    plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch")
    plan.save(tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=True)  # the safe unpickler reads the saved format
    back = RectifiedPlan.load(tmp_path / "p.pt")
    for name in ("kv_index", "kv_count", "rect_scale", "rect_bias", "rect_map", "density", "rect_fraction"):
        assert torch.equal(getattr(back, name), getattr(plan, name)), name
    assert back.rect_prob is None and back.block_size == 16
    assert back.seq_layout == lay and back.config == cfg and back.config.dense_blocks == cfg.dense_blocks
    # the loaded plan cannot know which v made C, and without rect_prob it cannot recompute it
    with pytest.raises(ValueError, match="keep_probs"):
        rectified_attention(q, k, v, plan=back, backend="torch")

def test_neighbour_and_first_frame_rules():
    lay = SequenceLayout((3, 6, 8), token_order="gilbert")
    q, k, v = _qkv(lay, B=1, H=1)
    cfg = B16.replace(cum_threshold=0.0, drop_rate=0.99)  # selection keeps one column only
    kept = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch").kept_visual()[0, 0]
    nbr = block_neighbours((3, 6, 8), 16, gilbert_order((3, 6, 8)))
    assert torch.all(kept >= nbr) and torch.all(kept.sum(-1) <= nbr.sum(-1) + 1)
    cfg = cfg.replace(neighbours=False, first_frame="curve_prefix")
    kept = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch").kept_visual()[0, 0]
    assert kept[:3, :3].all()  # n_v = 9, T = 3: F = 3
    cfg = cfg.replace(first_frame="frame")
    kept = rectified_plan(q, k, v, seq_layout=lay, config=cfg, backend="torch").kept_visual()[0, 0]
    blocks = torch.unique(gilbert_order((3, 6, 8)).inverse[:48] // 16)
    assert kept[blocks][:, blocks].all()


def test_errors():
    lay = LAYOUTS["end_padded"](2)
    q, k, v = _qkv(lay)
    for bad, name in (
        (dict(block_size=32), "block_size"),
        (dict(cum_threshold=1.5), "cum_threshold"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(first_frame="last"), "first_frame"),
        (dict(tail="zero"), "tail"),
        (dict(gapr=1), "gapr"),
    ):
        with pytest.raises(ValueError, match=name):
            RectifiedConfig(**bad)
    with pytest.raises(ValueError, match="seq_layout"):
        rectified_attention(q, k, v)
    with pytest.raises(ValueError, match="seq_layout"):
        rectified_attention(q[:, :-1], k[:, :-1], v[:, :-1], seq_layout=lay)
    with pytest.raises(ValueError, match="text_valid_len"):
        rectified_attention(q, k, v, seq_layout=lay.replace(text_valid_len=torch.tensor([1, 2, 3])))
    with pytest.raises(NotImplementedError, match="GQA"):
        rectified_attention(q, k[:, :, :1], v[:, :, :1], seq_layout=lay)
    with pytest.raises(ValueError, match="config"):
        rectified_attention(q, k, v, seq_layout=lay, config=dict(block_size=16))
    plan = rectified_plan(q, k, v, seq_layout=lay, config=B16, backend="torch")
    with pytest.raises(ValueError, match="plan"):
        rectified_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], plan=plan)
    with pytest.raises(ValueError, match="plan"):
        rectified_attention(q, k, v, plan="plan")
    other = SequenceLayout((3, 5, 7), text_len=20, text_position="start")
    with pytest.raises(ValueError, match="seq_layout"):
        rectified_attention(q, k, v, plan=plan, seq_layout=other)
    qg = q.float().requires_grad_()
    with pytest.raises(NotImplementedError, match="backward"):
        rectified_attention(qg, k.float(), v.float(), seq_layout=lay, config=B16, backend="triton")



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plan_length_mismatch_without_seq_layout(backend):
    # 125 and 122 tokens both cut into 8 blocks of 16: only the length check can catch the reuse
    lay = SequenceLayout((5, 5, 5))
    q, k, v = _qkv(lay, B=1, H=2, D=16, dtype=torch.float32)
    plan = rectified_plan(q, k, v, seq_layout=lay, config=B16, backend="torch")
    assert plan.num_tiles == -(-122 // 16)
    with pytest.raises(ValueError, match=r"plan.*N=122.*seq_len=125"):
        rectified_attention(q[:, :122], k[:, :122], v[:, :122], plan=plan, backend=backend)


def test_triton_head_dim_reasons():
    # the message names the backend and lists every reason on its own line (no kernel is launched)
    lay = SequenceLayout((1, 4, 8))
    q, k, v = _qkv(lay, B=1, H=1, D=264, dtype=torch.float32)
    plan = rectified_plan(q, k, v, seq_layout=lay, config=B16, backend="torch")
    with pytest.raises(NotImplementedError) as info:
        rectified_attention(q.requires_grad_(), k, v, plan=plan, backend="triton")
    msg = str(info.value)
    assert msg.startswith("No visattn backend can run rectified attention") and "  backend 'triton':" in msg
    lines = msg.splitlines()
    assert "    - head dim 264 > 256 is not supported" in lines
    assert any(x.startswith("    - no backward on 'triton'") for x in lines)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="head dim 264 > 256"):
        rectified_attention(q, k, v, plan=plan, backend="triton")

def test_torch_backend_is_differentiable():
    lay = LAYOUTS["start"](1)
    q, k, v = (t.requires_grad_() for t in _qkv(lay, B=1, H=1, D=8))
    out = rectified_attention(q, k, v, seq_layout=lay, config=B16, backend="torch")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize(
    "name",
    sorted(
        p.stem
        for p in __import__("pathlib")
        .Path(__file__)
        .resolve()
        .parents[2]
        .joinpath("configs/pipelines/rectified")
        .glob("*.yaml")
    ),
)
def test_presets_load(name):
    cfg = RectifiedConfig.from_preset(name)
    assert cfg.block_size == 128 and cfg.cum_threshold == 0.3
    with pytest.raises(ValueError, match="preset"):
        RectifiedConfig.from_preset("nope")
