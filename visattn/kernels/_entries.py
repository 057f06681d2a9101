"""List entries of the block-sparse core: the token range a block id names (plain or segmented
sequences) and PSA's pooled-level execution tiles (general split/merge of ``block_k / m`` pooled keys
into ``TN``-lane tiles), shared by ``block_sparse.py`` and ``pyramid.py``."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _online_softmax_step, _online_softmax_step_scaled, _tile_mask


@triton.jit
def _entry_start(blk, seq_k, BLOCK_K: tl.constexpr):
    """First key of the block a list entry names; ids outside [0, ceil(seq_k / BLOCK_K)) map to
    ``seq_k`` (nothing valid), decided before ``blk * BLOCK_K`` could wrap around in int32."""
    ok = (blk >= 0) & (blk < (seq_k + BLOCK_K - 1) // BLOCK_K)
    return tl.where(ok, blk * BLOCK_K, seq_k)


@triton.jit
def _entry_range(blk, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk,
                 BLOCK_K: tl.constexpr, SEGMENTS: tl.constexpr):
    """Token range ``[start, end)`` of the block a list entry names (``blk`` scalar or vector).

    Without segments blocks are cut from 0 over ``seq_k``. With segments ids ``< n_vk`` are video
    blocks (from ``video_start``, ending at the video end) and ids ``n_vk + t`` are text blocks (from
    ``text_start``, ending at the first ``text_valid`` text tokens). Ids out of range give an empty
    range, decided before ``blk * BLOCK_K`` could wrap around in int32.
    """
    if SEGMENTS:
        is_text = blk >= n_vk
        ok = (blk >= 0) & (blk < n_vk + n_tk)
        local = tl.where(ok, tl.where(is_text, blk - n_vk, blk), 0)
        start = tl.where(is_text, text_start, video_start) + local * BLOCK_K
        seg_end = tl.where(is_text, text_start + text_valid, video_start + num_video)
        end = tl.where(ok, tl.minimum(start + BLOCK_K, seg_end), start)
    else:
        start = _entry_start(blk, seq_k, BLOCK_K)
        end = tl.minimum(start + BLOCK_K, seq_k)
    return start, end


@triton.jit
def _lane_blocks(idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K: tl.constexpr, MF: tl.constexpr,
                 TN: tl.constexpr):
    """Block id of every lane of the t-th execution tile over entries ``[e0, e0 + n_ent)`` (-1 past the end)."""
    P: tl.constexpr = BLOCK_K // MF
    lane = t * TN + offs_p
    return tl.load(idx_row + (e0 + lane // P) * stride_ij, mask=lane < n_ent * P, other=-1)


@triton.jit
def _level_tiles(idx_row, stride_ij, e0, n_ent, BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr):
    """A level loop's set-up: lane offsets, its lane and tile counts, and the block ids of its first tile."""
    offs_p = tl.arange(0, TN)
    n_lanes = n_ent * (BLOCK_K // MF)
    return offs_p, n_lanes, (n_lanes + TN - 1) // TN, _lane_blocks(idx_row, stride_ij, e0, n_ent, 0, offs_p, BLOCK_K,
                                                                   MF, TN)


@triton.jit
def _tile_blocks(blk_next, idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K: tl.constexpr, MF: tl.constexpr,
                 TN: tl.constexpr, PREFETCH: tl.constexpr):
    """Block ids of tile ``t``'s lanes and the loop-carried ids of tile ``t + 1`` (read one tile ahead
    with ``PREFETCH``, so the gather addresses depend on a loop-carried value)."""
    if PREFETCH:
        blk = blk_next
        blk_next = _lane_blocks(idx_row, stride_ij, e0, n_ent, t + 1, offs_p, BLOCK_K, MF, TN)
    else:
        blk = _lane_blocks(idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K, MF, TN)
    return blk, blk_next


@triton.jit
def _lane_rows(blk, t, offs_p, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, pool_off,
               BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr, SEGMENTS: tl.constexpr):
    """Rows, true group counts and last-token positions of the lanes of tile ``t`` (see ``_level_lanes``)."""
    P: tl.constexpr = BLOCK_K // MF
    g = (t * TN + offs_p) % P
    start, end = _entry_range(blk, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, BLOCK_K,
                              SEGMENTS)
    tok0 = start + g * MF
    cnt = tl.minimum(tl.maximum(end - tok0, 0), MF)
    if MF == 1:
        rows = tok0
    else:
        rows = pool_off + tl.maximum(blk, 0) * P + g  # lanes with cnt 0 are masked (never read)
    return rows.to(tl.int64), cnt, tok0 + cnt - 1


@triton.jit
def _level_lanes(idx_row, stride_ij, e0, n_ent, t, offs_p, seq_k, text_valid, video_start, num_video, text_start,
                 n_vk, n_tk, pool_off, BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr,
                 SEGMENTS: tl.constexpr):
    """Lanes of the t-th execution tile over entries ``[e0, e0 + n_ent)`` at pool factor ``MF``.

    General split/merge: a block has ``P = BLOCK_K // MF`` pooled keys; lane ``l`` of tile ``t`` is
    pooled key ``(t*TN + l) % P`` of entry ``e0 + (t*TN + l) // P``, so a tile covers part of one
    entry (``P >= TN``) or packs ``TN // P`` consecutive entries (``P < TN``); lanes past the level's
    end are masked. Returns (row in K/V (``MF == 1``) or in the pooled buffer, true group count
    ``c`` (0 = masked lane), position of the group's last real token).
    """
    blk = _lane_blocks(idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K, MF, TN)
    return _lane_rows(blk, t, offs_p, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, pool_off,
                      BLOCK_K, MF, TN, SEGMENTS)


@triton.jit
def _group_bias(cnt):
    """``log2 c`` of each lane's group of ``c`` real tokens; -inf for masked lanes (``c == 0``)."""
    return tl.where(cnt > 0, tl.math.log2(tl.maximum(cnt, 1).to(tl.float32)), float("-inf"))


@triton.jit
def _gathered_kv(k_base, v_base, stride_kn, stride_vn, rows, cnt, offs_d, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr):
    """K/V rows of one gathered tile (masked lanes read as 0)."""
    mask = _tile_mask(cnt > 0, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _gathered_logits(q, k_base, v_base, stride_kn, stride_vn, rows, cnt, last, rows_q, sm_scale_log2, offs_d,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     CAUSAL: tl.constexpr):
    """K/V rows of one gathered tile and its log2-domain logits with the ``+log2 c`` group-count bias
    (masked lanes and, under ``CAUSAL``, groups ending after the query row get -inf)."""
    k, v = _gathered_kv(k_base, v_base, stride_kn, stride_vn, rows, cnt, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2 + _group_bias(cnt)[None, :]
    if CAUSAL:
        qk = tl.where(last[None, :] <= rows_q[:, None], qk, float("-inf"))
    return k, v, qk


@triton.jit
def _attend_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, rows_q, m_i, l_i, acc,
                  sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, pool_off,
                  partial, BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SEGMENTS: tl.constexpr,
                  CAUSAL: tl.constexpr, PREFETCH: tl.constexpr):
    """Online softmax over the entries ``[e0, e0 + n_ent)`` of one pool level, ``TN`` gathered lanes per
    tile; each lane's logit gets ``+ln c`` (``log2 c`` in the exp2 domain), ``c`` its group's true count.
    With ``PREFETCH`` the lanes' block ids are read one tile ahead (the gather addresses then depend on
    a loop-carried value, not on a load of the same iteration). ``partial`` (from ``_partial_levels``)
    is nonzero when some entry of the level names a block shorter than ``BLOCK_K``: only then do its
    tiles test their lanes' counts (a cross-warp reduction per tile)."""
    LOG2_MF: tl.constexpr = 0.0 if MF == 1 else (1.0 if MF == 2 else (2.0 if MF == 4 else 3.0))
    offs_p, n_lanes, n_t, blk_next = _level_tiles(idx_row, stride_ij, e0, n_ent, BLOCK_K, MF, TN)
    for t in range(0, n_t):
        blk, blk_next = _tile_blocks(blk_next, idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K, MF, TN, PREFETCH)
        rows, cnt, last = _lane_rows(blk, t, offs_p, seq_k, text_valid, video_start, num_video, text_start, n_vk,
                                     n_tk, pool_off, BLOCK_K, MF, TN, SEGMENTS)
        if CAUSAL:
            k, v, qk = _gathered_logits(q, k_base, v_base, stride_kn, stride_vn, rows, cnt, last, rows_q,
                                        sm_scale_log2, offs_d, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, CAUSAL)
        else:
            # Lanes of full groups (c = MF) share one bias, log2(MF); only a tile holding a group with fewer
            # real tokens (a partial block, an empty or invalid entry) needs per-lane counts in the logits'
            # layout, recomputed from a fresh read of the ids there (the common tile never pays for it).
            lane = t * TN + offs_p
            odd = partial * 0
            if partial != 0:
                odd = tl.max(((lane < n_lanes) & (cnt < MF)).to(tl.int32), 0)
            k, v = _gathered_kv(k_base, v_base, stride_kn, stride_vn, rows, cnt, offs_d, HEAD_DIM, HEAD_DIM_PAD)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if odd > 0:
                _, cnt_c, _ = _level_lanes(idx_row, stride_ij, e0, n_ent, t, offs_p, seq_k, text_valid, video_start,
                                           num_video, text_start, n_vk, n_tk, pool_off, BLOCK_K, MF, TN, SEGMENTS)
                bias = _group_bias(cnt_c)
            else:
                bias = tl.where(lane < n_lanes, LOG2_MF, float("-inf"))
            qk = qk * sm_scale_log2 + bias[None, :]
        p, m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _full_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, m_i, l_i, acc, sm_scale_log2,
                offs_d, pool_off, BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr):
    """``_attend_level`` for a pooled level (``MF > 1``) whose entries all name full blocks with valid ids
    (no causal mask): every lane below the level's end is a group of ``MF`` real tokens, so its pooled row
    comes from its block id alone, ``log2 MF`` folds into the exponent's FMA, and only the level's last
    tile masks lanes."""
    P: tl.constexpr = BLOCK_K // MF
    offs_p, n_lanes, n_t, blk_next = _level_tiles(idx_row, stride_ij, e0, n_ent, BLOCK_K, MF, TN)
    for t in range(0, n_t):
        blk, blk_next = _tile_blocks(blk_next, idx_row, stride_ij, e0, n_ent, t, offs_p, BLOCK_K, MF, TN, PREFETCH)
        lane = t * TN + offs_p
        rows = pool_off + blk * P + lane % P
        lane_ok = lane < n_lanes
        mask = _tile_mask(lane_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
        rows = rows.to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if (t + 1) * TN > n_lanes:  # the level's last tile: lanes past its end
            qk = tl.where(lane_ok[None, :], qk, float("-inf"))
        p, m_i, l_i, acc = _online_softmax_step_scaled(qk, sm_scale_log2, m_i, l_i, acc, MF)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _attend_pooled_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, rows_q, m_i, l_i,
                         acc, sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk,
                         pool_off, partial, BLOCK_K: tl.constexpr, MF: tl.constexpr, TN: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         SEGMENTS: tl.constexpr, CAUSAL: tl.constexpr, PREFETCH: tl.constexpr):
    """A pooled level (``MF > 1``): ``_full_level`` when every entry names a full block (``partial == 0``)
    and there is no causal mask, else ``_attend_level``. (Level 1 keeps ``_attend_level`` even when full:
    the same fast path there measured 0.3 ms slower at Wan's ``topk`` preset, b_k 32, on an H100.)"""
    if CAUSAL:
        m_i, l_i, acc = _attend_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, rows_q,
                                      m_i, l_i, acc, sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video,
                                      text_start, n_vk, n_tk, pool_off, partial, BLOCK_K, MF, TN, HEAD_DIM,
                                      HEAD_DIM_PAD, DOT_PRECISION, SEGMENTS, CAUSAL, PREFETCH)
    elif partial == 0:
        m_i, l_i, acc = _full_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, m_i, l_i,
                                    acc, sm_scale_log2, offs_d, pool_off, BLOCK_K, MF, TN, HEAD_DIM, HEAD_DIM_PAD,
                                    DOT_PRECISION, PREFETCH)
    else:
        m_i, l_i, acc = _attend_level(q, k_base, v_base, stride_kn, stride_vn, idx_row, stride_ij, e0, n_ent, rows_q,
                                      m_i, l_i, acc, sm_scale_log2, offs_d, seq_k, text_valid, video_start, num_video,
                                      text_start, n_vk, n_tk, pool_off, partial, BLOCK_K, MF, TN, HEAD_DIM,
                                      HEAD_DIM_PAD, DOT_PRECISION, SEGMENTS, CAUSAL, PREFETCH)
    return m_i, l_i, acc


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _partial_levels(idx_row, stride_ij, e_lo, e_1, e_2, e_3, e_end, seq_k, text_valid, video_start, num_video,
                    text_start, n_vk, n_tk, BLOCK_K: tl.constexpr, SCAN: tl.constexpr, SEGMENTS: tl.constexpr):
    """Bit ``l`` set when an entry of level ``l`` (entries ``[e_lo, e_1)``, ``[e_1, e_2)``, ``[e_2, e_3)``,
    ``[e_3, e_end)``) names a block of fewer than ``BLOCK_K`` keys (a partial block, or an id out of range).
    One pass over the tile's list before its loops, so that a full level's tiles skip the per-tile test."""
    flags = tl.zeros([SCAN], dtype=tl.int32)
    for c in range(e_lo, e_end, SCAN):
        e = c + tl.arange(0, SCAN)
        ok = e < e_end
        blk = tl.load(idx_row + e * stride_ij, mask=ok, other=0)
        start, end = _entry_range(blk, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, BLOCK_K,
                                  SEGMENTS)
        lvl = (e >= e_1).to(tl.int32) + (e >= e_2).to(tl.int32) + (e >= e_3).to(tl.int32)
        flags = flags | tl.where(ok & (end - start < BLOCK_K), tl.full([SCAN], 1, tl.int32) << lvl, 0)
    return tl.reduce(flags, 0, _or)

