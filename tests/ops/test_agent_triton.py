"""The fused ``"triton"`` agent-attention backend under the Triton interpreter (CPU) or on a GPU.

Forward and every gradient (q, k, v, the bias parameters, explicit agents, explicit bias tensors)
against autograd of the float64 reference ``agent_attention_ref``. Tolerance rule (DESIGN.md §5):
error <= 2x the error of the same reference run in the input precision, plus a per-dtype floor
(scaled by the reference's magnitude for gradients). Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from visattn.ops import AgentBias, agent_attention, agent_attention_ref

from ._agent_utils import naive_agent_attention, random_bias_params

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2}


def _check(name, got, ref, low, dtype):
    got, ref, low = got.double(), ref.double(), low.double()
    assert not got.isnan().any(), name
    err, ref_err = (got - ref).abs().max().item(), (low - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= 2 * ref_err + FLOOR[dtype] * scale, (name, err, ref_err, scale)


def _run(fn, inputs, params, kw, seed=1):
    """Output and gradients of sum(out * g) for a fixed random g (drawn in float64, same for every run)."""
    out = fn(*inputs, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * g).sum().backward()
    return [out] + [t.grad for t in inputs] + [params[n].grad for n in sorted(params)]


def _leaves(ts, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in ts]


# grid, r, prefix, agent_shape, heads, head_dim, mask ("none" | "some" | "row": batch 1 fully masked), dtype
CASES = [
    ((5, 7), 1, 0, (1, 1), 2, 16, "none", torch.float32),
    ((5, 7), 1, 1, (2, 2), 2, 32, "row", torch.float32),
    ((5, 7), 1, 1, (3, 3), 1, 16, "some", torch.float32),
    ((6, 8), 2, 0, (3, 3), 2, 16, "row", torch.float32),
    ((6, 8), 2, 1, (2, 2), 2, 32, "none", torch.float16),
    ((5, 7), 1, 0, (3, 3), 2, 16, "some", torch.float16),
]


@pytest.mark.parametrize("grid,r,P,agent_shape,H,D,mask,dtype", CASES, ids=lambda x: str(x))
def test_forward_and_gradients_match_float64_reference(device, grid, r, P, agent_shape, H, D, mask, dtype):
    B = 2
    kg = (grid[0] // r, grid[1] // r)
    N, Nk = P + math.prod(grid), P + math.prod(kg)
    base = [torch.randn(B, n_, H, D, dtype=torch.float64) for n_ in (N, Nk, Nk)]
    n = agent_shape[0] * agent_shape[1]
    pbase = {k_: t.to(device) for k_, t in random_bias_params(H, n, grid, kg, prefix=P).items()}
    kpm = None
    if mask != "none":
        kpm = torch.rand(B, Nk) > 0.4
        kpm[0, 0] = True
        if mask == "row":
            kpm[1] = False
        kpm = kpm.to(device)
    results = {}
    for name, dt in (("triton", dtype), ("ref", torch.float64), ("low", dtype)):
        ins = _leaves([t.to(device) for t in base], dt)
        params = {k_: t.detach().to(torch.float32 if dt != torch.float64 else dt).requires_grad_()
                  for k_, t in pbase.items()}
        kw = dict(agent_shape=agent_shape, grid=grid, bias=AgentBias(**params), key_padding_mask=kpm)
        if name == "triton":
            fn = lambda *a, **k: agent_attention(*a, backend="triton", **k)  # noqa: E731
        else:
            fn = lambda *a, up=name == "ref", **k: agent_attention_ref(*a, upcast=up, **k)  # noqa: E731
        results[name] = _run(fn, ins, params, kw)
    names = ["out", "dq", "dk", "dv"] + [f"d{n_}" for n_ in sorted(pbase)]
    assert results["triton"][0].dtype == dtype and results["triton"][0].shape == (B, N, H, D)
    for nm, got, ref, low in zip(names, results["triton"], results["ref"], results["low"], strict=True):
        _check(nm, got, ref, low, dtype)
    if mask == "row":  # every key of batch 1 masked: zero output and no gradient into its keys
        assert (results["triton"][0][1] == 0).all()
        assert (results["triton"][2][1] == 0).all() and (results["triton"][3][1] == 0).all()


@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
def test_explicit_agents_and_bias_tensors(device, layout):
    """Learned agents broadcast over the batch, a per-batch B1 and a head-broadcast 3-D B2, D = 24."""
    B, N, H, D, n = 2, 19, 2, 24, 5
    base = [torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3)]
    agents = torch.randn(1, n, H, D, dtype=torch.float64)
    b1 = torch.randn(B, H, n, N, dtype=torch.float64)
    b2 = torch.randn(1, N, n, dtype=torch.float64)  # broadcast over batch and heads
    kpm = (torch.rand(B, N) > 0.3).to(device)
    results = {}
    for name, dt in (("triton", torch.float32), ("ref", torch.float64), ("low", torch.float32)):
        ins = _leaves([t.to(device) for t in base], dt)
        params = dict(zip("abc", _leaves([t.to(device) for t in (agents, b1, b2)], dt), strict=True))
        if layout == "BHND":
            ins_l = [t.transpose(1, 2) for t in ins]
            ag = params["a"].transpose(1, 2)
        else:
            ins_l, ag = ins, params["a"]
        kw = dict(agents=ag, bias=(params["b"], params["c"]), key_padding_mask=kpm, scale=(0.3, 0.2),
                  layout=layout)
        if name == "triton":
            out = agent_attention(*ins_l, backend="triton", **kw)
        else:
            out = agent_attention_ref(*ins_l, upcast=name == "ref", **kw)
        out = out.transpose(1, 2) if layout == "BHND" else out
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (out.double() * g.to(device)).sum().backward()
        results[name] = [out] + [t.grad for t in ins] + [params[k_].grad for k_ in "abc"]
    names = ["out", "dq", "dk", "dv", "dagents", "db1", "db2"]
    for nm, got, ref, low in zip(names, *results.values(), strict=True):
        _check(nm, got, ref, low, torch.float32)
    # an independent formula for the forward (no visattn code)
    ref = naive_agent_attention(*[t.transpose(1, 2).to(device) for t in base],
                                agents=agents.transpose(1, 2).to(device), b1=b1.to(device), b2=b2.to(device),
                                mask=kpm, s1=0.3, s2=0.2).transpose(1, 2)
    torch.testing.assert_close(results["triton"][0].double(), ref, rtol=1e-4, atol=1e-4)


def test_reasons_and_no_silent_fallback(device):
    q = torch.randn(1, 16, 1, 16, device=device)
    kw = dict(agent_shape=(2, 2), grid=(4, 4), backend="triton")
    with pytest.raises(NotImplementedError, match="dropout"):
        agent_attention(q, q, q, dropout_p=0.1, **kw)
    with pytest.raises(NotImplementedError, match="head dim"):
        big = torch.randn(1, 16, 1, 160, device=device)
        agent_attention(big, big, big, **kw)
    with pytest.raises(NotImplementedError, match="agents"):
        x = torch.randn(1, 17 * 17, 1, 16, device=device)
        agent_attention(x, x, x, agent_shape=(17, 17), grid=(17, 17), backend="triton")
    x = torch.randn(1, 13 * 13, 1, 128, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="shared memory"):  # 169 agents, D = 128, backward
        agent_attention(x, x, x, agent_shape=(13, 13), grid=(13, 13), backend="triton")
    with pytest.raises(NotImplementedError, match="float64"):
        agent_attention(q.double(), q.double(), q.double(), **kw)
    if device.type == "cpu":
        with pytest.raises(NotImplementedError, match="bfloat16"):
            agent_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), **kw)


def test_auto_stays_on_the_reference_on_cpu():
    from visattn.ops import agent as agent_mod

    q = torch.randn(1, 16, 1, 16, requires_grad=True)
    k = torch.randn(1, 16, 1, 16)
    p = agent_mod._prepare(q, k, k, None, (2, 2), (4, 4), None, None, None, "BNHD")
    assert agent_mod._needs_grad(p)
    with torch.no_grad():
        assert not agent_mod._needs_grad(p)
    out = agent_attention(q, k, k, agent_shape=(2, 2), grid=(4, 4))  # auto on CPU: the torch reference
    assert out.dtype == torch.float32


@pytest.mark.parametrize("target", [1, 10_000])
def test_backward_splits(device, monkeypatch, target):
    """Every backward split: one program per head looping over all batches and tiles (target 1: bias
    gradients summed in place over the batches), and one program per tile and batch (target 10^4)."""
    from visattn.kernels import agent as kernels

    monkeypatch.setattr(kernels, "_target_programs", lambda dev: target)
    run = test_forward_and_gradients_match_float64_reference
    run(device, (5, 7), 1, 1, (2, 2), 2, 16, "row", torch.float32)
    run(device, (6, 8), 2, 0, (3, 3), 2, 16, "some", torch.float32)


def test_torch_compile_traces_the_custom_ops(device):
    """Fake implementations and the autograd registration, traced by dynamo + AOTAutograd (aot_eager)."""
    grid, H, D = (5, 7), 2, 16
    base = [torch.randn(2, 36, H, D, device=device) for _ in range(3)]
    d = {k_: t.to(device) for k_, t in random_bias_params(H, 4, grid, prefix=1, dtype=torch.float32).items()}

    def f(q, k, v, bias):
        return agent_attention(q, k, v, agent_shape=(2, 2), grid=grid, bias=bias, backend="triton")

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        ts = [t.clone().requires_grad_() for t in base]
        ps = {k_: t.clone().requires_grad_() for k_, t in d.items()}
        out = fn(*ts, AgentBias(**ps))
        out.square().sum().backward()
        grads.append([out] + [t.grad for t in ts] + [ps[k_].grad for k_ in sorted(ps)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
