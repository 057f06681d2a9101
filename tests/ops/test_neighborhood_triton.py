"""The neighborhood-attention Triton kernels on the CPU (``TRITON_INTERPRET=1``, set by conftest.py).

Oracle: ``neighborhood_attention_ref(upcast=True)`` in float64 with autograd gradients. Pass rule
(DESIGN §5, flash-attn style, ``_block_sparse_utils.assert_close``): the error is at most 2x the error
of the same reference run in the low precision, with floors fp32 1e-4 and fp16 1e-2 on outputs and
LSE (2x on gradients). The interpreter is slow, so each case combines several features on a tiny grid
(B = 1, H = 1, H = 2 only for GQA); together they cover 1-D/2-D/3-D, odd/even k, stride, dilation with
sizes not divisible by it, per-axis causality, GQA, extra KV, RPB (with its gradient), key padding
with fully masked rows, D != D_v, non-power-of-two head dims, fp16/fp32 and packed-QKV views.
bf16 is left to the GPU suite: the interpreter computes bf16 ``tl.dot`` wrongly, and the backend
refuses it on CPU tensors (tested below).
"""

from __future__ import annotations

import math

import pytest
import torch

from visattn.ops import _dispatch
from visattn.ops.neighborhood import neighborhood_attention, neighborhood_attention_ref

from ._block_sparse_utils import assert_close, assert_no_nan

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(bool(_dispatch.triton_reasons(CPU)),
                                reason=f"Triton cannot run on CPU tensors here: {_dispatch.triton_reasons(CPU)}")


def _inputs(size, H, Hk, D, Dv, dtype, *, B=1, n_extra=0, rpb=False, kpm=None, packed=False, ks=None):
    """Leaf tensors (rounded to ``dtype``) and a builder of the op's arguments from any copy of them."""
    leaves = {}
    if packed:  # q, k, v are head slices of one [B, *size, H + 2 Hk, D] projection (non-contiguous views)
        assert D == Dv
        leaves["qkv"] = torch.randn(B, *size, H + 2 * Hk, D).to(dtype)
    else:
        leaves["q"] = torch.randn(B, *size, H, D).to(dtype)
        leaves["k"] = torch.randn(B, *size, Hk, D).to(dtype)
        leaves["v"] = torch.randn(B, *size, Hk, Dv).to(dtype)
    if n_extra:
        leaves["ke"] = torch.randn(B, n_extra, Hk, D).to(dtype)
        leaves["ve"] = torch.randn(B, n_extra, Hk, Dv).to(dtype)
    if rpb:
        leaves["rpb"] = torch.randn(H, *(2 * k - 1 for k in ks))  # float32 for every q dtype

    def args(t):
        if packed:
            qkv = t["qkv"]
            q, k, v = qkv[..., :H, :], qkv[..., H:H + Hk, :], qkv[..., H + Hk:, :]
        else:
            q, k, v = t["q"], t["k"], t["v"]
        extra = dict(key_padding_mask=kpm)
        if n_extra:
            extra["extra_kv"] = (t["ke"], t["ve"])
        if rpb:
            extra["rpb"] = t["rpb"]
        return (q, k, v), extra

    return leaves, args


def _fwd_bwd(fn, leaves, args, ks, kw, dout, w, finite):
    (q, k, v), extra = args(leaves)
    out, lse = fn(q, k, v, ks, return_lse=True, **extra, **kw)
    l = torch.where(finite, lse.double(), torch.zeros_like(lse, dtype=torch.float64))
    loss = (out.double() * dout).sum() + (l * w).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return out, lse, dict(zip(names, grads))


def _run_case(size, ks, *, stride=1, dilation=1, causal=False, B=1, H=1, Hk=1, D=16, Dv=None, dtype=torch.float32,
              n_extra=0, rpb=False, kpm=None, packed=False, scale=None, opts=None):
    Dv = D if Dv is None else Dv
    leaves, args = _inputs(size, H, Hk, D, Dv, dtype, B=B, n_extra=n_extra, rpb=rpb, kpm=kpm, packed=packed,
                           ks=ks if not isinstance(ks, int) else (ks,) * len(size))
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, scale=scale)
    lo = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    hi = {n: t.double().requires_grad_() for n, t in leaves.items()}
    tri = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    with torch.no_grad():
        (q, k, v), extra = args(hi)
        finite = torch.isfinite(neighborhood_attention_ref(q, k, v, ks, return_lse=True, **extra, **kw)[1])
    dout = torch.randn(B, *size, H, Dv, dtype=torch.float64)
    w = torch.randn(B, *size, H, dtype=torch.float64)

    def triton(*a, **k):
        return neighborhood_attention(*a, backend="triton", backend_options=opts, **k)

    def ref_hi(*a, **k):
        return neighborhood_attention_ref(*a, upcast=True, **k)

    def ref_lo(*a, **k):
        return neighborhood_attention_ref(*a, upcast=False, **k)

    out, lse, grads = _fwd_bwd(triton, tri, args, ks, kw, dout, w, finite)
    r_out, r_lse, r_grads = _fwd_bwd(ref_hi, hi, args, ks, kw, dout, w, finite)
    l_out, l_lse, l_grads = _fwd_bwd(ref_lo, lo, args, ks, kw, dout, w, finite)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (B, *size, H, Dv) and lse.shape == (B, *size, H)
    assert_close("out", out, r_out, dtype=dtype, low_ref=l_out)
    assert_close("lse", lse, r_lse, dtype=dtype, low_ref=l_lse.float())
    for n in grads:
        assert_no_nan(f"d{n}", grads[n])
        g_dtype = torch.float32 if n == "rpb" else dtype  # rpb is kept in float32
        assert_close(f"d{n}", grads[n], r_grads[n], dtype=g_dtype, low_ref=l_grads[n], grad=True)
    return out, lse, grads


def _kpm(size, *blocks, p=0.2, B=1):
    """Random key mask (True = keep) with the given index boxes removed from batch element 0."""
    m = torch.rand(B, *size, generator=torch.Generator().manual_seed(math.prod(size))) > p
    for b in blocks:
        m[(0, *b)] = False
    return m


# each case: (size, kernel, options) with features combined; ids name what it covers
CASES = [
    pytest.param((13,), 4, dict(stride=2, n_extra=5, D=24, Dv=40, B=2), id="1d-even_k-stride-extra-D24-Dv40-B2"),
    pytest.param((19,), 3, dict(dilation=4, causal=True, rpb=True, dtype=torch.float16, scale=0.3, B=2,
                                kpm=_kpm((19,), (slice(0, 1),), B=2)),
                 id="1d-dilation_19mod4-causal-rpb-kpm_empty_row-fp16-B2"),
    pytest.param((7, 11), (3, 5), dict(dilation=(1, 2), rpb=True, H=2, Hk=1, n_extra=3),
                 id="2d-odd_k-dilation11mod2-rpb-gqa-extra"),
    pytest.param((8, 6), (4, 2), dict(stride=(2, 2), causal=(True, False), n_extra=3, D=40, Dv=24,
                                      dtype=torch.float16), id="2d-even_k-stride-causal0-extra-D40-Dv24-fp16"),
    pytest.param((6, 7), 3, dict(stride=(1, 3), dilation=(2, 1), D=32, packed=True,
                                 kpm=_kpm((6, 7), (slice(0, 5), slice(0, 3))), opts=dict(q_tile=(2, 4), kv_tile=(4, 2))),
                 id="2d-stride-dilation-packed_qkv-kpm_empty_row-tiles"),
    pytest.param((2, 3), (1, 3), dict(scale=0.0, causal=(False, True), D=8), id="2d-tiny-k1-scale0-causal1-D8"),
    pytest.param((4, 4, 5), (2, 3, 2), dict(stride=(1, 3, 1), dilation=(1, 1, 2), causal=(True, False, False),
                                            n_extra=2, rpb=True), id="3d-causal_time-stride-dilation-extra-rpb"),
    pytest.param((3, 4, 5), (3, 2, 3), dict(stride=(3, 1, 2), H=2, Hk=1, D=8, Dv=16, dtype=torch.float16,
                                            kpm=_kpm((3, 4, 5), (slice(0, 3), slice(0, 2), slice(0, 3)))),
                 id="3d-blocked-gqa-kpm_empty_row-D8-Dv16-fp16"),
]


@pytest.mark.parametrize("size, ks, opts", CASES)
def test_triton_matches_reference(size, ks, opts):
    opts = dict(opts)
    kpm = opts.get("kpm")
    out, lse, grads = _run_case(size, ks, **opts)
    if kpm is not None and (~torch.isfinite(lse)).any():  # the fully masked rows: zeros, -inf, zero dq
        empty = ~torch.isfinite(lse)
        assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
        if "q" in grads:
            assert (grads["q"][empty] == 0).all()
    elif kpm is not None:
        pytest.fail("the case meant to hold a fully masked row has none")


def test_packed_qkv_is_read_in_place(monkeypatch):
    """The Triton path takes slices of a packed projection without copying them (spec §3.1), and any
    strided view with a dense head dim."""
    from visattn.kernels import neighborhood as kern

    seen = {}
    real = kern.neighborhood_fwd

    def spy(q, k, v, *a, **kw):
        seen["ptrs"] = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(kern, "neighborhood_fwd", spy)
    qkv = torch.randn(1, 4, 5, 3, 1, 16)
    q, k, v = qkv.unbind(-3)
    out = neighborhood_attention(q, k, v, 3, backend="triton")
    assert seen["ptrs"] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    torch.testing.assert_close(out, neighborhood_attention_ref(q, k, v, 3), rtol=0, atol=1e-4)
    # spatially strided views (every other row, a column window) read through their strides
    big = torch.randn(1, 8, 12, 2, 16)
    qs, ks_, vs = big[:, ::2, 1:11, :1], big[:, 1::2, 1:11, 1:], big[:, ::2, :10, 1:]
    assert qs.stride(-1) == 1 and not qs.is_contiguous()
    out = neighborhood_attention(qs, ks_, vs, (3, 5), backend="triton")
    want = neighborhood_attention_ref(qs.double(), ks_.double(), vs.double(), (3, 5))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)


def test_repeated_backward_is_bitwise_identical():
    q, k, v = (torch.randn(1, 6, 7, 2, 16, requires_grad=True) for _ in range(3))
    ke, ve = (torch.randn(1, 3, 1, 16, requires_grad=True) for _ in range(2))
    k1, v1 = k[..., :1, :], v[..., :1, :]
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    out = neighborhood_attention(q, k1, v1, 3, dilation=(2, 1), extra_kv=(ke, ve), rpb=rpb, backend="triton")
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v, ke, ve, rpb), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v, ke, ve, rpb), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_extra_tokens(dtype):
    """``extra_kv`` with N_e = 0 equals no extras (forward and backward; empty dK_e/dV_e)."""
    q, k, v = (torch.randn(2, 9, 1, 16).to(dtype).requires_grad_() for _ in range(3))
    ke, ve = (torch.zeros(2, 0, 1, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    out = neighborhood_attention(q, k, v, 3, extra_kv=(ke, ve), backend="triton")
    want = neighborhood_attention(q, k, v, 3, backend="triton")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.autograd.grad(out.float().sum(), (q, k, v, ke, ve))
    g_want = torch.autograd.grad(want.float().sum(), (q, k, v))
    for a, b in zip(g[:3], g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g[3].shape == ke.shape and g[4].shape == ve.shape


def test_bf16_on_cpu_is_refused():
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        neighborhood_attention(q, q, q, 3, backend="triton")


def test_rpb_float64_is_refused():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(NotImplementedError, match="float64"):
        neighborhood_attention(q, q, q, 3, rpb=torch.zeros(1, 5, dtype=torch.float64), backend="triton")


def test_torch_compile_fullgraph():
    """Fake impls and autograd registration let dynamo trace the op without graph breaks, with every optional
    input and across two resolutions (the second recompiles with dynamic shapes by default). aot_eager keeps
    the CPU run free of a C++ toolchain; the inductor path is in the GPU suite."""
    torch._dynamo.reset()
    compiled = None
    for size in [(5, 6), (6, 7)]:
        ks = (3, 2)
        q, k, v = (torch.randn(1, *size, 1, 16, requires_grad=True) for _ in range(3))
        ke, ve = (torch.randn(1, 2, 1, 16, requires_grad=True) for _ in range(2))
        rpb = torch.randn(1, 5, 3, requires_grad=True)
        kpm = torch.rand(1, *size) > 0.2
        leaves = (q, k, v, ke, ve, rpb)

        def f(q, k, v, ke, ve, rpb, kpm):
            out, lse = neighborhood_attention(q, k, v, ks, stride=(1, 2), extra_kv=(ke, ve), rpb=rpb,
                                              key_padding_mask=kpm, return_lse=True, backend="triton")
            return out.sum() + lse.sum()

        compiled = compiled or torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(*leaves, kpm)
        g_got = torch.autograd.grad(got, leaves)
        want = f(*leaves, kpm)
        g_want = torch.autograd.grad(want, leaves)
        torch.testing.assert_close(got, want)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
        ref = neighborhood_attention_ref(*(t.double() for t in (q, k, v)), ks, stride=(1, 2), rpb=rpb.double(),
                                         extra_kv=(ke.double(), ve.double()), key_padding_mask=kpm, return_lse=True)
        assert abs(got.item() - (ref[0].sum() + ref[1].sum()).item()) < 1e-3 * math.sqrt(q.numel())
