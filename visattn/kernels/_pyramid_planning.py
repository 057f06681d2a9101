"""PSA planning kernels: the sampled max-attention estimator (spec §2.4) and the level planner (§2.5).

"PSA: Pyramid Sparse Attention" (Li et al., https://arxiv.org/abs/2512.04025). Called by
``ops/_pyramid_rules.py``; the attention kernels are in ``kernels/pyramid.py`` and the shared core.

- ``sampled_scores``: one persistent launch; each work item (128 sampled query rows, read from q in
  place) makes one GEMM pass over the pre-gathered sampled keys, writing per-block maxima to a
  per-program scratch slot (block-major), then reduces them (read one step ahead) and normalises
  its rows of S.
  The keys come in ``chunk_key_order`` so that each block's maximum is a reduction inside one
  thread of the MMA accumulator layout.
- ``gather_rows``: the sampled keys as one contiguous tensor (one launch, no expanded index).
- ``pyramid_plan_lists``: one program per (b, h, query tile): ``tl.sort`` of packed score/index keys,
  cumulative mass, level ends and the entry lists.

Caution/limits: tested under the Triton 3.9 interpreter, compiled for sm_90 on the CPU
(``tests/ops/test_pyramid_compile.py``) and on an H100 with Triton 3.6 (``tests/ops/test_pyramid_cuda.py``).
Sample counts are powers of two; rows of at most 2048 blocks in the planner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _tile_mask, cdiv, head_dim_pad, next_pow2, num_sms

# ---------------------------------------------------------------------------------------------
# sampled max-attention estimator (spec §2.4): one GEMM pass over the sampled keys, scratch in L2


@triton.jit
def _sampled_chunk(q, ks_base, stride_ksn, c, offs_t, offs_d, n_vk, qpos, KPOS, SK: tl.constexpr,
                   CAUSAL: tl.constexpr, PERM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Unscaled logits of the sampled rows against the keys of chunk ``c`` and their mask (columns of
    blocks ``>= n_vk`` invalid; causal: keys after the row). ``PERM``: the keys are padded to whole
    chunks and ordered as ``_block_max`` reads them."""
    KC: tl.constexpr = offs_t.shape[0]
    BPC: tl.constexpr = KC // SK
    t = c * KC + offs_t
    if PERM:
        blk = c * BPC + (offs_t // (4 * SK)) * 4 + (offs_t // 2) % 4
        ok = offs_t < KC  # every column exists (padded)
    else:
        blk = c * BPC + offs_t // SK
        ok = blk < n_vk
    k = tl.load(ks_base + t.to(tl.int64)[:, None] * stride_ksn + offs_d[None, :],
                mask=_tile_mask(ok, offs_d, HEAD_DIM, HEAD_DIM_PAD), other=0.0)
    lg = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    valid = (blk < n_vk)[None, :]
    if CAUSAL:
        kpos = tl.load(KPOS + t, mask=ok, other=0)
        valid = valid & (kpos[None, :] <= qpos[:, None])
    return lg, valid


@triton.jit
def _block_max(lg, ROWS: tl.constexpr, BPC: tl.constexpr, SK: tl.constexpr, PERM: tl.constexpr):
    """Per-block maxima ``[ROWS, BPC]`` of a ``[ROWS, BPC * SK]`` logits chunk. ``PERM``: column
    ``t = 8 (a SK/2 + i) + 2 j + r`` holds sample ``2 i + r`` of the chunk's block ``4 a + j``, so each
    thread of the MMA accumulator layout (lanes own column pairs ``2 j, 2 j + 1`` mod 8) holds whole
    blocks and reduces them without lane shuffles (H100, Wan 480p: 0.57 -> 0.54 ms)."""
    if PERM:
        x = tl.reshape(lg, (ROWS, BPC // 4, SK // 2, 4, 2))
        return tl.reshape(tl.max(tl.max(x, 4), 2), (ROWS, BPC))
    return tl.max(tl.reshape(lg, (ROWS, BPC, SK)), 2)


def chunk_order_applies(sk: int, kc: int) -> bool:
    """Whether the estimator reads its keys in the ``PERM`` order: ``kc`` a multiple of ``4 * sk``, ``sk`` even."""
    return kc % (4 * sk) == 0 and sk % 2 == 0


def chunk_key_order(n_vk: int, sk: int, kc: int, device=None) -> torch.Tensor:
    """Source positions (int64 ``[ceil(n_vk * sk / kc) * kc]``, into block-major sampled keys) of the
    estimator's ``PERM`` key order for chunks of ``kc`` keys (``chunk_order_applies``). The padding
    repeats the last block's keys; the kernel masks those columns."""
    bpc = kc // sk
    t = torch.arange(cdiv(n_vk * sk, kc) * kc, device=device)
    c, u = t // kc, t % kc
    blk = (c * bpc + (u // (4 * sk)) * 4 + (u // 2) % 4).clamp(max=n_vk - 1)
    return blk * sk + 2 * ((u // 8) % (sk // 2)) + u % 2


def key_chunk(device: torch.device, sk: int) -> int:
    """Sampled keys per estimator chunk: 128 on the GPU (H100, Wan 480p: 0.54 ms vs 0.68 at 64), 32 on the CPU."""
    return max(sk, 128 if device.type == "cuda" else 32)


@triton.jit(do_not_specialize=["n_vq", "n_vk", "n_items"])
def _sampled_scores_kernel(
    Q, KS, QROWS, KPOS, S, W,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_sb, stride_sh, stride_si,
    n_heads, sm_scale_log2, n_vq, n_vk, n_items,
    QB: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, KC: tl.constexpr, JC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTMAX: tl.constexpr, MEAN: tl.constexpr, CAUSAL: tl.constexpr, PERM: tl.constexpr, PARTS: tl.constexpr,
):
    """Persistent: each program takes work items ``(QB query blocks, b, h)`` in turn and owns one scratch
    slot ``W[pid]``: ``[n_vk, QB * SQ rows]`` fp32 block-major maxima (a chunk's stores fill whole sectors),
    then the rows' shifts and ``1 / l``. The sampled query rows are read from ``Q`` in place (by ``QROWS``,
    once per item); the sampled keys come pre-gathered (``KS``, read once per chunk; in ``chunk_key_order``
    when ``PERM``). One GEMM pass writes every row's per-block max logit to the slot while it tracks the
    row max (and softmax denominator); then, in ``PARTS`` groups of query blocks (fewer live registers),
    a GEMM-free pass reads the slot back ``JC`` blocks ahead and reduces ``exp(m_rJ - M_r)`` over each
    query block's rows, and a third rescales those rows of ``S`` to sum 1. ``sm_scale_log2`` > 0.
    The slot's stores bypass L1 (``.cg``) and its reads are marked ``evict_first`` (each line is read once), so
    the sampled keys keep their place in L2 (H100, Wan 480p, whole plan call: 0.921 -> 0.864 ms at
    ``wan21_1p3b_topk``, 0.674 -> 0.664 at ``default``)."""
    pid = tl.program_id(0)
    ROWS: tl.constexpr = QB * SQ
    BPC: tl.constexpr = KC // SK
    offs_r = tl.arange(0, ROWS)
    offs_t = tl.arange(0, KC)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    n_keys = n_vk * SK
    n_chunks = (n_keys + KC - 1) // KC
    n_groups = (n_vq + QB - 1) // QB
    n_load = n_chunks * KC if PERM else n_keys  # PERM: keys padded to whole chunks
    # the slot is block-major ([n_vk, ROWS]): a chunk's maxima are whole 32-byte sectors of consecutive rows
    slot_size = (n_vk + 2) * ROWS  # block-major maxima, then the rows' shifts and 1 / l
    w_base = W + pid.to(tl.int64) * slot_size
    w_rows = w_base + offs_r.to(tl.int64)[:, None]
    for item in range(pid, n_items, tl.num_programs(0)):
        grp = item % n_groups
        pid_bh = item // n_groups
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        row = grp * ROWS + offs_r
        r_ok = row < n_vq * SQ
        qpos = tl.load(QROWS + pid_bh.to(tl.int64) * n_vq * SQ + row, mask=r_ok, other=0)
        q = tl.load(Q + b * stride_qb + h * stride_qh + qpos.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                    mask=_tile_mask(r_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD), other=0.0)
        kpos_base = KPOS + pid_bh.to(tl.int64) * n_load
        ks_base = KS + b * stride_kb + h * stride_kh
        m_r = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_r = tl.zeros([ROWS], dtype=tl.float32)
        tl.debug_barrier()  # the previous item's reads of the slot are done before it is overwritten
        for c in range(0, n_chunks):  # the GEMM pass: block maxima to the slot, row max (and denominator)
            lg, valid = _sampled_chunk(q, ks_base, stride_kn, c, offs_t, offs_d, n_vk, qpos, kpos_base, SK, CAUSAL,
                                       PERM, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
            jb = c * BPC + tl.arange(0, BPC)
            if CAUSAL or SOFTMAX:
                lg = tl.where(valid, lg * sm_scale_log2, float("-inf"))
                m_blk = _block_max(lg, ROWS, BPC, SK, PERM)  # [rows, blocks of the chunk]
            else:  # every key is visible; columns of blocks >= n_vk are never stored, only masked here
                m_blk = _block_max(lg, ROWS, BPC, SK, PERM) * sm_scale_log2
                m_blk = tl.where((jb < n_vk)[None, :], m_blk, float("-inf"))
            tl.store(w_rows + jb[None, :] * ROWS, m_blk, mask=(jb < n_vk)[None, :], cache_modifier=".cg")
            m_new = tl.maximum(m_r, tl.max(m_blk, 1))
            if SOFTMAX:
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_r = l_r * tl.math.exp2(m_r - shift) + tl.sum(tl.math.exp2(lg - shift[:, None]), 1)
            m_r = m_new
        # the rows' shifts and 1 / l go to the slot's tail, so the reduction can take the rows in parts
        w_tail = w_base + n_vk * ROWS
        tl.store(w_tail + offs_r, tl.where(m_r == float("-inf"), 0.0, m_r))
        tl.store(w_tail + ROWS + offs_r, 1.0 / tl.where(l_r == 0.0, 1.0, l_r))
        tl.debug_barrier()  # the slot's writes are visible to every thread of the program
        PR: tl.constexpr = ROWS // PARTS
        for part in tl.static_range(PARTS):
            _reduce_rows(w_base + part * PR, w_tail + part * PR, S + b * stride_sb + h * stride_sh, stride_si,
                         grp * QB + part * (QB // PARTS), grp * ROWS + part * PR, n_vq, n_vk, ROWS, PR,
                         QB // PARTS, SQ, JC, SOFTMAX, MEAN)


@triton.jit
def _reduce_rows(w_part, w_tail, s_base, stride_si, i0, row0, n_vq, n_vk, ROWS: tl.constexpr,
                 PR: tl.constexpr, QP: tl.constexpr, SQ: tl.constexpr, JC: tl.constexpr, SOFTMAX: tl.constexpr,
                 MEAN: tl.constexpr):
    """Scores of ``QP`` query blocks (first ``i0``; their ``PR`` sampled rows from ``row0``) from the
    block-major maxima of a slot (``w_part``: the part's first row, ``ROWS`` per block; ``w_tail``: its
    shifts, then ``1 / l``): ``exp(m_rJ - M_r)`` (``/ l_r`` with ``SOFTMAX``) reduced over each query
    block's rows, the next ``JC`` blocks read one step ahead; then those rows of ``S`` sum to 1."""
    offs_r = tl.arange(0, PR)
    offs_j = tl.arange(0, JC)
    r_ok = row0 + offs_r < n_vq * SQ
    m_shift = tl.load(w_tail + offs_r)
    inv_l = tl.load(w_tail + ROWS + offs_r) if SOFTMAX else m_shift
    offs_i = i0 + tl.arange(0, QP)
    i_ok = (offs_i < n_vq)[:, None]
    s_rows = s_base + offs_i.to(tl.int64)[:, None] * stride_si
    rows = w_part + offs_r.to(tl.int64)[:, None]
    total = tl.zeros([QP], dtype=tl.float32)
    m_next = tl.load(rows + offs_j[None, :] * ROWS, mask=(offs_j < n_vk)[None, :], other=float("-inf"),
                     eviction_policy="evict_first")  # read once: the lines leave L2 first
    for j0 in range(0, n_vk, JC):
        j = j0 + offs_j
        m_blk = m_next
        m_next = tl.load(rows + (j + JC)[None, :] * ROWS, mask=(j + JC < n_vk)[None, :], other=float("-inf"),
                         eviction_policy="evict_first")
        e = tl.math.exp2(m_blk - m_shift[:, None])
        if SOFTMAX:
            e = e * inv_l[:, None]
        e = tl.reshape(tl.where(r_ok[:, None], e, 0.0), (QP, SQ, JC))
        if MEAN:
            sc = tl.sum(e, 1) / SQ
        else:
            sc = tl.max(e, 1)  # [QP, JC]
        total += tl.sum(sc, 1)
        tl.store(s_rows + j[None, :], sc, mask=i_ok & (j < n_vk)[None, :])
    tl.debug_barrier()  # these rows of S are visible to every thread of the program
    total = tl.maximum(total, 1e-30)[:, None]
    for j0 in range(0, n_vk, JC):  # rows of S sum to 1
        j = j0 + offs_j
        m = i_ok & (j < n_vk)[None, :]
        tl.store(s_rows + j[None, :], tl.load(s_rows + j[None, :], mask=m, other=0.0) / total, mask=m)


@triton.jit
def _gather_rows_kernel(X, ROWS, OUT, stride_xb, stride_xh, stride_xn, n_heads, n_rows,
                        RB: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    ok = r < n_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m = _tile_mask(ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    src = tl.load(ROWS + pid_bh.to(tl.int64) * n_rows + r, mask=ok, other=0)
    x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None] * stride_xn + offs_d[None, :], mask=m)
    tl.store(OUT + (pid_bh.to(tl.int64) * n_rows + r)[:, None] * HEAD_DIM + offs_d[None, :], x, mask=m)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, h, rows[b, h, r]]``: the rows ``rows`` (int64 ``[B, H, R]``) of ``x`` (``[B, H, N, D]``, unit
    stride on D) as a contiguous ``[B, H, R, D]`` tensor (``torch.gather`` without an expanded index)."""
    B, H, _, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows = rows.contiguous()
    R = rows.shape[2]
    out = torch.empty((B, H, R, D), device=x.device, dtype=x.dtype)
    _gather_rows_kernel[(cdiv(R, 64), B * H)](
        x, rows, out, *x.stride()[:3], H, R, RB=64, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), num_warps=4,
    )
    return out


def sampled_scores(q, ks, qrows, kpos, n_vq: int, n_vk: int, sk: int, scale: float, *, key_chunk: int,
                   softmax: bool = False, mean: bool = False, causal: bool = False) -> torch.Tensor:
    """Sampled scores ``[B, H, n_q, n_k]`` fp32, rows normalised to sum 1 (all-zero rows stay 0).

    ``q`` ``[B, H, N, D]`` (any strides) is read in place at the int64 rows ``qrows``
    ``[B, H, n_q * s_q]`` (the sampled rows of every query block, block-major). ``ks`` ``[B, H, R, D]``
    holds the ``sk`` sampled keys of every block, block-major, or, where ``chunk_order_applies(sk,
    key_chunk)``, in ``chunk_key_order`` (padded to whole chunks); ``kpos`` (int64 ``[B, H, R]``) are
    their token positions (read when causal). ``s_q`` and ``sk`` are powers of two; ``scale`` > 0.
    Scratch: one ``[n_k, QB * s_q]`` fp32 slot per program (two programs per SM on the GPU).
    """
    from ._common import LOG2E, dot_precision

    B, H, _, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    ks = ks if ks.stride(-1) == 1 else ks.contiguous()
    sq = qrows.shape[2] // n_vq
    out = torch.empty((B, H, n_vq, n_vk), device=q.device, dtype=torch.float32)
    gpu = q.device.type == "cuda"
    qb = max(1, (128 if gpu else 16) // sq)  # rows per program: one M=128 dot on the GPU
    n_items = cdiv(n_vq, qb) * B * H
    n_prog = min(n_items, 2 * num_sms(q.device) if gpu else 3)  # CPU: several items per program
    scratch = torch.empty((n_prog, (n_vk + 2) * qb * sq), device=q.device, dtype=torch.float32)
    _sampled_scores_kernel[(n_prog,)](
        q, ks, qrows, kpos if causal else qrows, out, scratch, q.stride(0), q.stride(1), q.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), out.stride(0), out.stride(1), out.stride(2), H,
        scale * LOG2E, n_vq, n_vk, n_items,
        QB=qb, SQ=sq, SK=sk, KC=key_chunk, JC=128 if gpu else 32, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D),
        DOT_PRECISION=dot_precision(q.dtype), SOFTMAX=softmax, MEAN=mean, CAUSAL=causal,
        PERM=chunk_order_applies(sk, key_chunk), PARTS=2 if qb % 2 == 0 else 1,  # halves: no register spills
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
        NK_PAD=max(16, next_pow2(nk)), NT_PAD=max(16, next_pow2(max(n_tk, 1))),
        MODE=0 if mode == "topk" else 1, num_warps=4 if nk <= 256 else 8,  # 4 warps spill the int64 sort of 512 keys
    )
    return kv_index, level_ptr
