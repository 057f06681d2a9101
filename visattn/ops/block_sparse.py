"""Block-sparse attention: the op over the shared core that PSA and Rectified SpaAttn extend.

Each query tile attends the key blocks its :class:`BlockSparsePlan` lists, with one softmax over all
of them (FlashAttention-2 arithmetic, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", https://arxiv.org/abs/2307.08691, applied to per-tile block lists).

Contents: the public op :func:`block_sparse_attention`; the ``torch.library`` custom ops
``visattn::block_sparse_fwd`` / ``visattn::block_sparse_bwd`` (fake impls and autograd, so
``torch.compile(fullgraph=True)`` works); :func:`block_sparse_attention_ref`, the single pure-PyTorch
reference; and the backend registrations (``"triton"``, ``"torch"``, ``"flex"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch
from ._flex import flex_attention_lse
from ._checks import check_layout, check_qkv, check_scale, describe_tensors
from ._types import Layout
from .block_sparse_plan import BlockSparsePlan, _cdiv, transpose_lists

__all__ = ["block_sparse_attention", "block_sparse_attention_ref", "BlockSparsePlan"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    *,
    scale: float | None = None,
    layout: Layout = "BNHD",
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query tile over the key blocks its plan lists.

    Equivalent PyTorch: softmax over the keys of the listed blocks of ``scale * q @ k^T``, times
    ``v``; see :func:`block_sparse_attention_ref`. Rows whose list is empty give zeros (LSE -inf).

    Args:
        q: ``[B, N_q, H, D]`` (``layout="BNHD"``, diffusers' dispatcher order) or ``[B, H, N_q, D]``
            (``"BHND"``); fp16, bf16, fp32 (fp64 on the ``"torch"`` backend).
        k: ``[B, N_k, H_kv, D]`` in the same layout; ``H`` must be a multiple of ``H_kv`` (GQA/MQA).
        v: like ``k``.
        plan: a :class:`BlockSparsePlan` with ``ceil(N_q / block_q)`` query tiles, broadcast over
            batch and heads where its axes 0/1 have size 1.
        scale: softmax scale, ``D ** -0.5`` by default.
        layout: ``"BNHD"`` (default) or ``"BHND"``; the output has the same layout.
        return_lse: also return the log-sum-exp (natural log, ``[B, H, N_q]``, fp32; fp64 for fp64
            input on the ``"torch"`` backend), differentiable.
        backend: ``"auto"`` (default, or the one set by ``visattn.use_backend``), ``"triton"``,
            ``"torch"`` or ``"flex"`` (FlexAttention with a cached ``BlockMask``, for comparison).

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: bad shapes, dtypes, devices, layout or a plan that does not fit q.
        NotImplementedError: the requested backend cannot run these inputs (with its reasons).
    """
    layout = check_layout(layout)
    B, Nq, Nk, H, Hk, D = check_qkv(q, k, v, layout)
    if not isinstance(plan, BlockSparsePlan):
        raise ValueError(f"expected plan to be a visattn.ops.BlockSparsePlan, got plan={type(plan).__name__}")
    plan.check_against(B, H, Nq)
    if plan.device != q.device:
        raise ValueError(f"expected the plan on q's device {q.device}, got plan.device={plan.device}")
    scale = check_scale(scale, D)
    chosen = _dispatch.select(
        "block_sparse", backend, q.device,
        lambda: describe_tensors(q=q, k=k, v=v) + f"; plan={plan!r}; layout={layout}",
        q, k, v, plan,
    )
    out, lse = chosen.fn(q, k, v, plan, scale, layout)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# reference


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    *,
    scale: float | None = None,
    layout: Layout = "BNHD",
    return_lse: bool = False,
    upcast: bool = True,
    chunk_rows: int = 1024,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference: a dense masked softmax, chunked over query tiles.

    Builds each chunk's token mask from the plan and computes the softmax in float64 when
    ``upcast`` (else in the input dtype). Differentiable through autograd. Memory is
    ``O(chunk_rows * N_k)`` per (batch, head).

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` with lse ``[B, H, N_q]`` (natural log,
        -inf for rows that attend nothing) in float32 (float64 for float64 input).
    """
    layout = check_layout(layout)
    B, Nq, Nk, H, Hk, D = check_qkv(q, k, v, layout)
    scale = check_scale(scale, D)
    if layout == "BNHD":  # to [B, H, N, D] views
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dtype = torch.float64 if upcast else q.dtype
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    if Hk != H:
        kc, vc = kc.repeat_interleave(H // Hk, dim=1), vc.repeat_interleave(H // Hk, dim=1)
    nk = _cdiv(Nk, plan.block_k)
    block_mask = plan.to_mask(nk).expand(B, H, -1, -1)  # [B, H, nq, nk]
    tiles_per_chunk = max(1, chunk_rows // plan.block_q)
    outs, lses = [], []
    for t0 in range(0, plan.num_q_tiles, tiles_per_chunk):
        t1 = min(t0 + tiles_per_chunk, plan.num_q_tiles)
        r0, r1 = t0 * plan.block_q, min(t1 * plan.block_q, Nq)
        mask = block_mask[:, :, t0:t1].repeat_interleave(plan.block_q, dim=2)[:, :, : r1 - r0]
        mask = mask.repeat_interleave(plan.block_k, dim=3)[..., :Nk]  # [B, H, rows, Nk]
        s = torch.matmul(qc[:, :, r0:r1], kc.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: no NaN
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        nonzero = denom > 0
        p = e / torch.where(nonzero, denom, torch.ones_like(denom))
        outs.append(torch.matmul(p, vc))
        lse = torch.where(nonzero, torch.log(torch.where(nonzero, denom, torch.ones_like(denom))) + m,
                          torch.full_like(m, float("-inf")))
        lses.append(lse.squeeze(-1))
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    lse = lse if lse.dtype == torch.float64 and q.dtype == torch.float64 else lse.float()
    if layout == "BNHD":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# custom ops (the Triton path): q/k/v arrive as [B, N, H, D] views in either memory order


@torch.library.custom_op("visattn::block_sparse_fwd", mutates_args=())
def _block_sparse_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, kv_count: torch.Tensor,
    block_q: int, block_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.block_sparse import block_sparse_fwd

    return block_sparse_fwd(q, k, v, kv_index, kv_count, block_q, block_k, scale)


@_block_sparse_fwd_op.register_fake
def _(q, k, v, kv_index, kv_count, block_q, block_k, scale):
    B, Nq, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("visattn::block_sparse_bwd", mutates_args=())
def _block_sparse_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dlse: torch.Tensor | None, kv_index: torch.Tensor, kv_count: torch.Tensor,
    q_index: torch.Tensor, q_count: torch.Tensor, block_q: int, block_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.block_sparse import block_sparse_bwd

    dq, dk, dv = block_sparse_bwd(do, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count,
                                  block_q, block_k, scale)
    if dk.shape[2] != k.shape[2]:  # GQA: sum the per-query-head slices of each group
        B, Nk, Hk, D = k.shape
        dk = dk.view(B, Nk, Hk, -1, D).sum(3).to(k.dtype)
        dv = dv.view(B, Nk, Hk, -1, D).sum(3).to(v.dtype)
    return dq, dk, dv


@_block_sparse_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count, block_q, block_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, kv_count, block_q, block_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_index, kv_count)
    ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_index, kv_count = ctx.saved_tensors
    q_index, q_count = transpose_lists(kv_index, kv_count, _cdiv(k.shape[1], ctx.block_k))
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()  # the kernels need a dense head dim
    if dlse is not None:
        dlse = dlse.contiguous()  # e.g. lse.sum() hands back a stride-0 expanded gradient
    dq, dk, dv = _block_sparse_bwd_op(dout, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count,
                                      ctx.block_q, ctx.block_k, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_block_sparse_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _as_bnhd(t: torch.Tensor, layout: str) -> torch.Tensor:
    t = t.transpose(1, 2) if layout == "BHND" else t
    # the kernels address tokens and heads by stride but need a dense head dim
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# backends, in "auto" priority order


def _triton_can_run(q, k, v, plan) -> list[str]:
    reasons = _dispatch.triton_reasons(q.device)
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton's interpreter multiplies the raw bits of bfloat16 operands in tl.dot (seen with
        # Triton 3.9): refuse rather than return wrong numbers
        reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly; use float16/float32 on the CPU")
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_TRITON_MAX_HEAD_DIM} is not supported")
    return reasons


@_dispatch.register_backend("block_sparse", "triton", can_run=_triton_can_run, doc="fused Triton fwd + bwd")
def _run_triton(q, k, v, plan, scale, layout):
    out, lse = _block_sparse_fwd_op(_as_bnhd(q, layout), _as_bnhd(k, layout), _as_bnhd(v, layout),
                                    plan.kv_index, plan.kv_count, plan.block_q, plan.block_k, scale)
    return (out.transpose(1, 2) if layout == "BHND" else out), lse


@_dispatch.register_backend("block_sparse", "torch", can_run=lambda *a: [], auto_devices=("cpu",),
                            doc="pure-PyTorch reference")
def _run_torch(q, k, v, plan, scale, layout):
    return block_sparse_attention_ref(q, k, v, plan, scale=scale, layout=layout, return_lse=True, upcast=False)


def _flex_can_run(q, k, v, plan) -> list[str]:
    reasons = _dispatch.flex_reasons()
    if q.dtype == torch.float64 and q.device.type == "cuda":
        reasons.append("FlexAttention's CUDA kernels do not support float64")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("FlexAttention has no backward on the CPU")
    return reasons


def flex_block_mask(plan: BlockSparsePlan, batch: int, heads: int, seq_q: int, seq_k: int):
    """A FlexAttention ``BlockMask`` of ``plan`` (cached on the plan).

    Listed blocks are marked full, so the compiled kernel skips ``mask_mod`` on them; the
    ``mask_mod`` (a lookup in the block mask) serves Flex's eager path, which ignores block sparsity.
    """
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex", batch, heads, seq_q, seq_k, plan.kv_index._version, plan.kv_count._version)
    hit = plan._cache.get("flex")
    if hit is not None and hit[0] == key:
        return hit[1]
    nk = _cdiv(seq_k, plan.block_k)
    mask = plan.to_mask(nk)
    dense = BlockSparsePlan.from_mask(mask, plan.block_q, plan.block_k)  # max_kv == nk, as flex needs
    zeros = torch.zeros_like(dense.kv_count)
    lookup = mask.expand(batch, heads, -1, -1)
    bq, bk = plan.block_q, plan.block_k

    def mask_mod(b, h, q_idx, kv_idx):
        return lookup[b, h, q_idx // bq, kv_idx // bk]

    bm = BlockMask.from_kv_blocks(
        zeros, dense.kv_index, dense.kv_count, dense.kv_index,
        BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(seq_q, seq_k),
    )
    plan._cache["flex"] = (key, bm)
    return bm


@_dispatch.register_backend("block_sparse", "flex", can_run=_flex_can_run, auto=False,
                            doc="FlexAttention with a cached BlockMask (comparison)")
def _run_flex(q, k, v, plan, scale, layout):
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bm = flex_block_mask(plan, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = flex_attention_lse(q, k, v, bm, scale)
    return (out.transpose(1, 2) if layout == "BNHD" else out), lse


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout = "BNHD") -> torch.Tensor:
    """Dense ``F.scaled_dot_product_attention`` in visattn's layouts (benchmarks' baseline)."""
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2) if layout == "BNHD" else out
