"""Rectified SpaAttn's block selection and index-list writer, shared by both Triton planners.

``kernels/rectified.py`` (fused planner, ``[16, BJ]`` query-block tiles) and
``kernels/_rectified_rows.py`` (one ``[1, BJ]`` row per program, long rows) compute the IPAR
probabilities, select blocks and write the lists with these functions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _probabilities(logit, t_lse, cols, cm, nv, HAS_TEXT_COL: tl.constexpr):
    """IPAR probabilities of ``[G, BJ]`` pooled logits (``-inf`` off the visual columns) with the rows'
    text log-sum-exp ``t_lse`` ``[G]`` merged into column ``nv``: returns ``(p, p_col, ncol)``, ``p`` the
    visual columns only. Rows with no finite logit get zeros (no NaN)."""
    m = tl.max(logit, 1)
    if HAS_TEXT_COL:
        m = tl.maximum(m, t_lse)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(cm[None, :], tl.exp(logit - m[:, None]), 0.0)
    z = tl.sum(e, 1)
    if HAS_TEXT_COL:
        et = tl.where(t_lse == float("-inf"), 0.0, tl.exp(t_lse - m))
        z += et
    z = tl.where(z > 0, z, 1.0)
    p = e / z[:, None]
    if HAS_TEXT_COL:
        p_col = tl.where(cols[None, :] == nv, (et / z)[:, None], p)
        ncol = nv + 1
    else:
        p_col = p
        ncol = nv
    return p, p_col, ncol


@triton.jit
def _select_blocks(p_col, rows, r_ok, cols, cm, ncol, nv, tau, k_min, NBR, FF, KEEP_ALL: tl.constexpr,
                   HAS_NBR: tl.constexpr, HAS_FF: tl.constexpr):
    """Kept visual blocks ``[G, BJ]`` of query rows ``rows`` (spec §2.5), shared by both Triton planners.

    ``p_col`` ``[G, BJ]``: IPAR probabilities of the ``ncol`` columns (visual blocks, then text merged
    into column ``nv``). Selection: the largest columns until the cumulative mass passes ``tau``, at
    least ``k_min`` (ties: lower index first), then the neighbour table and first-frame blocks.
    """
    valid_col = (cols < ncol)[None, :]
    if KEEP_ALL:
        kept = cm[None, :] & valid_col
    else:
        # descending probabilities (fp32 values; -1 marks columns that do not exist), running mass
        val = tl.where(valid_col, p_col, -1.0)
        sv = tl.sort(val, dim=1, descending=True)
        cs = tl.cumsum(tl.maximum(sv, 0.0), 1)
        n_le = tl.sum(((cs <= tau) & valid_col).to(tl.int32), 1)
        count = tl.minimum(tl.maximum(n_le + 1, k_min), ncol)
        thr = tl.max(tl.where(cols[None, :] == count[:, None] - 1, sv, -1.0), 1)  # the count-th largest
        # every column above thr, then the lowest-index columns equal to thr until count are kept
        # (the order of packed (probability, -index) keys, without carrying 64-bit keys)
        above = val > thr[:, None]
        tie = val == thr[:, None]
        need = count - tl.sum(above.to(tl.int32), 1)
        kept = cm[None, :] & (above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= need[:, None])))
    if HAS_NBR:
        pair = rows.to(tl.int64)[:, None] * nv + cols[None, :]
        kept = kept | (tl.load(NBR + pair, mask=r_ok[:, None] & cm[None, :], other=0) != 0)
    if HAS_FF:
        ffi = tl.load(FF + rows, mask=r_ok, other=0) != 0
        ffj = tl.load(FF + cols, mask=cm, other=0) != 0
        kept = kept | (ffi[:, None] & ffj[None, :])
    return kept & cm[None, :]


@triton.jit
def _store_lists(KV_INDEX, KV_COUNT, KCNT, RCNT, tile, stat, r_ok, cols, cm, kept, rect, ntv, nv, nt,
                 BT: tl.constexpr, HAS_TEXT_BLOCKS: tl.constexpr):
    """Index lists of query tiles ``tile`` ``[G]`` (kept visual blocks ascending, the ``ntv`` valid text
    blocks, then the rest, so every slot is written once), their counts, and the kept / rectified
    block counts per row at ``stat``; shared by both Triton planners."""
    ki = kept.to(tl.int32)
    nkept = tl.sum(ki, 1)
    notk = (cm[None, :] & (kept == 0)).to(tl.int32)
    pos = tl.where(kept, tl.cumsum(ki, 1) - 1, (nkept + ntv)[:, None] + tl.cumsum(notk, 1) - 1)
    base = KV_INDEX + tile * (nv + nt)
    tl.store(base[:, None] + pos, tl.zeros_like(pos) + cols[None, :], mask=r_ok[:, None] & cm[None, :])
    if HAS_TEXT_BLOCKS:
        tc = tl.arange(0, BT)
        tpos = tl.where(tc[None, :] < ntv, nkept[:, None] + tc[None, :], nv + tc[None, :])
        tl.store(base[:, None] + tpos, tl.zeros_like(tpos) + nv + tc[None, :], mask=r_ok[:, None] & (tc < nt)[None, :])
    tl.store(KV_COUNT + tile, nkept + ntv, mask=r_ok)
    tl.store(KCNT + stat, nkept, mask=r_ok)
    tl.store(RCNT + stat, tl.sum(rect.to(tl.int32), 1), mask=r_ok)
