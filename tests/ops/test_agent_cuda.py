"""GPU tests of agent attention (``pytest -m cuda``): the ``"sdpa"``, ``"triton"`` and ``"upstream"`` backends
against the float64 reference at the spec's shapes (agent.md §6) and dtypes, gradients, and the backbones' backend
equivalence at real sizes. Tolerance rule (DESIGN.md §5): error <= 2x the error of the same reference run
in the low precision, plus a per-dtype floor."""

from __future__ import annotations

import math

import pytest
import torch

from visattn.ops import AgentBias, agent_attention, agent_attention_ref

from ._agent_utils import random_bias_params

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# grid, agent_shape, prefix, r, heads, head dim
SHAPES = [
    ((7, 9), (3, 3), 0, 1, 2, 32),
    ((56, 56), (3, 3), 0, 1, 3, 32),
    ((28, 28), (4, 4), 0, 1, 6, 32),
    ((14, 14), (7, 7), 1, 1, 6, 64),
    ((14, 14), (9, 9), 1, 1, 12, 64),
    ((16, 16), (1, 1), 0, 2, 4, 128),
    ((32, 32), (16, 16), 0, 2, 2, 64),
]


def _case(grid, agent_shape, P, r, H, D, B=3, dtype=torch.float16, mask=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kg = (grid[0] // r, grid[1] // r)
    N, Nk = P + math.prod(grid), P + math.prod(kg)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (N, Nk, Nk))
    n0 = agent_shape[0] * agent_shape[1]
    torch.manual_seed(seed)
    d = {n: t.cuda() for n, t in random_bias_params(H, n0, grid, kg, prefix=P, dtype=torch.float32).items()}
    kpm = (torch.rand(B, Nk, generator=g) > 0.3).cuda() if mask else None
    if mask:
        kpm[0] = False
    return [t.cuda().to(dtype) for t in (q, k, v)], d, kpm


@pytest.mark.parametrize("backend", ["sdpa", "upstream", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("mask", [False, True])
def test_forward_matches_reference(backend, dtype, shape, mask):
    grid, agent_shape, P, r, H, D = shape
    (q, k, v), d, kpm = _case(*shape, dtype=dtype, mask=mask)
    bias = AgentBias(**d, cache={})
    kw = dict(agent_shape=agent_shape, grid=grid, bias=bias, key_padding_mask=kpm)
    with torch.no_grad():
        out = agent_attention(q, k, v, backend=backend, **kw)
        ref = agent_attention_ref(q, k, v, upcast=True, **kw).double()
        low = agent_attention_ref(q, k, v, upcast=False, **kw).double()
    assert out.dtype == dtype and not out.isnan().any()
    err, ref_err = (out.double() - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= 2 * ref_err + FLOOR[dtype], (err, ref_err)
    if mask:
        assert (out[0] == 0).all()


def _backward_case(backend, dtype, shape, mask, B=3):
    grid, agent_shape, P, r, H, D = shape
    (q, k, v), d, kpm = _case(*shape, dtype=dtype, mask=mask, B=B)
    grads = {}
    for name in (backend, "ref", "low"):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ps = {n: t.detach().clone().requires_grad_() for n, t in d.items()}
        kw = dict(agent_shape=agent_shape, grid=grid, bias=AgentBias(**ps), key_padding_mask=kpm)
        if name == backend:
            out = agent_attention(*ts, backend=backend, **kw)
        else:
            out = agent_attention_ref(*ts, upcast=name == "ref", **kw)
        torch.manual_seed(1)  # randn(shape), not randn_like: the outputs' memory orders differ by backend
        out.float().mul(torch.randn(out.shape, device=out.device)).sum().backward()
        grads[name] = [t.grad.double() for t in ts] + [ps[n].grad.double() for n in sorted(ps)]
    names = ["dq", "dk", "dv"] + [f"d{n}" for n in sorted(d)]
    for nm, g, r_, lo in zip(names, grads[backend], grads["ref"], grads["low"]):
        assert not g.isnan().any(), nm
        err, ref_err = (g - r_).abs().max().item(), (lo - r_).abs().max().item()
        scale = r_.abs().max().item() + 1e-6
        assert err <= 2 * ref_err + FLOOR[dtype] * max(1.0, scale), (nm, err, ref_err, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: str(s))
def test_backward_matches_reference(dtype, shape):
    _backward_case("sdpa", dtype, shape, mask=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("mask", [False, True])
def test_triton_backward_matches_reference(dtype, shape, mask):
    _backward_case("triton", dtype, shape, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_backward_large_batch(dtype):
    """B = 48: pass 1 split over key chunks; backward programs loop over several tiles and batches each."""
    _backward_case("triton", dtype, ((28, 28), (4, 4), 0, 1, 6, 32), mask=True, B=48)


def test_auto_picks_sdpa_below_2048_tokens_and_for_inference_on_cuda():
    (q, k, v), d, _ = _case((14, 14), (7, 7), 1, 1, 6, 64, dtype=torch.bfloat16)
    kw = dict(agent_shape=(7, 7), grid=(14, 14), bias=AgentBias(**d, cache={}))
    qg = q.detach().requires_grad_()
    auto = agent_attention(qg, k, v, **kw)
    torch.testing.assert_close(auto, agent_attention(qg, k, v, backend="sdpa", **kw), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(agent_attention(q, k, v, **kw), agent_attention(q, k, v, backend="sdpa", **kw),
                                   rtol=0, atol=0)


def test_auto_picks_triton_for_training_on_2048_tokens_or_more():
    # a 56x56 stage 1 (3136 tokens) trains on the fused kernels; without a gradient it stays on SDPA
    (q, k, v), d, _ = _case((56, 56), (3, 3), 1, 1, 3, 32, dtype=torch.bfloat16)
    kw = dict(agent_shape=(3, 3), grid=(56, 56), bias=AgentBias(**d, cache={}))
    qg = q.detach().requires_grad_()
    auto = agent_attention(qg, k, v, **kw)
    fused = agent_attention(qg, k, v, backend="triton", **kw)
    torch.testing.assert_close(auto, fused, rtol=0, atol=0)
    assert not torch.equal(fused, agent_attention(qg, k, v, backend="sdpa", **kw))  # the choice is visible
    g = torch.randn_like(auto)
    (ga,) = torch.autograd.grad(auto, qg, g)
    (gf,) = torch.autograd.grad(fused, qg, g)
    torch.testing.assert_close(ga, gf, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(agent_attention(q, k, v, **kw), agent_attention(q, k, v, backend="sdpa", **kw),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_no_host_sync_and_cuda_graph_capture(backend):
    (q, k, v), d, kpm = _case((14, 14), (7, 7), 1, 1, 6, 64, dtype=torch.bfloat16, mask=True)
    bias = AgentBias(**d, cache={})
    kw = dict(agent_shape=(7, 7), grid=(14, 14), bias=bias, key_padding_mask=kpm, backend=backend)
    with torch.no_grad():
        ref = agent_attention(q, k, v, **kw)  # warm-up fills the bias cache
        torch.cuda.set_sync_debug_mode("error")
        try:
            agent_attention(q, k, v, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            agent_attention(q, k, v, **kw)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = agent_attention(q, k, v, **kw)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, ref)


def test_triton_training_step_has_no_host_sync():
    (q, k, v), d, kpm = _case((28, 28), (4, 4), 0, 1, 6, 32, dtype=torch.bfloat16, mask=True, B=8)
    ps = {n: t.detach().clone().requires_grad_() for n, t in d.items()}
    ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(agent_shape=(4, 4), grid=(28, 28), bias=AgentBias(**ps), key_padding_mask=kpm, backend="triton")

    def step():
        agent_attention(*ts, **kw).float().square().sum().backward()

    step()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("name", ["agent_swin_tiny", "agent_pvt_small", "agent_deit_small", "agent_cswin_tiny"])
def test_backbone_sdpa_matches_reference_backend(name, backend):
    import timm

    import visattn  # noqa: F401

    torch.manual_seed(0)
    m = timm.create_model(name, backend="torch", drop_path_rate=0.0).cuda().train()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    out_ref = m(x)
    out_ref.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for mod in m.modules():
        if hasattr(mod, "an_bias"):
            mod.backend = backend
    out = m(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, out_ref, rtol=2e-3, atol=2e-3)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=5e-2, atol=5e-4, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_compile_fullgraph(backend):
    from visattn.layers import AgentAttention

    m = AgentAttention(96, 3, grid=(56, 56), agent_shape=(3, 3), backend=backend).cuda()
    x = torch.randn(4, 3136, 96, device="cuda")
    f = torch.compile(m, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(f(x).float(), m(x).float(), rtol=2e-2, atol=2e-2)
    if backend == "triton":  # training through the compiled graph: same gradients as eager
        grads = []
        for fn in (m, f):
            m.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn(x).float().square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=5e-2, atol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
