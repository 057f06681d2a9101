"""PSA-specific Triton kernels: pyramid pooling, the tile schedule, the pooled-level backward.

"PSA: Pyramid Sparse Attention" (Li et al., https://arxiv.org/abs/2512.04025). The attention itself
runs on the shared core ``kernels/block_sparse.py`` (``level_ptr`` + :class:`Pyramid`); this file
holds what only PSA needs:

- ``pyramid_pool``: one pass over K and V writing the mean-pooled levels (factors 2, 4, 8) of every
  KV block, with true group counts for partial blocks (fp32 sums, stored in the input dtype);
- ``tile_order``: each (b, h) row's query tiles heaviest first (one sort per row), for the forward grid;
- ``pyramid_bwd``: dQ (the forward's multi-level walk), dK/dV per (KV block, level) over the query
  tiles of the transposed plan (no atomics), and the scatter of pooled gradients to tokens.

The estimator and the planner are in ``kernels/_pyramid_planning.py``.

Caution/limits: tested under the Triton 3.9 interpreter, compiled for sm_90 on the CPU
(``tests/ops/test_pyramid_compile.py``) and on an H100 with Triton 3.6 (``tests/ops/test_pyramid_cuda.py``). fp16,
bf16, fp32; head dims up to 256; ``block_k`` a power of two >= 16 (32, 64, 128 in the op). No GQA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _load_tile, _tile_mask, cdiv, head_dim_pad, next_pow2
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
    for c in range(BLOCK_K // CHUNK):
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
    return cdiv(seq_k, block_k) if segments is None else segments.num_kv_blocks(block_k)


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
        DO2=2 in factors, DO4=4 in factors, DO8=8 in factors,
        # H100, Wan 480p K and V, ms at 2 / 4 warps: b_k 32 0.135 / 0.159, 64 0.242 / 0.171, 128 0.264 / 0.229
        num_warps=2 if block_k <= 32 else 4,
    )
    return Pyramid(kp, vp, n_blk)


@triton.jit(do_not_specialize=["n_heads", "n_tiles"])
def _tile_order_kernel(LEVEL_PTR, ORDER, stride_lb, stride_lh, stride_lt, stride_ob, stride_oh, n_heads, n_tiles,
                       T_PAD: tl.constexpr):
    """One program per (b, h): FLOP-equivalent work of every query tile (``8 n_1 + 4 n_2 + 2 n_4 + n_8``
    entries), then the tiles sorted heaviest first, ties by index (one ``tl.sort`` of packed keys)."""
    pid = tl.program_id(0)
    b = (pid // n_heads).to(tl.int64)
    h = (pid % n_heads).to(tl.int64)
    t = tl.arange(0, T_PAD)
    ok = t < n_tiles
    row = LEVEL_PTR + b * stride_lb + h * stride_lh + t.to(tl.int64) * stride_lt
    p0 = tl.load(row, mask=ok, other=0)
    p1 = tl.load(row + 1, mask=ok, other=0)
    p2 = tl.load(row + 2, mask=ok, other=0)
    p3 = tl.load(row + 3, mask=ok, other=0)
    p4 = tl.load(row + 4, mask=ok, other=0)
    work = 8 * (p1 - p0) + 4 * (p2 - p1) + 2 * (p3 - p2) + (p4 - p3)
    key = tl.where(ok, (work.to(tl.int64) << 24) | (T_PAD - 1 - t), -1)  # padding sorts last
    idx = (T_PAD - 1 - (tl.sort(key, descending=True) & 0xFFFFFF)).to(tl.int32)
    tl.store(ORDER + b * stride_ob + h * stride_oh + t, idx, mask=ok)


SORT_MAX_TILES = 4096  # query tiles per row sorted by one program of _tile_order_kernel


def tile_order(level_ptr: torch.Tensor) -> torch.Tensor:
    """Query tiles of each (b, h) row of a PSA plan heaviest first (stable): int32 ``level_ptr.shape[:-1]``.

    The work of a tile counts its entries at factor m as 1/m of a level-1 entry. The same order as
    ``work.argsort(-1, descending=True, stable=True)``."""
    Bl, Hl, T, _ = level_ptr.shape
    if T > SORT_MAX_TILES:  # beyond one program's sort
        n = (level_ptr[..., 1:] - level_ptr[..., :-1]).to(torch.int64)
        work = 8 * n[..., 0] + 4 * n[..., 1] + 2 * n[..., 2] + n[..., 3]
        return work.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    level_ptr = level_ptr if level_ptr.stride(-1) == 1 else level_ptr.contiguous()
    order = torch.empty((Bl, Hl, T), device=level_ptr.device, dtype=torch.int32)
    _tile_order_kernel[(Bl * Hl,)](
        level_ptr, order, *level_ptr.stride()[:3], order.stride(0), order.stride(1), Hl, T,
        T_PAD=max(16, next_pow2(T)), num_warps=4,
    )
    return order


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
        n_blk = cdiv(N, block_k)
        blen = (N - blk * block_k).clamp(max=block_k).expand(batch, N)
    else:
        vs, nv, ts, tlen, tv = segments
        tv = torch.full((batch,), tlen, device=device) if tv is None else tv.to(device).long().clamp(0, tlen)
        n_vk = cdiv(nv, block_k)
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
    _block_sparse_bwd_preprocess_kernel[(cdiv(N, 64), B * H)](
        out, do, dlse if dlse is not None else delta, delta, lse, lse2, *_bhn_strides(out), *_bhn_strides(do), N, H,
        HAS_DLSE=dlse is not None, BLOCK=64, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
    )
    if pyramid is None:
        pyramid = pyramid_pool(k, v, block_k, segments=segments)
    kp, vp, n_blk = pyramid
    text_valid, seg, n_tiles = _segment_args(segments, B, block_q, block_k, dev)
    vs, nv, ts, tlen, n_vq, n_vk, n_tk = seg
    n_tiles = n_tiles if n_tiles is not None else cdiv(N, block_q)
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
        _pyramid_bwd_dkdv_kernel[(n_blk * cdiv(P, tnb), B * H)](
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
