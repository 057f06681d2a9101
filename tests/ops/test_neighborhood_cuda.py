"""GPU tests of neighborhood attention at real sizes (run with ``pytest -m cuda`` on a CUDA machine).

Oracle: ``neighborhood_attention_ref(upcast=True)`` (float64, autograd gradients). Pass rule (DESIGN §5,
flash-attn style, ``_block_sparse_utils.assert_close``): the Triton error is at most 2x the error of
the reference run in the same low precision, with floors fp32 1e-4, fp16 1e-2, bf16 2e-2 on outputs and
LSE (2x on gradients). Also: every head dim multiple of 8 up to 256 (D_v != D too), the anchor-like
shapes (56x56 k7, 32x32 k13 d2, 3-D causal in time, extra KV, RPB with gradient, GQA), compile,
determinism, CUDA-graph capture, fully masked rows, FlexAttention agreement and int64 offsets.
"""

from __future__ import annotations

import math

import pytest
import torch

from visattn.ops.neighborhood import neighborhood_attention, neighborhood_attention_ref

from ._block_sparse_utils import FLOORS, assert_close, assert_no_nan, max_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 runs IEEE dots at the default matmul precision ("highest"); pin it for the comparison."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def _leaves(B, size, H, Hk, D, Dv, dtype, n_extra, rpb_shape):
    t = {
        "q": torch.randn(B, *size, H, D, device=DEV).to(dtype),
        "k": torch.randn(B, *size, Hk, D, device=DEV).to(dtype),
        "v": torch.randn(B, *size, Hk, Dv, device=DEV).to(dtype),
    }
    if n_extra:
        t["ke"] = torch.randn(B, n_extra, Hk, D, device=DEV).to(dtype)
        t["ve"] = torch.randn(B, n_extra, Hk, Dv, device=DEV).to(dtype)
    if rpb_shape is not None:
        t["rpb"] = torch.randn(*rpb_shape, device=DEV)  # float32 for every q dtype
    return t


def _call(fn, t, ks, kw, kpm, **extra):
    ekv = (t["ke"], t["ve"]) if "ke" in t else None
    return fn(t["q"], t["k"], t["v"], ks, extra_kv=ekv, rpb=t.get("rpb"), key_padding_mask=kpm, return_lse=True,
              **kw, **extra)


def _fwd_bwd(fn, t, ks, kw, kpm, dout, w, finite, **extra):
    out, lse = _call(fn, t, ks, kw, kpm, **extra)
    l = torch.where(finite, lse.double(), torch.zeros_like(lse, dtype=torch.float64))
    loss = (out.double() * dout).sum() + (l * w).sum()
    names = list(t)
    return out, lse, dict(zip(names, torch.autograd.grad(loss, [t[n] for n in names])))


def check_against_reference(size, ks, *, B=1, H=2, Hk=None, D=64, Dv=None, dtype=torch.float16, stride=1,
                            dilation=1, causal=False, n_extra=0, rpb=False, kpm=None, scale=None,
                            backend="triton", opts=None):
    """Forward (out, LSE) and backward (every input, rpb included) of ``backend`` vs the float64 reference."""
    Hk = H if Hk is None else Hk
    Dv = D if Dv is None else Dv
    n = len(size)
    kst = (ks,) * n if isinstance(ks, int) else tuple(ks)
    base = _leaves(B, size, H, Hk, D, Dv, dtype, n_extra, (H, *(2 * k - 1 for k in kst)) if rpb else None)
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, scale=scale)
    tri = {n_: x.clone().requires_grad_() for n_, x in base.items()}
    lo = {n_: x.clone().requires_grad_() for n_, x in base.items()}
    hi = {n_: x.double().requires_grad_() for n_, x in base.items()}
    with torch.no_grad():
        finite = torch.isfinite(_call(neighborhood_attention_ref, hi, ks, kw, kpm)[1])
    dout = torch.randn(B, *size, H, Dv, device=DEV, dtype=torch.float64)
    w = torch.randn(B, *size, H, device=DEV, dtype=torch.float64)
    out, lse, grads = _fwd_bwd(neighborhood_attention, tri, ks, kw, kpm, dout, w, finite, backend=backend,
                               backend_options=opts)
    r_out, r_lse, r_grads = _fwd_bwd(neighborhood_attention_ref, hi, ks, kw, kpm, dout, w, finite, upcast=True)
    l_out, l_lse, l_grads = _fwd_bwd(neighborhood_attention_ref, lo, ks, kw, kpm, dout, w, finite, upcast=False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (B, *size, H, Dv) and lse.shape == (B, *size, H)
    assert_close("out", out, r_out, dtype=dtype, low_ref=l_out)
    assert_close("lse", lse, r_lse, dtype=dtype, low_ref=l_lse.float())
    for name, g in grads.items():
        assert_no_nan(f"d{name}", g)
        assert_close(f"d{name}", g, r_grads[name], dtype=torch.float32 if name == "rpb" else dtype,
                     low_ref=l_grads[name], grad=True)
    return out, lse, grads


# =============================================================================================
# every head dim, every dtype


HEAD_DIMS = [8, 16, 32, 40, 64, 80, 96, 128, 192, 256]
DV_OF = {8: 16, 40: 64, 96: 40, 192: 128, 256: 8}  # D_v != D for these


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype):
    check_against_reference((20, 22), (7, 5), H=2, D=D, Dv=DV_OF.get(D, D), dtype=dtype, stride=(1, 2),
                            dilation=(2, 1), n_extra=7, rpb=True)


# =============================================================================================
# anchor-like shapes, forward and backward


SHAPES = [
    pytest.param(dict(size=(56, 56), ks=7, B=2, H=2, D=64), id="2d-56x56-k7"),
    pytest.param(dict(size=(56, 56), ks=7, dilation=8, rpb=True, H=2, D=32), id="2d-56x56-k7-d8-rpb(dinat)"),
    pytest.param(dict(size=(32, 32), ks=13, dilation=2, H=2, D=64), id="2d-32x32-k13-d2"),
    pytest.param(dict(size=(30, 37), ks=(8, 6), stride=(4, 3), causal=(False, True), H=2, D=64),
                 id="2d-even_k-stride-causal1-ragged"),
    pytest.param(dict(size=(8, 12, 16), ks=(3, 5, 7), causal=(True, False, False), H=2, D=64),
                 id="3d-8x12x16-k357-causal_time"),
    pytest.param(dict(size=(9, 13, 15), ks=(3, 4, 5), stride=(1, 2, 5), dilation=(2, 3, 1), H=4, Hk=1, D=48,
                      n_extra=77), id="3d-stride-dilation-mqa-extra77"),
    pytest.param(dict(size=(24, 40), ks=(7, 9), H=8, Hk=2, D=64, Dv=96, n_extra=77, rpb=True),
                 id="2d-gqa-extra77-rpb-Dv96"),
    pytest.param(dict(size=(1500,), ks=127, stride=16, causal=True, H=2, D=128, n_extra=1),
                 id="1d-1500-k127-s16-causal-extra1"),
    # the RPB gather is pipelined like K/V: at 128x128x3 this forward asked for 352 KB of shared memory
    pytest.param(dict(size=(8, 16, 16), ks=(3, 5, 5), H=2, D=128, rpb=True), id="3d-D128-rpb"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SHAPES)
def test_real_sizes(case, dtype):
    case = dict(case)
    check_against_reference(case.pop("size"), case.pop("ks"), dtype=dtype, **case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_key_padding_mask_with_fully_masked_rows(dtype):
    size = (28, 30)
    kpm = torch.rand(2, *size, device=DEV) > 0.3
    kpm[0, :12, :12] = False  # queries near the corner lose every key of their 7x7 window
    kpm[1] = False  # a whole batch element without keys
    out, lse, grads = check_against_reference(size, 7, B=2, H=2, D=64, dtype=dtype, kpm=kpm, rpb=True)
    empty = ~torch.isfinite(lse)
    assert empty[1].all() and empty[0, :3, :3].all()
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all() and (grads["q"][empty] == 0).all()
    assert (grads["k"][1] == 0).all() and (grads["v"][1] == 0).all() and (grads["rpb"].isfinite()).all()


@pytest.mark.parametrize("scale", [0.0, 1e-6, 3.0])
def test_scale_is_honoured(scale):
    check_against_reference((16, 20), (5, 3), H=2, D=64, dtype=torch.float16, scale=scale, n_extra=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_packed_qkv_views(dtype):
    """Slices of one packed projection (and a heads-first tensor seen as heads-last) need no copies."""
    B, size, H, D = 2, (24, 28), 4, 64
    qkv = torch.randn(B, *size, 3, H, D, device=DEV).to(dtype)
    q, k, v = qkv.unbind(-3)
    assert not q.is_contiguous()
    out = neighborhood_attention(q, k, v, (5, 7), dilation=(2, 1), backend="triton")
    want = neighborhood_attention_ref(q.double(), k.double(), v.double(), (5, 7), dilation=(2, 1))
    low = neighborhood_attention_ref(q, k, v, (5, 7), dilation=(2, 1), upcast=False)
    assert_close("out", out, want, dtype=dtype, low_ref=low)
    hf = torch.randn(B, H, *size, D, device=DEV).to(dtype)  # heads-first storage, permuted view
    hl = hf.permute(0, 2, 3, 1, 4)
    torch.testing.assert_close(neighborhood_attention(hl, hl, hl, 5, backend="triton"),
                               neighborhood_attention(hl.contiguous(), hl.contiguous(), hl.contiguous(), 5,
                                                      backend="triton"), rtol=0, atol=0)


# =============================================================================================
# compile, determinism, CUDA graphs


def _small_inputs(dtype=torch.float16, size=(32, 36), H=4, Hk=2, D=64):
    t = _leaves(2, size, H, Hk, D, D, dtype, 5, (H, 13, 9))
    return {n: x.requires_grad_() for n, x in t.items()}


def _f(q, k, v, ke, ve, rpb):
    return neighborhood_attention(q, k, v, (7, 5), stride=(1, 2), dilation=(2, 1), extra_kv=(ke, ve), rpb=rpb,
                                  return_lse=True, backend="triton")


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    compiled = torch.compile(_f, fullgraph=True)
    for size in [(32, 36), (40, 28)]:  # a second resolution: recompiles, no graph break
        t = _small_inputs(size=size)
        args = [t[n] for n in ("q", "k", "v", "ke", "ve", "rpb")]
        out_c, lse_c = compiled(*args)
        dout = torch.randn_like(out_c)
        g_c = torch.autograd.grad((out_c * dout).sum() + lse_c.sum(), args)
        out_e, lse_e = _f(*args)
        g_e = torch.autograd.grad((out_e * dout).sum() + lse_e.sum(), args)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=0)
        for a, b in zip(g_c, g_e):
            assert_no_nan("grad", a)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_repeated_backward_is_bitwise_identical():
    t = _small_inputs(size=(56, 56))
    args = [t[n] for n in ("q", "k", "v", "ke", "ve", "rpb")]
    out, lse = _f(*args)
    dout = torch.randn_like(out)
    loss = (out * dout).sum() + lse.sum()
    g1 = torch.autograd.grad(loss, args, retain_graph=True)
    for _ in range(3):
        g2 = torch.autograd.grad(loss, args, retain_graph=True)
        for name, a, b in zip(("q", "k", "v", "ke", "ve", "rpb"), g1, g2):
            assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


def test_cuda_graph_capture_of_the_forward():
    t = {n: x.detach() for n, x in _small_inputs().items()}
    args = [t[n] for n in ("q", "k", "v", "ke", "ve", "rpb")]
    _f(*args)  # warm-up: compile kernels and build the cached tables outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _f(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = _f(*args)
    for _ in range(2):
        for x in args[:5]:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = _f(*args)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)
        torch.testing.assert_close(static_lse, want_lse, rtol=0, atol=0)


def test_cuda_graph_capture_of_forward_and_backward_with_rpb():
    # the RPB gradient's reduction must not sync with the host either (F.one_hot's range check did)
    t = _small_inputs()
    args = [t[n] for n in ("q", "k", "v", "ke", "ve", "rpb")]
    dout = torch.randn(t["q"].shape, device="cuda", dtype=t["q"].dtype)

    def step():
        out, lse = _f(*args)
        return torch.autograd.grad((out * dout).sum() + lse.sum(), args)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        for x in args:
            x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("q", "k", "v", "ke", "ve", "rpb"), static_grads, step()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name} of the replayed graph")


# =============================================================================================
# FlexAttention agreement, large offsets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(size=(40, 44), ks=(7, 9), stride=(2, 3), dilation=(1, 2), causal=(True, False), H=4, Hk=2,
                      n_extra=16), id="2d-stride-dilation-causal0-gqa-extra"),
    pytest.param(dict(size=(6, 16, 20), ks=(3, 5, 5), causal=(True, False, False), H=2), id="3d-causal_time"),
])
def test_flex_and_triton_agree(case, dtype):
    """Both against the float64 reference: Triton's error is at most 2x Flex's (or the dtype floor)."""
    case = dict(case)
    size, ks = case.pop("size"), case.pop("ks")
    H, Hk, n_extra = case.pop("H"), case.pop("Hk", None), case.pop("n_extra", 0)
    Hk = H if Hk is None else Hk
    base = _leaves(1, size, H, Hk, 64, 64, dtype, n_extra, None)
    kw = dict(stride=case.get("stride", 1), dilation=case.get("dilation", 1), is_causal=case.get("causal", False))
    results = {}
    for backend in ("triton", "flex", "ref"):
        t = {n: (x.double() if backend == "ref" else x.clone()).requires_grad_() for n, x in base.items()}
        if backend == "ref":
            out, lse = _call(neighborhood_attention_ref, t, ks, kw, None)
        else:
            out, lse = _call(neighborhood_attention, t, ks, kw, None, backend=backend)
        dout = torch.randn(out.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
        grads = torch.autograd.grad((out.double() * dout).sum(), list(t.values()))  # Flex: no dLSE assumed
        results[backend] = (out, lse, grads)
    ref = results["ref"]
    names = ["out", "lse"] + [f"d{n}" for n in base]
    floor = FLOORS[dtype]
    for i, name in enumerate(names):
        a = results["triton"][0] if i == 0 else results["triton"][1] if i == 1 else results["triton"][2][i - 2]
        b = results["flex"][0] if i == 0 else results["flex"][1] if i == 1 else results["flex"][2][i - 2]
        r = ref[0] if i == 0 else ref[1] if i == 1 else ref[2][i - 2]
        e_t, e_f = max_err(a, r), max_err(b, r)
        bound = max(2 * e_f, floor * (2 if i >= 2 else 1))
        assert e_t <= bound, f"{name}: triton error {e_t:.3e} > {bound:.3e} (flex error {e_f:.3e})"


@pytest.mark.slow
def test_int64_offsets():
    """``N * H * D > 2**31`` elements per tensor (NATTEN #317/#337/#348): the last head must be right."""
    size, H, D = (512, 512), 72, 128  # 2.4e9 elements per tensor, ~4.8 GB in fp16
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB")
    q, k, v = (torch.randn(1, *size, H, D, device=DEV, dtype=torch.float16) for _ in range(3))
    assert math.prod(q.shape) > 2**31
    for t in (q, k, v):
        t.requires_grad_()
    out = neighborhood_attention(q, k, v, 7, backend="triton")
    dout = torch.zeros_like(out)
    dout[..., -1, :] = torch.randn_like(dout[..., -1, :])  # only the last head gets a gradient
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert_no_nan("out", out)
    # NA is local: the bottom 8 rows of the grid see the same windows (and inverse windows) in a crop of the
    # bottom 16 rows, so the float64 reference runs on that crop of the last head only
    crop = (slice(None), slice(-16, None), slice(None), slice(-1, None))
    ql, kl, vl = (t.detach()[crop].double().requires_grad_() for t in (q, k, v))
    ref = neighborhood_attention_ref(ql, kl, vl, 7)
    g = torch.autograd.grad(ref, (ql, kl, vl), dout[crop].double())
    rows = (slice(None), slice(-8, None))
    sl = rows + (slice(None), slice(-1, None))
    torch.testing.assert_close(out[sl].double(), ref[rows], rtol=0, atol=1e-2)
    for name, a, b in zip("qkv", (dq, dk, dv), g):
        torch.testing.assert_close(a[sl].double(), b[rows], rtol=0, atol=2e-2, msg=f"d{name}")
        assert not a[..., :-1, :].any(), f"d{name} of the other heads must be zero"
