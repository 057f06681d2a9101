"""Rectified SpaAttn's pooled scores for both Triton planners (``kernels/rectified.py``, fused, and
``kernels/_rectified_rows.py``, long rows): per [32, 64] tile of (b, h)'s block-pair scores, the pooled
GEMMs q̄k̄ᵀ, δq·k̄ᵀ, q̄·δkᵀ in tf32x3 (near-fp32) into the IPAR logits (``+ln w``) and the GAPR gain
test, and q̄·k_textᵀ with an online log-sum-exp from the text keys read in place. Kept apart from
selection so each kernel's live tiles fit in registers (spec ``specs/rectified.md`` §2.4-2.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, head_dim_pad

SCORE_TILE = (32, 64)  # [rows, columns] of a scores-kernel program (8 warps: no register spills on sm_90)


@triton.jit
def _rows_dot(A, B, a_rows, a_ok, b_rows, b_ok, stride_j, acc, DK: tl.constexpr, HEAD_DIM: tl.constexpr,
              HEAD_DIM_PAD: tl.constexpr, PREC: tl.constexpr):
    """``acc + A[a_rows] @ B[b_rows]^T`` over the head dim (fp32 [rows, D] tables, unit stride on D)."""
    for d0 in tl.range(0, HEAD_DIM_PAD, DK):
        dd = d0 + tl.arange(0, DK)
        dm = dd < HEAD_DIM
        a = tl.load(A + a_rows.to(tl.int64)[:, None] * stride_j + dd[None, :], mask=a_ok[:, None] & dm[None, :],
                    other=0.0)
        b = tl.load(B + b_rows.to(tl.int64)[:, None] * stride_j + dd[None, :], mask=b_ok[:, None] & dm[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["nv", "num_video", "text_len", "scale"])
def _rectified_scores_kernel(
    QM, KM, DQ, DKS, KT, TV, LOGIT, GAIN, TLSE,
    stride_sb, stride_sh, stride_sj, stride_tb, stride_th, stride_tn,
    nv, n_heads, num_video, text_len, scale,
    BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, TL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PREC: tl.constexpr, HAS_TEXT_COL: tl.constexpr,
    IPAR: tl.constexpr, EXACT_TAIL: tl.constexpr, GAPR: tl.constexpr,
):
    """A ``[BM, BN]`` tile of (b, h)'s pooled scores: the IPAR logits ``q̄k̄ᵀ·scale + ln w`` and the GAPR
    gain test ``|q̄k̄ᵀ| > |δq·k̄ᵀ| + |q̄·δkᵀ|`` (int8); column tile 0 also writes the log-sum-exp of each
    row's valid text logits ``q̄·k_textᵀ·scale`` (online over text chunks, text keys read in place)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // n_heads
    rows = pid_m * BM + tl.arange(0, BM)
    r_ok = rows < nv
    cols = pid_n * BN + tl.arange(0, BN)
    cm = cols < nv
    sbase = bh.to(tl.int64) // n_heads * stride_sb + bh.to(tl.int64) % n_heads * stride_sh
    d = _rows_dot(QM + sbase, KM + sbase, rows, r_ok, cols, cm, stride_sj, tl.zeros([BM, BN], tl.float32),
                  DK, HEAD_DIM, HEAD_DIM_PAD, PREC)
    lw = 0.0
    if IPAR:
        w = tl.zeros([BN], tl.int32) + BLOCK
        if EXACT_TAIL:  # the last block's true token count
            w = tl.where(cols == nv - 1, num_video - (nv - 1) * BLOCK, w)
        lw = tl.log(w.to(tl.float32))[None, :]
    out = bh.to(tl.int64) * nv * nv + rows.to(tl.int64)[:, None] * nv + cols[None, :]
    rc = r_ok[:, None] & cm[None, :]
    tl.store(LOGIT + out, d * scale + lw, mask=rc)
    if GAPR:
        e1 = _rows_dot(DQ + sbase, KM + sbase, rows, r_ok, cols, cm, stride_sj, tl.zeros([BM, BN], tl.float32),
                       DK, HEAD_DIM, HEAD_DIM_PAD, PREC)
        e2 = _rows_dot(QM + sbase, DKS + sbase, rows, r_ok, cols, cm, stride_sj, tl.zeros([BM, BN], tl.float32),
                       DK, HEAD_DIM, HEAD_DIM_PAD, PREC)
        tl.store(GAIN + out, (tl.abs(d) > tl.abs(e1) + tl.abs(e2)).to(tl.int8), mask=rc)
    if HAS_TEXT_COL:
        if pid_n == 0:
            tvalid = tl.minimum(tl.maximum(tl.load(TV + b), 0), text_len)
            t_m = tl.full([BM], float("-inf"), tl.float32)
            t_l = tl.zeros([BM], tl.float32)
            kt_base = KT + bh.to(tl.int64) // n_heads * stride_tb + bh.to(tl.int64) % n_heads * stride_th
            for t0 in range(0, tvalid, TL):
                tt = t0 + tl.arange(0, TL)
                t_ok = tt < tvalid
                st = tl.zeros([BM, TL], tl.float32)
                for d0 in tl.static_range(0, HEAD_DIM_PAD, DK):
                    dd = d0 + tl.arange(0, DK)
                    dm = dd < HEAD_DIM
                    qa = tl.load(QM + sbase + rows.to(tl.int64)[:, None] * stride_sj + dd[None, :],
                                 mask=r_ok[:, None] & dm[None, :], other=0.0)
                    kt = tl.load(kt_base + tt.to(tl.int64)[:, None] * stride_tn + dd[None, :],
                                 mask=t_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
                    st = tl.dot(qa, tl.trans(kt), st, input_precision=PREC)
                st = tl.where(t_ok[None, :], st * scale, float("-inf"))
                m_new = tl.maximum(t_m, tl.max(st, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                t_l = t_l * tl.exp(t_m - m_safe) + tl.sum(tl.exp(st - m_safe[:, None]), 1)
                t_m = m_new
            t_lse = tl.where(t_l > 0, t_m + tl.log(t_l), float("-inf"))
            tl.store(TLSE + bh.to(tl.int64) * nv + rows, t_lse, mask=r_ok)


def fp32_stats(*stats: torch.Tensor) -> list[torch.Tensor]:
    """The planners' statistics as fp32 tensors sharing one layout with a dense head dim."""
    if any(s.stride() != stats[0].stride() or s.dtype != torch.float32 for s in stats) or stats[0].stride(-1) != 1:
        return [s.float().contiguous() for s in stats]
    return list(stats)


def _text_valid(text_valid, B: int, device, needed: bool, placeholder: torch.Tensor) -> torch.Tensor:
    """Valid text lengths for the kernels: zeros when text is present but no lengths were given (as
    the torch planner's 0 valid text blocks), a placeholder that is never read when there is no text."""
    if text_valid is not None:
        return text_valid
    return torch.zeros(B, dtype=torch.int32, device=device) if needed else placeholder


def pooled_scores(stats, k_text, text_valid, *, scale: float, block: int, num_video: int, config):
    """``(logit, gain, t_lse)`` of ``_rectified_scores_kernel`` for fp32 statistics ``(q̄, k̄, V̄, δq, δk)``
    (``fp32_stats``): IPAR logits fp32 ``[B, H, n_v, n_v]``, the GAPR gain test int8 (None without GAPR)
    and the text log-sum-exp fp32 ``[B, H, n_v]`` (None without a text column). Any ``n_v``.
    ``text_valid``: int32 ``[B]`` valid text lengths (see ``_text_valid``)."""
    qm = stats[0]
    B, H, nv, D = qm.shape
    dev = qm.device
    has_text_col = k_text is not None and config.ipar
    if has_text_col:
        k_text = k_text if k_text.stride(-1) == 1 else k_text.contiguous()
        strides_t = (k_text.stride(0), k_text.stride(1), k_text.stride(2))
    else:
        k_text, strides_t = qm, (0, 0, 0)
    logit = torch.empty((B, H, nv, nv), dtype=torch.float32, device=dev)
    gain = torch.empty((B, H, nv, nv), dtype=torch.int8, device=dev) if config.gapr else None
    t_lse = torch.empty((B, H, nv), dtype=torch.float32, device=dev) if has_text_col else None
    dpad = head_dim_pad(D)
    _rectified_scores_kernel[(cdiv(nv, SCORE_TILE[0]), cdiv(nv, SCORE_TILE[1]), B * H)](
        stats[0], stats[1], stats[3], stats[4], k_text,
        text_valid if has_text_col else logit,  # read only with a text column
        logit, logit if gain is None else gain, logit if t_lse is None else t_lse,
        *qm.stride()[:3], *strides_t,
        nv, H, num_video, k_text.shape[2] if has_text_col else 0, scale,
        BLOCK=block, BM=SCORE_TILE[0], BN=SCORE_TILE[1], DK=min(dpad, 32), TL=32, HEAD_DIM=D, HEAD_DIM_PAD=dpad,
        PREC="tf32x3",  # ~fp32 accuracy on tensor cores (the interpreter computes in fp32)
        HAS_TEXT_COL=has_text_col, IPAR=config.ipar, EXACT_TAIL=config.tail == "exact", GAPR=config.gapr,
        num_warps=8,
    )
    return logit, gain, t_lse
