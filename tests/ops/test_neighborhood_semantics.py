"""CPU tests of neighborhood-attention semantics (pure torch, fast): ``specs/neighborhood.md`` §2 and §6.

Oracles: the golden 1-D table of §2.3 (typed by hand from the spec); NATTEN v0.14.6's window-start and
bias-start formulas, restated; NATTEN 0.21.7 itself (``natten.na1d/2d/3d``, Flex backend on the CPU);
dense SDPA for degenerate windows; and an independent float64 dense oracle built from a plain-Python
restatement of §2.2 (``_neighborhood_utils``). Error paths of §2.6 are matched by message.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from visattn.ops.neighborhood import (
    merge_attentions,
    neighborhood_attention,
    neighborhood_attention_ref,
    neighborhood_attention_weights,
    neighborhood_mask,
    neighborhood_windows,
    suggest_block_sparse,
)
from visattn.ops.neighborhood_ref import axis_windows, clamp_neighborhood

from ._neighborhood_utils import dense_oracle, make_qkv, spec_mask, spec_rpb_bias, spec_window

HYP = settings(max_examples=40, deadline=None, derandomize=True)


def _torch_na(q, k, v, ks, **kw):
    return neighborhood_attention(q, k, v, ks, backend="torch", **kw)


# =============================================================================================
# window rule: golden table, NATTEN v0.14.6 restated, the plain-Python restatement


def _keys(cell: str) -> list[int]:
    if cell.startswith("{"):
        return [int(x) for x in cell.strip("{}").split(",")]
    a, b = (cell.split("-") + [cell])[:2]
    return list(range(int(a), int(b) + 1))


# (L, k, s, d, causal): row of the §2.3 table, typed from the spec
GOLDEN = [
    ((7, 3, 1, 1, False), "0-2 0-2 1-3 2-4 3-5 4-6 4-6"),
    ((6, 4, 1, 1, False), "0-3 0-3 0-3 1-4 2-5 2-5"),
    ((6, 2, 1, 1, False), "0-1 0-1 1-2 2-3 3-4 4-5"),
    ((8, 3, 1, 2, False), "{0,2,4} {1,3,5} {0,2,4} {1,3,5} {2,4,6} {3,5,7} {2,4,6} {3,5,7}"),
    ((7, 3, 1, 2, False), "{0,2,4} {1,3,5} {0,2,4} {1,3,5} {2,4,6} {1,3,5} {2,4,6}"),
    ((8, 4, 2, 1, False), "0-3 0-3 1-4 1-4 3-6 3-6 4-7 4-7"),
    ((8, 4, 4, 1, False), "0-3 0-3 0-3 0-3 4-7 4-7 4-7 4-7"),
    ((7, 3, 2, 1, False), "0-2 0-2 2-4 2-4 4-6 4-6 4-6"),
    ((6, 3, 1, 1, True), "{0} 0-1 0-2 1-3 2-4 3-5"),
    ((8, 4, 2, 1, True), "{0} 0-1 0-2 0-3 2-4 2-5 4-6 4-7"),
]


@pytest.mark.parametrize("cfg, row", GOLDEN, ids=[f"L{c[0]}k{c[1]}s{c[2]}d{c[3]}{'c' if c[4] else ''}" for c, _ in GOLDEN])
def test_golden_windows(cfg, row):
    L, k, s, d, c = cfg
    want = [_keys(cell) for cell in row.split()]
    assert len(want) == L
    start, end = axis_windows(L, k, s, d, c)
    got = [list(range(int(a) * d + x % d, int(b) * d + x % d + 1, d)) for x, (a, b) in enumerate(zip(start, end))]
    assert got == want
    mask = neighborhood_mask((L,), k, s, d, c)
    assert [torch.nonzero(mask[x]).flatten().tolist() for x in range(L)] == want
    assert [spec_window(L, k, s, d, c, x) for x in range(L)] == want  # the tests' own restatement


def _natten014_window_start(index, length, k, d):
    """NATTEN v0.14.6 ``get_window_start`` (natten_cpu_commons.h), odd k; natural coordinates."""
    nb = k // 2
    if d <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    ni = index - nb * d
    if ni < 0:
        return index % d
    if index + nb * d >= length:
        imodd = index % d
        a = (length // d) * d
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * d
        return a + imodd - k * d
    return ni


def _natten014_pb_start(index, length, k, d):
    """NATTEN v0.14.6 ``get_pb_start``: RPB index of the first window slot, odd k."""
    nb = k // 2
    if d <= 1:
        return nb + (index < nb) * (nb - index) + (index + nb >= length) * (length - index - 1 - nb)
    if index - nb * d < 0:
        return k - 1 - index // d
    if index + nb * d >= length:
        return (length - index - 1) // d
    return nb


def test_natten_v0146_window_and_bias_start_formulas():
    checked = 0
    for L in range(1, 41):
        for k in range(1, L + 1, 2):
            for d in range(1, L // k + 1):
                start, end = axis_windows(L, k, 1, d, False)
                for x in range(L):
                    s0 = _natten014_window_start(x, L, k, d)
                    assert int(start[x]) * d + x % d == s0, (L, k, d, x)
                    assert int(end[x]) - int(start[x]) == k - 1
                    # §2.4: slot t has offset (j - i) + k - 1 with j = start + t (group coordinates)
                    assert int(start[x]) - x // d + k - 1 == _natten014_pb_start(x, L, k, d), (L, k, d, x)
                    checked += 1
    assert checked > 10_000


@given(L=st.integers(1, 40), data=st.data())
@HYP
def test_axis_windows_equal_restatement(L, data):
    k = data.draw(st.integers(1, L))
    d = data.draw(st.integers(1, L // k))
    s = data.draw(st.integers(1, k))
    c = data.draw(st.booleans())
    start, end = axis_windows(L, k, s, d, c)
    for x in range(L):
        assert list(range(int(start[x]) * d + x % d, int(end[x]) * d + x % d + 1, d)) == spec_window(L, k, s, d, c, x)


# =============================================================================================
# NATTEN 0.21.7 as oracle


def _random_configs(n_cfg=30, seed=1234):
    rng = random.Random(seed)
    out = []
    while len(out) < n_cfg:
        n = [1, 1, 2, 2, 3][len(out) % 5]
        if n == 1:
            size = (rng.randint(2, 40),)
        elif n == 2:
            size = (rng.randint(2, 14), rng.randint(2, 14))
        else:
            size = tuple(rng.randint(2, 6) for _ in range(3))
        if math.prod(size) > 256:
            continue
        ks, st_, dl, cs = [], [], [], []
        for L in size:
            k = rng.randint(2, L)
            d = rng.randint(1, L // k)
            ks.append(k), dl.append(d), st_.append(rng.randint(1, k)), cs.append(rng.random() < 0.35)
        out.append((size, tuple(ks), tuple(st_), tuple(dl), tuple(cs)))
    return out


NATTEN_CFGS = _random_configs() + [((9,), (9,), (2,), (1,), (True,))]  # the 1-D causal k = L cell


@pytest.fixture
def flex_uncompiled(monkeypatch):
    """Run NATTEN's Flex backend without dynamo (its eager path recompiles per mask, ~1.5 s a call);
    the mask is still NATTEN's own ``mask_mod``, evaluated by Flex's math implementation."""
    from torch.nn.attention import flex_attention as fa

    monkeypatch.setattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True, raising=False)


def _natten_call(fn, *args, causal_full_1d, **kw):
    try:
        return fn(*args, **kw)
    except NotImplementedError as e:
        if causal_full_1d:  # spec §6: NATTEN routes 1-D causal k = L to its FMHA (no CPU causal backend)
            pytest.skip(f"NATTEN: {e}")
        raise


@pytest.mark.parametrize("cfg", NATTEN_CFGS, ids=[str(i) for i in range(len(NATTEN_CFGS))])
def test_neighbor_sets_match_natten(cfg, flex_uncompiled):
    natten = pytest.importorskip("natten")
    size, ks, st_, dl, cs = cfg
    n, N = len(size), math.prod(size)
    D = max(16, 1 << (N - 1).bit_length())
    q = torch.zeros(1, *size, 1, D)
    v = torch.zeros(1, *size, 1, D)
    v.view(N, D)[:, :N] = torch.eye(N)  # one-hot values: output row = averaging weights over N(x)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    out = _natten_call(fn, q, q, v, ks, stride=st_, dilation=dl, is_causal=cs,
                       causal_full_1d=n == 1 and cs[0] and ks[0] == size[0])
    theirs = out.reshape(N, D)[:, :N] > 0
    ours = neighborhood_mask(size, ks, st_, dl, cs)
    bad = (theirs != ours).nonzero()[:5].tolist()
    assert not bad, f"{cfg}: mask differs from NATTEN at (query, key) {bad}"
    assert torch.equal(ours, spec_mask(size, ks, st_, dl, cs))


@pytest.mark.parametrize("cfg", NATTEN_CFGS[2:5], ids=["2d-a", "2d-b", "3d"])
@pytest.mark.parametrize("n_extra", [0, 5])
def test_outputs_and_lse_match_natten(cfg, n_extra):
    natten = pytest.importorskip("natten")
    size, ks, st_, dl, cs = cfg
    q, k, v = make_qkv(2, size, 2, 2, 16)
    kw = dict(stride=st_, dilation=dl, is_causal=cs, scale=0.37)
    ekv = (torch.randn(2, n_extra, 2, 16), torch.randn(2, n_extra, 2, 16)) if n_extra else None
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(size)]
    o_n, l_n = _natten_call(fn, q, k, v, ks, **kw, additional_keys=None if ekv is None else ekv[0],
                            additional_values=None if ekv is None else ekv[1], return_lse=True,
                            causal_full_1d=len(size) == 1 and cs[0] and ks[0] == size[0])
    o_r, l_r = neighborhood_attention_ref(q, k, v, ks, **kw, extra_kv=ekv, return_lse=True)
    assert (o_n - o_r).abs().max() < 2e-6 and (l_n.float() - l_r).abs().max() < 2e-6


# =============================================================================================
# tables, masks and structural properties


@given(L=st.integers(1, 30), data=st.data())
@HYP
def test_inverse_tables_consistent_with_mask(L, data):
    k = data.draw(st.integers(1, L))
    d = data.draw(st.integers(1, L // k))
    s = data.draw(st.integers(1, k))
    c = data.draw(st.booleans())
    _, _, lo, hi = neighborhood_windows((L,), k, s, d, c)
    mask = neighborhood_mask((L,), k, s, d, c)
    for y in range(L):
        queries = [x // d for x in range(L) if mask[x, y]]  # group coordinates (all share y's group)
        want = (queries[0], queries[-1]) if queries else None
        got = (int(lo[0][y]), int(hi[0][y]))
        assert (want is None and got[0] > got[1]) or got == want, (y, got, queries)
        assert queries == list(range(queries[0], queries[-1] + 1)) if queries else True


_axis = st.tuples(st.integers(2, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.booleans())


def _fit(ax):
    """Clamp a drawn (L, k, s, d, c) to a valid per-axis configuration."""
    L, k, s, d, c = ax
    d = min(d, L)
    k = min(k, L // d)
    return L, k, min(s, k), d, c


@given(st.lists(_axis, min_size=1, max_size=3))
@HYP
def test_exact_count_and_separability(axes):
    axes = [_fit(a) for a in axes]
    size, ks, st_, dl, cs = (tuple(x) for x in zip(*axes))
    mask = neighborhood_mask(size, ks, st_, dl, cs)
    per_axis = [neighborhood_mask((a[0],), *a[1:]) for a in axes]
    kron = per_axis[0]
    for m in per_axis[1:]:
        kron = torch.kron(kron.int(), m.int()).bool()
    assert torch.equal(mask, kron)
    if not any(cs):
        assert (mask.sum(1) == math.prod(ks)).all()
    assert mask.diagonal().all()  # every query lies in its own window


@given(L=st.integers(4, 24), data=st.data())
@HYP
def test_blocked_equivalence(L, data):
    k = data.draw(st.sampled_from([x for x in range(1, L + 1) if L % x == 0]))
    mask = neighborhood_mask((L,), k, k)
    blocks = torch.arange(L) // k
    assert torch.equal(mask, blocks[:, None] == blocks[None, :])


@given(L=st.integers(12, 40), data=st.data())
@HYP
def test_interior_translation_equivariance(L, data):
    k = data.draw(st.integers(1, L // 3))
    s = data.draw(st.integers(1, k))
    start, end = axis_windows(L, k, s, 1, False)
    for x in range(k + s, L - k - 2 * s):
        assert int(start[x + s]) == int(start[x]) + s and int(end[x + s]) == int(end[x]) + s, x


@given(st.lists(_axis, min_size=1, max_size=2), st.integers(0, 10**6))
@settings(max_examples=15, deadline=None, derandomize=True)
def test_dilation_decomposition(axes, seed):
    axes = [_fit(a) for a in axes]
    size, ks, st_, dl, cs = (tuple(x) for x in zip(*axes))
    torch.manual_seed(seed)
    q, k, v = make_qkv(1, size, 2, 1, 8, dtype=torch.float64)
    out = neighborhood_attention_ref(q, k, v, ks, stride=st_, dilation=dl, is_causal=cs)
    for g in itertools.product(*[range(d) for d in dl]):
        sl = (slice(None), *[slice(g[a], None, dl[a]) for a in range(len(size))])
        sub = neighborhood_attention_ref(q[sl], k[sl], v[sl], ks, stride=st_, dilation=1, is_causal=cs)
        torch.testing.assert_close(out[sl], sub, rtol=0, atol=1e-12)


@given(st.lists(_axis, min_size=1, max_size=3), st.integers(0, 3), st.integers(0, 10**6))
@settings(max_examples=15, deadline=None, derandomize=True)
def test_lse_merge_with_extras(axes, n_extra, seed):
    axes = [_fit(a) for a in axes]
    size, ks, st_, dl, cs = (tuple(x) for x in zip(*axes))
    torch.manual_seed(seed)
    q, k, v = make_qkv(2, size, 2, 2, 8, dtype=torch.float64)
    ekv = (torch.randn(2, n_extra, 2, 8, dtype=torch.float64), torch.randn(2, n_extra, 2, 8, dtype=torch.float64))
    kw = dict(stride=st_, dilation=dl, is_causal=cs, return_lse=True)
    o, l = neighborhood_attention_ref(q, k, v, ks, extra_kv=ekv, **kw)
    o1, l1 = neighborhood_attention_ref(q, k, v, ks, **kw)
    N = math.prod(size)
    o2, l2 = dense_oracle(q, k, v, torch.zeros(N, N, dtype=torch.bool), extra_kv=ekv)  # extras only
    om, lm = merge_attentions([o1, o2], [l1, l2])
    torch.testing.assert_close(om, o, rtol=0, atol=1e-12)
    torch.testing.assert_close(lm, l, rtol=0, atol=1e-12)
    if n_extra == 0:
        assert torch.isinf(l2).all()


# =============================================================================================
# the reference against independent oracles


@pytest.mark.parametrize("size", [(9,), (5, 6), (3, 4, 5)])
def test_full_window_equals_sdpa(size):
    q, k, v = make_qkv(2, size, 4, 2, 8, dtype=torch.float64)
    N = math.prod(size)
    out, lse = _torch_na(q, k, v, size, stride=tuple(max(1, x // 2) for x in size), return_lse=True)
    qh, kh, vh = (t.reshape(2, N, t.shape[-2], 8).transpose(1, 2) for t in (q, k, v))
    want = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True).transpose(1, 2).reshape(out.shape)
    logits = qh @ kh.repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, logits.logsumexp(-1).transpose(1, 2).reshape(lse.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("L, s", [(7, 1), (8, 3), (8, 8)])
def test_1d_causal_full_window_equals_causal_sdpa(L, s):
    q, k, v = make_qkv(2, (L,), 2, 2, 8, dtype=torch.float64)
    out = _torch_na(q, k, v, L, stride=s, is_causal=True)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-12)


CFGS_2D = [  # (size, k, s, d, causal): even k, stride, dilation with X mod d != 0, mixed causality
    ((6, 7), (4, 3), (2, 1), (1, 2), (True, False)),
    ((9, 5), (3, 2), (3, 2), (3, 1), (False, True)),
    ((4, 3, 5), (2, 3, 2), (1, 3, 2), (2, 1, 2), (False, False, True)),
]


@pytest.mark.parametrize("cfg", CFGS_2D, ids=["2d-a", "2d-b", "3d"])
@pytest.mark.parametrize("feature", ["extra", "gqa", "rpb", "kpm", "all"])
def test_reference_matches_dense_oracle(cfg, feature):
    size, ks, st_, dl, cs = cfg
    B, H, Hk = 2, 4, (2 if feature in ("gqa", "all") else 4)
    q, k, v = make_qkv(B, size, H, Hk, 8, 16, dtype=torch.float64)
    ekv = None
    if feature in ("extra", "all"):
        ekv = (torch.randn(B, 3, Hk, 8, dtype=torch.float64), torch.randn(B, 3, Hk, 16, dtype=torch.float64))
    rpb = torch.randn(H, *(2 * x - 1 for x in ks), dtype=torch.float64) if feature in ("rpb", "all") else None
    kpm = torch.rand(B, *size) > 0.3 if feature in ("kpm", "all") else None
    out, lse = _torch_na(q, k, v, ks, stride=st_, dilation=dl, is_causal=cs, extra_kv=ekv, rpb=rpb,
                         key_padding_mask=kpm, return_lse=True, scale=0.6)
    bias = None if rpb is None else spec_rpb_bias(rpb, size, ks, dl)
    want, wlse = dense_oracle(q, k, v, spec_mask(size, ks, st_, dl, cs), scale=0.6, extra_kv=ekv, bias=bias,
                              key_padding_mask=kpm)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, wlse, rtol=0, atol=1e-12)
    if feature == "gqa":  # equals repeat-KV
        rep = _torch_na(q, k.repeat_interleave(2, -2), v.repeat_interleave(2, -2), ks, stride=st_, dilation=dl,
                        is_causal=cs, scale=0.6)
        torch.testing.assert_close(out, rep, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fully_masked_rows(dtype):
    q, k, v = make_qkv(1, (8,), 2, 1, 8, dtype=dtype, requires_grad=True)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, :4] = False  # queries 0, 1, 2 (windows 0-2, 0-2, 1-3) lose every key
    out, lse = _torch_na(q, k, v, 3, key_padding_mask=kpm, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0, :3] == 0).all() and torch.isneginf(lse[0, :3]).all() and torch.isfinite(lse[0, 3:]).all()
    finite = torch.isfinite(lse)
    loss = (out * torch.randn_like(out)).sum() + torch.where(finite, lse, torch.zeros_like(lse)).sum()
    gq, gk, gv = torch.autograd.grad(loss, (q, k, v))
    for g in (gq, gk, gv):
        assert not g.isnan().any()
    assert (gq[0, :3] == 0).all() and (gk[0, :4] == 0).all() and (gv[0, :4] == 0).all()
    want, _ = dense_oracle(q.detach(), k.detach(), v.detach(), spec_mask((8,), (3,), (1,), (1,), (False,)),
                           key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zero_and_tiny_scale_honoured(scale):
    size, ks = (5, 6), (3, 2)
    q, k, v = make_qkv(1, size, 2, 2, 8, dtype=torch.float64)
    out, lse = _torch_na(q * 100, k * 100, v, ks, scale=scale, return_lse=True)
    mask = spec_mask(size, ks, (1, 1), (1, 1), (False, False)).double()
    mean = torch.einsum("nm,mhd->nhd", mask / mask.sum(1, keepdim=True), v[0].reshape(30, 2, 8))
    torch.testing.assert_close(out[0].reshape(30, 2, 8), mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(6)), rtol=0, atol=1e-9)


def test_gradcheck_float64():
    size, ks = (3, 3), (2, 2)
    q, k, v = make_qkv(1, size, 2, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    ke, ve = (torch.randn(1, 2, 1, d, dtype=torch.float64, requires_grad=True) for d in (2, 3))

    def fn(q, k, v, rpb, ke, ve):
        o, l = _torch_na(q, k, v, ks, stride=(2, 1), is_causal=(False, True), rpb=rpb, extra_kv=(ke, ve),
                         return_lse=True, scale=0.8)
        return o, l

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb, ke, ve))


@pytest.mark.parametrize("cfg", CFGS_2D + [((7,), (4,), (2,), (1,), (True,))], ids=["2d-a", "2d-b", "3d", "1d"])
def test_attention_weights(cfg):
    size, ks, st_, dl, cs = cfg
    q, k, _ = make_qkv(1, size, 2, 1, 8, dtype=torch.float64)
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), dtype=torch.float64)
    w = neighborhood_attention_weights(q, k, ks, stride=st_, dilation=dl, is_causal=cs, rpb=rpb)
    N = math.prod(size)
    assert w.shape == (1, *size, 2, math.prod(ks))
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-12)
    eye = torch.eye(N, dtype=torch.float64).reshape(1, *size, 1, N)
    probs, _ = dense_oracle(q, k, eye, spec_mask(size, ks, st_, dl, cs), bias=spec_rpb_bias(rpb, size, ks, dl))
    coords = list(itertools.product(*[range(x) for x in size]))
    for qi, x in enumerate(coords):
        wins = [spec_window(size[a], ks[a], st_[a], dl[a], cs[a], x[a]) for a in range(len(size))]
        for slot, t in enumerate(itertools.product(*[range(kk) for kk in ks])):
            if any(t[a] >= len(wins[a]) for a in range(len(size))):
                assert (w[0][x][:, slot] == 0).all()
                continue
            key = 0
            for a in range(len(size)):
                key = key * size[a] + wins[a][t[a]]
            torch.testing.assert_close(w[0][x][:, slot], probs.reshape(N, 2, N)[qi, :, key], rtol=0, atol=1e-12)


# =============================================================================================
# utilities


def test_clamp_neighborhood():
    assert clamp_neighborhood((5, 20, 3), (7, 7, 7), (3, 7, 7), (1, 2, 2)) == ((5, 7, 1), (3, 7, 1), (1, 2, 2))
    assert clamp_neighborhood((4,), 3, 3, 2) == ((2,), (2,), (2,))


def _partial_tiles(size, ks, stride, dl, q_tile, kv_tile) -> list:
    """Per axis, the (axis, group, Q tile start, KV tile start) of every partial KV tile the kernel's walk
    visits (spec §4.2, kernels/neighborhood.py): KV tiles step by ``kv_tile`` from the union start of
    the Q tile's windows up to the union end; a tile is full inside the intersection of the windows."""
    bad = []
    for a in range(len(size)):
        for g in range(dl[a]):
            lg = len(range(g, size[a], dl[a]))
            win = [[(y - g) // dl[a] for y in spec_window(size[a], ks[a], stride[a], dl[a], False, i * dl[a] + g)]
                   for i in range(lg)]
            for t0 in range(0, lg, q_tile[a]):
                rows = win[t0:t0 + q_tile[a]]
                lo, hi = rows[0][0], rows[-1][-1]
                fs, fe = rows[-1][0], rows[0][-1]
                for j in range(lo, hi + 1, kv_tile[a]):
                    if j < fs or j + kv_tile[a] - 1 > min(fe, lg - 1):
                        bad.append((a, g, t0, j))
    return bad


@pytest.mark.parametrize("size, ks, s, d", [((32, 32), (8, 8), 1, 1), ((32, 32), (16, 16), 1, 1),
                                            ((64, 64), (32, 32), 8, 1), ((16, 16, 16), (8, 8, 8), 1, 1),
                                            ((32, 32), (16, 16), 1, 2), ((48, 40), (24, 16), 4, 1)])
def test_suggest_block_sparse_tiles_are_full(size, ks, s, d):
    cfg = suggest_block_sparse(size, ks, s, d)
    assert cfg is not None
    n = len(size)
    dl = (d,) * n
    qt, kt, stv = cfg["q_tile"], cfg["kv_tile"], cfg["stride"]
    assert math.prod(qt) in (64, 128) and math.prod(kt) in (64, 128)
    for a in range(n):  # the documented divisibility
        assert (size[a] // dl[a]) % qt[a] == 0 and ks[a] % kt[a] == 0 and stv[a] % qt[a] == 0
        assert 1 <= stv[a] <= ks[a] and ks[a] % stv[a] == 0
    bad = _partial_tiles(size, ks, stv, dl, qt, kt)
    assert not bad, f"suggest_block_sparse{(size, ks, s, d)} = {cfg} leaves partial tiles (axis, g, q, kv): {bad[:4]}"


@pytest.mark.parametrize("size, ks", [((56, 56), (7, 7)), ((64,), 16), ((30, 30), (8, 8))])
def test_suggest_block_sparse_none_when_impossible(size, ks):
    assert suggest_block_sparse(size, ks) is None


# =============================================================================================
# errors (§2.6) and backend refusals


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


ERRORS = [
    ("rank", lambda: _torch_na(_t(2, 3), _t(2, 3), _t(2, 3), 1), r"rank 4, 5 or 6"),
    ("k-rank", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 1, 2, 8), _t(1, 8, 2, 8), 3), r"expected k of rank 4"),
    ("spatial", lambda: _torch_na(_t(1, 6, 7, 2, 8), _t(1, 6, 8, 2, 8), _t(1, 6, 7, 2, 8), 3),
     r"k\.shape\[2\] == q\.shape\[2\]"),
    ("batch", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(2, 8, 2, 8), 3), r"v\.shape\[0\] == q\.shape\[0\]"),
    ("dtype", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8, dtype=torch.float64), _t(1, 8, 2, 8), 3), r"one dtype"),
    ("device", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8).to("meta"), _t(1, 8, 2, 8), 3), r"one device"),
    ("rpb-device", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3,
                                     rpb=torch.zeros(2, 5, device="meta")), r"rpb\.device=meta"),
    ("heads", lambda: _torch_na(_t(1, 8, 3, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3), r"H=3, H_kv=2"),
    ("head-dim", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 16), _t(1, 8, 2, 8), 3), r"q\.shape\[-1\]=8"),
    ("tuple-len", lambda: _torch_na(_t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), (3, 3, 3)),
     r"kernel_size.*one entry per spatial axis \(2\)"),
    ("k<1", lambda: _torch_na(_t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), (3, 0)),
     r"kernel_size\[1\] >= 1.*kernel_size\[1\]=0"),
    ("d<1", lambda: _torch_na(_t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), 3, dilation=(0, 1)),
     r"dilation\[0\]=0"),
    ("s<1", lambda: _torch_na(_t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), 3, stride=(1, 0)),
     r"stride\[1\]=0"),
    ("s>k", lambda: _torch_na(_t(1, 9, 9, 2, 8), _t(1, 9, 9, 2, 8), _t(1, 9, 9, 2, 8), 7, stride=(1, 8)),
     r"stride\[1\]=8 must be <= kernel_size\[1\]=7"),
    ("kd>X", lambda: _torch_na(_t(1, 8, 13, 2, 8), _t(1, 8, 13, 2, 8), _t(1, 8, 13, 2, 8), (3, 7), dilation=(1, 2)),
     r"kernel_size\[1\]=7, dilation\[1\]=2, size\[1\]=13"),
    ("rpb", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, rpb=_t(2, 3)), r"rpb.*\[2, 5\]"),
    ("kpm-dtype", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, key_padding_mask=torch.ones(1, 8)),
     r"key_padding_mask.*bool.*\[1, 8\]"),
    ("kpm-shape", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3,
                                    key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), r"key_padding_mask.*\[1, 8\]"),
    ("extra-pair", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, extra_kv=(_t(1, 2, 2, 8),)),
     r"extra_kv to be a pair"),
    ("extra-heads", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3,
                                      extra_kv=(_t(1, 2, 1, 8), _t(1, 2, 1, 8))), r"extra_kv\[0\]\.shape"),
    ("extra-batch", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3,
                                      extra_kv=(_t(2, 2, 2, 8), _t(2, 2, 2, 8))), r"extra_kv\[0\]\.shape == \[1, N_e"),
    ("extra-dtype", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3,
                                      extra_kv=(_t(1, 2, 2, 8, dtype=torch.float64), _t(1, 2, 2, 8))), r"dtype"),
    ("scale", lambda: _torch_na(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, scale=float("nan")),
     r"scale=nan"),
    ("backend", lambda: neighborhood_attention(_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8), 3, backend="cudnn"),
     r"backend='cudnn'"),
]


@pytest.mark.parametrize("make, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rpb_may_have_another_float_dtype():
    q, k, v = make_qkv(1, (8,), 2, 2, 8)
    out = _torch_na(q, k, v, 3, rpb=torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(out, _torch_na(q, k, v, 3))


REFUSALS = [
    ("natten", dict(rpb=torch.zeros(2, 5)), "relative positional bias"),
    ("natten", dict(key_padding_mask=torch.ones(1, 8, dtype=torch.bool)), "key padding mask"),
    ("natten", dict(kernel_size=1), "kernel_size < 2"),
    ("flex", dict(key_padding_mask=torch.ones(1, 8, dtype=torch.bool)), "key_padding_mask"),
    ("flex", dict(requires_grad=True), "no backward on the CPU"),
]


@pytest.mark.parametrize("backend, kw, match", REFUSALS, ids=[f"{b}-{m.split()[0]}" for b, _, m in REFUSALS])
def test_named_backend_refusals(backend, kw, match):
    kw = dict(kw)
    ks = kw.pop("kernel_size", 3)
    q, k, v = make_qkv(1, (8,), 2, 2, 8, requires_grad=kw.pop("requires_grad", False))
    with pytest.raises(NotImplementedError, match=match):
        neighborhood_attention(q, k, v, ks, backend=backend, **kw)


def test_flex_backend_on_cpu_matches_reference():
    q, k, v = make_qkv(1, (6, 7), 2, 2, 16)
    rpb = torch.randn(2, 5, 3)
    with torch.no_grad():
        out = neighborhood_attention(q, k, v, (3, 2), stride=(2, 1), is_causal=(False, True), rpb=rpb, backend="flex")
    ref = neighborhood_attention_ref(q, k, v, (3, 2), stride=(2, 1), is_causal=(False, True), rpb=rpb)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_natten_backend_matches_reference():
    pytest.importorskip("natten")
    q, k, v = make_qkv(1, (6, 7), 2, 2, 16)
    ekv = (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))
    kw = dict(stride=(2, 1), dilation=(1, 2), is_causal=(False, True), extra_kv=ekv, return_lse=True)
    out, lse = neighborhood_attention(q, k, v, (3, 2), backend="natten", **kw)
    ref, ref_lse = neighborhood_attention_ref(q, k, v, (3, 2), **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-6)
