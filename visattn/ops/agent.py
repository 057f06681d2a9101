"""Agent attention: two small softmax attentions through a few agent tokens.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024,
https://arxiv.org/abs/2312.08874). With agents ``A`` (pooled from the queries' grid, or given):
``V_A = softmax(s1 A K^T + B1) V`` and ``O = softmax(s2 Q A^T + B2) V_A``; cost O(N n d).

Contents: the public op :func:`agent_attention`; :func:`agent_attention_ref`, the float64-capable
pure-PyTorch reference; :class:`AgentBias` (decomposed, cached biases; ``agent_bias.py``); and the
backends: ``"triton"`` (fused forward and backward kernels, ``kernels/agent.py`` via ``_agent_triton.py``;
default on CUDA when a gradient flows through a grid of at least 2048 query tokens, see
:func:`agent_attention`), ``"sdpa"`` (default on CUDA otherwise: two ``F.scaled_dot_product_attention``
calls with the cached biases broadcast over the batch), ``"torch"`` (the reference, default on CPU) and
``"upstream"`` (upstream's computation order: biases materialised and repeated over the batch every call,
explicit softmax; for benchmarks only, never picked by ``"auto"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _agent_triton, _dispatch
from ._checks import check_layout, check_qkv, describe_tensors
from ._types import Layout
from .agent_bias import AgentBias

__all__ = ["agent_attention", "agent_attention_ref", "AgentBias", "pool_agents"]

BiasLike = AgentBias | tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class _Problem:
    """Checked inputs, as ``[B, H, N, D]`` views, shared by every backend."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    agents: torch.Tensor | None  # [B|1, H, n, D] or None (pooled)
    agent_shape: tuple[int, ...] | None
    grid: tuple[int, ...] | None
    key_grid: tuple[int, ...] | None
    prefix: int
    bias: BiasLike
    mask: torch.Tensor | None  # bool [B, N_k], True = attend
    s1: float
    s2: float
    layout: Layout


def _grid_tuple(value, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"expected {name} to be a tuple of 1 to 3 positive ints, got {name}={value!r}") from None
    if not 1 <= len(out) <= 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in out):
        raise ValueError(f"expected {name} to be a tuple of 1 to 3 positive ints, got {name}={value!r}")
    return out


def _scales(scale, head_dim: int) -> tuple[float, float]:
    if scale is None:
        return head_dim**-0.5, head_dim**-0.5
    pair = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(pair) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < math.inf
                                 for s in pair):
        raise ValueError(f"expected scale to be a positive float or a pair (s1, s2) of them, got scale={scale!r}")
    return float(pair[0]), float(pair[1])


def _key_grid(grid: tuple[int, ...], grid_k_tokens: int, k_len: int) -> tuple[int, ...]:
    """The key grid: ``grid`` with its spatial axes divided by the one integer ``r`` that fits."""
    spatial = grid if len(grid) < 3 else grid[1:]
    for r in range(1, max(spatial) + 1):
        if any(s % r for s in spatial):
            continue
        red = tuple(s // r for s in spatial)
        if math.prod(red) * (math.prod(grid) // math.prod(spatial)) == grid_k_tokens:
            return red if len(grid) < 3 else (grid[0], *red)
    raise ValueError(
        f"expected k to hold the prefix tokens plus the query grid {grid} reduced by one integer factor r "
        f"on every spatial axis, got k.shape[token axis]={k_len}"
    )


def _prepare(q, k, v, agents, agent_shape, grid, bias, key_padding_mask, scale, layout) -> _Problem:
    layout = check_layout(layout)
    B, N, Nk, H, Hk, D = check_qkv(q, k, v, layout)
    if Hk != H:
        raise ValueError(f"expected q, k and v to have the same number of heads, got q heads={H}, k heads={Hk}")
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if (agents is None) == (agent_shape is None):
        raise ValueError(
            "expected exactly one of agents and agent_shape, got "
            f"agents={'None' if agents is None else tuple(agents.shape)}, agent_shape={agent_shape!r}"
        )
    if (agent_shape is not None or isinstance(bias, AgentBias)) and grid is None:
        raise ValueError(f"expected grid (the query token grid) with agent_shape or an AgentBias, got grid={grid!r}")
    g = kg = None
    P = 0
    if grid is not None:
        g = _grid_tuple(grid, "grid")
        if math.prod(g) > N:
            raise ValueError(f"expected prod(grid) <= the query tokens N={N}, got grid={g}")
        P = N - math.prod(g)
        if Nk - P < 1:
            raise ValueError(f"expected k to hold the {P} prefix token(s) and a key grid, got k tokens={Nk}")
        kg = _key_grid(g, Nk - P, Nk)
    shape = None
    if agent_shape is not None:
        shape = _grid_tuple(agent_shape, "agent_shape")
        if len(shape) != len(g):
            raise ValueError(f"expected agent_shape with as many axes as grid={g}, got agent_shape={shape}")
        if any(a > s for a, s in zip(shape, g)):
            raise ValueError(f"expected agent_shape no larger than grid={g} on every axis, got agent_shape={shape}")
        n = math.prod(shape)
    else:
        if not isinstance(agents, torch.Tensor) or agents.dim() != 4:
            raise ValueError(f"expected agents of rank 4 in layout {layout}, got agents={getattr(agents, 'shape', agents)}")
        if agents.dtype != q.dtype or agents.device != q.device:
            raise ValueError(f"expected agents with q's dtype {q.dtype} and device {q.device}, got "
                             f"agents.dtype={agents.dtype}, agents.device={agents.device}")
        agents = agents.transpose(1, 2) if layout == "BNHD" else agents
        if agents.shape[0] not in (1, B) or agents.shape[1] != H or agents.shape[3] != D:
            raise ValueError(f"expected agents of shape [B|1, n, H={H}, D={D}] (layout BNHD), got "
                             f"agents.shape={tuple(agents.transpose(1, 2).shape if layout == 'BNHD' else agents.shape)}")
        n = agents.shape[2]
    if isinstance(bias, AgentBias):
        if g is None or len(g) != 2:
            raise ValueError(f"expected a 2-D grid with an AgentBias (its terms are 2-D), got grid={g}")
        if bias.num_heads != H:
            raise ValueError(f"expected bias for {H} heads, got bias.num_heads={bias.num_heads}")
        if shape is None:
            s = math.isqrt(n)
            if n == bias.num_agents:
                shape = bias.agent_grid
            elif s * s == n:
                shape = (s, s)
            else:
                raise ValueError(f"expected bias for {n} agents (or a square agent count), got "
                                 f"bias.num_agents={bias.num_agents}")
            shape_for_bias = shape
            shape = None  # agents are given: agent_shape only shapes the bias
            bias = _BoundBias(bias, shape_for_bias)
        if bias_prefix(bias) not in (0, P):
            raise ValueError(f"expected bias with {P} prefix token(s), got bias.num_prefix_tokens={bias_prefix(bias)}")
    elif bias is not None:
        if not (isinstance(bias, (tuple, list)) and len(bias) == 2 and all(isinstance(t, torch.Tensor) for t in bias)):
            raise ValueError(f"expected bias to be an AgentBias or a pair (B1, B2) of tensors, got bias={type(bias).__name__}")
        b1, b2 = bias
        ok1 = b1.dim() in (3, 4) and _broadcasts(b1.shape[-3:], (H, n, Nk)) and (b1.dim() == 3 or b1.shape[0] in (1, B))
        ok2 = b2.dim() in (3, 4) and _broadcasts(b2.shape[-3:], (H, N, n)) and (b2.dim() == 3 or b2.shape[0] in (1, B))
        if not (ok1 and ok2):
            raise ValueError(f"expected bias (B1, B2) broadcastable to ([B, H, n, N_k], [B, H, N, n]) = "
                             f"([{B}, {H}, {n}, {Nk}], [{B}, {H}, {N}, {n}]), got bias shapes "
                             f"({tuple(b1.shape)}, {tuple(b2.shape)})")
        if b1.device != q.device or b2.device != q.device:
            raise ValueError(f"expected bias on q's device {q.device}, got {b1.device} and {b2.device}")
        bias = (b1, b2)
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (B, Nk) or m.device != q.device:
            raise ValueError(f"expected key_padding_mask a bool tensor [B, N_k] = [{B}, {Nk}] on {q.device}, got "
                             f"key_padding_mask={getattr(m, 'dtype', type(m).__name__)} "
                             f"{tuple(getattr(m, 'shape', ()))}")
    s1, s2 = _scales(scale, D)
    return _Problem(q, k, v, agents, shape, g, kg, P, bias, key_padding_mask, s1, s2, layout)


def _broadcasts(shape, target) -> bool:
    return all(s in (1, t) for s, t in zip(shape, target))


@dataclass
class _BoundBias:
    """An AgentBias bound to the agent grid of explicitly given agents."""

    bias: AgentBias
    agent_shape: tuple[int, int]


def bias_prefix(bias) -> int:
    b = bias.bias if isinstance(bias, _BoundBias) else bias
    return b.num_prefix_tokens


def pool_agents(q: torch.Tensor, grid: Sequence[int], agent_shape: Sequence[int], prefix: int = 0) -> torch.Tensor:
    """Agents pooled from the grid part of ``q [B, H, N, D]`` with torch's adaptive average pooling.

    Pooling is channel-wise, so it equals pooling the full-channel query map before the head split.
    Returns ``[B, H, n, D]`` with agents in row-major order over ``agent_shape``.
    """
    B, H, N, D = q.shape
    # pool the [B, N, H*D] token layout (a view for q sliced from a qkv projection), channels last
    x = q[:, :, prefix:].transpose(1, 2).reshape(B, *grid, H * D).movedim(-1, 1)
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(grid) - 1]
    a = pool(x, tuple(agent_shape))  # [B, H*D, *agent_shape]
    # contiguous: SDPA's fused kernels need a unit-stride head dim (the copy is only B*H*n*D)
    return a.reshape(B, H, D, -1).transpose(2, 3).contiguous()


def _agents(p: _Problem, q: torch.Tensor) -> torch.Tensor:
    if p.agents is not None:
        return p.agents.to(q.dtype)
    return pool_agents(q, p.grid, p.agent_shape, p.prefix)


def _materialize(p: _Problem, n: int, dtype, *, use_cache: bool = True):
    """(B1, B2) as tensors broadcastable to [B, H, n, N_k] and [B, H, N, n], or (None, None)."""
    if p.bias is None:
        return None, None
    if isinstance(p.bias, tuple):
        b1, b2 = p.bias
        return b1.to(dtype), b2.to(dtype)
    if isinstance(p.bias, _BoundBias):
        bias, shape = p.bias.bias, p.bias.agent_shape
    else:
        bias, shape = p.bias, p.agent_shape
    return bias.materialize(p.grid, p.key_grid, shape, dtype, num_prefix_tokens=p.prefix, use_cache=use_cache)


def _mask_fill(mask: torch.Tensor | None, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive key mask [B, 1, 1, N_k] and the per-row "any key valid" factor [B, 1, 1, 1].

    Rows whose keys are all masked get a zero fill (finite logits, no NaN) and are zeroed afterwards
    by the factor, all without a host sync.
    """
    if mask is None:
        return None, None
    anyv = mask.any(dim=-1)
    neg = torch.where(anyv[:, None], float("-inf"), 0.0)
    fill = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), neg.to(dtype))
    return fill[:, None, None, :], anyv[:, None, None, None]


def _add(x, y):
    return y if x is None else (x if y is None else x + y)


# ---------------------------------------------------------------------------------------------
# public op


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    agents: torch.Tensor | None = None,
    agent_shape: Sequence[int] | None = None,
    grid: Sequence[int] | int | None = None,
    bias: BiasLike = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | tuple[float, float] | None = None,
    layout: Layout = "BNHD",
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Agent attention ``softmax(s2 Q A^T + B2) softmax(s1 A K^T + B1) V`` (spec agent.md §2.3).

    Equivalent PyTorch: :func:`agent_attention_ref`.

    Args:
        q: ``[B, N, H, D]`` (``layout="BNHD"``) or ``[B, H, N, D]`` (``"BHND"``); ``N = P + prod(grid)``:
            ``P`` prefix tokens (e.g. a cls token) first, then the grid in row-major order.
        k, v: ``[B, N_k, H, D]`` in the same layout; ``N_k = P + prod(key grid)`` where the key grid is
            ``grid`` divided by one integer ``r`` on its spatial axes (PVT's spatial reduction).
        agents: explicit agents ``[B|1, n, H, D]`` (learned or merged tokens), or None.
        agent_shape: agent grid ``(h_a, w_a)`` (or 1-/3-D) pooled from the grid part of ``q`` with
            torch's adaptive-average-pooling bins; exactly one of ``agents``/``agent_shape``.
        grid: the query token grid ``(H, W)``, ``(N,)`` or ``(T, H, W)``; needed with ``agent_shape`` or
            an :class:`AgentBias`.
        bias: an :class:`AgentBias` (2-D grids; materialised for these grids and cached), or a pair
            ``(B1, B2)`` broadcastable to ``[B, H, n, N_k]`` and ``[B, H, N, n]``.
        key_padding_mask: bool ``[B, N_k]``, True for keys to attend; a row with no valid key gives
            zero agent features (so a zero output), never NaN.
        scale: ``s`` or ``(s1, s2)``; default ``D ** -0.5`` for both softmaxes.
        layout: ``"BNHD"`` (default) or ``"BHND"``; the output has q's layout, shape and dtype.
        dropout_p: attention dropout on both softmaxes (pass 0 in eval).
        backend: ``"auto"``, ``"sdpa"``, ``"triton"``, ``"torch"`` or ``"upstream"``. On CUDA ``"auto"``
            picks the fused ``"triton"`` kernels when a gradient flows and the queries hold at least
            2048 tokens (e.g. a 56x56 stage 1), where they train about twice as fast as two SDPA calls,
            and ``"sdpa"`` (two SDPA calls) otherwise, where it is faster (measurements beside
            ``_TRITON_AUTO_MIN_TOKENS``; ``benchmarks/results/agent_h100.md``). On CPU ``"auto"`` picks
            ``"torch"``.

    Raises:
        ValueError: inconsistent shapes, dtypes, devices or arguments (the message names them).
        NotImplementedError: the requested backend cannot run these inputs.
    """
    p = _prepare(q, k, v, agents, agent_shape, grid, bias, key_padding_mask, scale, layout)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected 0 <= dropout_p < 1, got dropout_p={dropout_p!r}")
    chosen = _dispatch.select("agent", backend, q.device, lambda: describe_tensors(q=q, k=k, v=v) + f"; grid={p.grid}",
                              p, float(dropout_p))
    out = chosen.fn(p, float(dropout_p))
    return out.transpose(1, 2) if p.layout == "BNHD" else out


# ---------------------------------------------------------------------------------------------
# reference


def agent_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    agents: torch.Tensor | None = None,
    agent_shape: Sequence[int] | None = None,
    grid: Sequence[int] | int | None = None,
    bias: BiasLike = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | tuple[float, float] | None = None,
    layout: Layout = "BNHD",
    dropout_p: float = 0.0,
    upcast: bool = True,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`agent_attention` (float64 when ``upcast``), chunked over queries.

    Materialised biases, explicit softmaxes; differentiable through autograd. Same arguments and
    errors as :func:`agent_attention`; returns q's layout and dtype.
    """
    p = _prepare(q, k, v, agents, agent_shape, grid, bias, key_padding_mask, scale, layout)
    out = _reference(p, dropout_p, upcast=upcast, chunk_rows=chunk_rows)
    return out.transpose(1, 2) if p.layout == "BNHD" else out


def _reference(p: _Problem, dropout_p: float, *, upcast: bool = True, chunk_rows: int = 4096) -> torch.Tensor:
    dt = torch.float64 if upcast else p.q.dtype
    q, k, v = p.q.to(dt), p.k.to(dt), p.v.to(dt)
    a = _agents(p, q)  # [B|1, H, n, D]
    b1, b2 = _materialize(p, a.shape[2], dt)
    fill, anyv = _mask_fill(p.mask, dt)
    z1 = _add(_add(torch.matmul(a, k.transpose(-1, -2)) * p.s1, b1), fill)
    p1 = torch.softmax(z1, dim=-1)
    if dropout_p:
        p1 = F.dropout(p1, dropout_p)
    va = torch.matmul(p1, v)  # [B, H, n, D]
    if anyv is not None:
        va = va * anyv
    outs = []
    N = q.shape[2]
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        z2 = torch.matmul(q[:, :, r0:r1], a.transpose(-1, -2)) * p.s2
        if b2 is not None:
            z2 = z2 + b2[..., r0:r1, :]
        p2 = torch.softmax(z2, dim=-1)
        if dropout_p:
            p2 = F.dropout(p2, dropout_p)
        outs.append(torch.matmul(p2, va))
    return torch.cat(outs, dim=2).to(p.q.dtype)


# ---------------------------------------------------------------------------------------------
# backends, in "auto" priority order


def _no_reasons(p: _Problem, dropout_p: float = 0.0) -> list[str]:
    return []


def _n_agents(p: _Problem) -> int:
    return p.agents.shape[2] if p.agents is not None else math.prod(p.agent_shape)


def _needs_grad(p: _Problem) -> bool:
    if not torch.is_grad_enabled():
        return False
    ts = [p.q, p.k, p.v, p.agents]
    if isinstance(p.bias, tuple):
        ts += list(p.bias)
    elif p.bias is not None:
        ts += (p.bias.bias if isinstance(p.bias, _BoundBias) else p.bias).tensors()
    return any(t is not None and t.requires_grad for t in ts)


def _triton_can_run(p: _Problem, dropout_p: float = 0.0) -> list[str]:
    return _agent_triton.triton_reasons(p.q, _n_agents(p), dropout_p, _needs_grad(p))


# "auto" takes the fused kernels only where they measured faster than two SDPA calls: training on a large
# token grid. H100, batch 128, bf16, AgentBias parameters, forward + backward ms, triton / sdpa: Agent-Swin
# stage 1 (56x56, 9 agents) 3.67 / 7.08, Agent-PVT stage 1 (56x56) 2.94 / 3.43; 28x28 and smaller 2.6-3.9 /
# 1.5-2.3; inference at every stage slower. Whole agent_swin_tiny training step: 60-66 ms against 68-73.
_TRITON_AUTO_MIN_TOKENS = 2048


def _triton_auto_reasons(p: _Problem, dropout_p: float = 0.0) -> list[str]:
    if not _needs_grad(p):
        return ["no gradient: two SDPA calls are faster for inference"]
    if p.q.shape[2] < _TRITON_AUTO_MIN_TOKENS:
        return [f"{p.q.shape[2]} query tokens < {_TRITON_AUTO_MIN_TOKENS}: two SDPA calls train faster"]
    return []


@_dispatch.register_backend("agent", "triton", can_run=_triton_can_run, auto_devices=("cuda",),
                            auto_if=_triton_auto_reasons,
                            doc="fused Triton forward + backward (auto: training on >= 2048 query tokens)")
def _run_triton(p: _Problem, dropout_p: float) -> torch.Tensor:
    a = _agents(p, p.q)
    b1, b2 = _materialize(p, a.shape[2], p.q.dtype)
    return _agent_triton.agent_attention_triton(p.q, p.k, p.v, a, b1, b2, p.mask, p.s1, p.s2)


@_dispatch.register_backend("agent", "sdpa", can_run=_no_reasons, auto_devices=("cuda",),
                            doc="two SDPA calls with cached biases broadcast over the batch (auto otherwise)")
def _run_sdpa(p: _Problem, dropout_p: float) -> torch.Tensor:
    q, k, v = p.q, p.k, p.v
    a = _agents(p, q)
    B = q.shape[0]
    if a.shape[0] != B:
        a = a.expand(B, -1, -1, -1)
    b1, b2 = _materialize(p, a.shape[2], q.dtype)
    fill, anyv = _mask_fill(p.mask, q.dtype)
    # masks stay unexpanded ([1, H, ...]): SDPA broadcasts them (stride 0) and pads only what it is given
    m1 = _add(None if b1 is None else (b1 if b1.dim() == 4 else b1[None]), fill)
    m2 = None if b2 is None else (b2 if b2.dim() == 4 else b2[None])
    va = F.scaled_dot_product_attention(a, k, v, attn_mask=m1, dropout_p=dropout_p, scale=p.s1)
    if anyv is not None:
        va = va * anyv.to(va.dtype)
    return F.scaled_dot_product_attention(q, a, va, attn_mask=m2, dropout_p=dropout_p, scale=p.s2)


@_dispatch.register_backend("agent", "torch", can_run=_no_reasons, auto_devices=("cpu",),
                            doc="pure-PyTorch reference (float64 logits)")
def _run_torch(p: _Problem, dropout_p: float) -> torch.Tensor:
    return _reference(p, dropout_p, upcast=True)


@_dispatch.register_backend("agent", "upstream", can_run=_no_reasons, auto=False,
                            doc="upstream's order: biases repeated over the batch, explicit softmax (benchmarks)")
def _run_upstream(p: _Problem, dropout_p: float) -> torch.Tensor:
    q, k, v = p.q, p.k, p.v
    B = q.shape[0]
    a = _agents(p, q)
    b1, b2 = _materialize(p, a.shape[2], torch.float32 if q.dtype != torch.float64 else q.dtype, use_cache=False)
    if b1 is not None:  # upstream materialises the biases densely for every batch element
        b1 = (b1 if b1.dim() == 4 else b1[None]).repeat(B // (b1.shape[0] if b1.dim() == 4 else 1), 1, 1, 1)
        b2 = (b2 if b2.dim() == 4 else b2[None]).repeat(B // (b2.shape[0] if b2.dim() == 4 else 1), 1, 1, 1)
    fill, anyv = _mask_fill(p.mask, torch.float32 if q.dtype != torch.float64 else q.dtype)
    attn = _add(_add((a * p.s1) @ k.transpose(-2, -1), b1), fill).softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    va = attn.to(v.dtype) @ v if not torch.is_autocast_enabled() else attn @ v
    if anyv is not None:
        va = va * anyv.to(va.dtype)
    attn2 = _add((q * p.s2) @ a.transpose(-2, -1), b2).softmax(dim=-1)
    if dropout_p:
        attn2 = F.dropout(attn2, dropout_p)
    out = attn2.to(va.dtype) @ va if not torch.is_autocast_enabled() else attn2 @ va
    return out.to(q.dtype)
