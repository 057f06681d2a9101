"""Block-sparse flash attention: the shared core that PSA and Rectified SpaAttn build on.

For batch ``b``, head ``h`` and query tile ``i`` (``block_q`` rows) the forward kernel walks the list
``kv_index[b, h, i, :kv_count[b, h, i]]`` of key blocks (``block_k`` keys each): it never scans all
blocks. The backward runs two kernels without atomics (deterministic): dK/dV per key tile walking the
transposed list (the query tiles that attend the block), and dQ per query tile walking the forward list.

Extensions (interface C; each a constexpr flag that is off by default, so the plain path compiles to
the same code): ``segments`` (:class:`Segments`: video tiles then text tiles, KV block ids mapped to
per-segment token ranges, padded text keys never attended) - ``level_ptr`` + :class:`Pyramid` (PSA:
entries grouped by pool factor 1/2/4/8; pooled entries run through ``_attend_pooled_level``: general
split/merge of ``block_k / m`` pooled keys into ``POOL_N``-lane execution tiles with a ``+ln c`` bias,
``c`` the true group count; a level of full blocks skips the counts) - ``causal`` (PSA's causal
variant) - ``rect_scale``/``rect_bias`` (Rectified's epilogue ``out = R * out + C`` per query tile) -
``tile_order`` (heavy tiles first).

Caution/limits: tested with Triton 3.6 (GPU) and 3.9 (interpreter on CPU). fp16, bf16 and fp32
(fp32 dots run in IEEE precision); head dims up to 256 (non-powers of two are padded with masked
lanes). ``block_q``/``block_k`` are powers of two >= 16. Kernel tiles divide the plan blocks: a
block of 128 keys may run as two 64-key tiles. Key offsets beyond ``seq_k`` (the partial last block,
or entries naming blocks out of range) are masked, so a bad plan cannot read out of bounds. The
extensions (segments, levels, causal, rect, tile order) were written and tested under the Triton 3.9
interpreter only; their GPU tests are ``tests/ops/test_pyramid_cuda.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (
    LOG2E,
    _bh_ids,
    _fwd_epilogue,
    _load_tile,
    _online_softmax_step,
    _tile_mask,
    cdiv,
    dot_precision,
    head_dim_pad,
)
from ._entries import _attend_level, _attend_pooled_level, _entry_range, _entry_start, _partial_levels


@triton.jit
def _attend_tile(q, k_base, v_base, start_n, key_end, stride_kn, stride_vn, m_i, l_i, acc, sm_scale_log2,
                 offs_n, offs_d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, TAIL_BRANCH: tl.constexpr):
    """Online-softmax update of one query tile with the ``BLOCK_N`` keys starting at ``start_n``;
    keys at or past ``key_end`` (the end of the entry's block) are masked."""
    keys = start_n + offs_n
    valid = keys < key_end
    kv_mask = _tile_mask(valid, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    k = _load_tile(k_base, start_n, stride_kn, offs_n, offs_d, kv_mask)
    v = _load_tile(v_base, start_n, stride_vn, offs_n, offs_d, kv_mask)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if TAIL_BRANCH:
        # only a tile reaching past key_end (partial blocks, invalid entries) pays for the mask;
        # full tiles run the plain FMA + exp2 of the online softmax
        if start_n + BLOCK_N > key_end:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet: no NaN
        p = tl.math.exp2(qk * sm_scale_log2 - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        # invalid keys get -inf through an additive bias
        qk = qk * sm_scale_log2 + tl.where(valid, 0.0, float("-inf"))[None, :]
        p, m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["seq_q", "seq_k", "max_kv", "video_start", "num_video", "text_start", "text_len",
                               "n_vq", "n_vk", "n_tk", "n_pool_blk"])
def _block_sparse_fwd_kernel(
    Q, K, V, O, LSE, KV_INDEX, KV_COUNT, TEXT_VALID, RECT_SCALE, RECT_BIAS, LEVEL_PTR, KP, VP, TILE_ORDER,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_ii, stride_ij,
    stride_cb, stride_ch, stride_ci,
    stride_rsb, stride_rsh, stride_rsi, stride_rbb, stride_rbh, stride_rbi,
    stride_lb, stride_lh, stride_li, stride_lj,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn,
    stride_tb, stride_th,
    seq_q, seq_k, n_heads, kv_group, max_kv, sm_scale_log2,
    video_start, num_video, text_start, text_len, n_vq, n_vk, n_tk, n_pool_blk,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,  # plan granularity: shapes the index arithmetic
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # kernel tile: divides BLOCK_Q / BLOCK_K
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TAIL_BRANCH: tl.constexpr, PREFETCH: tl.constexpr,
    SEGMENTS: tl.constexpr, RECT: tl.constexpr,  # features off by default: the plain path is unchanged
    LEVELS: tl.constexpr = False, POOL_N: tl.constexpr = 32, CAUSAL: tl.constexpr = False,
    ORDERED: tl.constexpr = False,
):
    SUBQ: tl.constexpr = BLOCK_Q // BLOCK_M
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, hk = _bh_ids(pid_bh, n_heads, kv_group)
    if ORDERED:
        # heavy tiles first within each head (TILE_ORDER[b, h, k] names the k-th heaviest tile); heads
        # stay the slow grid axis, so the programs in flight share one head's K/V in L2
        tile = tl.load(TILE_ORDER + b * stride_tb + h * stride_th + pid_m // SUBQ)
        pid_m = tile * SUBQ + pid_m % SUBQ
    else:
        tile = pid_m // SUBQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if SEGMENTS:
        # video query tiles first, then text tiles; each segment is cut into tiles from its start
        text_valid = tl.load(TEXT_VALID + b)
        is_text = tile >= n_vq
        seg_start = tl.where(is_text, text_start + (tile - n_vq) * BLOCK_Q, video_start + tile * BLOCK_Q)
        seg_end = tl.where(is_text, text_start + text_len, video_start + num_video)
        start_m = seg_start + (pid_m % SUBQ) * BLOCK_M
        row_ok = (start_m + offs_m) < seg_end
    else:
        text_valid = 0
        start_m = pid_m * BLOCK_M
        row_ok = (start_m + offs_m) < seq_q
    q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qn, offs_m, offs_d, q_mask)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_row = KV_INDEX + b * stride_ib + h * stride_ih + tile.to(tl.int64) * stride_ii
    if LEVELS:
        # entries [level_ptr[l], level_ptr[l+1]) use pool factor 2**l; clamped to a monotone [0, max_kv]
        lp_row = LEVEL_PTR + b * stride_lb + h * stride_lh + tile * stride_li
        e_lo = tl.minimum(tl.maximum(tl.load(lp_row), 0), max_kv)
        e_1 = tl.minimum(tl.maximum(tl.load(lp_row + stride_lj), e_lo), max_kv)
        e_2 = tl.minimum(tl.maximum(tl.load(lp_row + 2 * stride_lj), e_1), max_kv)
        e_3 = tl.minimum(tl.maximum(tl.load(lp_row + 3 * stride_lj), e_2), max_kv)
        e_4 = tl.minimum(tl.maximum(tl.load(lp_row + 4 * stride_lj), e_3), max_kv)
        if CAUSAL:
            partial = 15  # unused: the causal path computes every lane's count
        else:  # which levels hold a partial block (read here, where its latency overlaps the tile's Q load)
            partial = _partial_levels(idx_row, stride_ij, e_lo, e_1, e_2, e_3, e_4, seq_k, text_valid, video_start,
                                      num_video, text_start, n_vk, n_tk, BLOCK_K, 128, SEGMENTS)
        idx_row0 = idx_row
        idx_row = idx_row + e_lo * stride_ij
        count = e_1 - e_lo
    else:
        count = tl.load(KV_COUNT + b * stride_cb + h * stride_ch + tile * stride_ci)
        count = tl.minimum(tl.maximum(count, 0), max_kv)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # level-1 entries run as contiguous tiles unless a tile is wider than a block or causal masking is on
    CONTIG: tl.constexpr = (not LEVELS) or ((BLOCK_N <= BLOCK_K) and (not CAUSAL))
    if not CONTIG:
        count = 0
    SUB: tl.constexpr = BLOCK_K // BLOCK_N if BLOCK_N <= BLOCK_K else 1
    # one flat loop over (entry, sub-tile) keeps a single innermost loop for Triton's pipeliner
    total = count * SUB
    blk = tl.load(idx_row, mask=total > 0, other=0)
    for t in range(0, total):
        if PREFETCH:
            # the next entry's id is read one iteration ahead, so the K/V addresses of an iteration
            # depend on a loop-carried value rather than on a load in the same iteration
            cur = blk
            blk = tl.load(idx_row + ((t + 1) // SUB) * stride_ij, mask=t + 1 < total, other=0)
        else:
            cur = tl.load(idx_row + (t // SUB) * stride_ij)
        if SEGMENTS:
            blk_start, blk_end = _entry_range(cur, seq_k, text_valid, video_start, num_video, text_start,
                                              n_vk, n_tk, BLOCK_K, SEGMENTS)
            start_n = blk_start + (t % SUB) * BLOCK_N
        else:
            start_n = _entry_start(cur, seq_k, BLOCK_K) + (t % SUB) * BLOCK_N
            blk_end = seq_k
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, start_n, blk_end, stride_kn, stride_vn, m_i, l_i, acc,
                                     sm_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
                                     DOT_PRECISION, TAIL_BRANCH)

    if LEVELS:
        rows_q = start_m + offs_m
        e_prev = e_lo
        for lvl in tl.static_range(0, 4):
            e_next = e_1 if lvl == 0 else (e_2 if lvl == 1 else (e_3 if lvl == 2 else e_4))
            if lvl == 0:
                if not CONTIG:
                    m_i, l_i, acc = _attend_level(
                        q, k_base, v_base, stride_kn, stride_vn, idx_row0, stride_ij, e_prev, e_next - e_prev,
                        rows_q, m_i, l_i, acc, sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video,
                        text_start, n_vk, n_tk, 0, partial & 1, BLOCK_K, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
                        DOT_PRECISION, SEGMENTS, CAUSAL, PREFETCH)
            else:
                MF = 1 << lvl  # constexpr (lvl is); annotated constexprs cannot be rebound per iteration
                P = BLOCK_K // MF
                m_i, l_i, acc = _attend_pooled_level(
                    q, KP + b * stride_kpb + hk * stride_kph, VP + b * stride_vpb + hk * stride_vph,
                    stride_kpn, stride_vpn, idx_row0, stride_ij, e_prev, e_next - e_prev, rows_q, m_i, l_i, acc,
                    sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk,
                    n_pool_blk * (BLOCK_K - 2 * P), (partial >> lvl) & 1, BLOCK_K, MF, POOL_N, HEAD_DIM,
                    HEAD_DIM_PAD, DOT_PRECISION, SEGMENTS, CAUSAL, PREFETCH)
            e_prev = e_next

    out, lse = _fwd_epilogue(acc, m_i, l_i)
    if RECT:
        # Rectified SpaAttn epilogue: out = R * out + C, per query tile (fp32 before the cast)
        r = tl.load(RECT_SCALE + b * stride_rsb + h * stride_rsh + tile * stride_rsi)
        c = tl.load(RECT_BIAS + b * stride_rbb + h * stride_rbh + tile.to(tl.int64) * stride_rbi + offs_d,
                    mask=offs_d < HEAD_DIM, other=0.0)
        out = out * r + c[None, :]
    o_ptrs = O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_on
    tl.store(o_ptrs + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * seq_q + start_m + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit(do_not_specialize=["seq_q"])
def _block_sparse_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, LSE, LSE2,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    seq_q, n_heads,
    HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """delta = rowsum(O * dO) - dLSE, and the LSE in log2 units with empty rows mapped to +inf."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = _tile_mask(rows < seq_q, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    base = pid_bh.to(tl.int64) * seq_q
    if HAS_DLSE:
        delta -= tl.load(DLSE + base + rows, mask=rows < seq_q, other=0.0)
    tl.store(DELTA + base + rows, delta, mask=rows < seq_q)
    lse = tl.load(LSE + base + rows, mask=rows < seq_q, other=0.0)
    # an empty row has p = 0 everywhere: +inf makes exp2(s - lse) = 0 instead of NaN
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + base + rows, lse2, mask=rows < seq_q)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "max_q"])
def _block_sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, Q_INDEX, Q_COUNT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_ij, stride_ii,
    stride_cb, stride_ch, stride_cj,
    seq_q, seq_k, n_heads, kv_group, max_q, sm_scale, sm_scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key tile of query head h, over the query tiles that attend its block.

    The products are taken transposed (dK^T += Q^T dS, dV^T += dO^T P) so that K and V are only ever
    the B operand of a dot: they stay in shared memory instead of occupying registers for the whole
    loop (H100, Wan shape: backward 46.6 -> 43.9 ms dense; benchmarks/NOTES.md).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, hk = _bh_ids(pid_bh, n_heads, kv_group)
    start_n = pid_n * BLOCK_N
    kblk = start_n // BLOCK_K

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    key_ok = (start_n + offs_n) < seq_k
    kv_mask = _tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    row_n = start_n.to(tl.int64)
    k = _load_tile(K + b * stride_kb + hk * stride_kh, start_n, stride_kn, offs_n, offs_d, kv_mask)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, start_n, stride_vn, offs_n, offs_d, kv_mask)
    dkT = tl.zeros([HEAD_DIM_PAD, BLOCK_N], dtype=tl.float32)
    dvT = tl.zeros([HEAD_DIM_PAD, BLOCK_N], dtype=tl.float32)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * seq_q
    idx_row = Q_INDEX + b * stride_ib + h * stride_ih + kblk.to(tl.int64) * stride_ij
    count = tl.load(Q_COUNT + b * stride_cb + h * stride_ch + kblk * stride_cj)
    count = tl.minimum(tl.maximum(count, 0), max_q)
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    for t in range(0, count * SUB):
        qblk = tl.load(idx_row + (t // SUB) * stride_ii)
        start_m = qblk * BLOCK_Q + (t % SUB) * BLOCK_M
        rows = start_m + offs_m
        row_ok = rows < seq_q
        q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
        q = _load_tile(q_base, start_m, stride_qn, offs_m, offs_d, q_mask)
        do = _load_tile(do_base, start_m, stride_don, offs_m, offs_d, q_mask)
        # rows past seq_q read lse2 = +inf, so their probabilities are 0
        lse2 = tl.load(LSE2 + stat_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        # keys past seq_k are zero rows of k and v: their dk/dv rows are never stored
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * sm_scale_log2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dvT = tl.dot(tl.trans(do), p.to(do.dtype), dvT, input_precision=DOT_PRECISION)
        dkT = tl.dot(tl.trans(q), ds.to(q.dtype), dkT, input_precision=DOT_PRECISION)

    dk = tl.trans(dkT) * sm_scale
    dv = tl.trans(dvT)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + row_n * stride_dkn + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + row_n * stride_dvn + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "max_kv"])
def _block_sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, KV_INDEX, KV_COUNT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_ii, stride_ij,
    stride_cb, stride_ch, stride_ci,
    seq_q, seq_k, n_heads, kv_group, max_kv, sm_scale, sm_scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query tile over its listed key blocks (the forward's walk, recomputing P)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, hk = _bh_ids(pid_bh, n_heads, kv_group)
    start_m = pid_m * BLOCK_M
    tile = start_m // BLOCK_Q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = start_m + offs_m
    row_ok = rows < seq_q
    q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    row_m = start_m.to(tl.int64)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qn, offs_m, offs_d, q_mask)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, start_m, stride_don, offs_m, offs_d, q_mask)
    stat_base = pid_bh.to(tl.int64) * seq_q
    lse2 = tl.load(LSE2 + stat_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    idx_row = KV_INDEX + b * stride_ib + h * stride_ih + tile.to(tl.int64) * stride_ii
    count = tl.load(KV_COUNT + b * stride_cb + h * stride_ch + tile * stride_ci)
    count = tl.minimum(tl.maximum(count, 0), max_kv)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    # the block id is read in the iteration that uses it: reading it one iteration ahead, as the
    # forward does, made the backward 1.6x slower on an H100 (benchmarks/NOTES.md, v3)
    for t in range(0, count * SUB):
        cur = tl.load(idx_row + (t // SUB) * stride_ij)
        start_n = _entry_start(cur, seq_k, BLOCK_K) + (t % SUB) * BLOCK_N
        keys = start_n + offs_n
        kv_mask = _tile_mask(keys < seq_k, offs_d, HEAD_DIM, HEAD_DIM_PAD)
        k = _load_tile(k_base, start_n, stride_kn, offs_n, offs_d, kv_mask)
        v = _load_tile(v_base, start_n, stride_vn, offs_n, offs_d, kv_mask)
        # masked keys are zero rows of k: whatever their p, they add nothing to dq = ds @ k
        # both products are issued before the exponential (H100: 0.5-2 % faster than in between)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * sm_scale_log2 - lse2[:, None])
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + row_m * stride_dqn + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Host launchers. Tensors arrive as [B, N, H, D] *views* in either memory order: the kernels
# address them by (batch, head, token) strides, so no layout is copied. The last dim must be dense.


def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    # t is a [B, N, H, D] view: return (batch, head, token) strides
    return t.stride(0), t.stride(2), t.stride(1)


def _plan_strides(t: torch.Tensor) -> tuple[int, ...]:
    # broadcast axes of size 1 get stride 0, so a [1, 1, n, m] plan serves every (b, h)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim()))


class Segments(NamedTuple):
    """Video and text segments of a joint sequence, as the kernels read them.

    ``video_start``, ``num_video``, ``text_start``, ``text_len`` are python ints (shapes, not data);
    ``text_valid`` is an int32 device tensor ``[B]`` of valid text lengths (padding at the end of the
    text segment never attends) or None (all text valid).
    """

    video_start: int
    num_video: int
    text_start: int
    text_len: int
    text_valid: torch.Tensor | None = None

    @classmethod
    def from_layout(cls, seq_layout, batch: int, device) -> Segments:
        """From a :class:`visattn.ops.SequenceLayout` (``text_valid`` clamped on the device)."""
        return cls(seq_layout.video_start, seq_layout.num_video, seq_layout.text_start, seq_layout.text_len,
                   seq_layout.valid_text(batch, device))

    def num_q_tiles(self, block_q: int) -> int:
        return cdiv(self.num_video, block_q) + cdiv(self.text_len, block_q)

    def num_kv_blocks(self, block_k: int) -> int:
        return cdiv(self.num_video, block_k) + cdiv(self.text_len, block_k)

    def covers(self, seq_len: int) -> bool:
        """Whether the video and text segments tile ``[0, seq_len)`` (every row belongs to a tile)."""
        spans = sorted(s for s in ((self.video_start, self.num_video), (self.text_start, self.text_len)) if s[1])
        end = 0
        for start, length in spans:
            if start != end:
                return False
            end += length
        return end == seq_len


def segments_for(video_start: int, num_video: int, text_start: int, text_len: int,
                 text_valid: torch.Tensor | None = None) -> Segments | None:
    """The kernels' :class:`Segments` of a layout that covers the sequence, or None for video alone from token
    0 (no text): its blocks are cut as a plain sequence's, so the kernels run without the segment variant
    (Wan's self-attention; H100, PSA ``wan21_1p3b_topk``: ~1.94 -> 1.89 ms, the same outputs)."""
    if text_len == 0 and video_start == 0:
        return None
    return Segments(video_start, num_video, text_start, text_len, text_valid)


def _segment_args(segments: Segments | None, batch: int, block_q: int, block_k: int, device):
    """(TEXT_VALID tensor, the 7 scalar segment arguments, number of query tiles or None)."""
    if segments is None:
        return torch.zeros(1, dtype=torch.int32, device=device), (0, 0, 0, 0, 0, 0, 0), None
    vs, nv, ts, tlen, tv = segments
    if tv is None:
        tv = torch.full((batch,), tlen, dtype=torch.int32, device=device)
    tv = tv.to(device=device, dtype=torch.int32).clamp(0, tlen).contiguous()
    n_vq, n_tq = cdiv(nv, block_q), cdiv(tlen, block_q)
    return tv, (vs, nv, ts, tlen, n_vq, cdiv(nv, block_k), cdiv(tlen, block_k)), n_vq + n_tq


class Pyramid(NamedTuple):
    """PSA's pooled K/V levels, as ``kernels.pyramid.pyramid_pool`` writes them.

    ``k``/``v``: ``[B, L, H_kv, D]`` views holding, for pool factor m in (2, 4, 8), the group means of
    every KV block (``block_k // m`` rows per block, block ``j`` at rows ``off_m + j * block_k // m``
    with ``off_m = num_blocks * (block_k - 2 * block_k // m)``); ``num_blocks`` counts all KV blocks.
    """

    k: torch.Tensor
    v: torch.Tensor
    num_blocks: int


def block_sparse_fwd(q, k, v, kv_index, kv_count, block_q: int, block_k: int, scale: float, *,
                     segments: Segments | None = None, level_ptr: torch.Tensor | None = None,
                     pyramid: Pyramid | None = None, rect_scale: torch.Tensor | None = None,
                     rect_bias: torch.Tensor | None = None, causal: bool = False,
                     tile_order: torch.Tensor | None = None):
    """Forward launcher. q/k/v: [B, N, H, D] views; returns ``(out, lse)``, lse fp32 [B, H, N_q] (ln).

    Optional features (each off by default, each a constexpr flag, so the plain path is unchanged):

    - ``segments``: a :class:`Segments` of a joint self-attention sequence (``N_q == N_k``). Query
      tiles are the video tiles then the text tiles (``segments.num_q_tiles(block_q)`` rows of the
      plan); KV block ids ``< ceil(num_video / block_k)`` are video blocks, later ids text blocks.
      Rows of padded text queries produce finite output that callers ignore.
    - ``level_ptr`` int32 ``[B|1, H|1, n_q_tiles, 5]`` and ``pyramid`` (:class:`Pyramid`, from
      ``kernels.pyramid.pyramid_pool``; may be None when no entry uses a pooled level): PSA's
      per-entry pool factors; entries ``[level_ptr[l], level_ptr[l+1])`` of a row use factor
      ``2**l``; ``kv_count`` is ignored. ``causal`` (PSA's causal variant, needs ``level_ptr``): a
      group is visible to query position p iff its last real token is at or before p.
    - ``rect_scale`` fp32 ``[B|1, H|1, n_q_tiles]`` and ``rect_bias`` fp32 ``[B|1, H|1, n_q_tiles, D]``:
      Rectified's epilogue ``out_row = rect_scale * out_row + rect_bias`` (the LSE is the sparse one).
    - ``tile_order`` int32 ``[B|1, H|1, n_q_tiles]``: a permutation of the tiles of each row, heaviest
      first; each head's programs are scheduled in that order (load balance), head after head (L2 reuse).
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=dev, dtype=torch.float32)
    if segments is not None and not segments.covers(Nq):
        # rows outside the segments belong to no tile: start them from finite values
        out.zero_()
        lse.fill_(float("-inf"))
    dpad = head_dim_pad(D)
    levels = level_ptr is not None
    if levels:
        cfg = _configs.pyramid_fwd_config(dev, D, block_q, block_k, q.dtype, segments is not None)
    else:
        cfg = _configs.fwd_config(dev, D, block_q, block_k, q.dtype)
    text_valid, seg, n_tiles = _segment_args(segments, B, block_q, block_k, dev)
    rect = rect_scale is not None or rect_bias is not None
    if rect:
        rs = rect_scale if rect_scale is not None else torch.ones(1, 1, 1, device=dev)
        rb = rect_bias if rect_bias is not None else torch.zeros(1, 1, 1, D, device=dev)
        rs, rb = rs.float(), rb.float()
        if rb.stride(-1) != 1:
            rb = rb.contiguous()
    else:
        rs = rb = lse  # never read
    if levels:
        if level_ptr.dtype != torch.int32 or level_ptr.dim() != 4 or level_ptr.shape[-1] != 5:
            raise ValueError(f"expected level_ptr int32 [B, H, n_q_tiles, 5], got {level_ptr.dtype} "
                             f"{tuple(level_ptr.shape)}")
        if pyramid is None:  # only level 1 may be listed: the pooled buffers are never read
            pyramid = Pyramid(k, v, 0)
        kp, vp, n_pool = pyramid
    else:
        level_ptr, kp, vp, n_pool = kv_count[..., None], k, v, 0
    order = tile_order if tile_order is not None else kv_count
    ordered = tile_order is not None
    n_rows = n_tiles if n_tiles is not None else kv_index.shape[2]
    grid_m = cdiv(Nq, cfg.block_m) if n_tiles is None else n_tiles * (block_q // cfg.block_m)
    if ordered:
        grid_m = n_rows * (block_q // cfg.block_m)
    grid = (grid_m, B * H)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, kv_index, kv_count, text_valid, rs, rb, level_ptr, kp, vp, order,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(out),
        *_plan_strides(kv_index), *_plan_strides(kv_count),
        *(_plan_strides(rs) if rect else (0, 0, 0)), *(_plan_strides(rb)[:3] if rect else (0, 0, 0)),
        *_plan_strides(level_ptr), *_bhn_strides(kp), *_bhn_strides(vp), *_plan_strides(order)[:2],
        Nq, Nk, H, H // Hk, kv_index.shape[-1], scale * LOG2E, *seg, n_pool,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=dot_precision(q.dtype),
        TAIL_BRANCH=cfg.tail_branch, PREFETCH=cfg.prefetch, SEGMENTS=segments is not None, RECT=rect,
        LEVELS=levels, POOL_N=cfg.pool_n, CAUSAL=causal, ORDERED=ordered,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return out, lse


def block_sparse_bwd(do, q, k, v, out, lse, dlse, kv_index, kv_count, q_index, q_count,
                     block_q: int, block_k: int, scale: float):
    """Backward launcher: returns ``(dq, dk, dv)``; dk/dv have q's head count (the caller sums GQA groups).

    ``q_index``/``q_count`` is the transposed plan: for each key block, the query tiles attending it.
    ``dlse`` (or None) is the gradient flowing into the returned LSE.
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    dpad = head_dim_pad(D)
    dev = q.device
    delta = torch.empty((B, H, Nq), device=dev, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    pre_block = 64
    _block_sparse_bwd_preprocess_kernel[(cdiv(Nq, pre_block), B * H)](
        out, do, dlse if dlse is not None else delta, delta, lse, lse2,
        *_bhn_strides(out), *_bhn_strides(do), Nq, H,
        HAS_DLSE=dlse is not None, BLOCK=pre_block, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
    )
    dq = torch.empty_like(q)
    # GQA: one dk/dv slice per query head, reduced over the group by the caller
    dk = torch.empty_like(k) if Hk == H else k.new_empty((B, Nk, H, D))
    dv = torch.empty_like(v) if Hk == H else v.new_empty((B, Nk, H, D))
    prec = dot_precision(q.dtype)
    cfg = _configs.bwd_dkdv_config(dev, D, block_q, block_k, q.dtype)
    _block_sparse_bwd_dkdv_kernel[(cdiv(Nk, cfg.block_n), B * H)](
        q, k, v, do, lse2, delta, dk, dv, q_index, q_count,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do),
        *_bhn_strides(dk), *_bhn_strides(dv),
        *_plan_strides(q_index), *_plan_strides(q_count),
        Nq, Nk, H, H // Hk, q_index.shape[-1], scale, scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = _configs.bwd_dq_config(dev, D, block_q, block_k, q.dtype)
    _block_sparse_bwd_dq_kernel[(cdiv(Nq, cfg.block_m), B * H)](
        q, k, v, do, lse2, delta, dq, kv_index, kv_count,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do), *_bhn_strides(dq),
        *_plan_strides(kv_index), *_plan_strides(kv_count),
        Nq, Nk, H, H // Hk, kv_index.shape[-1], scale, scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, DOT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv
