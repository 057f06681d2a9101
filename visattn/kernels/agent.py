"""Agent attention: two small fused attentions through ``n`` agent tokens (spec agent.md §4).

Per batch element ``b`` and head ``h``, with agents ``A [n, D]`` (pooled or given), biases ``B1 [n, N_k]``
and ``B2 [N, n]`` (broadcast over the batch through a zero stride) and a key padding mask::

    pass 1:  V_A = softmax(s1 A K^T + B1 + mask) V        (n agents as queries over N_k keys)
    pass 2:  O   = softmax(s2 Q A^T + B2) V_A             (N queries over n agents as keys)

Forward: pass 1 is split over the keys (flash-decoding): ``_agent_fwd_pool_kernel`` programs own a
chunk of keys and all ``n`` agents (padded to ``BLOCK_A``, a power of two >= 16) and write partial
(max, sum, accumulator); ``_agent_fwd_merge_kernel`` merges the chunks into ``V_A`` and LSE1.
``_agent_fwd_kernel`` (pass 2) tiles the queries with every agent resident, so its softmax needs no
online rescaling, and writes ``O`` and LSE2. All logits and sums are fp32.

Backward (deterministic, no atomics): ``_agent_bwd_dq_kernel`` (pass 2) gives dQ, dV_A and dA (as
keys), and dB2; ``_agent_bwd_dkdv_kernel`` (pass 1) gives dK, dV, dA (as queries), and dB1. Both run
on a grid (chunk of token tiles, head, batch group): a program loops over its group's batches and,
for each, over its chunk's tiles, so dV_A / dA accumulate in registers over the chunk (one partial per
batch and chunk, summed on the host), and a bias broadcast over the batch gets its gradient summed
over the group in place (a region only that program touches; one partial per group, summed on the
host). ``_backward_split`` picks chunks and groups that fill the GPU with the fewest partials.
Softmax-gradient row terms: pass 2 holds every agent of a row, so ``rowsum(dO * O) = rowsum(P2 * dP2)``
is computed in place (``O`` is not read); pass 1's ``rowsum(dV_A * V_A)`` is a tiny host reduction.

Rows whose keys are all masked have LSE1 = -inf and give ``V_A = 0`` (so a zero output) and zero
gradients, never NaN. Tensors are addressed by (batch, head, token) strides with a dense head dim;
sequence lengths, batch size and agent count are runtime values (no recompilation per resolution).
Tested with Triton 3.6 (GPU) and 3.9 (interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (
    INTERPRET,
    LOG2E,
    _fwd_epilogue,
    _load_tile,
    _online_softmax_step,
    _tile_mask,
    cdiv,
    dot_precision,
    head_dim_pad,
    next_pow2,
    num_sms,
)
from ._launch import launch


@triton.jit
def _agent_rows(base, stride, offs_a, offs_d, mask):
    """The [BLOCK_A, HEAD_DIM_PAD] agent tile of a [n, D] slice with row stride ``stride``."""
    return tl.load(base + offs_a[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["seq_k", "n_agents", "tiles_per_chunk"])
def _agent_fwd_pool_kernel(
    A, K, V, B1, MASK, M_WS, L_WS, ACC_WS,
    stride_ab, stride_ah, stride_an,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_1b, stride_1h, stride_1a, stride_1k,
    stride_mb,
    seq_k, n_heads, n_agents, tiles_per_chunk, n_chunks, s1_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 1, one key chunk: partial (max, sum, P V) of all agents of (b, h) over the chunk's keys."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    a_ok = offs_a < n_agents
    a = _agent_rows(A + b * stride_ab + h * stride_ah, stride_an, offs_a, offs_d,
              _tile_mask(a_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD))
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    b1_base = B1 + b * stride_1b + h * stride_1h + offs_a[:, None].to(tl.int64) * stride_1a

    m_i = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, HEAD_DIM_PAD], dtype=tl.float32)
    start = pid_c * tiles_per_chunk * BLOCK_N
    for t in range(0, tiles_per_chunk):
        start_n = start + t * BLOCK_N
        keys = start_n + offs_n
        valid = keys < seq_k
        kv_mask = _tile_mask(valid, offs_d, HEAD_DIM, HEAD_DIM_PAD)
        k = _load_tile(k_base, start_n, stride_kn, offs_n, offs_d, kv_mask)
        v = _load_tile(v_base, start_n, stride_vn, offs_n, offs_d, kv_mask)
        s = tl.dot(a, tl.trans(k), input_precision=DOT_PRECISION) * s1_log2
        if HAS_BIAS:
            bias = tl.load(b1_base + keys[None, :] * stride_1k, mask=a_ok[:, None] & valid[None, :],
                           other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + keys, mask=valid, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)

    ws = pid_bh.to(tl.int64) * n_chunks + pid_c
    tl.store(M_WS + ws * BLOCK_A + offs_a, m_i)
    tl.store(L_WS + ws * BLOCK_A + offs_a, l_i)
    tl.store(ACC_WS + ws * (BLOCK_A * HEAD_DIM_PAD) + offs_a[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc)


@triton.jit(do_not_specialize=["n_agents", "n_chunks"])
def _agent_fwd_merge_kernel(
    M_WS, L_WS, ACC_WS, VA, LSE1,
    n_agents, n_chunks,
    BLOCK_A: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """Pass 1 merge: V_A [B, H, n, D] and LSE1 [B, H, n] (natural log, -inf for fully masked rows)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, HEAD_DIM_PAD], dtype=tl.float32)
    for c in range(0, n_chunks):
        ws = pid_bh * n_chunks + c
        m_c = tl.load(M_WS + ws * BLOCK_A + offs_a)
        l_c = tl.load(L_WS + ws * BLOCK_A + offs_a)
        acc_c = tl.load(ACC_WS + ws * (BLOCK_A * HEAD_DIM_PAD) + offs_a[:, None] * HEAD_DIM_PAD
                        + offs_d[None, :])
        m_new = tl.maximum(m, m_c)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - shift)
        beta = tl.math.exp2(m_c - shift)
        l_i = l_i * alpha + l_c * beta
        acc = acc * alpha[:, None] + acc_c * beta[:, None]
        m = m_new
    out, lse = _fwd_epilogue(acc, m, l_i)
    a_ok = offs_a < n_agents
    row = pid_bh * n_agents + offs_a
    tl.store(VA + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(VA.dtype.element_ty),
             mask=_tile_mask(a_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD))
    tl.store(LSE1 + row, lse, mask=a_ok)


@triton.jit(do_not_specialize=["seq_q", "n_agents"])
def _agent_fwd_kernel(
    Q, A, VA, B2, O, LSE2,
    stride_qb, stride_qh, stride_qn,
    stride_ab, stride_ah, stride_an,
    stride_2b, stride_2h, stride_2n, stride_2a,
    stride_ob, stride_oh, stride_on,
    seq_q, n_heads, n_agents, s2_log2,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2, one query tile: O = softmax(s2 Q A^T + B2) V_A with all agents resident; LSE2 (natural log)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = start_m + offs_m
    row_ok = rows < seq_q
    a_ok = offs_a < n_agents
    q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    a_mask = _tile_mask(a_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qn, offs_m, offs_d, q_mask)
    a = _agent_rows(A + b * stride_ab + h * stride_ah, stride_an, offs_a, offs_d, a_mask)
    va = _agent_rows(VA + pid_bh.to(tl.int64) * n_agents * HEAD_DIM, HEAD_DIM, offs_a, offs_d, a_mask)
    s = tl.dot(q, tl.trans(a), input_precision=DOT_PRECISION) * s2_log2
    if HAS_BIAS:
        ptr = (B2 + b * stride_2b + h * stride_2h + rows[:, None].to(tl.int64) * stride_2n
               + offs_a[None, :] * stride_2a)
        s += tl.load(ptr, mask=row_ok[:, None] & a_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
    s = tl.where(a_ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp2(s - m[:, None])
    l_i = tl.sum(p, 1)
    out = tl.dot(p.to(va.dtype), va, input_precision=DOT_PRECISION) / l_i[:, None]
    o_ptr = O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_on
    tl.store(o_ptr + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    lse = (m + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE2 + pid_bh.to(tl.int64) * seq_q + rows, lse, mask=row_ok)


@triton.jit
def _accumulate_bias_grad(ptr, mask, ds, i):
    """``*ptr += ds`` on a region only this program touches (``*ptr = ds`` for its first batch, ``i = 0``);
    the barrier makes the stores visible to every thread of the program before the next read."""
    prev = tl.load(ptr, mask=mask & (i > 0), other=0.0)
    tl.store(ptr, prev + ds, mask=mask)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["seq_q", "n_agents", "batch", "batch_per_group", "n_tiles", "tiles_per_chunk",
                               "n_chunks"])
def _agent_bwd_dq_kernel(
    Q, A, VA, B2, DO, LSE2, DQ, WS_DVA, WS_DA, DB2,
    stride_qb, stride_qh, stride_qn,
    stride_ab, stride_ah, stride_an,
    stride_2b, stride_2h, stride_2n, stride_2a,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    seq_q, n_heads, n_agents, batch, batch_per_group, n_tiles, tiles_per_chunk, n_chunks, s2, s2_log2,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2 backward of a chunk of query tiles of head h, for each batch of a group: dQ; dV_A and dA
    summed over the chunk (one partial per batch and chunk); dB2 summed over the group's batches."""
    pid_c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    a_ok = offs_a < n_agents
    a_mask = _tile_mask(a_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    t_lo = pid_c * tiles_per_chunk
    t_hi = tl.minimum(n_tiles, t_lo + tiles_per_chunk)
    b_lo = pid_g * batch_per_group
    b_hi = tl.minimum(batch, b_lo + batch_per_group)
    for i in range(0, b_hi - b_lo):
        b = b_lo.to(tl.int64) + i
        bh = b * n_heads + h
        a = _agent_rows(A + b * stride_ab + h * stride_ah, stride_an, offs_a, offs_d, a_mask)
        va = _agent_rows(VA + bh * n_agents * HEAD_DIM, HEAD_DIM, offs_a, offs_d, a_mask)
        dva = tl.zeros([BLOCK_A, HEAD_DIM_PAD], dtype=tl.float32)
        da = tl.zeros([BLOCK_A, HEAD_DIM_PAD], dtype=tl.float32)
        for t in range(t_lo, t_hi):
            start_m = t * BLOCK_M
            rows = start_m + offs_m
            row_ok = rows < seq_q
            q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
            ra_mask = row_ok[:, None] & a_ok[None, :]
            q = _load_tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qn, offs_m, offs_d, q_mask)
            do = _load_tile(DO + b * stride_dob + h * stride_doh, start_m, stride_don, offs_m, offs_d, q_mask)
            # rows past seq_q read LSE +inf: p = 0 there
            lse = tl.load(LSE2 + bh * seq_q + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            s = tl.dot(q, tl.trans(a), input_precision=DOT_PRECISION) * s2_log2
            if HAS_BIAS:
                ptr = (B2 + b * stride_2b + h * stride_2h + rows[:, None].to(tl.int64) * stride_2n
                       + offs_a[None, :] * stride_2a)
                s += tl.load(ptr, mask=ra_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.where(a_ok[None, :], s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(va), input_precision=DOT_PRECISION)
            delta = tl.sum(p * dp, 1)  # = rowsum(dO * O): every agent of the row is in this tile
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(a.dtype), a, input_precision=DOT_PRECISION) * s2
            dq_ptr = DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqn
            tl.store(dq_ptr + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=q_mask)
            dva = tl.dot(tl.trans(p.to(do.dtype)), do, dva, input_precision=DOT_PRECISION)
            da = tl.dot(tl.trans(ds.to(q.dtype)), q, da, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                db_row = (pid_g * n_heads + h) * seq_q + rows[:, None].to(tl.int64)
                db_ptr = DB2 + db_row * n_agents + offs_a[None, :]
                _accumulate_bias_grad(db_ptr, ra_mask, ds, i)
        ws = (bh * n_chunks + pid_c) * n_agents * HEAD_DIM + offs_a[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(WS_DVA + ws, dva, mask=a_mask)
        tl.store(WS_DA + ws, da * s2, mask=a_mask)


@triton.jit(do_not_specialize=["seq_k", "n_agents", "batch", "batch_per_group", "n_tiles", "tiles_per_chunk",
                               "n_chunks"])
def _agent_bwd_dkdv_kernel(
    A, K, V, B1, MASK, DVA, LSE1, DELTA1, DK, DV, WS_DA, DB1,
    stride_ab, stride_ah, stride_an,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_1b, stride_1h, stride_1a, stride_1k,
    stride_mb,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    seq_k, n_heads, n_agents, batch, batch_per_group, n_tiles, tiles_per_chunk, n_chunks, s1, s1_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 1 backward of a chunk of key tiles of head h, for each batch of a group: dK, dV; dA summed
    over the chunk (one partial per batch and chunk); dB1 summed over the group's batches.

    dV_A arrives in fp32 (summed over query chunks); its products run in fp32 (TF32 for 16-bit inputs),
    which keeps large loss-scaled gradients from overflowing fp16.
    """
    pid_c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    a_ok = offs_a < n_agents
    a_mask = _tile_mask(a_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    t_lo = pid_c * tiles_per_chunk
    t_hi = tl.minimum(n_tiles, t_lo + tiles_per_chunk)
    b_lo = pid_g * batch_per_group
    b_hi = tl.minimum(batch, b_lo + batch_per_group)
    for i in range(0, b_hi - b_lo):
        b = b_lo.to(tl.int64) + i
        bh = b * n_heads + h
        a = _agent_rows(A + b * stride_ab + h * stride_ah, stride_an, offs_a, offs_d, a_mask)
        dva = _agent_rows(DVA + bh * n_agents * HEAD_DIM, HEAD_DIM, offs_a, offs_d, a_mask)
        # LSE1 = -inf (every key masked) and padded agents: +inf, so p = 0
        lse = tl.load(LSE1 + bh * n_agents + offs_a, mask=a_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA1 + bh * n_agents + offs_a, mask=a_ok, other=0.0)
        da = tl.zeros([BLOCK_A, HEAD_DIM_PAD], dtype=tl.float32)
        for t in range(t_lo, t_hi):
            start_n = t * BLOCK_N
            keys = start_n + offs_n
            key_ok = keys < seq_k
            kv_mask = _tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
            ak_mask = a_ok[:, None] & key_ok[None, :]
            k = _load_tile(K + b * stride_kb + h * stride_kh, start_n, stride_kn, offs_n, offs_d, kv_mask)
            v = _load_tile(V + b * stride_vb + h * stride_vh, start_n, stride_vn, offs_n, offs_d, kv_mask)
            s = tl.dot(a, tl.trans(k), input_precision=DOT_PRECISION) * s1_log2
            if HAS_BIAS:
                ptr = (B1 + b * stride_1b + h * stride_1h + offs_a[:, None].to(tl.int64) * stride_1a
                       + keys[None, :] * stride_1k)
                s += tl.load(ptr, mask=ak_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            valid = key_ok
            if HAS_MASK:
                valid = valid & (tl.load(MASK + b * stride_mb + keys, mask=key_ok, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])  # [BLOCK_A, BLOCK_N]
            dv = tl.dot(tl.trans(p), dva, input_precision=DOT_PRECISION)
            dp = tl.dot(dva, tl.trans(v.to(tl.float32)), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(a.dtype)), a, input_precision=DOT_PRECISION) * s1
            da = tl.dot(ds.to(k.dtype), k, da, input_precision=DOT_PRECISION)
            dk_ptr = DK + b * stride_dkb + h * stride_dkh + start_n.to(tl.int64) * stride_dkn
            dv_ptr = DV + b * stride_dvb + h * stride_dvh + start_n.to(tl.int64) * stride_dvn
            tl.store(dk_ptr + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                     mask=kv_mask)
            tl.store(dv_ptr + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                     mask=kv_mask)
            if HAS_BIAS:
                db_row = (pid_g * n_heads + h) * n_agents + offs_a[:, None].to(tl.int64)
                db_ptr = DB1 + db_row * seq_k + keys[None, :]
                _accumulate_bias_grad(db_ptr, ak_mask, ds, i)
        ws = (bh * n_chunks + pid_c) * n_agents * HEAD_DIM + offs_a[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(WS_DA + ws, da * s1, mask=a_mask)


# ---------------------------------------------------------------------------------------------
# Host launchers. q/k/v/agents arrive as [B, H, N, D] *views* (any token/head strides, dense head
# dim); biases as 4-D views [Bb, H, n, N_k] / [Bb, H, N, n] with Bb in {1, B} (stride 0 where
# broadcast); the mask as bool [B, N_k]. Launchers allocate outputs and return them; no autograd.


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs per launch that fill the GPU (4 per SM); under the interpreter a small number, so that
    tiny test shapes still split pass 1 over key chunks and run both batch-group paths of the backward."""
    if INTERPRET or device.type != "cuda":
        return 6
    return 4 * num_sms(device)


def _bhn(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, H, N, D] view; a batch of one broadcasts (stride 0)."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _bias_strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    if t is None:
        return 0, 0, 0, 0
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2), t.stride(3)


def tokens_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, H, N, D] tensor in q's memory order ([B, N, H, D] memory when q's tokens are outer)."""
    B, H, N, D = q.shape
    dtype = dtype or q.dtype
    if q.stride(2) >= q.stride(1):  # tokens outer: a [B, N, H, D] buffer, so BNHD callers get it for free
        return q.new_empty((B, N, H, D), dtype=dtype).transpose(1, 2)
    return q.new_empty((B, H, N, D), dtype=dtype)


def _backward_split(batch: int, heads: int, tiles: int, ws_elems: int, db_elems: int | None,
                    device: torch.device) -> tuple[int, int, int, int]:
    return _split(batch, heads, tiles, ws_elems, db_elems, _target_programs(device))


@functools.cache
def _split(batch: int, heads: int, tiles: int, ws_elems: int, db_elems: int | None,
           target: int) -> tuple[int, int, int, int]:
    """(chunks, tiles per chunk, groups, batches per group) of a backward grid (chunks, heads, groups).

    Each program writes one partial agent gradient (``ws_elems``) per batch and chunk, and, for a bias
    broadcast over the batch (``db_elems`` per group; None otherwise), one bias-gradient partial per
    group. Among the splits that give enough programs to fill the GPU, the one writing the fewest
    partial elements wins.
    """
    target = min(target, batch * heads * tiles)
    best = None
    chunks = 0
    for c in range(1, tiles + 1):
        per_chunk = cdiv(tiles, c)
        if cdiv(tiles, per_chunk) == chunks:
            continue
        chunks = cdiv(tiles, per_chunk)
        groups = batch if db_elems is None else min(batch, cdiv(target, chunks * heads))
        per_group = cdiv(batch, groups)
        groups = cdiv(batch, per_group)
        if chunks * heads * groups < target and chunks < tiles and groups == batch:
            continue  # too few programs and more chunks would add some
        cost = batch * chunks * ws_elems + (0 if db_elems is None else groups * db_elems)
        if best is None or cost < best[0]:
            best = (cost, chunks, per_chunk, groups, per_group)
        if db_elems is None:
            break  # no bias partials: the fewest chunks that fill the GPU
    return best[1:]


def agent_fwd(q, k, v, a, b1, b2, mask, s1: float, s2: float):
    """Forward. Returns ``(out [B, H, N, D] in q's memory order, va [B, H, n, D], lse1 [B, H, n], lse2
    [B, H, N])``; LSEs fp32, natural log (LSE1 = -inf on rows with every key masked)."""
    B, H, N, D = q.shape
    Nk, n = k.shape[2], a.shape[2]
    dev = q.device
    dpad, apad = head_dim_pad(D), max(16, next_pow2(n))
    prec = dot_precision(q.dtype)
    m_arg = mask.view(torch.uint8) if mask is not None else q
    # pass 1: enough key chunks to fill the GPU, each a run of whole tiles
    cfg = _configs.agent_config(dev, "pool", dpad, apad, q.dtype)
    tiles = cdiv(Nk, cfg.block_n)
    chunks = max(1, min(tiles, cdiv(_target_programs(dev), B * H)))
    per = cdiv(tiles, chunks)
    chunks = cdiv(tiles, per)
    m_ws = torch.empty((B * H, chunks, apad), device=dev, dtype=torch.float32)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty((B * H, chunks, apad, dpad), device=dev, dtype=torch.float32)
    launch(
        _agent_fwd_pool_kernel, (chunks, B * H),
        (a, k, v, b1 if b1 is not None else q, m_arg, m_ws, l_ws, acc_ws),
        (*_bhn(a), *_bhn(k), *_bhn(v), *_bias_strides(b1), mask.stride(0) if mask is not None else 0,
         Nk, H, n, per, chunks),
        (float(s1) * LOG2E,),
        HAS_BIAS=b1 is not None, HAS_MASK=mask is not None, BLOCK_A=apad, BLOCK_N=cfg.block_n,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    va = q.new_empty((B, H, n, D))
    lse1 = torch.empty((B, H, n), device=dev, dtype=torch.float32)
    launch(_agent_fwd_merge_kernel, (B * H,), (m_ws, l_ws, acc_ws, va, lse1), (n, chunks), BLOCK_A=apad,
           HEAD_DIM=D, HEAD_DIM_PAD=dpad, num_warps=4)
    # pass 2
    cfg = _configs.agent_config(dev, "fwd", dpad, apad, q.dtype)
    out = tokens_like(q)
    lse2 = torch.empty((B, H, N), device=dev, dtype=torch.float32)
    launch(
        _agent_fwd_kernel, (cdiv(N, cfg.block_m), B * H), (q, a, va, b2 if b2 is not None else q, out, lse2),
        (*_bhn(q), *_bhn(a), *_bias_strides(b2), *_bhn(out), N, H, n),
        (float(s2) * LOG2E,),
        HAS_BIAS=b2 is not None, BLOCK_M=cfg.block_m, BLOCK_A=apad, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
        DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, va, lse1, lse2


def agent_bwd(do, q, k, v, a, b1, b2, mask, va, lse1, lse2, s1: float, s2: float):
    """Backward. Returns ``(dq, dk, dv, da, db1, db2)``: dq/dk/dv in the inputs' dtypes and memory
    order, ``da`` fp32 with a's batch size, ``db1``/``db2`` fp32 with the biases' batch size (None
    without bias)."""
    B, H, N, D = q.shape
    Nk, n = k.shape[2], a.shape[2]
    dev = q.device
    dpad, apad = head_dim_pad(D), max(16, next_pow2(n))
    prec = dot_precision(q.dtype)
    f32 = dict(device=dev, dtype=torch.float32)

    # pass 2: dQ, dV_A, dA (as keys of pass 2), dB2
    cfg = _configs.agent_config(dev, "bwd_dq", dpad, apad, q.dtype)
    tiles = cdiv(N, cfg.block_m)
    bcast2 = b2 is not None and b2.shape[0] == 1
    chunks, per_chunk, groups, per = _backward_split(B, H, tiles, 2 * n * D, N * n if bcast2 else None, dev)
    dq = tokens_like(q)
    ws_dva = torch.empty((B, H, chunks, n, D), **f32)
    ws_da = torch.empty((B, H, chunks, n, D), **f32)
    db2 = torch.empty((groups, H, N, n), **f32) if b2 is not None else None
    launch(
        _agent_bwd_dq_kernel, (chunks, H, groups),
        (q, a, va, b2 if b2 is not None else q, do, lse2, dq, ws_dva, ws_da, db2 if db2 is not None else q),
        (*_bhn(q), *_bhn(a), *_bias_strides(b2), *_bhn(do), *_bhn(dq),
         N, H, n, B, per, tiles, per_chunk, chunks),
        (float(s2), float(s2) * LOG2E),
        HAS_BIAS=b2 is not None, BLOCK_M=cfg.block_m, BLOCK_A=apad,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dva = ws_dva.sum(2)  # [B, H, n, D] fp32
    delta1 = (dva * va.float()).sum(-1)  # rowsum(dV_A * V_A) of pass 1's softmax gradient
    da = ws_da.sum(2)

    # pass 1: dK, dV, dA (as queries of pass 1), dB1
    cfg = _configs.agent_config(dev, "bwd_dkdv", dpad, apad, q.dtype)
    tiles = cdiv(Nk, cfg.block_n)
    bcast1 = b1 is not None and b1.shape[0] == 1
    chunks, per_chunk, groups, per = _backward_split(B, H, tiles, n * D, n * Nk if bcast1 else None, dev)
    dk, dv = tokens_like(k), tokens_like(v)
    ws_da1 = torch.empty((B, H, chunks, n, D), **f32)
    db1 = torch.empty((groups, H, n, Nk), **f32) if b1 is not None else None
    launch(
        _agent_bwd_dkdv_kernel, (chunks, H, groups),
        (a, k, v, b1 if b1 is not None else q, mask.view(torch.uint8) if mask is not None else q,
         dva, lse1, delta1, dk, dv, ws_da1, db1 if db1 is not None else q),
        (*_bhn(a), *_bhn(k), *_bhn(v), *_bias_strides(b1), mask.stride(0) if mask is not None else 0,
         *_bhn(dk), *_bhn(dv), Nk, H, n, B, per, tiles, per_chunk, chunks),
        (float(s1), float(s1) * LOG2E),
        HAS_BIAS=b1 is not None, HAS_MASK=mask is not None, BLOCK_N=cfg.block_n,
        BLOCK_A=apad, HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    da = da + ws_da1.sum(2)
    if a.shape[0] == 1 and B != 1:
        da = da.sum(0, keepdim=True)
    if db1 is not None and b1.shape[0] == 1:
        db1 = db1.sum(0, keepdim=True)
    if db2 is not None and b2.shape[0] == 1:
        db2 = db2.sum(0, keepdim=True)
    return dq, dk, dv, da, db1, db2
