"""PSA semantics on the CPU: reference vs oracles, degenerate equalities, level rules, plan objects.

Oracles: the expanded-key oracle of ``_pyramid_utils`` (host loops) and dense SDPA; rule tests use
values worked out by hand (spec §2.5 worked example and analogous cases).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn.ops import (
    PyramidConfig,
    PyramidPlan,
    SequenceLayout,
    pyramid_attention,
    pyramid_attention_ref,
    pyramid_plan,
)

from ._pyramid_utils import cdiv, expanded_oracle, lists_from_map, max_abs, random_level_map


def _qkv(B, N, H, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, N, H, D, generator=g, dtype=dtype) for _ in range(3))


def _plan(lmap, bq, bk, N, lay=None, causal=False):
    cfg = PyramidConfig(causal=causal)._with_blocks(bq, bk) if causal else None
    return PyramidPlan.from_dense(lmap, block_q=bq, block_k=bk, seq_len=N, seq_layout=lay, config=cfg)


# ------------------------------------------------------------------ reference vs oracles
@pytest.mark.parametrize(
    "N, bq, bk, factors", [(97, 32, 16, (1, 2, 4, 8)), (130, 16, 32, (8,)), (64, 64, 16, (2, 4))]
)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_expanded_oracle(N, bq, bk, factors, causal):
    q, k, v = _qkv(2, N, 2, 8, seed=N)
    g = torch.Generator().manual_seed(1)
    lmap = random_level_map(2, 2, cdiv(N, bq), cdiv(N, bk), factors, gen=g)
    out, lse = pyramid_attention_ref(q, k, v, _plan(lmap, bq, bk, N, causal=causal), return_lse=True)
    eo, el = expanded_oracle(q, k, v, lmap, bq, bk, causal=causal)
    assert max_abs(out, eo) < 1e-12
    fin = torch.isfinite(el)
    assert torch.equal(torch.isfinite(lse), fin) and max_abs(lse[fin], el[fin]) < 1e-12


@pytest.mark.parametrize("pos", ["start", "end"])
def test_reference_with_text_matches_oracle(pos):
    lay = SequenceLayout((2, 3, 7), text_len=19, text_position=pos, text_valid_len=torch.tensor([19, 6]))
    N, bq, bk = lay.seq_len, 16, 16
    q, k, v = _qkv(2, N, 1, 8, seed=3)
    nq, nk = cdiv(42, bq) + cdiv(19, bq), cdiv(42, bk) + cdiv(19, bk)
    lmap = random_level_map(2, 1, nq, nk, (1, 2, 4, 8), gen=torch.Generator().manual_seed(2))
    out = pyramid_attention_ref(q, k, v, _plan(lmap, bq, bk, N, lay))
    seg = (lay.video_start, lay.num_video, lay.text_start, lay.text_len, [19, 6])
    eo, _ = expanded_oracle(q, k, v, lmap, bq, bk, seg=seg)
    assert max_abs(out, eo) < 1e-12


def test_all_level1_equals_dense_sdpa():
    N, bq, bk = 150, 32, 64
    q, k, v = _qkv(2, N, 3, 16)
    plan = _plan(torch.ones(1, 1, cdiv(N, bq), cdiv(N, bk), dtype=torch.int8), bq, bk, N)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert max_abs(pyramid_attention_ref(q, k, v, plan), want) < 1e-12
    assert max_abs(pyramid_attention(q, k, v, plan=plan, backend="torch"), want) < 1e-12


def test_constant_groups_pool_exactly():
    # keys and values constant within every group of 8 (hence of 2 and 4): any levels without skips = dense
    N, bq, bk = 100, 32, 32
    q, k, v = _qkv(1, N, 2, 8, seed=4)
    k = k[:, torch.arange(N) // 8 * 8]
    v = v[:, torch.arange(N) // 8 * 8]
    lmap = random_level_map(
        1, 2, cdiv(N, bq), cdiv(N, bk), (1, 2, 4, 8), p_skip=0.0, gen=torch.Generator().manual_seed(5)
    )
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert max_abs(pyramid_attention_ref(q, k, v, _plan(lmap, bq, bk, N)), want) < 1e-12


def test_single_kept_block_is_attention_restricted_to_it():
    N, bq, bk = 90, 32, 32
    q, k, v = _qkv(1, N, 1, 8, seed=6)
    lmap = torch.zeros(1, 1, cdiv(N, bq), cdiv(N, bk), dtype=torch.int8)
    lmap[..., 2] = 1  # the partial last block
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k[:, 64:], v[:, 64:]))).transpose(
        1, 2
    )
    assert max_abs(pyramid_attention_ref(q, k, v, _plan(lmap, bq, bk, N)), want) < 1e-12


def test_tail_variants_agree_on_full_blocks_and_differ_on_partial():
    for N, same in ((128, True), (120, False)):
        q, k, v = _qkv(1, N, 1, 8, seed=7)
        lmap = torch.full((1, 1, cdiv(N, 32), cdiv(N, 32)), 8, dtype=torch.int8)
        plan = _plan(lmap, 32, 32, N)
        a = pyramid_attention_ref(q, k, v, plan, tail="exact")
        b = pyramid_attention_ref(q, k, v, plan, tail="replicate")
        assert (max_abs(a, b) < 1e-12) == same


def test_reference_gradcheck():
    N, bq, bk = 37, 16, 16
    q, k, v = (t.requires_grad_() for t in _qkv(1, N, 1, 4, seed=8))
    lmap = random_level_map(
        1, 1, cdiv(N, bq), cdiv(N, bk), (1, 2, 4, 8), p_skip=0.2, gen=torch.Generator().manual_seed(9)
    )
    plan = _plan(lmap, bq, bk, N)

    def f(a, b, c):
        out, lse = pyramid_attention_ref(a, b, c, plan, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # empty rows: -inf

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


# ------------------------------------------------------------------ level rules (hand-worked)
def _rule_plan(scores_row, **cfg):
    nk = len(scores_row)
    bk = cfg.pop("block_k", 128)
    N = nk * bk
    q = torch.zeros(1, N, 1, 16)
    s = torch.tensor(scores_row, dtype=torch.float32).expand(1, 1, cdiv(N, 128), nk)
    config = PyramidConfig(block_q=128, block_k=bk, **cfg)
    return pyramid_plan(q, q, config=config, scores=s).to_dense()[0, 0, 0].tolist()


def test_worked_example_thresholdbound():
    S = [0.5, 0.2, 0.15, 0.1, 0.05]
    lv = {1: 0.4, 2: 0.6, 4: 0.8, 8: 0.9}
    assert _rule_plan(S, levels=lv, mode="thresholdbound", align="none") == [1, 2, 4, 8, 0]
    assert _rule_plan(S, levels=lv, mode="thresholdbound", align="upstream") == [1, 2, 4, 8, 8]


def test_thresholdbound_min_full_fraction_and_crossing_block():
    # C = (.3, .55, .75, .9, 1): tau1 = .5 -> c = 1 -> e1 = 2 (the crossing block is included)
    S = [0.3, 0.25, 0.2, 0.15, 0.1]
    assert _rule_plan(S, levels={1: 0.5, 2: 0.5, 4: 0.5, 8: 0.5}, mode="thresholdbound", align="none") == [
        1,
        1,
        0,
        0,
        0,
    ]
    # min_full_fraction 0.5: e1 >= floor(2.5) + 1 = 3
    assert _rule_plan(
        S, levels={1: 0.0, 8: 0.0}, mode="thresholdbound", align="none", min_full_fraction=0.5
    ) == [1, 1, 1, 0, 0]


def test_topk_quantiles_and_alignment():
    S = [float(20 - i) for i in range(20)]  # already ranked
    lv = {1: 0.10, 2: 0.15, 4: 0.15, 8: 0.35}
    # ends floor(20 * tau) = 2, 3, 3, 7
    assert _rule_plan(S, levels=lv, mode="topk", align="none", block_k=64) == [1, 1, 2] + [8] * 4 + [0] * 13
    # b_k 64, tile 32: a_8 = 4; nk = 10: ends 1, 1, 1, 3 -> x8 length 2 rounds up to 4
    S10 = [float(10 - i) for i in range(10)]
    assert _rule_plan(S10, levels=lv, mode="topk", align="upstream", block_k=64) == [1] + [8] * 4 + [0] * 5


def test_energybound_intervals_and_forced_blocks():
    S = [0.5, 0.2, 0.15, 0.1, 0.05]
    lv = {1: 0.4, 2: 0.6, 4: 0.8, 8: 0.9}
    # C = (.5, .7, .85, .95, 1): ranks 0, 1, 2 -> 2, 4, 8; then block 0 (sink, diagonal of row 0) -> 1
    assert _rule_plan(S, levels=lv, mode="energybound", align="none") == [1, 4, 8, 0, 0]


def test_ties_rank_lower_block_first():
    S = [0.25, 0.25, 0.25, 0.25]
    assert _rule_plan(S, levels={1: 0.25, 2: 0.5}, mode="topk", align="none") == [1, 2, 0, 0]


def test_similarity_cap():
    bk, N = 32, 96
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, N, 1, 16, generator=g)
    k[:, 0:32] = k[:, 0:32:2].repeat_interleave(2, 1)  # block 0: pairs identical -> cap 2
    k[:, 32:64] = k[:, 32:33]  # block 1: constant -> cap 8; block 2 random -> cap 1
    s = torch.full((1, 1, 1, 3), 1.0)
    cfg = PyramidConfig(
        block_q=128, block_k=bk, levels={8: 1.0}, mode="topk", align="none", sim_thresholds=(0.7, 0.65, 0.6)
    )
    plan = pyramid_plan(k, k, config=cfg, scores=s)
    assert plan.to_dense()[0, 0, 0].tolist() == [2, 8, 1]
    off = pyramid_plan(k, k, config=cfg.replace(sim_thresholds=(-1, -1, -1)), scores=s)
    assert off.to_dense()[0, 0, 0].tolist() == [8, 8, 8]


def test_default_quotas_give_density_015():
    nk = 80
    N = nk * 64
    q = torch.zeros(1, N, 2, 16)
    s = torch.rand(1, 2, cdiv(N, 128), nk)
    plan = pyramid_plan(q, q, config=PyramidConfig(), scores=s)
    assert torch.allclose(plan.density(), torch.full((1, 2), 0.15))
    assert plan.exact_density().shape == (1, 2)


def test_text_rows_dense_and_text_keys_full():
    lay = SequenceLayout((1, 4, 40), text_len=30, text_position="end", text_valid_len=20)
    q = torch.randn(1, lay.seq_len, 1, 16)
    cfg = PyramidConfig(levels={1: 0.0, 8: 0.0}, mode="topk", align="none")._with_blocks(32, 32)
    d = pyramid_plan(q, q, config=cfg, seq_layout=lay).to_dense()[0, 0]
    nq, nk = cdiv(160, 32), cdiv(160, 32)
    assert (d[:nq, :nk] == 0).all() and (d[:nq, nk:] == 1).all() and (d[nq:] == 1).all()


def test_sampled_estimator_is_seeded_and_finds_the_diagonal():
    g = torch.Generator().manual_seed(0)
    N, D = 512, 16
    base = torch.randn(N // 64, D, generator=g) * 4
    q = base.repeat_interleave(64, 0)[None, :, None] + 0.1 * torch.randn(1, N, 1, D, generator=g)
    cfg = PyramidConfig(block_q=64, block_k=64, levels={1: 0.125}, mode="topk", align="none")
    a = pyramid_plan(q, q, config=cfg, keep_scores=True)
    b = pyramid_plan(q, q, config=cfg, keep_scores=True)
    assert torch.equal(a.kv_index, b.kv_index)
    assert torch.equal(a.to_dense()[0, 0], torch.eye(8, dtype=torch.int8))
    assert torch.allclose(a.scores.sum(-1), torch.ones(1, 1, 8))
    anti = pyramid_plan(q, q, config=cfg.replace(estimator="antidiagonal"))
    assert torch.equal(anti.to_dense()[0, 0], torch.eye(8, dtype=torch.int8))


# ------------------------------------------------------------------ plan objects
def test_plan_conversions_roundtrip(tmp_path):
    lay = SequenceLayout((2, 4, 9), text_len=10, text_position="start")
    q = torch.randn(2, lay.seq_len, 3, 16)
    plan = pyramid_plan(
        q,
        q,
        config=PyramidConfig(levels={1: 0.2, 2: 0.4, 4: 0.5, 8: 0.7})._with_blocks(16, 16),
        seq_layout=lay,
    )
    d = plan.to_dense()
    assert torch.equal(PyramidPlan.from_dense(d, block_q=16, block_k=16, seq_layout=lay).to_dense(), d)
    up = plan.to_upstream()
    assert up.shape[-1] == plan.num_kv_blocks + 5 and (up == -1).sum(-1).eq(5).all()
    assert torch.equal(
        PyramidPlan.from_upstream(up, block_q=16, block_k=16, seq_len=lay.seq_len, seq_layout=lay).to_dense(),
        d,
    )
    plan.save(tmp_path / "p.pt")
    back = PyramidPlan.load(tmp_path / "p.pt")
    assert torch.equal(back.kv_index, plan.kv_index) and back.seq_layout == lay and back.config == plan.config
    qi, qc = plan.transpose()
    assert qc.sum() == (d > 0).sum()
    # lists from an independent builder mean the same map
    idx, lp = lists_from_map(d)
    assert torch.equal(PyramidPlan(idx, lp, 16, 16, lay.seq_len, lay).to_dense(), d)



def test_upstream_format_against_hand_built_mask():
    # upstream's new mask format (spec §3.1; upstream calc_density_newtype): per row [n_k + 5] entries,
    # the block ids of factor 1, then 2, 4, 8, then the skipped ones, each segment closed by -1
    dense = torch.tensor(
        [
            [[2, 1, 0, 8, 1, 4], [8, 8, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]],
            [[0, 0, 0, 0, 0, 0], [4, 2, 4, 2, 8, 0], [0, 8, 0, 0, 0, 1]],
        ],
        dtype=torch.int8,
    )[None]  # [B=1, H=2, n_q=3, n_k=6]
    want = torch.tensor(
        [
            [
                [1, 4, -1, 0, -1, 5, -1, 3, -1, 2, -1],
                [2, 5, -1, -1, -1, 0, 1, -1, 3, 4, -1],
                [0, 1, 2, 3, 4, 5, -1, -1, -1, -1, -1],
            ],
            [
                [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5, -1],
                [-1, 1, 3, -1, 0, 2, -1, 4, -1, 5, -1],
                [5, -1, -1, -1, 1, -1, 0, 2, 3, 4, -1],
            ],
        ],
        dtype=torch.int32,
    )[None]
    geo = dict(block_q=32, block_k=16, seq_len=96)  # 3 query tiles, 6 KV blocks
    plan = PyramidPlan.from_dense(dense, **geo)
    assert torch.equal(plan.to_upstream(), want)
    assert torch.equal(PyramidPlan.from_upstream(want, **geo).to_dense(), dense)
    # within a segment the ids follow the rank (here: block 4 ranked before block 1 in row 0)
    rank = torch.arange(6).expand(1, 2, 3, 6).clone()
    rank[0, 0, 0, 4] = -1
    ranked = want.clone()
    ranked[0, 0, 0, :2] = torch.tensor([4, 1])
    assert torch.equal(PyramidPlan.from_dense(dense, rank=rank, **geo).to_upstream(), ranked)
    assert torch.equal(PyramidPlan.from_upstream(ranked, **geo).to_dense(), dense)

# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(block_k=48), "config.block_k"),
        (dict(block_k=16), r"config.block_k in \(32, 64, 128\), got config.block_k=16"),
        (dict(block_k=256), "config.block_k"),
        (dict(block_q=32), r"config.block_q in \(64, 128\), got config.block_q=32"),
        (dict(block_q=16), "config.block_q"),
        (dict(levels={3: 0.5}), "config.levels"),
        (dict(levels={1: 0.5, 2: 0.4}), "config.levels"),
        (dict(mode="nope"), "config.mode"),
        (dict(block_k=32, sample_fraction=0.03), "one sample per block"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PyramidConfig(**kw)



def test_test_only_block_sizes_stay_behind_the_escape_hatch(tmp_path):
    from visattn.ops._pyramid_config import allow_test_block_sizes

    with allow_test_block_sizes():
        inside = PyramidConfig(block_q=16, block_k=16)
        with pytest.raises(ValueError, match="config.block_q"):
            PyramidConfig(block_q=48)  # the hatch admits the test sizes only
    with pytest.raises(ValueError, match="config.block_k"):
        PyramidConfig(block_k=16)  # closed again
    small = PyramidConfig(levels={1: 0.5})._with_blocks(32, 16)
    assert (small.block_q, small.block_k, small.level_ends) == (32, 16, (0.5,) * 4) and inside.block_q == 16
    # a test-only config keeps its sizes through replace and save/load, changing them is checked
    assert small.replace(mode="thresholdbound").block_k == 16
    with pytest.raises(ValueError, match="config.block_q"):
        PyramidConfig().replace(block_q=32)
    assert small.replace(block_q=64).block_q == 64  # spec sizes are fine
    q = torch.randn(1, 40, 1, 16)
    pyramid_plan(q, q, config=small).save(tmp_path / "p.pt")
    assert PyramidPlan.load(tmp_path / "p.pt").config == small

def test_op_errors():
    q = torch.randn(1, 64, 2, 16)
    with pytest.raises(ValueError, match="rank 4"):
        pyramid_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="seq_layout"):
        pyramid_attention(q, q, q, seq_layout=SequenceLayout((1, 4, 4)))
    with pytest.raises(NotImplementedError, match="GQA"):
        pyramid_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="plan"):
        pyramid_attention(q, q, q, plan="x")
    plan = pyramid_plan(q, q, config=PyramidConfig()._with_blocks(16, 16))
    with pytest.raises(ValueError, match="plan"):
        pyramid_attention(q[:, :48], q[:, :48], q[:, :48], plan=plan)
    with pytest.raises(ValueError, match="scores"):
        pyramid_plan(q, q, config=PyramidConfig()._with_blocks(16, 16), scores=torch.zeros(1, 2, 3, 3))
    with pytest.raises(NotImplementedError, match="float64"):
        pyramid_attention(q.double(), q.double(), q.double(), plan=plan, backend="triton")



def test_plan_layout_mismatch():
    lay = SequenceLayout((1, 4, 8), text_len=16, text_position="end")
    q = torch.randn(1, lay.seq_len, 2, 16)
    cfg = PyramidConfig()._with_blocks(16, 16)
    one_segment = pyramid_plan(q, q, config=cfg)  # no layout: one segment over all 48 tokens
    with pytest.raises(ValueError, match=r"plan made for seq_layout=.*plan.seq_layout=None"):
        pyramid_attention(q, q, q, plan=one_segment, seq_layout=lay, backend="torch")
    hand_made = PyramidPlan.from_dense(one_segment.to_dense(), block_q=16, block_k=16, seq_len=lay.seq_len)
    with pytest.raises(ValueError, match="plan.seq_layout=None"):
        pyramid_attention(q, q, q, plan=hand_made, seq_layout=lay, backend="torch")
    other = SequenceLayout((1, 4, 8), text_len=16, text_position="start")
    with pytest.raises(ValueError, match="plan.seq_layout == seq_layout"):
        pyramid_attention(q, q, q, plan=pyramid_plan(q, q, config=cfg, seq_layout=lay), seq_layout=other)
    # fitting uses: the plan's own layout, and a one-segment plan made on purpose (text_keys="as_video")
    fit = pyramid_plan(q, q, config=cfg, seq_layout=lay)
    assert torch.equal(
        pyramid_attention(q, q, q, plan=fit, seq_layout=lay), pyramid_attention(q, q, q, plan=fit)
    )
    as_video = pyramid_plan(q, q, config=cfg.replace(text_keys="as_video"), seq_layout=lay)
    assert as_video.seq_layout is None
    pyramid_attention(q, q, q, plan=as_video, seq_layout=lay)


def test_triton_head_dim_reasons():
    # the message names the backend and lists every reason on its own line (no kernel is launched)
    N, D = 40, 264
    q = torch.randn(1, N, 1, D, dtype=torch.float64)
    plan = PyramidPlan.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.int8), block_q=16, block_k=16, seq_len=N)
    with pytest.raises(NotImplementedError) as info:
        pyramid_attention(q, q, q, plan=plan, backend="triton")
    msg = str(info.value)
    assert msg.startswith("No visattn backend can run pyramid attention") and "  backend 'triton':" in msg
    lines = msg.splitlines()
    assert "    - head dim 264 > 256 is not supported" in lines
    assert any(x.startswith("    - dtype torch.float64 is not supported") for x in lines)
    with pytest.raises(NotImplementedError, match="head dim 264 > 256"):
        pyramid_attention(q.float(), q.float(), q.float(), plan=plan, backend="triton")
    assert pyramid_attention(q, q, q, plan=plan, backend="torch").shape == q.shape  # torch runs it

def test_presets_load():
    for name in (
        "default",
        "wan21_14b",
        "wan21_1p3b",
        "wan21_1p3b_topk",
        "wan22_a14b",
        "wan22_5b",
        "cogvideox15_5b",
        "cogvideox_5b",
        "cogvideox_5b_4step_lora",
        "qwen25vl_videomme",
        "hunyuanvideo_720p",
    ):
        PyramidConfig.from_preset(name)
    assert PyramidConfig.from_preset("default") == PyramidConfig()
    assert PyramidConfig.from_preset("wan21_14b").level_ends == (0.4, 0.5, 0.6, 0.8)
    with pytest.raises(ValueError, match="preset"):
        PyramidConfig.from_preset("nope")


def test_sampled_estimator_matches_naive_definition():
    from visattn.ops._pyramid_rules import sample_offsets, sampled_scores

    g = torch.Generator().manual_seed(1)
    B, N, H, D, bq, bk = 1, 75, 2, 8, 16, 16
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    cfg = PyramidConfig()._with_blocks(bq, bk)
    S = sampled_scores(q, k, cfg, None, D**-0.5)
    qo, ko = sample_offsets(B, H, bq, 4, "cpu", None), sample_offsets(B, H, bk, 4, "cpu", None)
    nq, nk = cdiv(N, bq), cdiv(N, bk)
    for h in range(H):
        assert len(set(qo[0, h].tolist())) == 4
        krow = [[min(j * bk + o, min(N, (j + 1) * bk) - 1) for o in ko[0, h].tolist()] for j in range(nk)]
        want = torch.zeros(nq, nk)
        for i in range(nq):
            for o in qo[0, h].tolist():
                r = min(i * bq + o, min(N, (i + 1) * bq) - 1)
                m = torch.tensor(
                    [max((q[0, h, r] @ k[0, h, t]).item() * D**-0.5 for t in krow[j]) for j in range(nk)]
                )
                want[i] = torch.maximum(want[i], torch.exp(m - m.max()))
        want = want / want.sum(-1, keepdim=True)
        assert torch.allclose(S[0, h], want, atol=1e-6)



def _antidiagonal_naive(q, k, S, bq, bk, causal):
    """Spec §2.4 by loops for one head: q, k ``[N, D]`` video tokens, N a multiple of S."""
    N, D = q.shape
    G = N // S
    logit = torch.empty(G, G, dtype=torch.float64)
    for g in range(G):
        for h in range(G):
            dot = sum(float(q[g * S + S - 1 - u].double() @ k[h * S + u].double()) for u in range(S))
            logit[g, h] = dot / (D**0.5 * S) if not (causal and h > g) else float("-inf")
    p = torch.softmax(logit, -1)  # over each group row
    out = torch.zeros(cdiv(N, bq), cdiv(N, bk), dtype=torch.float64)
    for g in range(G):
        for h in range(G):
            out[g * S // bq, h * S // bk] += p[g, h]  # the blocks that hold groups g and h
    return out


@pytest.mark.parametrize("causal, text", [(False, False), (True, False), (False, True)])
def test_antidiagonal_estimator_matches_naive_definition(causal, text):
    from visattn.ops._pyramid_rules import antidiagonal_scores

    # 92 video tokens: 23 groups of S = 4, partial last blocks (92 = 2*32 + 28 = 5*16 + 12)
    lay = SequenceLayout((1, 4, 23), text_len=13, text_position="start") if text else None
    N = 92 + (13 if text else 0)
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, 2, N, 8, generator=g) for _ in range(2))  # [B, H, N, D]
    cfg = PyramidConfig(estimator="antidiagonal", antidiagonal_stride=4, causal=causal)._with_blocks(32, 16)
    got = antidiagonal_scores(q, k, cfg, lay)
    if not causal:  # the op plans with these scores (causal planning masks future blocks afterwards)
        bnhd = (q.transpose(1, 2), k.transpose(1, 2))
        assert torch.equal(pyramid_plan(*bnhd, config=cfg, seq_layout=lay, keep_scores=True).scores, got)
    vid = slice(13, N) if text else slice(0, N)  # the estimator sees the video segment only
    assert got.shape == (2, 2, 3, 6)
    for b in range(2):
        for h in range(2):
            want = _antidiagonal_naive(q[b, h, vid], k[b, h, vid], 4, 32, 16, causal)
            torch.testing.assert_close(got[b, h].double(), want, atol=1e-5, rtol=0)

@pytest.mark.parametrize(
    "estimator, reduce, causal, fraction",
    [
        ("sampled_max", "max", False, 0.25),  # keys in the chunk order (kernels._pyramid_planning.chunk_key_order)
        ("sampled_softmax_max", "mean", True, 0.25),
        ("sampled_softmax_max", "max", False, 0.25),
        ("sampled_max", "max", True, 1.0),  # block-major keys (16 samples: the chunk order does not apply)
    ],
)
def test_triton_estimator_matches_torch(estimator, reduce, causal, fraction, device):
    g = torch.Generator().manual_seed(2)
    lay = SequenceLayout((3, 5, 7), text_len=20, text_position="start") if not causal else None
    N = 150 if lay is None else lay.seq_len
    q, k = (torch.randn(2, N, 2, 16, generator=g).to(device) for _ in range(2))
    cfg = PyramidConfig(estimator=estimator, reduce=reduce, causal=causal, sample_fraction=fraction)
    cfg = cfg._with_blocks(32, 16)
    a = pyramid_plan(q, k, config=cfg, keep_scores=True, backend="torch", seq_layout=lay)
    b = pyramid_plan(q, k, config=cfg, keep_scores=True, backend="triton", seq_layout=lay)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize(
    "mode, levels, align, text",
    [
        ("topk", {1: 0.1, 2: 0.15, 4: 0.15, 8: 0.35}, "upstream", False),
        ("thresholdbound", {1: 0.4, 2: 0.5, 4: 0.6, 8: 0.8}, "upstream", True),
    ],
)
def test_triton_planner_matches_torch_rules(mode, levels, align, text, device):
    g = torch.Generator().manual_seed(3)
    lay = SequenceLayout((2, 5, 30), text_len=40, text_position="start") if text else None
    N = 700 if lay is None else lay.seq_len
    nv = N if lay is None else lay.num_video
    q = torch.zeros(2, N, 2, 16, device=device)
    s = torch.rand(2, 2, cdiv(nv, 128), cdiv(nv, 32), generator=g)
    s[0, 0, 0, :5] = 0.5  # ties: lower block first
    s[1, 1, 1] = 0.0  # an all-zero row
    cfg = PyramidConfig(block_q=128, block_k=32, mode=mode, levels=levels, align=align)
    a = pyramid_plan(q, q, config=cfg, scores=s.to(device), backend="torch", seq_layout=lay)
    b = pyramid_plan(q, q, config=cfg, scores=s.to(device), backend="triton", seq_layout=lay)
    assert torch.equal(a.kv_index, b.kv_index) and torch.equal(a.level_ptr, b.level_ptr)


def test_sample_index_is_built_once_per_shape_and_never_with_a_generator():
    from visattn.ops import _pyramid_rules as R

    R._INDEX_CACHE.clear()
    a = R._sample_index(1, 2, 3, 70, 16, 4, "cpu", None)
    assert R._sample_index(1, 2, 3, 70, 16, 4, "cpu", None) is a  # reused
    R._INDEX_CACHE.clear()
    b = R._sample_index(1, 2, 3, 70, 16, 4, "cpu", None)
    assert b is not a and torch.equal(a, b)  # the same rows when rebuilt
    off = R.sample_offsets(1, 2, 16, 4, "cpu", None)
    blk = torch.arange(5)[:, None]  # 70 tokens from 3: blocks of 16, the last one 6 long
    want = 3 + blk * 16 + torch.minimum(off[:, :, None, :], torch.where(blk == 4, 5, 15))
    assert torch.equal(a, want.flatten(2))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    x = R._sample_index(1, 2, 3, 70, 16, 4, "cpu", g1)
    y = R._sample_index(1, 2, 3, 70, 16, 4, "cpu", g2)
    assert not torch.equal(x, y) and len(R._INDEX_CACHE) == 1  # drawn from each generator, not cached
