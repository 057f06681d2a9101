"""The ``"triton"`` backend of agent attention: custom ops and autograd around ``kernels/agent.py``.

``visattn::agent_fwd`` / ``visattn::agent_bwd`` are ``torch.library`` custom ops (fake impls for
``torch.compile``) joined by ``register_autograd``. Their inputs are the agents ``a`` (pooled from ``q``
outside, so the pooling backward is torch's adaptive-average-pooling autograd) and the materialised
biases; the ops return gradients for q, k, v, the agents and both biases. A bias broadcast over the
batch (batch dim 1) gets a batch-summed gradient from the kernels; other broadcast axes are expanded
before the op, so autograd of ``expand`` sums them.
"""

from __future__ import annotations

import torch

from . import _dispatch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_AGENTS = 256


def triton_reasons(q: torch.Tensor, n_agents: int, dropout_p: float, needs_grad: bool) -> list[str]:
    """Why the fused kernels cannot run these inputs (empty if they can)."""
    reasons = _dispatch.triton_reasons(q.device)
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton's interpreter multiplies the raw bits of bfloat16 operands in tl.dot (Triton 3.9)
        reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly; "
                       "use float16/float32 on the CPU")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported "
                       "(the agent tiles stay resident)")
    if n_agents > MAX_AGENTS:
        reasons.append(f"{n_agents} agents > {MAX_AGENTS} is not supported "
                       "(all agents stay resident in a tile)")
    elif n_agents > 128 and q.shape[-1] > 64 and (needs_grad or q.dtype == torch.float32):
        # tiles of 256 agents x 128 channels need more than an H100's 227 KB of shared memory in the
        # backward (any dtype) and in the fp32 forward (sizes from compiling the kernels for sm_90)
        what = "a backward pass" if needs_grad else "float32"
        reasons.append(f"{n_agents} agents > 128 with head dim {q.shape[-1]} > 64 does not fit in "
                       f"shared memory with {what}; use backend='sdpa'")
    if dropout_p:
        reasons.append("attention dropout is not implemented in the fused kernels, "
                       f"got dropout_p={dropout_p}")
    return reasons


def _tokens_like(q: torch.Tensor) -> torch.Tensor:
    B, H, N, D = q.shape
    if q.stride(2) >= q.stride(1):
        return q.new_empty((B, N, H, D)).transpose(1, 2)
    return q.new_empty((B, H, N, D))


@torch.library.custom_op("visattn::agent_fwd", mutates_args=())
def _agent_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b1: torch.Tensor | None,
    b2: torch.Tensor | None, mask: torch.Tensor | None, s1: float, s2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.agent import agent_fwd

    return agent_fwd(q, k, v, a, b1, b2, mask, s1, s2)


@_agent_fwd_op.register_fake
def _(q, k, v, a, b1, b2, mask, s1, s2):
    B, H, N, D = q.shape
    n = a.shape[2]
    f32 = dict(dtype=torch.float32)
    return (_tokens_like(q), q.new_empty((B, H, n, D)), q.new_empty((B, H, n), **f32),
            q.new_empty((B, H, N), **f32))


@torch.library.custom_op("visattn::agent_bwd", mutates_args=())
def _agent_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
    b1: torch.Tensor | None, b2: torch.Tensor | None, mask: torch.Tensor | None, va: torch.Tensor,
    lse1: torch.Tensor, lse2: torch.Tensor, s1: float, s2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.agent import agent_bwd

    dq, dk, dv, da, db1, db2 = agent_bwd(do, q, k, v, a, b1, b2, mask, va, lse1, lse2, s1, s2)
    # no bias: distinct empty outputs (the outputs of a custom op may not alias each other)
    db1 = q.new_empty((0,)) if db1 is None else db1.to(b1.dtype)
    db2 = q.new_empty((0,)) if db2 is None else db2.to(b2.dtype)
    return dq, dk, dv, da.to(a.dtype), db1, db2


@_agent_bwd_op.register_fake
def _(do, q, k, v, a, b1, b2, mask, va, lse1, lse2, s1, s2):
    return (_tokens_like(q), _tokens_like(k), _tokens_like(v),
            torch.empty_like(a, memory_format=torch.contiguous_format),
            q.new_empty((0,)) if b1 is None else b1.new_empty(b1.shape),
            q.new_empty((0,)) if b2 is None else b2.new_empty(b2.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, a, b1, b2, mask, s1, s2 = inputs
    out, va, lse1, lse2 = output
    ctx.save_for_backward(q, k, v, a, b1, b2, mask, va, lse1, lse2)
    ctx.s1, ctx.s2 = s1, s2
    ctx.mark_non_differentiable(va, lse1, lse2)


def _backward(ctx, dout, *unused):
    q, k, v, a, b1, b2, mask, va, lse1, lse2 = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(q)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()  # the kernels need a dense head dim
    dq, dk, dv, da, db1, db2 = _agent_bwd_op(dout, q, k, v, a, b1, b2, mask, va, lse1, lse2, ctx.s1, ctx.s2)
    return (dq, dk, dv, da, None if b1 is None else db1, None if b2 is None else db2, None, None, None)


_agent_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def agent_attention_triton(q, k, v, a, b1, b2, mask, s1: float, s2: float) -> torch.Tensor:
    """Fused agent attention of ``[B, H, N, D]`` views (any token/head strides) with agents
    ``a [B|1, H, n, D]``, biases broadcastable to ``[B, H, n, N_k]`` / ``[B, H, N, n]`` (or None) and a
    bool key mask ``[B, N_k]`` (or None). Returns ``[B, H, N, D]`` in q's memory order."""
    B, H, N, _ = q.shape
    Nk, n = k.shape[2], a.shape[2]
    if b1 is not None:
        b1 = b1 if b1.dim() == 4 else b1[None]
        b1 = b1.expand(b1.shape[0], H, n, Nk)
    if b2 is not None:
        b2 = b2 if b2.dim() == 4 else b2[None]
        b2 = b2.expand(b2.shape[0], H, N, n)
    if mask is not None:
        mask = mask.contiguous()
    out, *_ = _agent_fwd_op(_dense(q), _dense(k), _dense(v), _dense(a), b1, b2, mask, float(s1), float(s2))
    return out
