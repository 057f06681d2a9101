"""NeighborhoodAttention layers: backends agree, small-input modes, NATTEN <= 0.17 state dicts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn
from visattn.layers.neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from visattn.ops._dispatch import list_backends


def _other_backends() -> list[str]:
    return [b for b in list_backends("neighborhood").get("neighborhood", []) if b not in ("torch", "natten")]


def _grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _run(m, x):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad.detach(), _grads(m)


CASES = [
    # (spatial, kernel, stride, dilation, causal)
    ((9,), 3, 1, 2, False),
    ((7, 6), (3, 4), (1, 2), (2, 1), False),
    ((5, 7), 3, 1, 1, (True, False)),
    ((3, 4, 5), (1, 3, 3), 1, 1, False),
]


@pytest.mark.parametrize("backend", _other_backends() or [pytest.param("triton", marks=pytest.mark.skip(
    reason="no non-reference neighborhood backend registered"))])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_torch_backend_layer(case, backend, device):
    spatial, ks, st, dl, causal = case
    dim, heads = 16, 2
    kw = dict(spatial_dims=len(spatial), stride=st, dilation=dl, is_causal=causal, rel_pos_bias=True)
    ref = NeighborhoodAttention(dim, heads, ks, backend="torch", **kw).to(device)
    fast = NeighborhoodAttention(dim, heads, ks, backend=backend, **kw).to(device)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.rpb.normal_()  # a visible bias
        fast.rpb.copy_(ref.rpb)
    x = torch.randn(2, *spatial, dim, device=device)
    y0, gx0, g0 = _run(ref, x)
    try:
        y1, gx1, g1 = _run(fast, x)
    except NotImplementedError as e:  # a declared capability gap (e.g. Flex has no CPU backward)
        pytest.skip(f"backend {backend!r} cannot run this case here: {str(e).splitlines()[-2].strip()}")
    torch.testing.assert_close(y1, y0, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gx1, gx0, rtol=1e-3, atol=1e-4)
    assert set(g0) == set(g1) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")


def test_layer_equals_reference_math():
    """q/k/v are the head-major thirds of qkv(x); scale and rpb reach the op unchanged."""
    from visattn.ops.neighborhood import neighborhood_attention_ref

    m = NeighborhoodAttention2D(12, 3, 3, dilation=2, rel_pos_bias=True, qk_scale=0.3, backend="torch")
    torch.nn.init.normal_(m.rpb)
    x = torch.randn(2, 7, 8, 12)
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(2, 7, 8, 3, 3, 4)
    o = neighborhood_attention_ref(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], 3, dilation=2,
                                   scale=0.3, rpb=m.rpb)
    expected = F.linear(o.reshape(2, 7, 8, 12), m.proj.weight, m.proj.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def _natten014_window_start(i, length, k, d):
    """NATTEN v0.14's get_window_start, restated (odd k, stride 1)."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= length:
        imodd = i % d
        a = (length // d) * d
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * d
        return a + imodd - k * d
    return i - ns * d


def _natten014_pb_start(i, length, k, d):
    """NATTEN v0.14's get_pb_start, restated (odd k, stride 1)."""
    ns = k // 2
    if d <= 1:
        return ns + (i < ns) * (ns - i) + (i + ns >= length) * (length - i - 1 - ns)
    if i - ns * d < 0:
        return k - 1 - (i // d)
    if i + ns * d >= length:
        return (length - i - 1) // d
    return ns


@pytest.mark.parametrize("k,d,size", [(3, 1, (6, 7)), (5, 2, (11, 10)), (3, 3, (9, 10))])
def test_natten017_state_dict_loads_and_matches_unfused_natten(k, d, size):
    """A NATTEN <= 0.17 ``NeighborhoodAttention2D`` state dict loads unchanged and computes what the old
    unfused ``natten2dqkrpb`` -> softmax -> ``natten2dav`` path computed (restated here)."""
    dim, heads = 8, 2
    hd = dim // heads
    sd = {"qkv.weight": torch.randn(3 * dim, dim) * 0.3, "qkv.bias": torch.randn(3 * dim) * 0.1,
          "rpb": torch.randn(heads, 2 * k - 1, 2 * k - 1), "proj.weight": torch.randn(dim, dim) * 0.3,
          "proj.bias": torch.randn(dim) * 0.1}
    m = NeighborhoodAttention2D(dim, heads, k, dilation=d, rel_pos_bias=True, backend="torch")
    m.load_state_dict(sd, strict=True)
    x = torch.randn(1, *size, dim, dtype=torch.float64)
    m = m.double()
    H, W = size
    qkv = (x @ sd["qkv.weight"].double().T + sd["qkv.bias"].double()).reshape(1, H, W, 3, heads, hd)
    q, kk, v = (qkv[0, :, :, i].permute(2, 0, 1, 3) for i in range(3))  # [heads, H, W, hd]
    q = q * hd ** -0.5
    out = torch.zeros(heads, H, W, hd, dtype=torch.float64)
    for h in range(heads):
        for i in range(H):
            for j in range(W):
                si, sj = _natten014_window_start(i, H, k, d), _natten014_window_start(j, W, k, d)
                pi, pj = _natten014_pb_start(i, H, k, d), _natten014_pb_start(j, W, k, d)
                logits, vals = [], []
                for a in range(k):
                    for b in range(k):
                        y, z = si + a * d, sj + b * d
                        logits.append(q[h, i, j] @ kk[h, y, z] + sd["rpb"][h, pi + a, pj + b].double())
                        vals.append(v[h, y, z])
                p = torch.softmax(torch.stack(logits), 0)
                out[h, i, j] = (p[:, None] * torch.stack(vals)).sum(0)
    expected = out.permute(1, 2, 0, 3).reshape(1, H, W, dim) @ sd["proj.weight"].double().T + sd["proj.bias"].double()
    torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-9)


def test_natten017_state_dict_names_1d_3d():
    m1 = NeighborhoodAttention1D(8, 2, 5, rel_pos_bias=True)
    m3 = NeighborhoodAttention3D(8, 2, (3, 5, 7), rel_pos_bias=True)
    assert dict((n, tuple(p.shape)) for n, p in m1.state_dict().items()) == {
        "qkv.weight": (24, 8), "qkv.bias": (24,), "rpb": (2, 9), "proj.weight": (8, 8), "proj.bias": (8,)}
    assert m3.rpb.shape == (2, 5, 9, 13)
    assert set(NeighborhoodAttention2D(8, 2, 3).state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("size,k,d", [((5, 6), 7, 1), ((9, 20), 3, 4), ((4,), 3, 2), ((2, 9, 3), (2, 3, 5), 1)])
def test_legacy_pad_equals_explicit_pad_attend_crop(size, k, d):
    n = len(size)
    dim, heads = 8, 2
    pad_mod = NeighborhoodAttention(dim, heads, k, spatial_dims=n, dilation=d, rel_pos_bias=True,
                                    small_input="legacy_pad", backend="torch")
    plain = NeighborhoodAttention(dim, heads, k, spatial_dims=n, dilation=d, rel_pos_bias=True, backend="torch")
    plain.load_state_dict(pad_mod.state_dict())
    ks = k if isinstance(k, tuple) else (k,) * n
    need = [max(0, kk * d - s) for kk, s in zip(ks, size)]
    x = torch.randn(2, *size, dim)
    pads = [0, 0]
    for a in reversed(range(n)):
        pads += [0, need[a]]
    y_pad, gx_pad, g_pad = _run(pad_mod, x)

    def explicit(inp):
        out = plain(F.pad(inp, pads))
        return out[(slice(None), *(slice(0, s) for s in size))]

    plain.zero_grad(set_to_none=True)
    xr = x.detach().requires_grad_(True)
    y = explicit(xr)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    # the layer crops before the output projection, the explicit version after: same math, other sum order
    torch.testing.assert_close(y_pad, y.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_pad, xr.grad, rtol=1e-6, atol=1e-6)
    for name, g in _grads(plain).items():
        torch.testing.assert_close(g_pad[name], g, rtol=1e-5, atol=1e-5)


def test_small_input_error_and_clamp():
    x = torch.randn(1, 5, 6, 8)
    m = NeighborhoodAttention2D(8, 2, 7, rel_pos_bias=True, backend="torch")
    with pytest.raises(ValueError, match="kernel_size"):
        m(x)
    c = NeighborhoodAttention2D(8, 2, 7, rel_pos_bias=True, small_input="clamp", backend="torch")
    c.load_state_dict(m.state_dict())
    # clamped windows 5x6 cover the whole map; the RPB table keeps each offset's entry
    small = NeighborhoodAttention2D(8, 2, (5, 6), rel_pos_bias=True, backend="torch")
    sd = dict(m.state_dict())
    sd["rpb"] = m.rpb.detach()[:, 2:11, 1:12]
    small.load_state_dict(sd)
    torch.testing.assert_close(c(x), small(x))


def test_attn_drop_torch_only_and_identity_in_eval():
    m = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, attn_drop=0.5, backend="torch")
    x = torch.randn(1, 6, 6, 8)
    ref = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, backend="torch")
    ref.load_state_dict(m.state_dict())
    m.eval()
    torch.testing.assert_close(m(x), ref(x))
    m.train()
    y = m(x)
    assert torch.isfinite(y).all() and not torch.allclose(y, ref(x))
    # the dense dropout path without dropout equals the op (checks its mask and bias)
    m.attn_drop = 1e-12  # (Final only for TorchScript) keeps the dense dropout path, drops nothing
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
    t = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.1, backend="triton").train()
    with pytest.raises(NotImplementedError, match="attn_drop"):
        t(x)


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention2D(10, 3, 3)
    with pytest.raises(ValueError, match=r"stride\[1\]=4 must be <= kernel_size\[1\]=3"):
        NeighborhoodAttention2D(8, 2, 3, stride=(1, 4))
    with pytest.raises(TypeError, match="kernel_size"):
        NeighborhoodAttention2D(8, 2, "7")
    with pytest.raises(TypeError, match="rel_pos_bias"):
        NeighborhoodAttention2D(8, 2, 3, rel_pos_bias="false")
    with pytest.raises(ValueError, match="small_input"):
        NeighborhoodAttention2D(8, 2, 3, small_input="pad")
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention(8, 2, (3, 3, 3), spatial_dims=2)
    with pytest.raises(ValueError, match="spatial axes"):
        NeighborhoodAttention2D(8, 2, 3)(torch.randn(1, 5, 8))
    assert NeighborhoodAttention(8, 2, (3, 5, 7)).spatial_dims == 3
    m = NeighborhoodAttention2D(8, 2, 3, qk_scale=0.0)
    assert m.scale == 0.0


def test_kernel_choice_and_torchscript():
    with visattn.use_backend("torch"):
        assert NeighborhoodAttention2D(8, 2, 3).use_kernel is False
    assert NeighborhoodAttention2D(8, 2, 3, backend="triton").use_kernel is True
    with timm.layers.set_scriptable(True):
        m = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, small_input="legacy_pad", backend="triton")
    assert m.use_kernel is False
    s = torch.jit.script(m)
    x = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(s(x), m(x))


def test_reset_parameters_and_factory_kwargs():
    m = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in m.parameters())
    m = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.fill_(5.0)
    m.reset_parameters()
    assert m.rpb.abs().max() < 0.2 and 0.005 < m.rpb.std() < 0.05
