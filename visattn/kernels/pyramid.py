"""PSA-specific Triton kernels: pyramid pooling, pooled-level backward, importance estimation.

"PSA: Pyramid Sparse Attention" (Li et al., https://arxiv.org/abs/2512.04025). The attention itself
runs on the shared core ``kernels/block_sparse.py`` (``level_ptr`` + :class:`Pyramid`); this file
holds what only PSA needs:

- ``pyramid_pool``: one pass over K and V writing the mean-pooled levels (factors 2, 4, 8) of every
  KV block, with true group counts for partial blocks (fp32 sums, stored in the input dtype);
- ``pyramid_bwd``: dQ (the forward's multi-level walk), dK/dV per (KV block, level) over the query
  tiles of the transposed plan (no atomics), and the scatter of pooled gradients to tokens;
- ``sampled_scores``: the sampled max-attention estimator (one GEMM pass; per-program scratch slots
  of block maxima, reread while still in L2).

Caution/limits: tested under the Triton 3.9 interpreter, compiled for sm_90 on the CPU
(``tests/ops/test_pyramid_compile.py``) and on an H100 with Triton 3.6 (``tests/ops/test_pyramid_cuda.py``). fp16,
bf16, fp32; head dims up to 256; ``block_k`` a power of two >= 16 (32, 64, 128 in the op). No GQA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import _load_tile, _tile_mask, head_dim_pad
from ._entries import _entry_range, _gathered_logits, _level_lanes
from .block_sparse import Pyramid, Segments, _bhn_strides, _segment_args

POOL_FACTORS = (2, 4, 8)


@triton.jit
def _pool_level(base, stride_n, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K: tl.constexpr,
                MF: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Group means of one block at pool factor ``MF``, ``CHUNK`` tokens at a time, each chunk read as
    ``[CHUNK / MF, MF, D]`` (the group axis in the load's own layout): a plain reduction, no reshape."""
    P: tl.constexpr = BLOCK_K // MF
    G: tl.constexpr = CHUNK // MF
    g = tl.arange(0, G)
    d3 = offs_d[None, None, :]
    for c in tl.static_range(BLOCK_K // CHUNK):
        tok = start + c * CHUNK + g[:, None] * MF + tl.arange(0, MF)[None, :]  # [G, MF]
        ok = tok < end
        x = tl.load(base + tok.to(tl.int64)[:, :, None] * stride_n + d3, mask=ok[:, :, None] & (d3 < HEAD_DIM),
                    other=0.0).to(tl.float32)
        cnt = tl.sum(ok.to(tl.int32), axis=1)
        mean = tl.sum(x, axis=1) / tl.maximum(cnt, 1).to(tl.float32)[:, None]
        rows = (n_blk * (BLOCK_K - 2 * P) + j * P + c * G + g).to(tl.int64)
        tl.store(out_base + rows[:, None] * stride_on + offs_d[None, :], mean.to(out_base.dtype.element_ty),
                 mask=offs_d[None, :] < HEAD_DIM)


@triton.jit(do_not_specialize=["seq_k", "n_blk", "video_start", "num_video", "text_start", "n_vk", "n_tk"])
def _pyramid_pool_kernel(
    K, V, KP, VP, TEXT_VALID,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn,
    seq_k, n_heads, n_blk, video_start, num_video, text_start, n_vk, n_tk,
    BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SEGMENTS: tl.constexpr,
    DO2: tl.constexpr, DO4: tl.constexpr, DO8: tl.constexpr,
):
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    text_valid = tl.load(TEXT_VALID + b) if SEGMENTS else 0
    start, end = _entry_range(j, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, BLOCK_K, SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    CHUNK: tl.constexpr = 32 if BLOCK_K > 32 else BLOCK_K
    for which in tl.static_range(2):
        if which == 0:
            base = K + b * stride_kb + h * stride_kh
            stride_n = stride_kn
            out_base = KP + b * stride_kpb + h * stride_kph
            stride_on = stride_kpn
        else:
            base = V + b * stride_vb + h * stride_vh
            stride_n = stride_vn
            out_base = VP + b * stride_vpb + h * stride_vph
            stride_on = stride_vpn
        if DO2:
            _pool_level(base, stride_n, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 2, HEAD_DIM,
                        HEAD_DIM_PAD, CHUNK)
        if DO4:
            _pool_level(base, stride_n, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 4, HEAD_DIM,
                        HEAD_DIM_PAD, CHUNK)
        if DO8:
            _pool_level(base, stride_n, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 8, HEAD_DIM,
                        HEAD_DIM_PAD, CHUNK)


def num_kv_blocks(seq_k: int, block_k: int, segments: Segments | None) -> int:
    return triton.cdiv(seq_k, block_k) if segments is None else segments.num_kv_blocks(block_k)


def pyramid_pool(k: torch.Tensor, v: torch.Tensor, block_k: int, *, segments: Segments | None = None,
                 factors: tuple[int, ...] = POOL_FACTORS) -> Pyramid:
    """Mean-pooled levels of K and V (``[B, N, H_kv, D]`` views) for the pool ``factors`` listed.

    Groups of ``m`` consecutive tokens never straddle blocks; a partial group averages its real
    tokens only (text blocks: the first ``text_valid`` tokens). Levels not listed are left
    uninitialised (the plan must not use them).
    """
    B, Nk, Hk, D = k.shape
    n_blk = num_kv_blocks(Nk, block_k, segments)
    rows = n_blk * (block_k - block_k // 8)  # levels 2, 4, 8 back to back
    # [B, H, L, D] storage (each head's rows contiguous), handed out as a [B, L, H, D] view
    kp = k.new_empty((B, Hk, rows, D)).transpose(1, 2)
    vp = v.new_empty((B, Hk, rows, D)).transpose(1, 2)
    text_valid, seg, _ = _segment_args(segments, B, 16, block_k, k.device)
    vs, nv, ts, _, _, n_vk, n_tk = seg
    _pyramid_pool_kernel[(n_blk, B * Hk)](
        k, v, kp, vp, text_valid, *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(kp), *_bhn_strides(vp),
        Nk, Hk, n_blk, vs, nv, ts, n_vk, n_tk,
        BLOCK_K=block_k, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), SEGMENTS=segments is not None,
        DO2=2 in factors, DO4=4 in factors, DO8=8 in factors, num_warps=4,
    )
    return Pyramid(kp, vp, n_blk)


# ---------------------------------------------------------------------------------------------
# backward: dQ over the forward's multi-level walk; dK/dV per (KV block, level); scatter to tokens


@triton.jit
def _q_tile_rows(tile, sub, seq_q, video_start, num_video, text_start, text_len, n_vq, BLOCK_Q: tl.constexpr,
                 BLOCK_M: tl.constexpr, SEGMENTS: tl.constexpr):
    """(first row, end of valid rows) of sub-tile ``sub`` of query tile ``tile`` (the forward's mapping)."""
    if SEGMENTS:
        is_text = tile >= n_vq
        seg_start = tl.where(is_text, text_start + (tile - n_vq) * BLOCK_Q, video_start + tile * BLOCK_Q)
        seg_end = tl.where(is_text, text_start + text_len, video_start + num_video)
    else:
        seg_start = tile * BLOCK_Q
        seg_end = seq_q
    return seg_start + sub * BLOCK_M, seg_end


@triton.jit(do_not_specialize=["seq_q", "seq_k", "max_kv", "video_start", "num_video", "text_start", "text_len",
                               "n_vq", "n_vk", "n_tk", "n_pool_blk"])
def _pyramid_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, KV_INDEX, LEVEL_PTR, KP, VP, TEXT_VALID,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_ii, stride_ij, stride_lb, stride_lh, stride_li, stride_lj,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn,
    seq_q, seq_k, n_heads, max_kv, sm_scale, sm_scale_log2,
    video_start, num_video, text_start, text_len, n_vq, n_vk, n_tk, n_pool_blk,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, TN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SEGMENTS: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    SUBQ: tl.constexpr = BLOCK_Q // BLOCK_M
    tile = pid_m // SUBQ
    start_m, row_end = _q_tile_rows(tile, pid_m % SUBQ, seq_q, video_start, num_video, text_start, text_len, n_vq,
                                    BLOCK_Q, BLOCK_M, SEGMENTS)
    text_valid = tl.load(TEXT_VALID + b) if SEGMENTS else 0
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows_q = start_m + offs_m
    row_ok = rows_q < row_end
    q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, start_m, stride_qn, offs_m, offs_d, q_mask)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, start_m, stride_don, offs_m, offs_d, q_mask)
    stat = pid_bh.to(tl.int64) * seq_q
    lse2 = tl.load(LSE2 + stat + rows_q, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat + rows_q, mask=row_ok, other=0.0)
    idx_row = KV_INDEX + b * stride_ib + h * stride_ih + tile.to(tl.int64) * stride_ii
    lp_row = LEVEL_PTR + b * stride_lb + h * stride_lh + tile * stride_li
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    offs_p = tl.arange(0, TN)
    e_prev = tl.minimum(tl.maximum(tl.load(lp_row), 0), max_kv)
    for lvl in tl.static_range(0, 4):
        MF = 1 << lvl  # constexpr (lvl is); annotated constexprs cannot be rebound per iteration
        P = BLOCK_K // MF
        e_next = tl.minimum(tl.maximum(tl.load(lp_row + (lvl + 1) * stride_lj), e_prev), max_kv)
        n_ent = e_next - e_prev
        if lvl == 0:
            k_base = K + b * stride_kb + h * stride_kh
            v_base = V + b * stride_vb + h * stride_vh
            skn = stride_kn
            svn = stride_vn
        else:
            k_base = KP + b * stride_kpb + h * stride_kph
            v_base = VP + b * stride_vpb + h * stride_vph
            skn = stride_kpn
            svn = stride_vpn
        for t in range(0, (n_ent * P + TN - 1) // TN):
            rows, cnt, last = _level_lanes(idx_row, stride_ij, e_prev, n_ent, t, offs_p, seq_k, text_valid,
                                           video_start, num_video, text_start, n_vk, n_tk,
                                           n_pool_blk * (BLOCK_K - 2 * P), BLOCK_K, MF, TN, SEGMENTS)
            k, v, qk = _gathered_logits(q, k_base, v_base, skn, svn, rows, cnt, last, rows_q, sm_scale_log2, offs_d,
                                        HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, CAUSAL)
            p = tl.math.exp2(qk - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        e_prev = e_next
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqn + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "max_q", "video_start", "num_video", "text_start", "text_len",
                               "n_vq", "n_vk", "n_tk", "n_pool_blk"])
def _pyramid_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, Q_INDEX, Q_COUNT, TEXT_VALID,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_il, stride_ij, stride_ii, stride_cb, stride_ch, stride_cl, stride_cj,
    seq_q, seq_k, n_heads, max_q, sm_scale, sm_scale_log2,
    video_start, num_video, text_start, text_len, n_vq, n_vk, n_tk, n_pool_blk,
    LVL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, TNB: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SEGMENTS: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Gradients of the ``TNB`` pooled keys (factor ``2**LVL``) of one KV block over the query tiles
    that attend it at that level; K/V are the token tensors (``LVL == 0``) or the pooled buffers."""
    MF: tl.constexpr = 1 << LVL
    P: tl.constexpr = BLOCK_K // MF
    SUBK: tl.constexpr = (P + TNB - 1) // TNB
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    j = pid // SUBK
    g = (pid % SUBK) * TNB + tl.arange(0, TNB)
    text_valid = tl.load(TEXT_VALID + b) if SEGMENTS else 0
    start, end = _entry_range(j, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, BLOCK_K, SEGMENTS)
    tok0 = start + g * MF
    cnt = tl.where(g < P, tl.minimum(tl.maximum(end - tok0, 0), MF), 0)
    ok = cnt > 0
    last = tok0 + cnt - 1
    if LVL == 0:
        rows = tok0.to(tl.int64)
    else:
        rows = (n_pool_blk * (BLOCK_K - 2 * P) + j * P + g).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kv_mask = _tile_mask(ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    bias = tl.where(ok, tl.math.log2(tl.maximum(cnt, 1).to(tl.float32)), float("-inf"))
    dk = tl.zeros([TNB, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([TNB, HEAD_DIM_PAD], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat = pid_bh.to(tl.int64) * seq_q
    idx_row = Q_INDEX + b * stride_ib + h * stride_ih + LVL * stride_il + j.to(tl.int64) * stride_ij
    count = tl.load(Q_COUNT + b * stride_cb + h * stride_ch + LVL * stride_cl + j * stride_cj)
    count = tl.minimum(tl.maximum(count, 0), max_q)
    SUBQ: tl.constexpr = BLOCK_Q // BLOCK_M
    for t in range(0, count * SUBQ):
        tile = tl.load(idx_row + (t // SUBQ) * stride_ii)
        start_m, row_end = _q_tile_rows(tile, t % SUBQ, seq_q, video_start, num_video, text_start, text_len, n_vq,
                                        BLOCK_Q, BLOCK_M, SEGMENTS)
        rows_q = start_m + offs_m
        row_ok = rows_q < row_end
        q_mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
        q = _load_tile(q_base, start_m, stride_qn, offs_m, offs_d, q_mask)
        do = _load_tile(do_base, start_m, stride_don, offs_m, offs_d, q_mask)
        lse2 = tl.load(LSE2 + stat + rows_q, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat + rows_q, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * sm_scale_log2 + bias[:, None]
        if CAUSAL:
            qkT = tl.where(last[:, None] <= rows_q[None, :], qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows[:, None] * stride_dkn + offs_d[None, :], dk, mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows[:, None] * stride_dvn + offs_d[None, :], dv, mask=kv_mask)


def _token_groups(N: int, block_k: int, m: int, segments: Segments | None, batch: int, device):
    """Per token: (row of its group in the level-m pooled buffer [N], 1 / group count [B, N] or 0)."""
    t = torch.arange(N, device=device)
    if segments is None:
        blk, off = t // block_k, t % block_k
        n_blk = triton.cdiv(N, block_k)
        blen = (N - blk * block_k).clamp(max=block_k).expand(batch, N)
    else:
        vs, nv, ts, tlen, tv = segments
        tv = torch.full((batch,), tlen, device=device) if tv is None else tv.to(device).long().clamp(0, tlen)
        n_vk = triton.cdiv(nv, block_k)
        is_v = (t >= vs) & (t < vs + nv)
        rel = torch.where(is_v, t - vs, t - ts)
        blk = torch.where(is_v, rel // block_k, n_vk + rel // block_k)
        off = rel % block_k
        seg_end = torch.where(is_v[None], torch.full((batch, 1), vs + nv, device=device), ts + tv[:, None])
        start = torch.where(is_v, vs, ts) + (rel // block_k) * block_k
        blen = (seg_end - start[None]).clamp(0, block_k)
        n_blk = segments.num_kv_blocks(block_k)
    P = block_k // m
    grp = off // m
    cnt = (blen - grp * m).clamp(0, m)
    inv = torch.where((off[None] < blen) & (cnt > 0), 1.0 / cnt.clamp(min=1), 0.0)
    row = (n_blk * (block_k - 2 * P) + blk * P + grp) if m > 1 else t
    return row, inv


def pyramid_bwd(do, q, k, v, out, lse, dlse, kv_index, level_ptr, q_index, q_count, block_q: int, block_k: int,
                scale: float, *, segments: Segments | None = None, causal: bool = False, pyramid: Pyramid | None = None):
    """Backward of the PSA forward: ``(dq, dk, dv)``. ``q_index``/``q_count`` are the transposed plan per
    level (``PyramidPlan.transpose``): int32 ``[B|1, H|1, 4, n_kv_blocks, n_q_tiles]``, ``[.., 4, n_kv_blocks]``."""
    from . import _configs
    from ._common import LOG2E, dot_precision
    from .block_sparse import _block_sparse_bwd_preprocess_kernel, _plan_strides

    B, N, H, D = q.shape
    dev = q.device
    dpad = head_dim_pad(D)
    prec = dot_precision(q.dtype)
    delta = torch.empty((B, H, N), device=dev, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    _block_sparse_bwd_preprocess_kernel[(triton.cdiv(N, 64), B * H)](
        out, do, dlse if dlse is not None else delta, delta, lse, lse2, *_bhn_strides(out), *_bhn_strides(do), N, H,
        HAS_DLSE=dlse is not None, BLOCK=64, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
    )
    if pyramid is None:
        pyramid = pyramid_pool(k, v, block_k, segments=segments)
    kp, vp, n_blk = pyramid
    text_valid, seg, n_tiles = _segment_args(segments, B, block_q, block_k, dev)
    vs, nv, ts, tlen, n_vq, n_vk, n_tk = seg
    n_tiles = n_tiles if n_tiles is not None else triton.cdiv(N, block_q)
    cfg = _configs.pyramid_bwd_config(dev, D, block_q, block_k, q.dtype)
    dq = torch.empty_like(q)
    if segments is not None:
        dq.zero_()
    _pyramid_bwd_dq_kernel[(n_tiles * (block_q // cfg.block_m), B * H)](
        q, k, v, do, lse2, delta, dq, kv_index, level_ptr, kp, vp, text_valid,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do), *_bhn_strides(dq),
        *_plan_strides(kv_index), *_plan_strides(level_ptr), *_bhn_strides(kp), *_bhn_strides(vp),
        N, N, H, kv_index.shape[-1], scale, scale * LOG2E, vs, nv, ts, tlen, n_vq, n_vk, n_tk, n_blk,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=cfg.block_m, TN=cfg.pool_n, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
        DOT_PRECISION=prec, SEGMENTS=segments is not None, CAUSAL=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # fp32 gradient buffers: tokens (level 1) and pooled rows (levels 2, 4, 8), [B, H, rows, D] storage
    dk32 = torch.zeros((B, H, N, D), device=dev, dtype=torch.float32).transpose(1, 2)
    dv32 = torch.zeros_like(dk32)
    dkp = torch.zeros((B, H, kp.shape[1], D), device=dev, dtype=torch.float32).transpose(1, 2)
    dvp = torch.zeros_like(dkp)
    for lvl in range(4):
        P = block_k >> lvl
        tnb = max(16, min(cfg.block_n, P))
        src_k, src_v, dst_k, dst_v = (k, v, dk32, dv32) if lvl == 0 else (kp, vp, dkp, dvp)
        _pyramid_bwd_dkdv_kernel[(n_blk * triton.cdiv(P, tnb), B * H)](
            q, src_k, src_v, do, lse2, delta, dst_k, dst_v, q_index, q_count, text_valid,
            *_bhn_strides(q), *_bhn_strides(src_k), *_bhn_strides(src_v), *_bhn_strides(do),
            *_bhn_strides(dst_k), *_bhn_strides(dst_v), *_plan_strides(q_index), *_plan_strides(q_count),
            N, N, H, q_index.shape[-1], scale, scale * LOG2E, vs, nv, ts, tlen, n_vq, n_vk, n_tk, n_blk,
            LVL=lvl, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=cfg.block_m, TNB=tnb, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
            DOT_PRECISION=prec, SEGMENTS=segments is not None, CAUSAL=causal,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # scatter: every real token of group g gets dK^m_g / c_g (likewise V)
    dkp_h, dvp_h = dkp.transpose(1, 2), dvp.transpose(1, 2)  # [B, H, L, D]
    dk_h, dv_h = dk32.transpose(1, 2), dv32.transpose(1, 2)
    for m in POOL_FACTORS:
        row, inv = _token_groups(N, block_k, m, segments, B, dev)
        w = inv[:, None, :, None]
        dk_h = dk_h + dkp_h[:, :, row] * w
        dv_h = dv_h + dvp_h[:, :, row] * w
    # in k's / v's own memory format, as the custom op's fake (torch.empty_like) promises torch.compile
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dk.copy_(dk_h.transpose(1, 2))
    dv.copy_(dv_h.transpose(1, 2))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# sampled max-attention estimator (spec §2.4): two passes over the sampled keys, no scratch


@triton.jit
def _sampled_chunk(q, ks_base, stride_ksn, c, offs_t, offs_d, n_keys, qpos, KPOS, CAUSAL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """log2-domain logits (unscaled) of the sampled rows against sampled keys ``[c*KC, (c+1)*KC)``."""
    KC: tl.constexpr = offs_t.shape[0]
    t = c * KC + offs_t
    ok = t < n_keys
    k = tl.load(ks_base + t.to(tl.int64)[:, None] * stride_ksn + offs_d[None, :],
                mask=_tile_mask(ok, offs_d, HEAD_DIM, HEAD_DIM_PAD), other=0.0)
    lg = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    valid = ok[None, :]
    if CAUSAL:
        kpos = tl.load(KPOS + t, mask=ok, other=0)
        valid = valid & (kpos[None, :] <= qpos[:, None])
    return lg, valid


@triton.jit(do_not_specialize=["n_vq", "n_vk", "n_items"])
def _sampled_scores_kernel(
    QS, KS, QPOS, KPOS, S, W,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_sb, stride_sh, stride_si,
    n_heads, sm_scale_log2, n_vq, n_vk, n_items,
    QB: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, KC: tl.constexpr, JC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTMAX: tl.constexpr, MEAN: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Persistent: each program takes work items ``(QB query blocks, b, h)`` in turn and owns one scratch
    slot ``W[pid]`` of ``[QB * SQ rows, n_vk]`` fp32. One GEMM pass writes every row's per-block max logit
    there while it tracks the row max (and softmax denominator); a second, GEMM-free pass reads the slot
    back (still in L2) and reduces ``exp(m_rJ - M_r)`` over each query block's rows."""
    pid = tl.program_id(0)
    ROWS: tl.constexpr = QB * SQ
    BPC: tl.constexpr = KC // SK
    offs_r = tl.arange(0, ROWS)
    offs_t = tl.arange(0, KC)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_j = tl.arange(0, JC)
    n_keys = n_vk * SK
    n_chunks = (n_keys + KC - 1) // KC
    n_groups = (n_vq + QB - 1) // QB
    w_rows = W + pid.to(tl.int64) * ROWS * n_vk + offs_r.to(tl.int64)[:, None] * n_vk  # [ROWS, 1] row starts
    for item in range(pid, n_items, tl.num_programs(0)):
        grp = item % n_groups
        pid_bh = item // n_groups
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        row = grp * ROWS + offs_r
        r_ok = row < n_vq * SQ
        q = tl.load(QS + b * stride_qb + h * stride_qh + row.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                    mask=_tile_mask(r_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD), other=0.0)
        qpos = tl.load(QPOS + pid_bh.to(tl.int64) * n_vq * SQ + row, mask=r_ok, other=0) if CAUSAL else row
        kpos_base = KPOS + pid_bh.to(tl.int64) * n_vk * SK
        ks_base = KS + b * stride_kb + h * stride_kh
        m_r = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_r = tl.zeros([ROWS], dtype=tl.float32)
        tl.debug_barrier()  # the previous item's reads of the slot are done before it is overwritten
        for c in range(0, n_chunks):  # the GEMM pass: block maxima to the slot, row max (and denominator)
            lg, valid = _sampled_chunk(q, ks_base, stride_kn, c, offs_t, offs_d, n_keys, qpos, kpos_base, CAUSAL,
                                       HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
            lg = tl.where(valid, lg * sm_scale_log2, float("-inf"))
            m_blk = tl.max(tl.reshape(lg, (ROWS, BPC, SK)), 2)  # [rows, blocks of the chunk]
            jb = c * BPC + tl.arange(0, BPC)
            tl.store(w_rows + jb[None, :], m_blk, mask=(jb < n_vk)[None, :])
            m_new = tl.maximum(m_r, tl.max(m_blk, 1))
            if SOFTMAX:
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_r = l_r * tl.math.exp2(m_r - shift) + tl.sum(tl.math.exp2(lg - shift[:, None]), 1)
            m_r = m_new
        tl.debug_barrier()  # the slot's writes are visible to every thread of the program
        m_shift = tl.where(m_r == float("-inf"), 0.0, m_r)
        inv_l = 1.0 / tl.where(l_r == 0.0, 1.0, l_r)
        offs_i = grp * QB + tl.arange(0, QB)
        s_rows = S + b * stride_sb + h * stride_sh + offs_i.to(tl.int64)[:, None] * stride_si
        for j0 in range(0, n_vk, JC):  # reduce exp(m_rJ - M_r) over each query block's rows
            j = j0 + offs_j
            m_blk = tl.load(w_rows + j[None, :], mask=(j < n_vk)[None, :], other=float("-inf"))
            e = tl.math.exp2(m_blk - m_shift[:, None])
            if SOFTMAX:
                e = e * inv_l[:, None]
            e = tl.reshape(tl.where(r_ok[:, None], e, 0.0), (QB, SQ, JC))
            if MEAN:
                sc = tl.sum(e, 1) / SQ
            else:
                sc = tl.max(e, 1)  # [QB, JC]
            tl.store(s_rows + j[None, :], sc, mask=(offs_i < n_vq)[:, None] & (j < n_vk)[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sampled_scores(qs, ks, qpos, kpos, n_vq: int, n_vk: int, scale: float, *, softmax: bool = False,
                   mean: bool = False, causal: bool = False, key_chunk: int | None = None) -> torch.Tensor:
    """Unnormalised sampled scores ``[B, H, n_q, n_k]`` fp32 from pre-gathered samples.

    ``qs`` ``[B, H, n_q * s_q, D]`` and ``ks`` ``[B, H, n_k * s_k, D]`` (the sampled rows of every block,
    block-major; unit stride on D); ``qpos``/``kpos`` int ``[B, H, rows]`` token positions (causal only).
    ``s_q`` and ``s_k`` are powers of two. Scratch: one ``[QB * s_q, n_k]`` fp32 slot per program (two
    programs per SM on the GPU).
    """
    from ._common import LOG2E, dot_precision

    B, H, _, D = qs.shape
    sq, sk = qs.shape[2] // n_vq, ks.shape[2] // n_vk
    out = torch.empty((B, H, n_vq, n_vk), device=qs.device, dtype=torch.float32)
    gpu = qs.device.type == "cuda"
    qb = max(1, (128 if gpu else 16) // sq)  # rows per program: one M=128 dot on the GPU
    kc = max(sk, key_chunk or (128 if gpu else 32))  # 128: 0.63 ms vs 0.76 at 64 (H100, Wan)
    n_items = triton.cdiv(n_vq, qb) * B * H
    n_prog = min(n_items, 2 * _num_sms(qs.device) if gpu else 3)  # CPU: several items per program
    scratch = torch.empty((n_prog, qb * sq, n_vk), device=qs.device, dtype=torch.float32)
    if causal:
        qpos, kpos = qpos.to(torch.int32).contiguous(), kpos.to(torch.int32).contiguous()
    else:
        qpos = kpos = out  # never read
    _sampled_scores_kernel[(n_prog,)](
        qs, ks, qpos, kpos, out, scratch, qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1),
        ks.stride(2), out.stride(0), out.stride(1), out.stride(2), H, scale * LOG2E, n_vq, n_vk, n_items,
        QB=qb, SQ=sq, SK=sk, KC=kc, JC=64 if gpu else 32, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D),
        DOT_PRECISION=dot_precision(qs.dtype), SOFTMAX=softmax, MEAN=mean, CAUSAL=causal,
        num_warps=8 if gpu and qb * sq >= 128 else 4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# planner (spec §2.5): one program per (b, h, query tile); sort, cumulative mass, level ends, lists


@triton.jit
def _level_end(e_prev, C, rank, n_vk, tau, e_topk, a, min_full, IS_L1: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:  # topk: quantile ends computed on the host (shapes only)
        e = tl.maximum(e_prev, e_topk)
    else:  # thresholdbound: the crossing block is included
        c = tl.sum(((C <= tau + 1e-6) & (rank < n_vk)).to(tl.int32), 0)
        e = tl.where(c > 0, c + 1, e_prev)
        e = tl.minimum(tl.maximum(e, e_prev), n_vk)
        if IS_L1:
            e = tl.maximum(e, min_full)
    # upstream alignment: the level's length rounded up to a multiple of a (down at the end of the row)
    up = e_prev + (e - e_prev + a - 1) // a * a
    end = tl.minimum(up, n_vk)
    aligned = tl.where(end == n_vk, e_prev + (end - e_prev) // a * a, end)
    return tl.where(a > 1, aligned, e)


@triton.jit(do_not_specialize=["n_vq", "n_vk", "n_tk"])
def _pyramid_plan_kernel(
    S, KV_INDEX, LEVEL_PTR, stride_sb, stride_sh, stride_si, stride_ib, stride_ih, stride_ii,
    stride_lb, stride_lh, stride_li, n_heads, n_vq, n_vk, n_tk,
    tau1, tau2, tau4, tau8, k1, k2, k4, k8, a1, a2, a4, a8, min_full,
    NK_PAD: tl.constexpr, NT_PAD: tl.constexpr, MODE: tl.constexpr,
):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    idx_row = KV_INDEX + b * stride_ib + h * stride_ih + i.to(tl.int64) * stride_ii
    lp_row = LEVEL_PTR + b * stride_lb + h * stride_lh + i * stride_li
    n_all = n_vk + n_tk
    rank = tl.arange(0, NK_PAD)
    offs_t = tl.arange(0, NT_PAD)
    if i >= n_vq:  # text query tiles: every block at m = 1, in order
        tl.store(idx_row + rank, rank, mask=rank < n_vk)
        tl.store(idx_row + n_vk + offs_t, n_vk + offs_t, mask=offs_t < n_tk)
        tl.store(lp_row + tl.arange(0, 8), tl.where(tl.arange(0, 8) == 0, 0, n_all), mask=tl.arange(0, 8) < 5)
    else:
        ok = rank < n_vk
        s = tl.load(S + b * stride_sb + h * stride_sh + i * stride_si + rank, mask=ok, other=0.0)
        s = tl.maximum(s, 0.0)
        # one sortable key: score bits (non-negative floats order like their bits), then lower index first
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(ok, (bits << 32) | (NK_PAD - 1 - rank).to(tl.int64), -1)
        key = tl.sort(key, descending=True)
        blk = (NK_PAD - 1 - (key & 0xFFFFFFFF)).to(tl.int32)
        vals = tl.where(rank < n_vk, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        cum = tl.cumsum(vals, 0)
        C = cum / tl.maximum(tl.max(cum, 0), 1e-30)  # the last cumulative value, as the torch rules
        e1 = _level_end(0, C, rank, n_vk, tau1, k1, a1, min_full, True, MODE)
        e2 = _level_end(e1, C, rank, n_vk, tau2, k2, a2, min_full, False, MODE)
        e4 = _level_end(e2, C, rank, n_vk, tau4, k4, a4, min_full, False, MODE)
        e8 = _level_end(e4, C, rank, n_vk, tau8, k8, a8, min_full, False, MODE)
        # video ranks grouped by level; the text blocks (m = 1) follow the level-1 ranks
        pos = rank + tl.where(rank >= e1, n_tk, 0)
        tl.store(idx_row + pos, blk, mask=ok)
        tl.store(idx_row + e1 + offs_t, n_vk + offs_t, mask=offs_t < n_tk)
        lp = tl.arange(0, 8)
        val = tl.where(lp == 0, 0, tl.where(lp == 1, e1, tl.where(lp == 2, e2, tl.where(lp == 3, e4, e8))) + n_tk)
        tl.store(lp_row + lp, val.to(tl.int32), mask=lp < 5)


def pyramid_plan_lists(scores: torch.Tensor, *, n_tq: int, n_tk: int, mode: str, ends, topk_ends, aligns,
                       min_full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_index, level_ptr)`` from video scores ``[B, H, n_q, n_k]`` (``n_k <= 2048``) by the topk or
    thresholdbound rule; ``n_tq``/``n_tk`` text query tiles / KV blocks are appended (text at m = 1)."""
    B, H, nq, nk = scores.shape
    n_all = nk + n_tk
    kv_index = torch.empty((B, H, nq + n_tq, n_all), device=scores.device, dtype=torch.int32)
    level_ptr = torch.empty((B, H, nq + n_tq, 5), device=scores.device, dtype=torch.int32)
    s = scores.float()
    _pyramid_plan_kernel[(nq + n_tq, B * H)](
        s, kv_index, level_ptr, s.stride(0), s.stride(1), s.stride(2), *kv_index.stride()[:3],
        *level_ptr.stride()[:3], H, nq, nk, n_tk, *[float(t) for t in ends], *[int(k) for k in topk_ends],
        *[int(a) for a in aligns], int(min_full),
        NK_PAD=max(16, triton.next_power_of_2(nk)), NT_PAD=max(16, triton.next_power_of_2(max(n_tk, 1))),
        MODE=0 if mode == "topk" else 1, num_warps=4 if nk <= 256 else 8,  # 4 warps spill the int64 sort of 512 keys
    )
    return kv_index, level_ptr
