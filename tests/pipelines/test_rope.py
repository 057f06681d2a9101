"""The fused RoPE kernel (``kernels/rope.py``) against independent rotations.

References: a complex multiplication in fp64 (Wan's tables: one angle per pair) and diffusers'
``apply_rotary_emb`` (general interleaved tables). On the CPU the kernel runs in the Triton
interpreter, whose fp32 -> bf16/fp16 conversion truncates: low-precision outputs may differ from a
rounded reference by one unit in the last place there (on the GPU the conversion rounds to nearest).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from visattn.pipelines._rope import _wan_rope_eager, rope_pairs, wan_rope  # noqa: E402

# tolerance of one output: fp64/fp32 arithmetic, then one rounding (or truncation) to the dtype
_ULP = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _complex_rotation(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(x[2i] + i x[2i+1]) e^{i theta[s, i]}`` in fp64, as ``[B, S, H, D]`` real pairs."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)[:, None]).flatten(-2)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = _ULP[dtype] * ref.abs().double().clamp_min(1.0)
    bad = (out.double() - ref.double()).abs() > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off, e.g. {out[bad][:4]} vs {ref[bad][:4]}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [128, 64, 6, 20])  # pairs 64, 32 and (padded to a power of two) 3, 10
def test_wan_tables_match_complex_rotation(dtype, D):
    B, S, H = 2, 37, 3  # 37 tokens: a partial 32-token tile
    q, k = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, H, D, dtype=dtype) * 3
    theta = torch.rand(S, D // 2, dtype=torch.float64) * 40
    tab = torch.float64 if dtype == torch.float64 else torch.float32  # as the rope module holds them
    cos = theta.cos().repeat_interleave(2, -1).to(tab)  # Wan's tables: [1, S, 1, D], repeated pairs
    sin = theta.sin().repeat_interleave(2, -1).to(tab)
    ce, se = cos[:, 0::2], sin[:, 1::2]
    oq, ok = rope_pairs((q, k), ce, ce, se, se, fused=True)  # q and k in one launch
    assert oq.dtype == ok.dtype == dtype and oq.shape == q.shape
    _close(oq, _complex_rotation(q, theta), dtype)
    _close(ok, _complex_rotation(k, theta), dtype)
    # the eager path (CPU) is WanAttnProcessor's own code
    eq, ek = wan_rope(q, k, cos[None, :, None], sin[None, :, None])
    _close(eq, _complex_rotation(q, theta), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_general_tables_match_diffusers(dtype):
    B, S, H, D = 1, 45, 2, 64
    x = torch.randn(B, S, H, D, dtype=dtype)
    cos, sin = torch.randn(S, D), torch.randn(S, D)  # not repeated: even and odd entries differ
    (out,) = rope_pairs((x,), cos[:, 0::2], cos[:, 1::2], sin[:, 0::2], sin[:, 1::2], fused=True)
    ref = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    _close(out, ref.float(), dtype)


def test_strided_input_and_tables():
    # x a view into a wider buffer (fused qkv), tables sliced from [1, S, 1, D] with a token step
    B, S, H, D = 2, 33, 4, 32
    buf = torch.randn(B, S, 3 * H * D, dtype=torch.float64)
    q, k = buf[..., : H * D].unflatten(-1, (H, D)), buf[..., H * D : 2 * H * D].unflatten(-1, (H, D))
    theta = torch.rand(2 * S, D // 2, dtype=torch.float64)
    cos = theta.cos().repeat_interleave(2, -1)[::2]
    sin = theta.sin().repeat_interleave(2, -1)[::2]
    oq, ok = rope_pairs((q, k), cos[:, 0::2], cos[:, 0::2], sin[:, 1::2], sin[:, 1::2], fused=True)
    _close(oq, _complex_rotation(q, theta[::2]), torch.float64)
    _close(ok, _complex_rotation(k, theta[::2]), torch.float64)


def test_backward_is_autograd_of_the_rotation():
    B, S, H, D = 2, 35, 3, 16
    q = torch.randn(B, S, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, H, D, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(S, D, dtype=torch.float64), torch.randn(S, D, dtype=torch.float64)
    tables = (cos[:, 0::2], cos[:, 1::2], sin[:, 0::2], sin[:, 1::2])
    gq, gk = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, H, D, dtype=torch.float64)
    oq, ok = rope_pairs((q, k), *tables, fused=True)
    dq, dk = torch.autograd.grad((oq * gq).sum() + (ok * gk).sum(), (q, k))
    rq, rk = rope_pairs((q, k), *tables, fused=False)  # torch ops, torch autograd
    eq, ek = torch.autograd.grad((rq * gq).sum() + (rk * gk).sum(), (q, k), retain_graph=True)
    torch.testing.assert_close(dq, eq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk, ek, rtol=1e-12, atol=1e-12)
    # one output unused: its gradient is None, the other still flows
    (dq_only,) = torch.autograd.grad(rope_pairs((q, k), *tables, fused=True)[0].sum(), (q,))
    torch.testing.assert_close(dq_only, torch.autograd.grad(rq.sum(), (q,))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_wan_rope_matches_the_eager_code(dtype):
    B, S, H, D = 1, 4099, 12, 128
    q, k = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(2))
    theta = torch.rand(S, D // 2, device="cuda", dtype=torch.float64) * 100
    rot = tuple(f(theta).repeat_interleave(2, -1).float()[None, :, None] for f in (torch.cos, torch.sin))
    oq, ok = wan_rope(q, k, *rot)
    rq, rk = _wan_rope_eager(q, *rot), _wan_rope_eager(k, *rot)
    for out, ref, x in ((oq, rq, q), (ok, rk, k)):
        _close(out, _complex_rotation(x, theta), dtype)
        if dtype != torch.float32:  # rounded to nearest on the GPU: FMA contraction rarely shows
            assert (out != ref).float().mean().item() < 0.01
    # training through the processor: the kernel's backward
    qg = q.float().requires_grad_()
    (og, _) = wan_rope(qg, k.float(), *rot)
    (d,) = torch.autograd.grad(og.sum(), qg)
    qe = q.float().requires_grad_()
    (e,) = torch.autograd.grad(_wan_rope_eager(qe, *rot).sum(), qe)
    torch.testing.assert_close(d, e, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key_too", [True, False])
def test_cuda_diffusers_rope_matches_apply_rotary_emb(key_too):
    from visattn.pipelines._rope import diffusers_rope

    B, S, H, D = 2, 1000, 8, 64
    q, k = (torch.randn(B, S + 7, H, D, device="cuda", dtype=torch.bfloat16)[:, 7:] for _ in range(2))
    cos, sin = torch.randn(S, D, device="cuda"), torch.randn(S, D, device="cuda")
    oq, ok = diffusers_rope(q, k if key_too else None, (cos, sin))
    assert (ok is not None) == key_too
    for out, x in ((oq, q), (ok, k)) if key_too else ((oq, q),):
        ref = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
        _close(out, ref, torch.bfloat16)
        assert (out != ref).float().mean().item() < 0.01


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_wan_rope_traces_the_torch_code():
    S, H, D = 300, 4, 64
    q, k = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    theta = torch.rand(S, D // 2, device="cuda", dtype=torch.float64)
    rot = tuple(f(theta).repeat_interleave(2, -1).float()[None, :, None] for f in (torch.cos, torch.sin))
    compiled = torch.compile(lambda a, b: wan_rope(a, b, *rot), fullgraph=True)
    for out, ref in zip(compiled(q, k), wan_rope(q, k, *rot), strict=True):
        _close(out, ref.float(), torch.bfloat16)


def _rmsnorm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp64, rounded once to ``x``'s dtype (torch's fused kernel rounds once)."""
    xd = x.double()
    return (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_then_rotation_in_one_launch(dtype):
    # Wan's norm_q / norm_k (RMSNorm over all heads of a token) fused before the rotation; q and k are
    # views into a fused qkv buffer (token stride 3 H D), the two weights differ
    from visattn.kernels.rope import rope_pairs_fwd

    B, S, H, D = 2, 37, 3, 16
    buf = torch.randn(B, S, 3 * H * D, dtype=dtype) * 4
    q, k = buf[..., : H * D], buf[..., H * D : 2 * H * D]
    wq, wk = torch.rand(H * D, dtype=dtype) + 0.5, torch.rand(H * D, dtype=torch.float32) * 2
    theta = torch.rand(S, D // 2, dtype=torch.float64) * 40
    cos, sin = (f(theta).repeat_interleave(2, -1).float() for f in (torch.cos, torch.sin))
    ce, se = cos[:, 0::2], sin[:, 1::2]
    oq, ok = rope_pairs_fwd((q.unflatten(-1, (H, D)), k.unflatten(-1, (H, D))), ce, ce, se, se,
                            norm=((wq, wk), 1e-6))
    for out, x, w in ((oq, q, wq), (ok, k, wk)):
        ref = _complex_rotation(_rmsnorm_reference(x, w, 1e-6).unflatten(-1, (H, D)), theta)
        # one unit in the last place from the norm's rounding, carried through the rotation, plus the rotation's own
        tol = 3 * _ULP[dtype] * ref.abs().double().clamp_min(1.0)
        assert ((out.double() - ref).abs() <= tol).all(), (out.double() - ref).abs().max()
    # torch's own RMSNorm module, then the rotation: the same values up to those roundings
    norm = torch.nn.RMSNorm(H * D, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(wq)
        ref = _complex_rotation(norm(q).unflatten(-1, (H, D)), theta)
    tol = 3 * _ULP[dtype] * ref.abs().clamp_min(1.0)
    assert ((oq.double() - ref).abs() <= tol).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_wan_norm_rope_matches_norm_modules_then_rope(dtype):
    from visattn.pipelines._rope import wan_norm_rope

    B, S, H, D = 1, 4099, 12, 128
    q, k = (torch.randn(B, S, H * D, device="cuda", dtype=dtype) * 3 for _ in range(2))
    norm_q, norm_k = (torch.nn.RMSNorm(H * D, eps=1e-6, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        for n in (norm_q, norm_k):
            n.weight.uniform_(0.5, 2.0)
    theta = torch.rand(S, D // 2, device="cuda", dtype=torch.float64) * 100
    rot = tuple(f(theta).repeat_interleave(2, -1).float()[None, :, None] for f in (torch.cos, torch.sin))
    with torch.no_grad():
        oq, ok = wan_norm_rope(q, k, norm_q, norm_k, H, *rot)
        for out, x, n in ((oq, q, norm_q), (ok, k, norm_k)):
            ref = _wan_rope_eager(n(x).unflatten(-1, (H, D)), *rot)  # the default processor's steps
            exact = _complex_rotation(_rmsnorm_reference(x, n.weight, 1e-6).unflatten(-1, (H, D)), theta)
            tol = 3 * _ULP[dtype] * exact.abs().clamp_min(1.0)
            assert ((out.double() - exact).abs() <= tol).all()
            assert (out != ref).float().mean().item() < (0.02 if dtype != torch.float32 else 1.0)
        # not fused: a gradient is needed, the norms are not RMSNorm, or their eps differ
        assert wan_norm_rope(q, k, torch.nn.LayerNorm(H * D, device="cuda", dtype=dtype), norm_k, H, *rot) is None
        norm_k.eps = 1e-5
        assert wan_norm_rope(q, k, norm_q, norm_k, H, *rot) is None
        norm_k.eps = 1e-6
    assert wan_norm_rope(q, k, norm_q, norm_k, H, *rot) is None  # grad mode: the weights need gradients


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_cuda_wan_processor_with_fused_norm_rope_matches_default(dtype, fused_qkv):
    # the dense method's Wan processor takes wan_norm_rope on CUDA (inference); the model's own default
    # processors (torch RMSNorm modules, then their RoPE) are the oracle
    import visattn.pipelines as vp
    from visattn.pipelines import _families
    from visattn.pipelines.tiny import tiny_inputs, tiny_model

    model = tiny_model("wan").to("cuda", dtype)
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():  # norm weights of their own, different for q and k (a fresh model's are ones)
        for mod in model.modules():
            if isinstance(mod, torch.nn.RMSNorm) and mod.weight is not None:
                mod.weight.uniform_(0.5, 2.0, generator=gen)
    if fused_qkv:
        model.fuse_qkv_projections()
    inputs = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) if torch.is_tensor(v) else v
              for k, v in tiny_inputs("wan", size=32).items()}
    calls = []
    real = _families.wan_norm_rope

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    with torch.no_grad():
        ref = model(**inputs)[0].float()
        _families.wan_norm_rope = spy
        try:
            with vp.apply(model, "dense"):
                out = model(**inputs)[0].float()
        finally:
            _families.wan_norm_rope = real
    assert calls and all(calls)  # the fused path ran in every self-attention layer
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
