"""Rectified SpaAttn kernels: per-block statistics (Triton), the planner, and the rectified forward.

"Rectified SpaAttn" (Liu, Li, Zhang, Chen, Gu; https://arxiv.org/abs/2511.19835); semantics in
``specs/rectified.md`` §2.

- ``_rectified_stats_kernel``: one program per (visual block, batch x head, tensor, 64 head-dim lanes)
  reads its slice of a q, k or v tile once and writes the fp32 means q̄, k̄, V̄ and the mean absolute
  deviations δq, δk over the valid tokens (``tail="exact"``) or over the zero-padded block
  (``tail="upstream"``, parity only).
- ``plan_tensors_triton``: the planner in two launches. ``pooled_scores``
  (``kernels/_rectified_scores.py``, shared with the row planner): the IPAR logits, the GAPR gain test
  and the text log-sum-exp in [32, 64] tiles. ``_rectified_plan_kernel`` (one program per 16 query blocks,
  batch x head): the softmax, a row ``tl.sort`` of the probabilities, cumsum, count, ties by index,
  neighbour row, first frame, the rectified set, R, C = (P ⊙ 𝒢) V̄ and the index lists; the last
  program of each batch x head writes density, rectified fraction and the tile schedule. The split
  keeps each kernel's live tiles in registers (the single fused kernel spilled ~20 KB per thread and
  ran 1.1 ms on an H100). Up to 511 visual blocks (wider rows compile too slowly);
  ``kernels/_rectified_rows.py`` plans rows of up to 2047 blocks with one program per row.
- ``plan_tensors``: the same planner as device-side torch ops (any dtype; the ``"torch"`` backend,
  float64 planning, and rows longer than 2047 blocks).
Attention runs on the shared block-sparse core (``kernels/block_sparse.py``) with segments and the
``rect_scale``/``rect_bias`` epilogue (``ops/rectified.py``); one launch covers video and text tiles.

Caution/limits: Triton 3.6 (GPU) / the interpreter on CPU; fp16, bf16, fp32; head dims up to 256.
The fused planner keeps fp32 statistics and tf32x3 GEMMs; its selection can differ from a float64 plan
only at exact cumulative-threshold or gain/error ties (rounding).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import _bh_ids, _load_tile, _tile_mask, cdiv, head_dim_pad, next_pow2
from ._rectified_scores import _text_valid, fp32_stats, pooled_scores
from ._rectified_select import _probabilities, _select_blocks, _store_lists
from .block_sparse import _bhn_strides


@triton.jit
def _pool_tile(X, stride_b, stride_h, stride_n, b, h, MEAN, DEV, start, local, num_video, out, d0,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DC: tl.constexpr,
               UPSTREAM_TAIL: tl.constexpr, HAS_DEV: tl.constexpr):
    """Mean (and mean absolute deviation) over the block's tokens of one [BLOCK, DC] tile of X (head-dim
    lanes ``d0 + [0, DC)``)."""
    offs_r = tl.arange(0, BLOCK)
    offs_d = d0 + tl.arange(0, DC)
    row_ok = (local + offs_r) < num_video
    x = _load_tile(X + b * stride_b + h * stride_h, start, stride_n, offs_r, offs_d,
                   _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)).to(tl.float32)
    if UPSTREAM_TAIL:  # upstream pools the zero-padded tail block over all BLOCK rows
        cnt = BLOCK * 1.0
        dev_rows = offs_r >= 0
    else:
        cnt = tl.minimum(num_video - local, BLOCK).to(tl.float32)
        dev_rows = row_ok
    dmask = offs_d < HEAD_DIM
    xm = tl.sum(x, 0) / cnt
    tl.store(MEAN + out + offs_d, xm, mask=dmask)
    if HAS_DEV:
        tl.store(DEV + out + offs_d, tl.sum(tl.where(dev_rows[:, None], tl.abs(x - xm[None, :]), 0.0), 0) / cnt,
                 mask=dmask)


@triton.jit(do_not_specialize=["video_start", "num_video"])
def _rectified_stats_kernel(
    Q, K, V, QM, KM, VM, DQ, DK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    video_start, num_video, n_blocks, n_heads,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DC: tl.constexpr,
    UPSTREAM_TAIL: tl.constexpr,
):
    """One program per (visual block, b x h, tensor x head-dim chunk): axis 2 picks q (mean, deviation),
    k (mean, deviation) or v (mean) and ``DC`` head-dim lanes, so the tiles of a block are read by
    concurrent small programs."""
    pid_j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    NDC: tl.constexpr = HEAD_DIM_PAD // DC
    which = tl.program_id(2) // NDC
    d0 = (tl.program_id(2) % NDC) * DC
    b, h, _ = _bh_ids(pid_bh, n_heads, 1)
    local = pid_j * BLOCK
    start = video_start + local
    out = (pid_bh.to(tl.int64) * n_blocks + pid_j) * HEAD_DIM
    if which == 0:
        _pool_tile(Q, stride_qb, stride_qh, stride_qn, b, h, QM, DQ, start, local, num_video, out, d0,
                   BLOCK, HEAD_DIM, HEAD_DIM_PAD, DC, UPSTREAM_TAIL, True)
    elif which == 1:
        _pool_tile(K, stride_kb, stride_kh, stride_kn, b, h, KM, DK, start, local, num_video, out, d0,
                   BLOCK, HEAD_DIM, HEAD_DIM_PAD, DC, UPSTREAM_TAIL, True)
    else:
        _pool_tile(V, stride_vb, stride_vh, stride_vn, b, h, VM, VM, start, local, num_video, out, d0,
                   BLOCK, HEAD_DIM, HEAD_DIM_PAD, DC, UPSTREAM_TAIL, False)


STATS_DC = 64  # head-dim lanes per statistics program


def stats_warps(block: int, dc: int) -> int:
    """Warps of a statistics program: 64 tile elements per thread, no spills (H100, Wan 480p, 128 x 128
    tiles: 0.12 ms as 2 x 64 lanes at 4 warps; one 128-lane program at 8 warps 0.19 ms)."""
    return max(1, min(8, block * dc // 2048))


def block_stats_triton(q, k, v, video_start: int, num_video: int, block: int, upstream_tail: bool):
    """q/k/v: [B, N, H, D] views, dense head dim. Returns fp32 (q̄, k̄, V̄, δq, δk), each [B, H, n_v, D]."""
    B, _, H, D = q.shape
    nv = cdiv(num_video, block)
    outs = [torch.empty((B, H, nv, D), device=q.device, dtype=torch.float32) for _ in range(5)]
    dpad = head_dim_pad(D)
    dc = min(dpad, STATS_DC)
    _rectified_stats_kernel[(nv, B * H, 3 * (dpad // dc))](
        q,
        k,
        v,
        *outs,
        *_bhn_strides(q),
        *_bhn_strides(k),
        *_bhn_strides(v),
        video_start,
        num_video,
        nv,
        H,
        BLOCK=block,
        HEAD_DIM=D,
        HEAD_DIM_PAD=dpad,
        DC=dc,
        UPSTREAM_TAIL=upstream_tail,
        num_warps=stats_warps(block, dc),
    )
    return tuple(outs)


def block_weights(nv: int, block: int, num_video: int, exact_tail: bool, dtype, device) -> torch.Tensor:
    """Tokens per visual block, ``[n_v]``: ``block`` each, the last one's true count when ``exact_tail``.

    Built on the device from scalars (no element assignment: a Python value written into a CUDA
    tensor is a synchronising host-to-device copy)."""
    w = torch.full((nv,), float(block), dtype=dtype, device=device)
    if not exact_tail:
        return w
    last = float(num_video - (nv - 1) * block)
    return torch.where(torch.arange(nv, device=device) == nv - 1, torch.full_like(w, last), w)


def block_stats_torch(q, k, v, video_start: int, num_video: int, block: int, upstream_tail: bool, dtype):
    """The statistics as torch ops in ``dtype`` (the ``"torch"`` backend). Same outputs as the kernel."""
    nv = -(-num_video // block)
    pad = nv * block - num_video
    sl = slice(video_start, video_start + num_video)
    cnt = block_weights(nv, block, num_video, not upstream_tail, dtype, q.device)
    n_valid = num_video if (pad and not upstream_tail) else nv * block
    valid = (torch.arange(nv * block, device=q.device) < n_valid).view(nv, block, 1)

    def blocks(x):  # [B, N, H, D] -> [B, H, n_v, b, D]
        x = x[:, sl].to(dtype).transpose(1, 2)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], x.shape[1], nv, block, x.shape[-1])

    res = []
    for x in (q, k, v):
        xb = blocks(x)
        m = xb.sum(3) / cnt[:, None]
        res.append((xb, m))
    (qb, qm), (kb, km), (_, vm) = res
    dq = ((qb - qm[..., None, :]).abs() * valid).sum(3) / cnt[:, None]
    dk = ((kb - km[..., None, :]).abs() * valid).sum(3) / cnt[:, None]
    return qm, km, vm, dq, dk


def plan_tensors(
    qm,
    km,
    vm,
    dq,
    dk,
    k_text,
    text_valid,
    *,
    scale: float,
    block: int,
    num_video: int,
    n_text_blocks: int,
    config,
    nbr,
    first_frame,
    keep_probs: bool,
):
    """The planner (spec §2.4-2.7) on pooled statistics; device-side torch ops, no host sync.

    Args:
        qm, km, vm, dq, dk: ``[B, H, n_v, D]`` block statistics (fp32 or fp64).
        k_text: ``[B, H, L, D]`` text keys in the statistics' dtype, or None (no text).
        text_valid: int ``[B]`` valid text lengths (device), or None.
        nbr: bool ``[n_v, n_v]`` neighbour table on the device, or None.
        first_frame: bool ``[n_v]`` blocks of the first-frame square, or None.

    Returns:
        dict with kv_index, kv_count (int32), rect_scale, rect_bias (fp32), rect_map (bool
        [B, H, n_v, n_v]), kept (bool [B, H, n_v, n_v]), rect_prob (or None), density, rect_frac.
    """
    B, H, nv, D = qm.shape
    dtype, dev = qm.dtype, qm.device
    # pooled logits; IPAR: +ln w_J on pooled columns, each valid text token its own column
    w = block_weights(nv, block, num_video, config.tail == "exact", dtype, dev)
    dots = qm @ km.transpose(-1, -2)  # [B, H, n_v, n_v], unscaled (GAPR gain)
    has_text = k_text is not None and config.ipar
    if config.ipar:
        logits = dots * scale + w.log()
    else:
        logits = dots * scale  # Jenga: plain pooled softmax over visual blocks
    if has_text:
        st = (qm @ k_text.transpose(-1, -2)) * scale  # [B, H, n_v, L]
        L = k_text.shape[2]
        tmask = torch.arange(L, device=dev)[None, :] < text_valid[:, None]  # [B, L]
        st = st.masked_fill(~tmask[:, None, None, :], float("-inf"))
        full = torch.cat([logits, st], -1).softmax(-1)
        P = full[..., :nv]
        cols = torch.cat([P, full[..., nv:].sum(-1, keepdim=True)], -1)  # text merged into one column
    else:
        P = logits.softmax(-1)
        cols = P
    ncol = cols.shape[-1]
    # selection: rank columns (descending, ties lower index first), keep the top `count`
    sp, order = torch.sort(cols, dim=-1, descending=True, stable=True)
    csum = sp.cumsum(-1)
    k_min = int((1.0 - config.drop_rate) * nv)
    # τ = 1 keeps every column (a float cumsum may pass 1 before the last column)
    tau = float("inf") if config.cum_threshold >= 1.0 else config.cum_threshold
    count = ((csum <= tau).sum(-1) + 1).clamp(min=k_min, max=ncol)
    ranks = torch.arange(ncol, device=dev)
    keep_sorted = ranks < count[..., None]
    kept_cols = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = kept_cols[..., :nv]
    if nbr is not None:
        kept = kept | nbr
    if first_frame is not None:
        kept = kept | (first_frame[:, None] & first_frame[None, :])
    # GAPR: dropped pairs whose pooled gain beats the pooling error
    if config.gapr:
        err = (dq @ km.transpose(-1, -2)).abs() + (qm @ dk.transpose(-1, -2)).abs()
        rect = (~kept) & (dots.abs() > err)
        Pg = P * rect
        R = 1.0 - Pg.sum(-1)
        C = Pg @ vm
    else:
        rect = torch.zeros_like(kept)
        Pg = None
        R = torch.ones((B, H, nv), dtype=dtype, device=dev)
        C = torch.zeros((B, H, nv, D), dtype=dtype, device=dev)
    # index lists: visual tiles list kept visual blocks then the valid text blocks; text tiles all
    nt = n_text_blocks
    if nt:
        tv = text_valid if text_valid is not None else torch.zeros(B, dtype=torch.int32, device=dev)
        n_tvalid = (tv.long() + block - 1) // block  # [B]
        tcol = torch.arange(nt, device=dev)[None, :] < n_tvalid[:, None]  # [B, nt]
        vis_rows = torch.cat([kept, tcol[:, None, None, :].expand(B, H, nv, nt)], -1)
        txt_rows = torch.cat(
            [
                torch.ones(B, H, nt, nv, dtype=torch.bool, device=dev),
                tcol[:, None, None, :].expand(B, H, nt, nt),
            ],
            -1,
        )
        rows = torch.cat([vis_rows, txt_rows], 2)
    else:
        rows = kept
    ncols = nv + nt
    key = torch.where(rows, torch.arange(ncols, device=dev, dtype=torch.int32), ncols)
    kv_index = key.sort(-1).values.to(torch.int32)
    kv_count = rows.sum(-1, dtype=torch.int32)
    # fp32 for the kernel's epilogue; fp64 statistics (the "torch" backend in float64) stay fp64
    rdt = torch.float64 if dtype == torch.float64 else torch.float32
    rect_scale = torch.ones((B, H, nv + nt), dtype=rdt, device=dev)
    rect_scale[..., :nv] = R
    rect_bias = torch.zeros((B, H, nv + nt, D), dtype=rdt, device=dev)
    rect_bias[..., :nv, :] = C
    dropped = (~kept).sum((-1, -2))
    return dict(
        kv_index=kv_index,
        kv_count=kv_count,
        rect_scale=rect_scale,
        rect_bias=rect_bias,
        rect_map=rect,
        rect_prob=(Pg.float() if (keep_probs and Pg is not None) else None),
        density=kept.sum((-1, -2)).float() / (nv * nv),
        rect_frac=rect.sum((-1, -2)).float() / dropped.clamp(min=1).float(),
    )


def first_frame_blocks(mode: str | None, video_grid, block: int, order) -> torch.Tensor | None:
    """bool [n_v] (CPU): the first-frame square's blocks (``"curve_prefix"``: the first ⌊n_v/T⌋;
    ``"frame"``: every block holding a frame-0 token under the token order)."""
    if mode is None:
        return None
    T, Hh, W = video_grid
    n = T * Hh * W
    nv = -(-n // block)
    sel = torch.zeros(nv, dtype=torch.bool)
    if mode == "curve_prefix":
        sel[: nv // T] = True
    else:
        pos = torch.arange(Hh * W) if order is None else order.inverse[: Hh * W]
        sel[pos // block] = True
    return sel


# ---------------------------------------------------------------------------------------------
# planner: pooled scores in tiles, then one program per (group of G visual query blocks, batch x head)


@triton.jit(do_not_specialize=["nv", "nt"])
def _rectified_plan_kernel(
    LOGIT, GAIN, TLSE, VM, TV, NBR, FF,
    KV_INDEX, KV_COUNT, RSCALE, RBIAS, RMAP, PG, KCNT, RCNT, DENSITY, RFRAC, TILE_ORDER, DONE,
    stride_sb, stride_sh, stride_sj,
    nv, nt, n_heads, tau, k_min,
    BLOCK: tl.constexpr, G: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr, DK: tl.constexpr,
    BV: tl.constexpr, BN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PREC: tl.constexpr,
    HAS_TEXT_COL: tl.constexpr, HAS_TEXT_BLOCKS: tl.constexpr,
    GAPR: tl.constexpr, HAS_NBR: tl.constexpr, HAS_FF: tl.constexpr, KEEP_ALL: tl.constexpr,
    KEEP_PROBS: tl.constexpr,
):
    """Rows I0..I0+G-1 of (b, h), from the scores kernel's logits, gain test and text log-sum-exp: the
    IPAR softmax (text merged into one column), selection (``_select_blocks``: row sort, cumulative
    threshold, top-k floor, neighbours, first frame), the GAPR rectified set, R, C = (P ⊙ 𝒢)V̄ and the
    index lists (kept visual ascending, valid text, then the rest so every slot is written once).
    Programs past the visual groups write the text query tiles (every block, R = 1, C = 0). The last
    program of each (b, h) to finish (a counter in ``DONE``, zeroed by the caller) writes its totals
    and tile schedule (``_finalize_bh``), which saves a launch."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    n_groups = (nv + G - 1) // G
    n_tiles = nv + nt
    ntv = 0
    if HAS_TEXT_BLOCKS:
        ntv = (tl.load(TV + b) + BLOCK - 1) // BLOCK
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dmask = offs_d < HEAD_DIM
    if pid >= n_groups:  # a text query tile
        ttile = bh.to(tl.int64) * n_tiles + nv + (pid - n_groups)
        for c0 in range(0, n_tiles, BJ):
            cc = c0 + tl.arange(0, BJ)
            tl.store(KV_INDEX + ttile * n_tiles + cc, cc, mask=cc < n_tiles)
        tl.store(KV_COUNT + ttile, nv + ntv)
        tl.store(RSCALE + ttile, 1.0)
        tl.store(RBIAS + ttile * HEAD_DIM + offs_d, tl.zeros([HEAD_DIM_PAD], tl.float32), mask=dmask)
    else:
        rows = pid * G + tl.arange(0, G)
        r_ok = rows < nv
        cols = tl.arange(0, BJ)
        cm = cols < nv
        rc = r_ok[:, None] & cm[None, :]
        sq = bh.to(tl.int64) * nv * nv
        pair = rows.to(tl.int64)[:, None] * nv + cols[None, :]
        logit = tl.load(LOGIT + sq + pair, mask=rc, other=float("-inf"))
        t_lse = 0.0
        if HAS_TEXT_COL:
            t_lse = tl.load(TLSE + bh.to(tl.int64) * nv + rows, mask=r_ok, other=float("-inf"))
        p, p_col, ncol = _probabilities(logit, t_lse, cols, cm, nv, HAS_TEXT_COL)
        kept = _select_blocks(p_col, rows, r_ok, cols, cm, ncol, nv, tau, k_min, NBR, FF, KEEP_ALL, HAS_NBR, HAS_FF)
        tile = bh.to(tl.int64) * n_tiles + rows
        if GAPR:
            rect = cm[None, :] & (kept == 0) & (tl.load(GAIN + sq + pair, mask=rc, other=0) != 0)
            pg = tl.where(rect, p, 0.0)
            if KEEP_PROBS:
                tl.store(PG + sq + pair, pg, mask=rc)
            sbase = bh.to(tl.int64) // n_heads * stride_sb + bh.to(tl.int64) % n_heads * stride_sh
            for d0 in tl.range(0, HEAD_DIM_PAD, DK, num_stages=1):  # C = (P ⊙ 𝒢) V̄, a [G, BJ] x [BJ, DK] GEMM per chunk
                dd = d0 + tl.arange(0, DK)
                dm = dd < HEAD_DIM
                vb = tl.load(VM + sbase + cols.to(tl.int64)[:, None] * stride_sj + dd[None, :],
                             mask=cm[:, None] & dm[None, :], other=0.0)
                c = tl.dot(pg, vb, input_precision=PREC)
                tl.store(RBIAS + tile[:, None] * HEAD_DIM + dd[None, :], c, mask=r_ok[:, None] & dm[None, :])
            tl.store(RSCALE + tile, 1.0 - tl.sum(pg, 1), mask=r_ok)
        else:
            rect = kept & (kept == 0)
            tl.store(RBIAS + tile[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([G, HEAD_DIM_PAD], tl.float32),
                     mask=r_ok[:, None] & dmask[None, :])
            tl.store(RSCALE + tile, tl.full([G], 1.0, tl.float32), mask=r_ok)
        tl.store(RMAP + sq + pair, rect.to(tl.int8), mask=rc)
        _store_lists(KV_INDEX, KV_COUNT, KCNT, RCNT, tile, bh.to(tl.int64) * nv + rows, r_ok, cols, cm, kept, rect,
                     ntv, nv, nt, BT, HAS_TEXT_BLOCKS)
    # every thread's stores precede the counter update (release); the last program acquires them all
    tl.debug_barrier()
    if tl.atomic_add(DONE + bh, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        _finalize_bh(bh.to(tl.int64), KCNT, RCNT, KV_COUNT, DENSITY, RFRAC, TILE_ORDER, nv, n_tiles, BV, BN)


@triton.jit
def _finalize_bh(bh, KCNT, RCNT, KV_COUNT, DENSITY, RFRAC, TILE_ORDER, nv, n_tiles, BV: tl.constexpr,
                 BN: tl.constexpr):
    """Per (b, h): kept density, rectified fraction of dropped pairs and the kernel's tile schedule
    (tiles by decreasing kv_count, ties by index: a stable descending argsort, as one packed sort).
    Reads other programs' results, so it bypasses L1 (``.cg``)."""
    kept = tl.zeros([BV], tl.int32)
    rect = tl.zeros([BV], tl.int32)
    for c0 in range(0, nv, BV):
        cv = c0 + tl.arange(0, BV)
        kept += tl.load(KCNT + bh * nv + cv, mask=cv < nv, other=0, cache_modifier=".cg")
        rect += tl.load(RCNT + bh * nv + cv, mask=cv < nv, other=0, cache_modifier=".cg")
    nk = tl.sum(kept, 0)
    pairs = nv * nv
    tl.store(DENSITY + bh, nk.to(tl.float32) / pairs.to(tl.float32))
    tl.store(RFRAC + bh, tl.sum(rect, 0).to(tl.float32) / tl.maximum(pairs - nk, 1).to(tl.float32))
    t = tl.arange(0, BN)
    cnt = tl.load(KV_COUNT + bh * n_tiles + t, mask=t < n_tiles, other=0, cache_modifier=".cg")
    key = tl.where(t < n_tiles, (cnt.to(tl.int64) << 32) | (BN - 1 - t).to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    tl.store(TILE_ORDER + bh * n_tiles + t, (BN - 1 - (key & 0xFFFFFFFF)).to(tl.int32), mask=t < n_tiles)


# rows of next_pow2(n_v + 1) <= 512 columns: wider [16, 1024] sorts took minutes to compile (Triton 3.9,
# sm_90); larger plans (e.g. 720p video, 593+ blocks) use the row planner of kernels/_rectified_rows.py
MAX_FUSED_BLOCKS = 511
PLAN_GROUP = 16  # query-block rows per planner program (tl.dot needs M >= 16)
PLAN_WARPS = 8  # with 4 warps the [16, BJ] row tiles spill registers on sm_90


def plan_tensors_triton(
    qm,
    km,
    vm,
    dq,
    dk,
    k_text,
    text_valid,
    *,
    scale: float,
    block: int,
    num_video: int,
    n_text_blocks: int,
    config,
    nbr,
    first_frame,
    keep_probs: bool,
):
    """:func:`plan_tensors` (``n_v <= MAX_FUSED_BLOCKS``) as two Triton launches (``pooled_scores``, then
    the planner with per-head totals and the tile schedule); fp32 statistics ``[B, H, n_v, D]``. ``k_text`` is a ``[B, H, L, D]`` view of the text keys in any float dtype (read in
    place). Also returns ``tile_order`` (int32 ``[B, H, n_tiles]``)."""
    B, H, nv, D = qm.shape
    dev = qm.device
    nt = n_text_blocks
    ncols = nv + nt
    stats = fp32_stats(qm, km, vm, dq, dk)
    has_text_col = k_text is not None and config.ipar
    keep = keep_probs and config.gapr
    new = functools.partial(torch.empty, device=dev)
    kv_index = new((B, H, ncols, ncols), dtype=torch.int32)
    kv_count = new((B, H, ncols), dtype=torch.int32)
    tile_order = new((B, H, ncols), dtype=torch.int32)
    counts = new((2, B, H, nv), dtype=torch.int32)  # kept / rectified per row
    rect_scale = new((B, H, ncols), dtype=torch.float32)
    rect_bias = new((B, H, ncols, D), dtype=torch.float32)
    totals = new((2, B, H), dtype=torch.float32)  # density / rectified fraction
    pg = new((B, H, nv, nv), dtype=torch.float32) if keep else None
    rmap = torch.empty((B, H, nv, nv), dtype=torch.int8, device=dev)
    done = torch.zeros(B * H, dtype=torch.int32, device=dev)
    tv = _text_valid(text_valid, B, dev, nt > 0 or has_text_col, kv_count)
    bj = max(16, next_pow2(nv + int(has_text_col)))
    dk_chunk = min(head_dim_pad(D), 32)
    logit, gain, t_lse = pooled_scores(stats, k_text, tv, scale=scale, block=block, num_video=num_video,
                                       config=config)
    _rectified_plan_kernel[(cdiv(nv, PLAN_GROUP) + nt, B * H)](
        logit, rmap if gain is None else gain, totals if t_lse is None else t_lse, stats[2], tv,
        nbr if nbr is not None else kv_count,
        first_frame if first_frame is not None else kv_count,
        kv_index, kv_count, rect_scale, rect_bias, rmap, pg if keep else rmap, counts[0], counts[1], totals[0],
        totals[1], tile_order, done, *stats[0].stride()[:3],
        nv, nt, H, float(config.cum_threshold), int((1.0 - config.drop_rate) * nv),
        BLOCK=block, G=PLAN_GROUP, BJ=bj, BT=max(16, next_pow2(max(nt, 1))), DK=dk_chunk,
        BV=min(1024, max(16, next_pow2(nv))), BN=max(16, next_pow2(ncols)),
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), PREC="tf32x3",
        HAS_TEXT_COL=has_text_col, HAS_TEXT_BLOCKS=nt > 0, GAPR=config.gapr, HAS_NBR=nbr is not None,
        HAS_FF=first_frame is not None, KEEP_ALL=config.cum_threshold >= 1.0, KEEP_PROBS=keep,
        num_warps=PLAN_WARPS,
    )
    return dict(
        kv_index=kv_index,
        kv_count=kv_count,
        rect_scale=rect_scale,
        rect_bias=rect_bias,
        rect_map=rmap.view(torch.bool),
        rect_prob=pg if keep else None,
        density=totals[0],
        rect_frac=totals[1],
        tile_order=tile_order,
    )
