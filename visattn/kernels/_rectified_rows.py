"""Rectified SpaAttn's row planner for long rows (``MAX_FUSED_BLOCKS < n_v <= MAX_ROW_BLOCKS``).

The fused planner of ``kernels/rectified.py`` handles up to 511 visual blocks (wider [16, 1024] row
sorts compile too slowly); 720p video and larger (HunyuanVideo 720p: 929 blocks) run this planner:
the pooled scores from the fused planner's ``pooled_scores`` (IPAR logits, GAPR gain test, text
log-sum-exp), then one program per (query block, batch x head) does the softmax, the shared selection
(``tl.sort`` of the probabilities, cumsum, count, ties by index, neighbour row, first frame), the
rectified set, R, P ⊙ 𝒢 and the index list; C = (P ⊙ 𝒢) V̄ is one batched matmul. Same selection
rules as ``plan_tensors``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from ._rectified_select import _probabilities, _select_blocks, _store_lists
from ._rectified_scores import _text_valid, fp32_stats, pooled_scores


@triton.jit(do_not_specialize=["nv", "nt", "k_min", "tau"])
def _rectified_row_plan_kernel(
    LOGIT, GAIN, TLSE, NBR, FF, TV, KV_INDEX, KV_COUNT, RSCALE, PG, RMAP, KCNT, RCNT,
    nv, nt, n_heads, tau, k_min,
    BLOCK: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr, HAS_TEXT_COL: tl.constexpr,
    HAS_TEXT_BLOCKS: tl.constexpr, GAPR: tl.constexpr, HAS_NBR: tl.constexpr, HAS_FF: tl.constexpr,
    KEEP_ALL: tl.constexpr,
):
    """Row I of (b, h), from ``pooled_scores``' logits, gain test and text log-sum-exp: the IPAR softmax
    (text merged into one column), the shared selection (``_select_blocks``), the rectified set, R,
    P ⊙ 𝒢 and the index list (``_store_lists``)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    cols = tl.arange(0, BJ)
    cm = cols < nv
    row = (bh.to(tl.int64) * nv + i) * nv
    # the shared probability, selection and list helpers take [G, BJ] tiles: this row is a [1, BJ] tile
    rows = i + tl.arange(0, 1)
    r_ok = rows < nv
    logit = tl.load(LOGIT + row + cols[None, :], mask=cm[None, :], other=float("-inf"))
    t_lse = 0.0
    if HAS_TEXT_COL:
        t_lse = tl.load(TLSE + bh.to(tl.int64) * nv + rows)
    p, p_col, ncol = _probabilities(logit, t_lse, cols, cm, nv, HAS_TEXT_COL)
    kept = _select_blocks(p_col, rows, r_ok, cols, cm, ncol, nv, tau, k_min, NBR, FF, KEEP_ALL, HAS_NBR, HAS_FF)
    if GAPR:
        rect = (tl.load(GAIN + row + cols, mask=cm, other=0) != 0)[None, :] & (kept == 0)
    else:
        rect = kept & (kept == 0)
    pg = tl.where(rect, p, 0.0)
    tl.store(PG + row + cols[None, :], pg, mask=cm[None, :])
    tl.store(RMAP + row + cols[None, :], rect.to(tl.int8), mask=cm[None, :])
    tile = bh.to(tl.int64) * (nv + nt) + rows
    tl.store(RSCALE + tile, 1.0 - tl.sum(pg, 1))
    ntv = 0
    if HAS_TEXT_BLOCKS:
        ntv = (tl.load(TV + b) + BLOCK - 1) // BLOCK
    _store_lists(KV_INDEX, KV_COUNT, KCNT, RCNT, tile, bh.to(tl.int64) * nv + rows, r_ok, cols, cm, kept, rect, ntv,
                 nv, nt, BT, HAS_TEXT_BLOCKS)


MAX_ROW_BLOCKS = 2047  # tl.sort over next_pow2(n_v + 1) <= 2048 columns per program


def plan_tensors_rows(
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
    """:func:`plan_tensors` for ``MAX_FUSED_BLOCKS < n_v <= MAX_ROW_BLOCKS``: ``pooled_scores``, then one
    Triton program per row (fp32 statistics); also returns ``tile_order``."""
    B, H, nv, D = qm.shape
    dev = qm.device
    nt = n_text_blocks
    ncols = nv + nt
    has_text_col = k_text is not None and config.ipar
    stats = fp32_stats(qm, km, vm, dq, dk)
    tv = _text_valid(text_valid, B, dev, True, None)
    logit, gain, t_lse = pooled_scores(stats, k_text, tv, scale=scale, block=block, num_video=num_video,
                                       config=config)
    kv_index = torch.empty((B, H, ncols, ncols), dtype=torch.int32, device=dev)
    kv_count = torch.empty((B, H, ncols), dtype=torch.int32, device=dev)
    rect_scale = torch.ones((B, H, ncols), dtype=torch.float32, device=dev)
    pg = torch.empty((B, H, nv, nv), dtype=torch.float32, device=dev)
    rmap = torch.empty((B, H, nv, nv), dtype=torch.int8, device=dev)
    kcnt = torch.empty((B, H, nv), dtype=torch.int32, device=dev)
    rcnt = torch.empty((B, H, nv), dtype=torch.int32, device=dev)
    if nt:  # text query tiles: every video block and the valid text blocks, R = 1, C = 0
        kv_index[:, :, nv:] = torch.arange(ncols, dtype=torch.int32, device=dev)
        kv_count[:, :, nv:] = (nv + (tv + block - 1) // block)[:, None, None].to(torch.int32)
    dummy = kcnt
    _rectified_row_plan_kernel[(nv, B * H)](
        logit, rmap if gain is None else gain, logit if t_lse is None else t_lse,
        nbr if nbr is not None else dummy, first_frame if first_frame is not None else dummy, tv,
        kv_index, kv_count, rect_scale, pg, rmap, kcnt, rcnt,
        nv, nt, H, float(config.cum_threshold), int((1.0 - config.drop_rate) * nv),
        BLOCK=block,
        BJ=next_pow2(nv + 1),
        BT=next_pow2(max(nt, 1)),
        HAS_TEXT_COL=has_text_col,
        HAS_TEXT_BLOCKS=nt > 0,
        GAPR=config.gapr,
        HAS_NBR=nbr is not None,
        HAS_FF=first_frame is not None,
        KEEP_ALL=config.cum_threshold >= 1.0,
        num_warps=4 if nv < 512 else 8,
    )
    rect_bias = torch.zeros((B, H, ncols, D), dtype=torch.float32, device=dev)
    if config.gapr:
        rect_bias[:, :, :nv].copy_(pg @ stats[2])
    dropped = nv * nv - kcnt.sum(-1)
    return dict(
        kv_index=kv_index,
        kv_count=kv_count,
        rect_scale=rect_scale,
        rect_bias=rect_bias,
        rect_map=rmap.bool(),
        rect_prob=pg if keep_probs and config.gapr else None,
        density=kcnt.sum(-1).float() / (nv * nv),
        rect_frac=rcnt.sum(-1).float() / dropped.clamp(min=1).float(),
        tile_order=kv_count.argsort(dim=-1, descending=True, stable=True).to(torch.int32),
    )
