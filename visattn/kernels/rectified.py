"""Rectified SpaAttn kernels: per-block statistics (Triton), the planner, and the rectified forward.

"Rectified SpaAttn" (Liu, Li, Zhang, Chen, Gu; https://arxiv.org/abs/2511.19835); semantics in
``specs/rectified.md`` §2.

- ``_rectified_stats_kernel``: one program per (visual block, batch x head) reads its q, k, v tile
  once and writes the fp32 means q̄, k̄, V̄ and the mean absolute deviations δq, δk over the valid
  tokens (``tail="exact"``) or over the zero-padded block (``tail="upstream"``, parity only).
- ``_rectified_plan_kernel`` / ``plan_tensors_triton``: the planner, fused: the pooled GEMMs (q̄k̄ᵀ,
  δq·k̄ᵀ, q̄·δkᵀ, q̄·k_textᵀ with its log-sum-exp) run as batched matmuls, then one program per
  (query block, batch x head) does the IPAR softmax with ``+ln w``, a ``tl.sort`` of packed
  (probability, index) keys, cumsum, count, neighbour row, first frame, the GAPR test, R, P ⊙ 𝒢 and
  the index list; C = (P ⊙ 𝒢) V̄ is one more batched matmul. Up to 2047 visual blocks per row.
- ``plan_tensors``: the same planner as device-side torch ops (any dtype; the ``"torch"`` backend,
  float64 planning, and rows longer than the fused kernel's sort).
Attention runs on the shared block-sparse core (``kernels/block_sparse.py``) with segments and the
``rect_scale``/``rect_bias`` epilogue (``ops/rectified.py``); one launch covers video and text tiles.

Caution/limits: Triton 3.6 (GPU) / the interpreter on CPU; fp16, bf16, fp32; head dims up to 256.
The fused planner keeps fp32 statistics; its selection can differ from a float64 plan only at exact
cumulative-threshold ties (rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _bh_ids, _load_tile, _tile_mask, head_dim_pad


@triton.jit(do_not_specialize=["video_start", "num_video"])
def _rectified_stats_kernel(
    Q,
    K,
    V,
    QM,
    KM,
    VM,
    DQ,
    DK,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    video_start,
    num_video,
    n_blocks,
    n_heads,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPSTREAM_TAIL: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, _ = _bh_ids(pid_bh, n_heads, 1)
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    local = pid_j * BLOCK
    row_ok = (local + offs_r) < num_video
    mask = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    start = video_start + local
    if UPSTREAM_TAIL:
        # upstream pools the zero-padded tail block over all BLOCK rows
        cnt = BLOCK * 1.0
        dev_rows = offs_r >= 0
    else:
        cnt = tl.minimum(num_video - local, BLOCK).to(tl.float32)
        dev_rows = row_ok
    out = (pid_bh.to(tl.int64) * n_blocks + pid_j) * HEAD_DIM + offs_d
    dmask = offs_d < HEAD_DIM
    # one tensor at a time keeps a single [BLOCK, D] fp32 tile live (register pressure at D = 128)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, start, stride_qn, offs_r, offs_d, mask).to(tl.float32)
    qm = tl.sum(q, 0) / cnt
    dq = tl.sum(tl.where(dev_rows[:, None], tl.abs(q - qm[None, :]), 0.0), 0) / cnt
    tl.store(QM + out, qm, mask=dmask)
    tl.store(DQ + out, dq, mask=dmask)
    k = _load_tile(K + b * stride_kb + h * stride_kh, start, stride_kn, offs_r, offs_d, mask).to(tl.float32)
    km = tl.sum(k, 0) / cnt
    dk = tl.sum(tl.where(dev_rows[:, None], tl.abs(k - km[None, :]), 0.0), 0) / cnt
    tl.store(KM + out, km, mask=dmask)
    tl.store(DK + out, dk, mask=dmask)
    v = _load_tile(V + b * stride_vb + h * stride_vh, start, stride_vn, offs_r, offs_d, mask).to(tl.float32)
    tl.store(VM + out, tl.sum(v, 0) / cnt, mask=dmask)


def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(2), t.stride(1)


def block_stats_triton(q, k, v, video_start: int, num_video: int, block: int, upstream_tail: bool):
    """q/k/v: [B, N, H, D] views, dense head dim. Returns fp32 (q̄, k̄, V̄, δq, δk), each [B, H, n_v, D]."""
    B, _, H, D = q.shape
    nv = triton.cdiv(num_video, block)
    outs = [torch.empty((B, H, nv, D), device=q.device, dtype=torch.float32) for _ in range(5)]
    _rectified_stats_kernel[(nv, B * H)](
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
        HEAD_DIM_PAD=head_dim_pad(D),
        UPSTREAM_TAIL=upstream_tail,
        num_warps=4 if block <= 64 else 8,
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
# fused planner: one program per (visual query block, batch x head) does the row-wise part


@triton.jit(do_not_specialize=["nv", "nt", "k_min", "tau", "scale"])
def _rectified_plan_kernel(
    DOTS,
    E1,
    E2,
    TXT,
    LOGW,
    NBR,
    FF,
    TV,
    KV_INDEX,
    KV_COUNT,
    RSCALE,
    PG,
    RMAP,
    KCNT,
    RCNT,
    nv,
    nt,
    n_heads,
    scale,
    tau,
    k_min,
    BLOCK: tl.constexpr,
    BJ: tl.constexpr,
    BT: tl.constexpr,
    HAS_TEXT_COL: tl.constexpr,
    HAS_TEXT_BLOCKS: tl.constexpr,
    GAPR: tl.constexpr,
    HAS_NBR: tl.constexpr,
    HAS_FF: tl.constexpr,
    KEEP_ALL: tl.constexpr,
):
    """Row I of (b, h): IPAR softmax (``+ln w``, text merged from its log-sum-exp), selection by a sort
    of packed (probability, index) keys, neighbours, first frame, the GAPR test, R, P ⊙ 𝒢 and the
    index list (kept visual ascending, valid text, then the rest so every slot is written once)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    cols = tl.arange(0, BJ)
    cm = cols < nv
    row = (bh.to(tl.int64) * nv + i) * nv
    d = tl.load(DOTS + row + cols, mask=cm, other=0.0)
    lw = tl.load(LOGW + cols, mask=cm, other=0.0)
    logit = tl.where(cm, d * scale + lw, float("-inf"))
    m = tl.max(logit, 0)
    if HAS_TEXT_COL:
        t_lse = tl.load(TXT + bh.to(tl.int64) * nv + i)
        m = tl.maximum(m, t_lse)
    e = tl.where(cm, tl.exp(logit - m), 0.0)
    z = tl.sum(e, 0)
    if HAS_TEXT_COL:
        et = tl.where(t_lse == float("-inf"), 0.0, tl.exp(t_lse - m))
        z += et
        p_col = tl.where(cols == nv, et / z, e / z)
        ncol = nv + 1
    else:
        p_col = e / z
        ncol = nv
    p = e / z
    valid_col = cols < ncol
    # descending by probability, ties: lower index first; probabilities >= 0 sort like their bits
    bits = p_col.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(valid_col, (bits << 32) | (2147483647 - cols).to(tl.int64), -1)
    sk = tl.sort(key, descending=True)
    sp = tl.where(sk >= 0, (sk >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    cs = tl.cumsum(sp, 0)
    if KEEP_ALL:
        count = ncol
    else:
        n_le = tl.sum(((cs <= tau) & valid_col).to(tl.int32), 0)
        count = tl.minimum(tl.maximum(n_le + 1, k_min), ncol)
    thr = tl.sum(tl.where(cols == count - 1, sk, 0), 0)  # the count-th largest key
    kept = cm & (key >= thr)
    if HAS_NBR:
        kept = kept | (tl.load(NBR + i.to(tl.int64) * nv + cols, mask=cm, other=0) != 0)
    if HAS_FF:
        ffi = tl.load(FF + i)
        kept = kept | ((ffi != 0) & (tl.load(FF + cols, mask=cm, other=0) != 0))
    kept = kept & cm
    if GAPR:
        err = tl.abs(tl.load(E1 + row + cols, mask=cm, other=0.0)) + tl.abs(
            tl.load(E2 + row + cols, mask=cm, other=0.0)
        )
        rect = cm & (kept == 0) & (tl.abs(d) > err)
    else:
        rect = cols < 0
    pg = tl.where(rect, p, 0.0)
    tl.store(PG + row + cols, pg, mask=cm)
    tl.store(RMAP + row + cols, rect.to(tl.int8), mask=cm)
    n_tiles = nv + nt
    tile = bh.to(tl.int64) * n_tiles + i
    tl.store(RSCALE + tile, 1.0 - tl.sum(pg, 0))
    ki = kept.to(tl.int32)
    nkept = tl.sum(ki, 0)
    ntv = 0
    if HAS_TEXT_BLOCKS:
        ntv = (tl.load(TV + b) + BLOCK - 1) // BLOCK
    notk = (cm & (kept == 0)).to(tl.int32)
    pos = tl.where(kept, tl.cumsum(ki, 0) - 1, nkept + ntv + tl.cumsum(notk, 0) - 1)
    base = KV_INDEX + tile * (nv + nt)
    tl.store(base + pos, cols, mask=cm)
    if HAS_TEXT_BLOCKS:
        tc = tl.arange(0, BT)
        tl.store(base + tl.where(tc < ntv, nkept + tc, nv + tc), nv + tc, mask=tc < nt)
    tl.store(KV_COUNT + tile, nkept + ntv)
    tl.store(KCNT + bh.to(tl.int64) * nv + i, nkept)
    tl.store(RCNT + bh.to(tl.int64) * nv + i, tl.sum(rect.to(tl.int32), 0))


MAX_FUSED_BLOCKS = 2047  # tl.sort over next_pow2(n_v + 1) <= 2048 columns per program


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
    """:func:`plan_tensors` with the row-wise part fused in one Triton kernel (fp32 statistics)."""
    B, H, nv, D = qm.shape
    dev = qm.device
    nt = n_text_blocks
    ncols = nv + nt
    kmT = km.transpose(-1, -2)
    dots = qm @ kmT
    e1 = dq @ kmT if config.gapr else dots
    e2 = qm @ dk.transpose(-1, -2) if config.gapr else dots
    w = block_weights(nv, block, num_video, config.tail == "exact", torch.float32, dev)
    logw = w.log() if config.ipar else torch.zeros_like(w)
    has_text_col = k_text is not None and config.ipar
    txt = dots
    if has_text_col:
        st = (qm @ k_text.transpose(-1, -2)) * scale  # [B, H, n_v, L]
        tmask = torch.arange(k_text.shape[2], device=dev)[None, :] < text_valid[:, None]
        txt = st.masked_fill(~tmask[:, None, None, :], float("-inf")).logsumexp(-1)
    tv = text_valid if (nt and text_valid is not None) else torch.zeros(B, dtype=torch.int32, device=dev)
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
    _rectified_plan_kernel[(nv, B * H)](
        dots,
        e1,
        e2,
        txt,
        logw,
        nbr if nbr is not None else dummy,
        first_frame if first_frame is not None else dummy,
        tv,
        kv_index,
        kv_count,
        rect_scale,
        pg,
        rmap,
        kcnt,
        rcnt,
        nv,
        nt,
        H,
        scale,
        float(config.cum_threshold),
        int((1.0 - config.drop_rate) * nv),
        BLOCK=block,
        BJ=triton.next_power_of_2(nv + 1),
        BT=triton.next_power_of_2(max(nt, 1)),
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
        rect_bias[:, :, :nv].copy_(pg @ vm)
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
    )
