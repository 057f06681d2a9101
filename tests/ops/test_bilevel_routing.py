"""CPU tests of ``visattn.ops`` bi-level routing: routing, references, Triton kernels, errors.

Oracles: ``_routing_utils`` (per-token Python loops, float64) checks routing and both reference
implementations; dense SDPA checks the degenerate cases (topk = P, n_win = 1); the float64 reference
with autograd then checks the Triton kernels, run here under ``TRITON_INTERPRET=1`` on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn.ops import (
    _dispatch,
    bilevel_routing_attention,
    bilevel_routing_attention_ref,
    region_routing,
    routed_attention,
    routed_attention_ref,
)

from ._routing_utils import assert_close, oracle_attention, oracle_routing

CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(
    bool(_dispatch.triton_reasons(CPU)), reason="Triton cannot run on CPU tensors here"
)


def maps(B, H, W, heads, d, dv=None, dtype=torch.float64, grad=False):
    dv = d if dv is None else dv
    q = torch.randn(B, H, W, heads, d, dtype=dtype)
    k = torch.randn(B, H, W, heads, d, dtype=dtype)
    v = torch.randn(B, H, W, heads, dv, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


# =============================================================================================
# routing


@pytest.mark.parametrize(
    "H, W, n, topk, padding",
    [
        (8, 8, 4, 3, "mask"),
        (15, 13, 7, 4, "mask"),
        (5, 9, 7, 2, "mask"),
        (15, 13, 7, 5, "zeros"),
        (6, 6, 3, 1, "mask"),
    ],
)
def test_routing_matches_oracle(H, W, n, topk, padding):
    q, k, _ = maps(2, H, W, 2, 8)
    r = region_routing(q, k, n, topk=topk, padding=padding)
    expect, region, grid = oracle_routing(q, k, (n, n), topk, 8**-0.5, padding)
    assert r.grid == grid and r.region_size == region
    assert r.index.dtype == torch.int32 and r.weight is None
    assert r.index.tolist() == expect


def test_zeros_geometry_follows_the_nchw_rule():
    q, k, _ = maps(1, 15, 15, 1, 8)
    r = region_routing(q, k, 7, topk=1, padding="zeros")
    assert r.region_size == (2, 2) and r.grid == (8, 8)  # floor(15 / 7) = 2, ceil(15 / 2) = 8 > n_win
    r = region_routing(q, k, 7, topk=1)
    assert r.region_size == (3, 3) and r.grid == (5, 5)


def test_routing_ties_go_to_the_lower_index_and_ascend():
    q = torch.zeros(1, 4, 4, 1, 4)
    k = torch.zeros(1, 4, 4, 1, 4)
    k[:, 2:, 2:] = 1.0  # region 3 wins, regions 0-2 tie at 0
    q[:] = 1.0
    r = region_routing(q, k, 2, topk=3)
    assert r.index.tolist() == [[[0, 1, 3]] * 4]


@needs_interpreter
@pytest.mark.parametrize("P, topk", [(1, 1), (5, 2), (16, 16), (49, 16), (64, 4), (100, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_topk_kernel_matches_a_stable_descending_sort(P, topk, dtype):
    from visattn.kernels.bilevel_routing import route_topk

    g = torch.Generator().manual_seed(P)
    # few distinct values, so most rows hold ties that the stable order must break by column
    logits = torch.randint(-3, 4, (2, P, P), generator=g).to(dtype) / 2
    logits[1] = torch.randn(P, P, generator=g, dtype=dtype)
    index = route_topk(logits, topk)
    assert index.dtype == torch.int32 and index.shape == (2, P, topk)
    want = [
        [sorted(sorted(range(P), key=lambda j: (-float(row[j]), j))[:topk]) for row in logits[b]]
        for b in range(2)
    ]
    assert index.tolist() == want


def test_routing_scale_invariance_and_detachment():
    q, k, _ = maps(2, 12, 12, 2, 8, grad=True)
    a = region_routing(q, k, 3, topk=4).index
    b = region_routing(q, k, 3, topk=4, scale=123.0).index
    assert torch.equal(a, b)
    assert not a.requires_grad
    # gradients of q and k equal those with the index frozen
    out = bilevel_routing_attention(q, k, q[..., :8], 3, topk=4, backend="torch")
    gq, gk = torch.autograd.grad(out.sum(), (q, k))
    out2 = routed_attention(q, k, q[..., :8], a, (4, 4), backend="torch")
    gq2, gk2 = torch.autograd.grad(out2.sum(), (q, k))
    torch.testing.assert_close(gq, gq2)
    torch.testing.assert_close(gk, gk2)


def test_routing_means_exclude_padding_in_mask_mode():
    # 5 columns, n_win 2 -> regions of 3 and 2 columns; the second region's mean is over 2 columns
    q = torch.zeros(1, 1, 5, 1, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, 5, 1, 2, dtype=torch.float64)
    q[..., 0] = 1.0
    k[0, 0, 3:, 0, 0] = 1.0  # mean 1 over valid tokens (0.67 if a padded zero were counted)
    k[0, 0, :3, 0, 0] = torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64)
    r = region_routing(q, k, (1, 2), topk=1)
    assert r.index[0, :, 0].tolist() == [1, 1]


def test_descriptors_stay_fp32_under_fp16():
    q, k, _ = maps(1, 14, 14, 2, 16, dtype=torch.float32)
    q16, k16 = q.half(), k.half()
    r16 = region_routing(q16, k16, 7, topk=4, routing="soft")
    r32 = region_routing(q16.float(), k16.float(), 7, topk=4, routing="soft")
    assert torch.equal(r16.index, r32.index)
    assert r16.weight.dtype == torch.float32
    torch.testing.assert_close(r16.weight, r32.weight)


# =============================================================================================
# references


@pytest.mark.parametrize(
    "H, W, n, topk, padding, heads",
    [
        (6, 6, 3, 2, "mask", 2),
        (7, 5, 3, 3, "mask", 1),
        (7, 5, 3, 4, "zeros", 2),
        (5, 9, 7, 3, "mask", 1),
    ],
)
def test_references_match_oracle(H, W, n, topk, padding, heads):
    q, k, v = maps(1, H, W, heads, 8, 6)
    r = region_routing(q, k, n, topk=topk, padding=padding)
    exp_o, exp_l = oracle_attention(q, k, v, r.index.tolist(), r.region_size, r.grid, 8**-0.5, padding)
    for impl in ("mask", "gather"):
        o, lse = routed_attention_ref(
            q, k, v, r.index, r.region_size, padding=padding, return_lse=True, impl=impl
        )
        torch.testing.assert_close(o, exp_o, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, exp_l, rtol=0, atol=1e-12)


def test_reference_per_head_index_matches_oracle():
    q, k, v = maps(1, 6, 6, 2, 8)
    idx = torch.stack(
        [torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3]]), torch.tensor([[3, 2], [2, 0], [1, 3], [0, 1]])]
    )
    idx = idx.sort(-1).values[None].int()  # [1, heads, P, 2]
    exp_o, _ = oracle_attention(q, k, v, idx.tolist(), (3, 3), (2, 2), 8**-0.5, "mask")
    for impl in ("mask", "gather"):
        torch.testing.assert_close(
            routed_attention_ref(q, k, v, idx, 3, impl=impl), exp_o, rtol=0, atol=1e-12
        )


def test_soft_routing_gather_and_mask_agree():
    q, k, v = maps(2, 8, 8, 2, 8)
    r = region_routing(q, k, 4, topk=3, routing="soft")
    a = routed_attention_ref(q, k, v, r.index, r.region_size, region_weight=r.weight)
    b = routed_attention_ref(q, k, v, r.index, r.region_size, region_weight=r.weight, impl="gather")
    torch.testing.assert_close(a, b)
    hard = routed_attention_ref(q, k, v, r.index, r.region_size)
    assert not torch.allclose(a, hard)


@pytest.mark.parametrize("H, W, n", [(8, 8, 4), (7, 9, 3), (6, 5, 1)])
def test_topk_P_and_n_win_1_equal_dense_attention(H, W, n):
    q, k, v = maps(2, H, W, 2, 8)
    P = len(range(0, H, -(-H // n))) * len(range(0, W, -(-W // n)))
    out = bilevel_routing_attention_ref(q, k, v, n, topk=P)
    dense = F.scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(out.shape))


# =============================================================================================
# Triton kernels (interpreter)


def _check_triton(q, k, v, idx, region, *, padding="mask", opts=None, dtype=torch.float32, lse_grad=True):
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out, lse = routed_attention(
        q, k, v, idx, region, padding=padding, return_lse=True, backend="triton", backend_options=opts
    )
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = routed_attention_ref(qd, kd, vd, idx, region, padding=padding, return_lse=True)
    lo = (
        routed_attention_ref(q.detach(), k.detach(), v.detach(), idx, region, padding=padding, upcast=False)
        if dtype != torch.float32
        else None
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ro, dtype, lo, "out")
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, None, "lse")
    go = torch.randn_like(out)
    gl = torch.randn_like(lse) if lse_grad else torch.zeros_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (rl * gl.double()).sum(), (qd, kd, vd))
    for name, g, rg in zip("qkv", grads, rgrads):
        assert_close(g, rg, dtype, None, f"d{name}", factor=4.0 if dtype != torch.float32 else 2.0)
    return grads


def _routed(q, k, n_win=None, region_size=None, topk=1, padding="mask"):
    r = region_routing(q.double(), k.double(), n_win, region_size=region_size, topk=topk, padding=padding)
    return r.index, r.region_size


KERNEL_CASES = [
    # id, (B, H, W, heads, d, dv), routing kwargs, padding, opts
    ("r1x1", (1, 6, 6, 1, 16, 16), dict(region_size=1, topk=5), "mask", None),
    ("r2x2-dv", (2, 8, 8, 2, 16, 8), dict(region_size=2, topk=3), "mask", None),
    ("r3x5", (1, 9, 10, 2, 16, 16), dict(region_size=(3, 5), topk=2), "mask", None),
    ("r4x4-G1", (1, 12, 12, 1, 32, 32), dict(n_win=3, topk=4), "mask", {"group": (1, 1)}),
    (
        "r8x4-chunks-b16",
        (1, 8, 8, 1, 16, 16),
        dict(region_size=(8, 4), topk=2),
        "mask",
        {"block_m": 16, "block_n": 16},
    ),
    ("r6x7-subboxes", (1, 8, 9, 1, 16, 16), dict(region_size=(6, 7), topk=2), "mask", None),
    ("15x13-n7", (1, 15, 13, 1, 16, 16), dict(n_win=7, topk=4), "mask", None),
    ("15x13-n7-zeros", (1, 15, 13, 1, 16, 16), dict(n_win=7, topk=4), "zeros", None),
    ("5x9-H<n", (1, 5, 9, 1, 16, 16), dict(n_win=7, topk=3), "mask", None),
    ("kP", (1, 6, 6, 1, 16, 16), dict(n_win=3, topk=9), "mask", None),
    ("d24-dv40-group2x3", (1, 8, 12, 2, 24, 40), dict(region_size=2, topk=3), "mask", {"group": (2, 3)}),
    ("group-partial-edge", (1, 10, 10, 1, 16, 16), dict(region_size=2, topk=2), "zeros", {"group": (3, 2)}),
]


@needs_interpreter
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_triton_matches_reference(case):
    _, (B, H, W, heads, d, dv), rk, padding, opts = case
    q, k, v = maps(B, H, W, heads, d, dv, dtype=torch.float32)
    idx, region = _routed(q, k, padding=padding, **rk)
    _check_triton(q, k, v, idx, region, padding=padding, opts=opts)


@needs_interpreter
def test_triton_fp16():
    q, k, v = maps(1, 8, 8, 2, 16, dtype=torch.float32)
    idx, region = _routed(q, k, region_size=2, topk=4)
    _check_triton(q, k, v, idx, region, dtype=torch.float16)


@needs_interpreter
@pytest.mark.parametrize("lists", ["disjoint", "identical"])
def test_triton_grouped_tiles_with_constructed_lists(lists):
    q, k, v = maps(1, 4, 8, 1, 16, dtype=torch.float32)  # 2x4 regions of 2x2, one 2x4 group of 8 regions
    P = 8
    if lists == "disjoint":
        idx = torch.arange(P).view(1, P, 1).int()
    else:
        idx = torch.tensor([1, 6]).expand(1, P, 2).int().contiguous()
    _check_triton(q, k, v, idx, 2, opts={"group": (2, 4)})


@needs_interpreter
def test_triton_per_head_index_and_strided_views():
    B, H, W, heads, d = 1, 6, 6, 2, 16
    qkv = torch.randn(B, H, W, 3 * heads * d)
    q, k, v = (t.view(B, H, W, heads, d) for t in qkv.split(heads * d, -1))  # strided views, no copies
    idx = torch.stack(
        [torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3]]), torch.tensor([[2, 3], [0, 2], [1, 3], [0, 1]])]
    )
    _check_triton(q, k, v, idx[None].int(), 3)


@needs_interpreter
def test_triton_1d_strip():
    q, k, v = (torch.randn(2, 37, 2, 16) for _ in range(3))
    r = region_routing(q.double(), k.double(), region_size=5, topk=3)
    assert r.grid == (8,) and r.index.shape == (2, 8, 3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = routed_attention(q, k, v, r.index, 5, backend="triton")
    ref = routed_attention_ref(q.double(), k.double(), v.double(), r.index, 5)
    assert out.shape == (2, 37, 2, 16)
    assert_close(out, ref, torch.float32, None, "out")


@needs_interpreter
@pytest.mark.parametrize(
    "grid, topk, group, heads",
    [((7, 7), 1, (1, 1), 1), ((7, 7), 16, (4, 4), 2), ((5, 9), 3, (2, 3), 1), ((10, 13), 5, (4, 8), 1),
     ((9, 9), 81, (2, 2), 1)],
)
def test_triton_plan_kernel_matches_the_torch_plan(grid, topk, group, heads):
    """The one-launch Triton planner equals ``build_plan`` (scatter + stable sort) on every listed entry."""
    from visattn.kernels.bilevel_routing import bra_plan
    from visattn.ops.bilevel_routing_plan import build_plan

    P = grid[0] * grid[1]
    rows = [torch.randperm(P)[:topk].sort().values for _ in range(2 * heads * P)]
    idx = torch.stack(rows).view(2, heads, P, topk).int()
    ref = build_plan(idx, grid, group)
    got = bra_plan(idx, grid, group, inverse=True)
    for lst, sel, cnt, g_lst, g_sel, g_cnt in [
        (ref.lst, ref.sel, ref.cnt, *got[:3]), (ref.ilst, ref.isel, ref.icnt, *got[3:])
    ]:
        assert torch.equal(cnt, g_cnt) and lst.shape == g_lst.shape
        listed = torch.arange(lst.shape[-1]) < cnt[..., None]
        assert torch.equal(lst[listed], g_lst[listed]) and torch.equal(sel[listed], g_sel[listed])
    assert bra_plan(idx, grid, group, inverse=False)[3].shape[-1] == 0


@needs_interpreter
@pytest.mark.parametrize(
    "region, want",
    [((4, 4), (16, 32, (1, 1))), ((5, 5), (32, 32, (1, 1))), ((4, 8), (32, 32, (1, 1))),
     ((8, 8), (64, 32, (1, 1))), ((2, 2), (64, 32, (4, 4))), ((3, 3), (64, 32, (1, 7)))],  # 7 regions of 9 tokens fill 63 rows
    ids=["16-tok", "25-tok", "32-tok", "64-tok", "4-tok", "9-tok"],
)
def test_gpu_tile_defaults(monkeypatch, region, want):
    # GPU defaults (benchmarks/NOTES.md, routing v3): regions of 16-32 tokens get a query tile each,
    # smaller ones are grouped into 64-row tiles, larger ones fill 64-row tiles; options still win
    import visattn.kernels.bilevel_routing as kb
    from visattn.ops._bilevel_routing_backends import triton_geometry

    monkeypatch.setattr(kb, "INTERPRET", False)
    cuda = torch.device("cuda")
    geo = triton_geometry(cuda, torch.bfloat16, region, (7, 7), {})
    assert (geo[6], geo[7], geo[4:6]) == want
    geo = triton_geometry(cuda, torch.bfloat16, region, (7, 7), {"block_m": 64, "group": (2, 2)})
    assert (geo[6], geo[4:6]) == (64, (2, 2))
    # the interpreter keeps its small tiles
    monkeypatch.setattr(kb, "INTERPRET", True)
    assert triton_geometry(cuda, torch.bfloat16, region, (7, 7), {})[6:] == (32, 32)


def test_triton_forward_without_gradient_matches_reference():
    q, k, v = maps(1, 9, 9, 2, 16, dtype=torch.float32)
    idx, region = _routed(q, k, region_size=3, topk=4)
    with torch.no_grad():
        out = routed_attention(q, k, v, idx, region, backend="triton")
    ref = routed_attention_ref(q.double(), k.double(), v.double(), idx, region)
    assert_close(out, ref, torch.float32, None, "out")


@needs_interpreter
def test_triton_backward_is_bitwise_repeatable():
    q, k, v = maps(1, 9, 9, 1, 16, dtype=torch.float32, grad=True)
    idx, region = _routed(q, k, region_size=3, topk=4)
    g1 = torch.autograd.grad(
        routed_attention(q, k, v, idx, region, backend="triton").square().sum(), (q, k, v)
    )
    g2 = torch.autograd.grad(
        routed_attention(q, k, v, idx, region, backend="triton").square().sum(), (q, k, v)
    )
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@needs_interpreter
def test_bilevel_op_triton_matches_reference_end_to_end():
    q, k, v = maps(2, 7, 7, 2, 16, dtype=torch.float32)
    out, lse, r = bilevel_routing_attention(
        q, k, v, 3, topk=3, scale=0.3, return_lse=True, return_routing=True, backend="triton"
    )
    ro, rl, rr = bilevel_routing_attention_ref(
        q, k, v, 3, topk=3, scale=0.3, return_lse=True, return_routing=True
    )
    assert torch.equal(r.index, rr.index)
    assert_close(out, ro, torch.float32, None, "out")


def test_auto_backend_bf16_on_cpu_is_correct_or_refused():
    q, k, v = maps(1, 6, 6, 1, 16, dtype=torch.bfloat16)
    out = bilevel_routing_attention(q, k, v, 3, topk=2)
    ref = bilevel_routing_attention_ref(q.double(), k.double(), v.double(), 3, topk=2)
    assert_close(out, ref, torch.bfloat16, None, "out")
    with pytest.raises(NotImplementedError, match="bfloat16"):
        bilevel_routing_attention(q, k, v, 3, topk=2, backend="triton")


def test_flex_backend_matches_reference():
    q, k, v = maps(1, 8, 8, 2, 16, dtype=torch.float32)
    with torch.no_grad():
        for padding in ("mask", "zeros"):
            out = bilevel_routing_attention(q, k, v, 3, topk=3, padding=padding, backend="flex")
            ref = bilevel_routing_attention_ref(q, k, v, 3, topk=3, padding=padding)
            assert_close(out, ref, torch.float32, None, f"flex {padding}")


def test_torch_backend_gather_and_mask_agree():
    q, k, v = maps(1, 9, 7, 2, 8, dtype=torch.float32)
    a = bilevel_routing_attention(q, k, v, 3, topk=2, backend="torch", backend_options={"impl": "gather"})
    b = bilevel_routing_attention(q, k, v, 3, topk=2, backend="torch", backend_options={"impl": "mask"})
    torch.testing.assert_close(a, b)


def test_soft_routing_is_refused_by_triton_with_a_reason():
    q, k, v = maps(1, 6, 6, 1, 16, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="soft routing"):
        bilevel_routing_attention(q, k, v, 3, topk=2, routing="soft", backend="triton")


# =============================================================================================
# errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_win=3, topk=16), r"topk=16 must be <= the number of regions P=9 \(grid 3x3\)"),
        (dict(n_win=3, topk=0), "topk=0 must be >= 1"),
        (dict(topk=2), "exactly one of n_win and region_size"),
        (dict(n_win=3, region_size=2, topk=2), "exactly one of n_win and region_size"),
        (dict(n_win=(3, 0), topk=2), r"n_win >= 1 on every axis.*axis W"),
        (dict(n_win=3, topk=2, padding="reflect"), "padding"),
        (dict(n_win=3, topk=2, routing="fuzzy"), "routing"),
        (dict(n_win=9, topk=2, padding="zeros"), "n_win on every axis, got size 6 < n_win 9 on axis H"),
        (dict(n_win=3, topk=2, backend="nope"), "backend"),
        (dict(n_win=3, topk=2, backend="torch", backend_options={"impl": "x"}), "impl"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = maps(1, 6, 6, 2, 8)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        bilevel_routing_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = maps(1, 6, 6, 2, 8)
    with pytest.raises(ValueError, match=r"axis 2 \(spatial 1\)"):
        bilevel_routing_attention(q, k[:, :, :5], v[:, :, :5], 3, topk=2)
    with pytest.raises(ValueError, match="dtype"):
        bilevel_routing_attention(q, k.float(), v, 3, topk=2)
    with pytest.raises(ValueError, match="rank 5"):
        bilevel_routing_attention(q[0], k[0], v[0, 0], 3, topk=2)
    with pytest.raises(ValueError, match=r"axis 3 \(heads\)"):
        bilevel_routing_attention(q, k, v[..., :1, :], 3, topk=2)
    with pytest.raises(ValueError, match="d_qk"):
        bilevel_routing_attention(q, k[..., :4], v, 3, topk=2)
    with pytest.raises(ValueError, match="region_index of shape"):
        routed_attention(q, k, v, torch.zeros(1, 5, 2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="int32/int64"):
        routed_attention(q, k, v, torch.zeros(1, 9, 2), 2)
    with pytest.raises(ValueError, match="region_index on q's device"):
        routed_attention(q, k, v, torch.zeros(1, 9, 2, dtype=torch.int32, device="meta"), 2)
    with pytest.raises(ValueError, match="region_weight"):
        routed_attention(
            q, k, v, torch.zeros(1, 9, 2, dtype=torch.int32), 2, region_weight=torch.ones(1, 9, 3)
        )


def test_debug_mode_checks_index_values(monkeypatch):
    q, k, v = maps(1, 6, 6, 1, 8)
    monkeypatch.setenv("VISATTN_DEBUG", "1")
    with pytest.raises(ValueError, match=r"values in \[0, P=4\)"):
        routed_attention(q, k, v, torch.tensor([[[0], [1], [2], [4]]], dtype=torch.int32), 3, backend="torch")
    with pytest.raises(ValueError, match="duplicate-free"):
        routed_attention(
            q, k, v, torch.tensor([[[0, 0], [1, 2], [2, 3], [0, 1]]], dtype=torch.int32), 3, backend="torch"
        )
