"""CPU tests of agent attention (spec agent.md §2-3, §6): backends vs an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.ops import AgentBias, agent_attention, agent_attention_ref
from visattn.ops.agent import pool_agents

from ._agent_utils import bins, naive_agent_attention, pool_naive, random_bias_params, upstream_biases

BACKENDS = ["torch", "sdpa", "upstream"]


def _qkv(B, N, Nk, H, D, dtype=torch.float64):
    return (torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, Nk, H, D, dtype=dtype),
            torch.randn(B, Nk, H, D, dtype=dtype))


def _bhnd(*ts):
    return [t.transpose(1, 2) for t in ts]


CASES = [  # grid, r, prefix, agent_shape, heads, head_dim
    ((7, 9), 1, 0, (3, 3), 2, 16),
    ((7, 9), 1, 1, (2, 3), 1, 32),
    ((8, 6), 2, 0, (3, 3), 2, 16),
    ((8, 8), 2, 1, (1, 1), 3, 8),
    ((6, 6), 1, 0, (6, 6), 2, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,r,P,agent_shape,H,D", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_match_naive_reference(backend, grid, r, P, agent_shape, H, D, with_bias):
    B = 2
    kg = (grid[0] // r, grid[1] // r)
    q, k, v = _qkv(B, P + math.prod(grid), P + math.prod(kg), H, D)
    bias = b1 = b2 = None
    n0 = 9
    if with_bias:
        d = random_bias_params(H, n0, grid, kg, prefix=P)
        bias = AgentBias(**d)
        if agent_shape == (3, 3):
            b1, b2 = upstream_biases(d, grid, kg)
        else:  # resampled along the agent grid: compare with the materialised pair checked elsewhere
            b1, b2 = bias.materialize(grid, kg, agent_shape)
    out = agent_attention(q, k, v, agent_shape=agent_shape, grid=grid, bias=bias, backend=backend)
    ref = naive_agent_attention(*_bhnd(q, k, v), grid=grid, agent_shape=agent_shape, b1=b1, b2=b2).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bhnd_layout_and_float32(backend):
    grid, H, D = (5, 7), 2, 16
    q, k, v = _qkv(2, 36, 36, H, D, torch.float32)
    d = random_bias_params(H, 4, grid, prefix=1, dtype=torch.float32)
    out = agent_attention(*_bhnd(q, k, v), agent_shape=(2, 2), grid=grid, bias=AgentBias(**d), layout="BHND",
                          backend=backend)
    b1, b2 = upstream_biases(d, grid, grid)
    ref = naive_agent_attention(*_bhnd(q, k, v), grid=grid, agent_shape=(2, 2), b1=b1, b2=b2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_explicit_agents_equal_pooled():
    grid, H, D = (7, 9), 2, 16
    q, k, v = _qkv(2, 64, 64, H, D)
    d = random_bias_params(H, 9, grid, prefix=1)
    bias = AgentBias(**d)
    pooled = pool_agents(q.transpose(1, 2), grid, (3, 3), prefix=1).transpose(1, 2)  # [B, n, H, D]
    for backend in BACKENDS:
        a = agent_attention(q, k, v, agent_shape=(3, 3), grid=grid, bias=bias, backend=backend)
        b = agent_attention(q, k, v, agents=pooled, grid=grid, bias=bias, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_learned_agents_broadcast_over_batch():
    q, k, v = _qkv(3, 20, 20, 2, 8)
    agents = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    out = agent_attention(q, k, v, agents=agents, backend="sdpa")
    ref = naive_agent_attention(*_bhnd(q, k, v), agents=agents.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_pooling_bins_match_torch_adaptive_pooling():
    assert bins(56, 3) == [(0, 19), (18, 38), (37, 56)]
    x = torch.randn(2, 3, 56 * 45, 4, dtype=torch.float64)
    for shape in [(3, 3), (7, 4), (56, 45), (1, 1), (5, 9)]:
        torch.testing.assert_close(pool_agents(x, (56, 45), shape), pool_naive(x, (56, 45), shape))


@pytest.mark.parametrize("grid,agent_shape", [((13,), (4,)), ((3, 5, 6), (2, 2, 3))])
def test_1d_and_3d_grids(grid, agent_shape):
    N = 1 + math.prod(grid)
    q, k, v = _qkv(2, N, N, 2, 8)
    for backend in BACKENDS:
        out = agent_attention(q, k, v, agent_shape=agent_shape, grid=grid, backend=backend)
        ref = naive_agent_attention(*_bhnd(q, k, v), grid=grid, agent_shape=agent_shape).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_single_agent_closed_form():
    grid, H, D = (4, 5), 2, 8
    q, k, v = _qkv(2, 20, 20, H, D)
    d = random_bias_params(H, 1, grid)
    bias = AgentBias(**d)
    out = agent_attention(q, k, v, agent_shape=(1, 1), grid=grid, bias=bias, backend="sdpa").transpose(1, 2)
    qh, kh, vh = _bhnd(q, k, v)
    abar = qh.mean(2, keepdim=True)
    b1, _ = upstream_biases(d, grid, grid)
    expect = torch.softmax(abar @ kh.transpose(-1, -2) * D**-0.5 + b1, -1) @ vh  # [B, H, 1, D]
    torch.testing.assert_close(out, expect.expand_as(out))


def test_row_constants_leave_the_output_unchanged():
    H, n = 2, 6
    q, k, v = _qkv(2, 30, 30, H, 8)
    agents = torch.randn(2, n, H, 8, dtype=torch.float64)
    b1, b2 = torch.randn(H, n, 30, dtype=torch.float64), torch.randn(H, 30, n, dtype=torch.float64)
    base = agent_attention(q, k, v, agents=agents, bias=(b1, b2), backend="torch")
    shifted = agent_attention(q, k, v, agents=agents, backend="torch",
                              bias=(b1 + torch.randn(H, n, 1, dtype=torch.float64),
                                    b2 + torch.randn(H, 30, 1, dtype=torch.float64)))
    torch.testing.assert_close(base, shifted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask(backend):
    grid, H, D = (4, 4), 2, 8
    q, k, v = _qkv(3, 17, 17, H, D)
    mask = torch.rand(3, 17) > 0.4
    mask[1] = False  # a row with every key masked
    mask[2, 0] = True
    d = random_bias_params(H, 4, grid, prefix=1)
    out = agent_attention(q, k, v, agent_shape=(2, 2), grid=grid, bias=AgentBias(**d), key_padding_mask=mask,
                          backend=backend)
    b1, b2 = upstream_biases(d, grid, grid)
    ref = naive_agent_attention(*_bhnd(q, k, v), grid=grid, agent_shape=(2, 2), b1=b1, b2=b2,
                                mask=mask).transpose(1, 2)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # masked keys do not matter
    k2 = torch.where(mask[:, :, None, None], k, torch.randn_like(k) * 100)
    out2 = agent_attention(q, k2, v, agent_shape=(2, 2), grid=grid, bias=AgentBias(**d), key_padding_mask=mask,
                           backend=backend)
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_gradcheck(backend):
    grid, H, D = (3, 4), 1, 4
    q, k, v = (t.requires_grad_() for t in _qkv(1, 13, 13, H, D))
    d = {name: t.requires_grad_() for name, t in random_bias_params(H, 4, grid, prefix=1, std=0.3).items()}

    def f(q, k, v, an, ah, wa, ca):
        bias = AgentBias(**{**d, "an": an, "ah": ah, "wa": wa, "ca": ca})
        return agent_attention(q, k, v, agent_shape=(2, 2), grid=grid, bias=bias, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, d["an"], d["ah"], d["wa"], d["ca"]), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_sdpa_gradients_match_reference_float32():
    grid, H, D = (6, 6), 2, 16
    q, k, v = _qkv(2, 37, 37, H, D, torch.float32)
    d = random_bias_params(H, 9, grid, prefix=1, dtype=torch.float32)
    grads = []
    for backend in ["torch", "sdpa", "upstream"]:
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        ds = {n: t.clone().requires_grad_() for n, t in d.items()}
        out = agent_attention(*ts, agent_shape=(3, 3), grid=grid, bias=AgentBias(**ds), backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([t.grad for t in ts] + [ds[n].grad for n in sorted(ds)])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# AgentBias identities (§2.4)


def test_materialize_equals_upstream_at_trained_size():
    d = random_bias_params(3, 9, (7, 7), (7, 7), prefix=1)
    b1, b2 = AgentBias(**d).materialize()
    e1, e2 = upstream_biases(d, (7, 7), (7, 7))
    torch.testing.assert_close(b1, e1, rtol=0, atol=1e-14)
    torch.testing.assert_close(b2, e2, rtol=0, atol=1e-14)


def test_separable_resize_equals_2d_resize_of_the_sum():
    """I1(row) + I1(col) equals I2 of their separable sum (upstream loader vs downstream resize)."""
    d = random_bias_params(2, 4, (7, 7), (7, 7))
    bias = AgentBias(**d)
    for size in [(10, 13), (4, 5), (14, 14)]:
        b1, b2 = bias.materialize(size, size)
        an = F.interpolate(d["an"], size=size, mode="bilinear")
        sep = F.interpolate((d["ah"] + d["aw"])[0], size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(b1, (an + sep).reshape(2, 4, -1))
        na = F.interpolate(d["na"], size=size, mode="bilinear")
        hw = (d["ha"] + d["wa"])[0].permute(0, 3, 1, 2)  # [h, n, H0, W0]
        sep2 = F.interpolate(hw, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(b2, (na + sep2).reshape(2, 4, -1).transpose(1, 2))


def test_spatial_and_agent_resampling_commute():
    d = random_bias_params(2, 9, (7, 7), (7, 7), prefix=1)
    bias = AgentBias(**d)
    direct = bias.materialize((11, 9), (11, 9), (4, 5))
    via = bias.resample(grid=(11, 9), agent_shape=(4, 5)).materialize((11, 9), (11, 9), (4, 5))
    via2 = bias.resample(agent_shape=(4, 5)).materialize((11, 9), (11, 9))
    for a, b, c in zip(direct, via, via2):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_resample_round_trips_at_trained_size():
    d = random_bias_params(2, 9, (7, 7), (7, 7), prefix=1)
    bias = AgentBias(**d)
    same = bias.resample(grid=(7, 7), agent_shape=(3, 3))
    for n in d:
        torch.testing.assert_close(getattr(same, n), d[n], rtol=0, atol=0)
    up = bias.resample(grid=(14, 14), agent_shape=(5, 5))
    assert up.ah.shape == (1, 2, 25, 14, 1) and up.wa.shape == (1, 2, 1, 14, 25) and up.an.shape == (2, 25, 7, 7)


def test_cache_under_no_grad_and_invalidation():
    d = {n: torch.nn.Parameter(t) for n, t in random_bias_params(2, 4, (5, 5)).items()}
    bias = AgentBias(**d, cache={})
    with torch.no_grad():
        a = bias.materialize((5, 5))
        b = bias.materialize((5, 5))
        assert a[0] is b[0] and a[1] is b[1]
        d["an"].add_(1.0)
        c = bias.materialize((5, 5))
        assert c[0] is not a[0]
        torch.testing.assert_close(c[0], a[0] + 1.0)
    e = bias.materialize((5, 5))  # grad enabled: fresh and differentiable
    assert e[0].requires_grad and e[0] is not c[0]


# ---------------------------------------------------------------------------------------------
# errors


def _err(match, **kw):
    q, k, v = kw.pop("qkv", None) or _qkv(2, 17, 17, 2, 8)
    args = dict(agent_shape=(2, 2), grid=(4, 4))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        agent_attention(q, k, v, **args)


def test_errors():
    _err("exactly one of agents and agent_shape", agents=torch.randn(2, 4, 2, 8, dtype=torch.float64))
    _err("exactly one of agents and agent_shape", agent_shape=None)
    _err("expected grid", grid=None)
    _err("prod\\(grid\\) <= ", grid=(5, 5))
    _err("agent_shape no larger than grid", agent_shape=(5, 1))
    _err("agent_shape with as many axes", agent_shape=(2,))
    _err("reduced by one integer factor", qkv=_qkv(2, 17, 9, 2, 8)[:1] + _qkv(2, 10, 10, 2, 8)[1:])
    _err("key_padding_mask", key_padding_mask=torch.ones(2, 16, dtype=torch.bool))
    _err("key_padding_mask", key_padding_mask=torch.ones(2, 17))
    _err("bias for 2 heads", bias=AgentBias(**random_bias_params(3, 4, (4, 4))))
    _err("bias \\(B1, B2\\) broadcastable", bias=(torch.zeros(2, 3, 17), torch.zeros(2, 17, 4)))
    _err("scale", scale=-1.0)
    _err("same number of heads", qkv=(_qkv(2, 17, 17, 2, 8)[0], *_qkv(2, 17, 17, 1, 8)[1:]))
    _err("share the head dim", qkv=(_qkv(2, 17, 17, 2, 4)[0], *_qkv(2, 17, 17, 2, 8)[1:]))
    _err("share one dtype", qkv=(_qkv(2, 17, 17, 2, 8, torch.float32)[0], *_qkv(2, 17, 17, 2, 8)[1:]))
    with pytest.raises(ValueError, match="bias.ah.shape"):
        AgentBias(**{**random_bias_params(2, 4, (4, 4)), "ah": torch.zeros(1, 2, 5, 4, 1)})


def test_errors_shapes_agents_and_bias_binding():
    """The rest of spec §3.1's error list: layout/rank, key length, explicit agents, bias binding."""
    q, k, v = _qkv(2, 17, 17, 2, 8)
    _err("layout to be one of", layout="BHWC")
    _err("q of rank 4", qkv=(q[0], k, v))
    _err(r"prefix token\(s\) and a key grid", qkv=(q, k[:, :1], v[:, :1]))  # one prefix token, no key grid
    agents = torch.randn(2, 4, 2, 8, dtype=torch.float64)
    _err("agents of rank 4", agent_shape=None, agents=agents[0])
    _err("agents with q's dtype", agent_shape=None, agents=agents.float())
    _err(r"agents of shape \[B\|1, n, H=2, D=8\]", agent_shape=None, agents=torch.randn(2, 4, 3, 8, dtype=torch.float64))
    _err("agents of shape", agent_shape=None, agents=torch.randn(3, 4, 2, 8, dtype=torch.float64))
    bias = AgentBias(**random_bias_params(2, 4, (4, 4)))
    _err("2-D grid with an AgentBias", grid=(16,), agent_shape=(2,), bias=bias)
    _err("bias for 5 agents", agent_shape=None, agents=torch.randn(2, 5, 2, 8, dtype=torch.float64), bias=bias)
    # a bias with a prefix (cls) token on a grid without one (16 = 4 x 4 tokens: P = 0)
    q16, k16, v16 = _qkv(2, 16, 16, 2, 8)
    biased = AgentBias(**random_bias_params(2, 4, (4, 4), prefix=1))
    _err("bias with 0 prefix token", qkv=(q16, k16, v16), bias=biased)
    _err("AgentBias or a pair", bias=torch.zeros(3))


def test_backend_selection():
    q, k, v = _qkv(1, 16, 16, 1, 8)
    assert visattn.list_backends("agent")["agent"] == ["triton", "sdpa", "torch", "upstream"]
    with pytest.raises(ValueError, match="backend"):
        agent_attention(q, k, v, agent_shape=(2, 2), grid=(4, 4), backend="nope")
    with pytest.raises(NotImplementedError, match="float64"):  # the fused backend says why it cannot run
        agent_attention(q, k, v, agent_shape=(2, 2), grid=(4, 4), backend="triton")
    with pytest.raises(NotImplementedError, match="not implemented for agent"):
        agent_attention(q, k, v, agent_shape=(2, 2), grid=(4, 4), backend="natten")
    with visattn.use_backend("upstream"):
        a = agent_attention(q, k, v, agent_shape=(2, 2), grid=(4, 4))
    torch.testing.assert_close(a, agent_attention_ref(q, k, v, agent_shape=(2, 2), grid=(4, 4)))
