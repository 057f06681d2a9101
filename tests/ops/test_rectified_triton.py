"""Rectified SpaAttn Triton path (statistics kernel, block-sparse core with segments and the R/C
epilogue) against the float64 reference; tiny shapes so the interpreter stays fast on CPU CI."""

from __future__ import annotations

import pytest
import torch

from visattn.kernels._rectified_rows import plan_tensors_rows
from visattn.kernels.rectified import block_stats_torch, block_stats_triton, plan_tensors, plan_tensors_triton
from visattn.ops import (
    RectifiedConfig,
    SequenceLayout,
    rectified_attention,
    rectified_attention_ref,
    rectified_plan,
)

from .test_rectified import _valid_rows


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CFG = RectifiedConfig(drop_rate=0.7, cum_threshold=0.2)._with_block(16)


@pytest.mark.parametrize("upstream", [False, True])
def test_stats_kernel_matches_torch(upstream):
    dev = _dev()
    q, k, v = (torch.randn(2, 70, 3, 24, device=dev) for _ in range(3))  # D = 24: padded head dim
    got = block_stats_triton(q, k, v, 11, 53, 16, upstream)  # video tokens 11..63: partial tail of 5
    want = block_stats_torch(q, k, v, 11, 53, 16, upstream, torch.float64)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def _structured(lay, B, H, D, block=16):
    """Noise plus a per-block offset on the video tokens, so pooled estimates are informative and GAPR
    rectifies some dropped pairs (plain Gaussian q/k almost never pass its gain/error test)."""
    x = torch.randn(B, lay.seq_len, H, D)
    nv = -(-lay.num_video // block)
    off = (1.5 * torch.randn(B, nv, H, D)).repeat_interleave(block, 1)[:, : lay.num_video]
    x[:, lay.video_slice] += off
    return x


CASES = [
    # (grid, text_len, position, text_valid, B, H, D, dtype, config)
    ((3, 5, 7), 0, "end", None, 1, 2, 32, torch.float32, CFG.replace(neighbours=False)),
    (
        (3, 5, 7),
        20,
        "end",
        [20, 7],
        2,
        1,
        16,
        torch.float16,
        CFG.replace(neighbours=False, first_frame="curve_prefix"),
    ),
    ((2, 6, 9), 11, "start", [5, 11], 2, 2, 32, torch.float32, CFG.replace(neighbours=False, drop_rate=0.9)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_reference(case):
    grid, L, pos, tv, B, H, D, dtype, cfg = CASES[case]
    dev = _dev()
    lay = SequenceLayout(
        grid,
        text_len=L,
        text_position=pos,
        token_order="gilbert",
        text_valid_len=None if tv is None else torch.tensor(tv, device=dev),
    )
    q, k, v = (_structured(lay, B, H, D).to(device=dev, dtype=dtype) for _ in range(3))
    out, plan = rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="triton", return_plan=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref, kept, rect, R, C = rectified_attention_ref(q, k, v, seq_layout=lay, config=cfg, return_maps=True)
    assert torch.equal(plan.kept_visual(), kept) and torch.equal(plan.rect_map, rect)
    assert plan.rect_map.any() and plan.density.max() < 1
    ok = _valid_rows(lay, B).to(dev)
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out[ok].double(), ref[ok].double(), atol=tol, rtol=tol)


def test_triton_plan_reuse_and_bhnd_layout():
    dev = _dev()
    lay = SequenceLayout((2, 5, 8), text_len=7, text_position="end")
    q, k, v = (torch.randn(1, 2, lay.seq_len, 16, device=dev) for _ in range(3))  # BHND
    v2 = torch.randn_like(v)
    plan = rectified_plan(
        q, k, v, seq_layout=lay, config=CFG, layout="BHND", keep_probs=True, backend="triton"
    )
    got = rectified_attention(q, k, v2, plan=plan, layout="BHND", backend="triton")
    want = rectified_attention_ref(q, k, v2, seq_layout=lay, config=CFG, layout="BHND")
    torch.testing.assert_close(got.double(), want.double(), atol=2e-5, rtol=2e-5)


PLAN_CASES = [
    # (grid, text_len, text_valid, config)
    ((3, 6, 9), 0, None, CFG),
    ((3, 6, 9), 0, None, CFG.replace(first_frame="curve_prefix", cum_threshold=0.5)),
    ((2, 7, 9), 19, [19, 3], CFG.replace(neighbours=False, drop_rate=0.95)),
    ((2, 7, 9), 19, [0, 12], CFG.replace(ipar=False, tail="upstream")),
    ((2, 7, 9), 19, [19, 12], CFG.replace(gapr=False, cum_threshold=1.0)),
]


@pytest.mark.parametrize("planner", ["fused", "rows"])
def test_triton_planners_break_probability_ties_by_index(planner):
    """Equal pooled logits (q̄ = 0, no IPAR weights): every column has p = 1/n_v, so the selection is
    decided by ties alone; both Triton planners keep the lowest indices, as the torch planner's stable
    sort does (11 blocks, tau 0.5: 6 kept per row, no neighbour or first-frame additions)."""
    dev = _dev()
    lay = SequenceLayout((3, 6, 9), token_order="gilbert")
    cfg = CFG.replace(ipar=False, cum_threshold=0.5, drop_rate=0.9, neighbours=False)
    B, H, D, b = 1, 2, 16, 16
    q, k, v = (_structured(lay, B, H, D).to(dev) for _ in range(3))
    stats = list(block_stats_torch(q, k, v, lay.video_start, lay.num_video, b, False, torch.float32))
    stats[0] = torch.zeros_like(stats[0])  # q̄ = 0: every pooled logit is 0
    kw = dict(scale=D**-0.5, block=b, num_video=lay.num_video, n_text_blocks=0, config=cfg, nbr=None,
              first_frame=None, keep_probs=False)
    want = plan_tensors(*stats, None, None, **kw)
    got = (plan_tensors_triton if planner == "fused" else plan_tensors_rows)(*stats, None, None, **kw)
    nv = stats[0].shape[2]
    assert torch.equal(want["kv_count"], torch.full_like(want["kv_count"], 6))
    assert torch.equal(got["kv_count"], want["kv_count"])
    first6 = torch.arange(6, device=dev, dtype=torch.int32).expand(B, H, nv, 6)
    assert torch.equal(got["kv_index"][..., :6], first6) and torch.equal(want["kv_index"][..., :6], first6)


@pytest.mark.parametrize("planner", ["fused", "rows"])
@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_triton_planners_match_torch_planner(case, planner):
    """The fused planner (<= 511 visual blocks) and the row planner (longer rows) against the torch one."""
    from visattn.ops.rectified import _tables

    grid, L, tv, cfg = PLAN_CASES[case]
    dev = _dev()
    lay = SequenceLayout(
        grid,
        text_len=L,
        token_order="gilbert",
        text_valid_len=None if tv is None else torch.tensor(tv, device=dev),
    )
    B, H, D, b = 2, 3, 16, 16
    q, k, v = (_structured(lay, B, H, D).to(dev) for _ in range(3))
    stats = block_stats_torch(
        q, k, v, lay.video_start, lay.num_video, b, cfg.tail == "upstream", torch.float32
    )
    k_text = k[:, lay.text_slice].transpose(1, 2).float() if L else None
    valid = lay.valid_text(B, dev) if L else None
    nbr, ff = _tables(lay, cfg, dev)
    kw = dict(
        scale=D**-0.5,
        block=b,
        num_video=lay.num_video,
        n_text_blocks=lay.num_text_blocks(b),
        config=cfg,
        nbr=nbr,
        first_frame=ff,
        keep_probs=True,
    )
    want = plan_tensors(*stats, k_text, valid, **kw)
    got = (plan_tensors_triton if planner == "fused" else plan_tensors_rows)(*stats, k_text, valid, **kw)
    for name in ("kv_count", "rect_map"):
        assert torch.equal(got[name], want[name]), name
    cnt = want["kv_count"]
    used = torch.arange(want["kv_index"].shape[-1], device=dev) < cnt[..., None]
    assert torch.equal(got["kv_index"][used], want["kv_index"][used])
    full = torch.sort(got["kv_index"], -1).values  # every slot written once: a permutation of all ids
    assert torch.equal(full, torch.arange(full.shape[-1], device=dev, dtype=full.dtype).expand_as(full))
    for name in ("rect_scale", "rect_bias", "density", "rect_frac"):
        torch.testing.assert_close(got[name], want[name].float(), atol=1e-5, rtol=1e-5)
    # the schedule equals a stable descending argsort of kv_count
    order = want["kv_count"].argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    assert torch.equal(got["tile_order"], order)
    if L and planner == "fused":  # text keys read in place from a strided half-precision view: same plan
        k_half = k.half()[:, lay.text_slice].transpose(1, 2)
        want_h = plan_tensors(*stats, k_half.float(), valid, **kw)
        got_h = plan_tensors_triton(*stats, k_half, valid, **kw)
        assert torch.equal(got_h["rect_map"], want_h["rect_map"])
        assert torch.equal(got_h["kv_count"], want_h["kv_count"])
        torch.testing.assert_close(got_h["rect_bias"], want_h["rect_bias"].float(), atol=1e-5, rtol=1e-5)
    if cfg.gapr:
        assert want["rect_map"].any()
        torch.testing.assert_close(got["rect_prob"], want["rect_prob"], atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_with_plan():
    """A given plan runs under ``torch.compile(fullgraph=True)`` (custom op + fake impl; aot_eager on CPU)."""
    dev = _dev()
    lay = SequenceLayout((2, 6, 8), text_len=9, text_valid_len=torch.tensor([9, 4], device=dev))
    q, k, v = (torch.randn(2, lay.seq_len, 2, 32, device=dev) for _ in range(3))
    plan = rectified_plan(q, k, v, seq_layout=lay, config=CFG, backend="triton")
    eager = rectified_attention(q, k, v, plan=plan, backend="triton")
    fn = torch.compile(
        lambda q, k, v: rectified_attention(q, k, v, plan=plan, backend="triton"),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(fn(q, k, v), eager)


@pytest.mark.parametrize("limits", [(511, 2047), (4, 2047), (4, 8)])
def test_plan_picks_planner_by_row_length(monkeypatch, limits):
    """rectified_plan plans rows of n_v visual blocks with the fused planner (n_v <= 511), the row planner
    (<= 2047) or torch; limits lowered here so 11 blocks reach each tier. Same plan from every tier."""
    import visattn.kernels._rectified_rows as rows_mod
    import visattn.kernels.rectified as rect_mod

    calls = []
    for mod, name in ((rect_mod, "plan_tensors_triton"), (rows_mod, "plan_tensors_rows"), (rect_mod, "plan_tensors")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **kw: (calls.append(_n), _fn(*a, **kw))[1])
    monkeypatch.setattr(rect_mod, "MAX_FUSED_BLOCKS", limits[0])
    monkeypatch.setattr(rows_mod, "MAX_ROW_BLOCKS", limits[1])
    dev = _dev()
    lay = SequenceLayout((3, 6, 9), text_len=9, text_valid_len=torch.tensor([9, 4], device=dev))
    assert lay.num_video_blocks(16) == 11
    q, k, v = (_structured(lay, 2, 2, 16).to(dev) for _ in range(3))
    plan = rectified_plan(q, k, v, seq_layout=lay, config=CFG, backend="triton")
    want = {(511, 2047): "plan_tensors_triton", (4, 2047): "plan_tensors_rows", (4, 8): "plan_tensors"}[limits]
    assert calls == [want]
    ref = rectified_plan(q, k, v, seq_layout=lay, config=CFG, backend="torch")
    assert torch.equal(plan.kv_count, ref.kv_count)
    assert torch.equal(plan.rect_map, ref.rect_map)
