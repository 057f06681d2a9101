"""Tests of ``visattn.layers.AgentAttention`` against an independent float64 implementation of
upstream's module (spec agent.md §2.3-2.5, §3.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import AgentAttention
from visattn.ops import agent_attention

from ..ops._agent_utils import naive_agent_attention, upstream_biases


def _bias_dict(m):
    return {n: getattr(m, f"{n}_bias") for n in ("an", "na", "ah", "aw", "ha", "wa", "ac", "ca")
            if getattr(m, f"{n}_bias", None) is not None}


def _separable_biases(d, grid, key_grid):
    """Biases at another grid by the 2-D form (I2 of the separable sums; spec §2.4 identity)."""
    h, n = d["an"].shape[:2]
    b1 = F.interpolate(d["an"], size=key_grid, mode="bilinear") + F.interpolate(
        (d["ah"] + d["aw"])[0], size=key_grid, mode="bilinear")
    b2 = F.interpolate(d["na"], size=grid, mode="bilinear") + F.interpolate(
        (d["ha"] + d["wa"])[0].permute(0, 3, 1, 2), size=grid, mode="bilinear")
    b1, b2 = b1.reshape(h, n, -1), b2.reshape(h, n, -1).transpose(1, 2)
    if "ac" in d:
        b1, b2 = torch.cat([d["ac"][0], b1], -1), torch.cat([d["ca"][0], b2], -2)
    return b1, b2


def naive_layer(m: AgentAttention, x, grid):
    """Upstream's forward written out: projections, pooled agents, two softmaxes, DWC, proj."""
    B, N, C = x.shape
    H, D, P, r = m.num_heads, m.head_dim, m.num_prefix_tokens, m.kv_reduction
    if m.qkv_mode == "qkv":
        q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
    else:
        q = F.linear(x, m.q.weight, m.q.bias)
        xs = x
        if r > 1:
            img = x[:, P:].transpose(1, 2).reshape(B, C, *grid)
            xs = F.conv2d(img, m.sr.weight, m.sr.bias, stride=r).flatten(2).transpose(1, 2)
            xs = F.layer_norm(xs, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
            xs = torch.cat([x[:, :P], xs], 1)
        k, v = F.linear(xs, m.kv.weight, m.kv.bias).chunk(2, dim=-1)
    kg = (grid[0] // r, grid[1] // r)
    heads = lambda t: t.reshape(B, -1, H, D).transpose(1, 2)  # noqa: E731
    d = _bias_dict(m)
    if tuple(grid) == m.grid:
        b1, b2 = upstream_biases(d, grid, kg)
    else:
        b1, b2 = _separable_biases(d, grid, kg)
    o = naive_agent_attention(heads(q), heads(k), heads(v), grid=grid, agent_shape=m.agent_shape, b1=b1, b2=b2)
    o = o.transpose(1, 2).reshape(B, N, C)
    vg = v[:, P:].transpose(1, 2).reshape(B, C, *kg)
    if r > 1:
        vg = F.interpolate(vg, size=grid, mode="bilinear")
    conv = m.get_v if m.lepe else m.dwc
    dw = F.conv2d(vg, conv.weight, conv.bias, padding=1, groups=C).flatten(2).transpose(1, 2)
    o = torch.cat([o[:, :P], o[:, P:] + dw], 1)
    return o if m.qkv_mode == "none" else F.linear(o, m.proj.weight, m.proj.bias)


VARIANTS = {
    "swin": dict(dim=24, num_heads=3, grid=(8, 8), agent_shape=(3, 3)),
    "pvt_r1": dict(dim=16, num_heads=2, grid=(6, 6), agent_shape=(2, 2), qkv_mode="q_kv"),
    "pvt_r2": dict(dim=16, num_heads=2, grid=(8, 8), agent_shape=(2, 2), kv_reduction=2),
    "deit": dict(dim=24, num_heads=3, grid=(5, 5), agent_shape=(2, 2), num_prefix_tokens=1),
}

UPSTREAM_SHAPES = {  # parameter shapes of upstream's modules for these sizes (spec §2.4)
    "swin": {"qkv.weight": (72, 24), "dwc.weight": (24, 1, 3, 3), "an_bias": (3, 9, 7, 7), "na_bias": (3, 9, 7, 7),
             "ah_bias": (1, 3, 9, 8, 1), "aw_bias": (1, 3, 9, 1, 8), "ha_bias": (1, 3, 8, 1, 9),
             "wa_bias": (1, 3, 1, 8, 9), "proj.weight": (24, 24)},
    "pvt_r2": {"q.weight": (16, 16), "kv.weight": (32, 16), "sr.weight": (16, 16, 2, 2), "norm.weight": (16,),
               "ah_bias": (1, 2, 4, 4, 1), "aw_bias": (1, 2, 4, 1, 4), "ha_bias": (1, 2, 8, 1, 4)},
    "deit": {"ac_bias": (1, 3, 4, 1), "ca_bias": (1, 3, 1, 4)},
}


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("backend", ["torch", "sdpa", "upstream"])
def test_layer_matches_upstream_formula(name, backend):
    kw = VARIANTS[name]
    m = AgentAttention(**kw, backend=backend, dtype=torch.float64)
    _randomize(m)
    P = kw.get("num_prefix_tokens", 0)
    x = torch.randn(2, P + kw["grid"][0] * kw["grid"][1], kw["dim"], dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_layer(m, x, kw["grid"]), rtol=1e-9, atol=1e-9)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    for n, s in UPSTREAM_SHAPES.get(name, {}).items():
        assert shapes[n] == s, (n, shapes[n], s)


@pytest.mark.parametrize("name", ["swin", "pvt_r2", "deit"])
def test_other_grids_resample_the_biases(name):
    kw = VARIANTS[name]
    m = AgentAttention(**kw, dtype=torch.float64)
    _randomize(m)
    P = kw.get("num_prefix_tokens", 0)
    for grid in [(10, 6), (4, 12)]:
        x = torch.randn(2, P + grid[0] * grid[1], kw["dim"], dtype=torch.float64)
        torch.testing.assert_close(m(x, grid), naive_layer(m, x, grid), rtol=1e-9, atol=1e-9)


def test_cswin_lepe_variant_names_and_forward_qkv():
    m = AgentAttention(16, 2, grid=(6, 6), agent_shape=(2, 2), qkv_mode="none", lepe=True, dtype=torch.float64)
    _randomize(m)
    names = {n for n, _ in m.named_parameters()}
    assert "get_v.weight" in names and not any(n.startswith(("qkv", "proj", "dwc")) for n in names)
    q, k, v = (torch.randn(2, 36, 16, dtype=torch.float64) for _ in range(3))
    out = m.forward_qkv(q, k, v)
    heads = lambda t: t.reshape(2, 36, 2, 8).transpose(1, 2)  # noqa: E731
    b1, b2 = upstream_biases(_bias_dict(m), (6, 6), (6, 6))
    ref = naive_agent_attention(heads(q), heads(k), heads(v), grid=(6, 6), agent_shape=(2, 2), b1=b1, b2=b2)
    ref = ref.transpose(1, 2).reshape(2, 36, 16) + F.conv2d(
        v.transpose(1, 2).reshape(2, 16, 6, 6), m.get_v.weight, m.get_v.bias, padding=1, groups=16
    ).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_gradients_match_reference_backend():
    kw = VARIANTS["deit"]
    x = torch.randn(2, 26, 24)
    outs = {}
    for backend in ["torch", "sdpa"]:
        torch.manual_seed(1)
        m = AgentAttention(**kw, backend=backend)
        _randomize(m)
        xx = x.clone().requires_grad_()
        m(xx).square().sum().backward()
        outs[backend] = [xx.grad] + [p.grad for p in m.parameters()]
        assert all(g is not None for g in outs[backend])
    for a, b in zip(outs["torch"], outs["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_agent_count_can_change_at_run_time():
    m = AgentAttention(16, 2, grid=(8, 8), agent_shape=(3, 3), dtype=torch.float64)
    _randomize(m)
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    m.agent_shape = (4, 4)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the bias was resampled along the agent grid: equal to resampling the parameters first
    b = m.agent_bias().resample(agent_shape=(4, 4))
    q, k, v = m.qkv(x).chunk(3, -1)
    o = agent_attention(q.reshape(1, 64, 2, 8), k.reshape(1, 64, 2, 8), v.reshape(1, 64, 2, 8), agent_shape=(4, 4),
                        grid=(8, 8), bias=b).reshape(1, 64, 16)
    o = o + m.dwc(v.transpose(1, 2).reshape(1, 16, 8, 8)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, m.proj(o))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads to divide dim"):
        AgentAttention(10, 3, grid=(4, 4))
    with pytest.raises(ValueError, match="agent_shape no larger than grid"):
        AgentAttention(8, 2, grid=(4, 4), agent_shape=(5, 5))
    with pytest.raises(ValueError, match="kv_reduction"):
        AgentAttention(8, 2, grid=(5, 5), agent_shape=(2, 2), kv_reduction=2)
    with pytest.raises(TypeError, match="grid"):
        AgentAttention(8, 2, grid="(4, 4)")


def test_compiles_without_graph_breaks():
    m = AgentAttention(16, 2, grid=(6, 6), agent_shape=(2, 2), num_prefix_tokens=1, backend="sdpa")
    x = torch.randn(2, 37, 16)
    f = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), m(x))
    f(x).sum().backward()
    assert m.an_bias.grad is not None
