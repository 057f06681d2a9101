"""Layer tests: BilevelRoutingAttention in its three padding modes against an independent
restatement of BiFormer's layer semantics (test-side, float64), and AttentionLePE's quirks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import AttentionLePE, BilevelRoutingAttention
from visattn.ops import _dispatch

from ..ops._routing_utils import assert_close, oracle_attention

needs_interpreter = pytest.mark.skipif(
    bool(_dispatch.triton_reasons(torch.device("cpu"))), reason="Triton cannot run on CPU tensors here"
)


def upstream_bra(layer: BilevelRoutingAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    """specs/routing.md §2.6 written out: padding, means by avg_pool2d, Python top-k, per-token oracle."""
    n, C, qk, m = layer.n_win, layer.dim, layer.qk_dim, layer.num_heads
    H0, W0 = x.shape[1:3]
    if mode == "legacy":
        x = F.pad(x, (0, 0, 0, (-W0) % n, 0, (-H0) % n))
    qkv = layer.qkv(x)
    q, k, v = qkv.split([qk, qk, C], -1)
    H, W = x.shape[1:3]
    rH = H // n if mode in ("legacy", "legacy_nchw") else math.ceil(H / n)
    rW = W // n if mode in ("legacy", "legacy_nchw") else math.ceil(W / n)
    RH, RW = math.ceil(H / rH), math.ceil(W / rW)

    def means(t):
        return F.avg_pool2d(t.permute(0, 3, 1, 2), (rH, rW), ceil_mode=True, count_include_pad=False).flatten(
            2
        )

    qm, km = means(q.detach()).transpose(1, 2), means(k.detach()).transpose(1, 2)  # [B, P, qk]
    logits = (qm * layer.scale) @ km.transpose(1, 2)
    topk = min(layer.topk, RH * RW)
    index = [
        [sorted(sorted(range(RH * RW), key=lambda j: (-float(row[j]), j))[:topk]) for row in lb]
        for lb in logits
    ]
    heads = lambda t: t.unflatten(-1, (m, -1))  # noqa: E731
    if mode == "legacy_nchw":  # zero-padded q, k, v after the projection; padded keys are zero vectors
        pad = (0, 0, 0, RW * rW - W, 0, RH * rH - H)
        qa, ka, va = (F.pad(t, pad) for t in (q, k, v))
    else:
        qa, ka, va = q, k, v
    out, _ = oracle_attention(heads(qa), heads(ka), heads(va), index, (rH, rW), (RH, RW), layer.scale, "mask")
    out = out.flatten(-2)[:, :H, :W]
    out = out + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.proj(out[:, :H0, :W0])


def make_layer(**kw):
    kw.setdefault("backend", "torch")
    layer = BilevelRoutingAttention(16, 2, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("mode", ["mask", "legacy", "legacy_nchw"])
@pytest.mark.parametrize("H, W, n, topk", [(15, 13, 7, 4), (8, 8, 4, 3), (5, 9, 3, 2)])
def test_layer_matches_upstream_semantics(mode, H, W, n, topk):
    if mode == "legacy_nchw" and min(H, W) < n:
        pytest.skip("legacy_nchw needs the map >= n_win")
    layer = make_layer(n_win=n, topk=topk, padding=mode)
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), upstream_bra(layer, x, mode))


def test_padding_modes_coincide_on_divisible_maps():
    x = torch.randn(1, 14, 14, 16, dtype=torch.float64)
    outs = []
    for mode in ("mask", "legacy", "legacy_nchw"):
        torch.manual_seed(1)
        outs.append(make_layer(n_win=7, topk=4, padding=mode)(x))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_scale_quirk_and_zero_scale():
    layer = make_layer(n_win=2, topk=2, qk_dim=32)
    assert layer.scale == 32**-0.5  # the whole qk width, not the head dim 16
    x = torch.randn(1, 6, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), upstream_bra(layer, x, "mask"))
    zero = make_layer(n_win=2, topk=2, qk_scale=0.0)
    assert zero.scale == 0.0
    torch.testing.assert_close(zero(x), upstream_bra(zero, x, "mask"))


def test_topk_clamping():
    x = torch.randn(1, 3, 3, 16, dtype=torch.float64)
    layer = make_layer(n_win=7, topk=16)
    y, routing = layer(x, return_routing=True)
    assert routing.index.shape == (1, 9, 9)  # 3x3 map, n_win 7 -> 9 single-token regions, all routed
    dense = make_layer(n_win=1, topk=1)
    dense.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y, dense(x))
    with pytest.raises(ValueError, match=r"topk=16 must be <= the number of regions P=9 \(grid 3x3\)"):
        make_layer(n_win=7, topk=16, clamp_topk=False)(x)


def test_qkv_param_attention_and_no_lepe():
    layer = make_layer(n_win=2, topk=1, param_attention="qkv", lepe_kernel=0)
    assert isinstance(layer.proj, torch.nn.Identity) and layer.lepe is None
    assert layer.qkv.weight.shape == (48, 16)
    assert layer(torch.randn(1, 4, 4, 16, dtype=torch.float64)).shape == (1, 4, 4, 16)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(lepe_kernel=4), ValueError, "odd lepe_kernel"),
        (dict(padding="reflect"), ValueError, "padding"),
        (dict(diff_routing=True), ValueError, "diff_routing"),
        (dict(kv_downsample_mode="ada_avgpool"), ValueError, "kv_downsample_mode"),
        (dict(qk_dim=15), ValueError, "divisible by num_heads"),
        (dict(n_win=None), ValueError, "exactly one of n_win and region_size"),
        (dict(topk="4"), TypeError, "topk"),
    ],
)
def test_layer_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        BilevelRoutingAttention(16, 2, **kw)


@pytest.mark.parametrize("source", ["x", "v"])
def test_attention_lepe(source):
    torch.manual_seed(0)
    layer = AttentionLePE(32, lepe_source=source).double()
    assert layer.qkv.bias is None and layer.num_heads == 8 and layer.scale == 4**-0.5
    x = torch.randn(2, 5, 6, 32, dtype=torch.float64)
    q, k, v = layer.qkv(x).flatten(1, 2).split(32, -1)
    hd = lambda t: t.unflatten(-1, (8, 4)).transpose(1, 2)  # noqa: E731
    att = torch.softmax(hd(q) @ hd(k).transpose(-1, -2) * 0.5, -1) @ hd(v)
    out = att.transpose(1, 2).reshape(2, 5, 6, 32)
    src = x if source == "x" else v.reshape(2, 5, 6, 32)
    out = out + layer.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.proj(out))


@needs_interpreter
@pytest.mark.parametrize("mode", ["mask", "legacy_nchw"])
def test_layer_triton_matches_torch(mode):
    torch.manual_seed(0)
    ref = BilevelRoutingAttention(32, 2, n_win=3, topk=2, padding=mode, backend="torch")
    tri = BilevelRoutingAttention(32, 2, n_win=3, topk=2, padding=mode, backend="triton")
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 7, 8, 32)
    ya, yb = ref(x), tri(x)
    assert_close(yb, ya, torch.float32, None, "out")
    g = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * g).sum(), list(ref.parameters()))
    gb = torch.autograd.grad((yb * g).sum(), list(tri.parameters()))
    for (name, _), a, b in zip(ref.named_parameters(), ga, gb):
        assert_close(b, a, torch.float32, None, name, factor=10.0)
