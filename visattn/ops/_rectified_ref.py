"""Rectified SpaAttn reference (``specs/rectified.md`` §2.3-2.7), written from the spec.

Float64, one query block at a time, independent of the planner in ``kernels/rectified.py``: block
statistics by slicing, ranks by pairwise comparison (no sort), token masks per block. Used by the
tests, the benchmarks and as the oracle of the ``"torch"`` backend's planner.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_scale
from ._layout import SequenceLayout
from ._types import Layout
from .rectified_plan import RectifiedConfig


def rectified_attention_ref(
    q,
    k,
    v,
    *,
    seq_layout: SequenceLayout,
    config: RectifiedConfig | None = None,
    layout: Layout = "BNHD",
    scale: float | None = None,
    upcast: bool = True,
    return_maps: bool = False,
):
    """Pure-PyTorch reference of spec §2.3-2.7, independent of the planner (no sort: ranks by pairwise
    comparison). Returns ``out`` (q's layout and dtype) or, with ``return_maps``, ``(out, kept, rect,
    R, C)`` with kept/rect bool ``[B, H, n_v, n_v]``, R ``[B, H, n_v]``, C ``[B, H, n_v, D]``."""
    from .rectified import _bhnd, _check_config, _check_inputs, _tables  # shared checks (import cycle)

    config = _check_config(config)
    layout, B, N, H, D = _check_inputs(q, k, v, layout, seq_layout, True)
    scale = check_scale(scale, D)
    dt = torch.float64 if upcast else q.dtype
    qc, kc, vc = (_bhnd(t, layout).to(dt) for t in (q, k, v))  # [B, H, N, D]
    lay, b = seq_layout, config.block_size
    Nv, vs, ts, L = lay.num_video, lay.video_start, lay.text_start, lay.text_len
    nv = -(-Nv // b)
    dev = q.device
    tv = lay.valid_text(B, dev).long()
    spans = [(vs + j * b, vs + min((j + 1) * b, Nv)) for j in range(nv)]
    div = [float(b) if config.tail == "upstream" else float(e - s) for s, e in spans]
    mean = lambda x, j: x[:, :, spans[j][0] : spans[j][1]].sum(2) / div[j]  # noqa: E731

    def dev_mean(x, m, j):  # mean |x - m| over the block (zero-padded tail rows count for "upstream")
        s, e = spans[j]
        d = (x[:, :, s:e] - m[:, :, None]).abs().sum(2)
        if config.tail == "upstream":
            d = d + (b - (e - s)) * m.abs()
        return d / div[j]

    qm = torch.stack([mean(qc, j) for j in range(nv)], 2)
    km = torch.stack([mean(kc, j) for j in range(nv)], 2)
    vm = torch.stack([mean(vc, j) for j in range(nv)], 2)
    dq = torch.stack([dev_mean(qc, qm[:, :, j], j) for j in range(nv)], 2)
    dk = torch.stack([dev_mean(kc, km[:, :, j], j) for j in range(nv)], 2)
    logw = torch.tensor(div, dtype=dt, device=dev).log()
    text_ok = torch.arange(L, device=dev)[None, :] < tv[:, None]  # [B, L]
    nbr, ff = _tables(lay, config, dev)
    k_min = int((1.0 - config.drop_rate) * nv)
    # key validity over the whole sequence: video keys always, text keys up to the valid length
    key_ok = torch.ones(B, N, dtype=torch.bool, device=dev)
    if L:
        key_ok[:, ts : ts + L] = text_ok
    key_blk = torch.full((N,), -1, dtype=torch.long, device=dev)
    key_blk[vs : vs + Nv] = torch.arange(Nv, device=dev) // b
    out = torch.zeros_like(qc)
    kept_all = torch.zeros(B, H, nv, nv, dtype=torch.bool, device=dev)
    rect_all = torch.zeros_like(kept_all)
    R_all = torch.ones(B, H, nv, dtype=dt, device=dev)
    C_all = torch.zeros(B, H, nv, D, dtype=dt, device=dev)
    for i in range(nv):
        s_vis = scale * torch.einsum("bhd,bhjd->bhj", qm[:, :, i], km)
        if config.ipar:
            z = [s_vis + logw]
            if L:
                s_t = scale * torch.einsum("bhd,bhtd->bht", qm[:, :, i], kc[:, :, ts : ts + L])
                z.append(s_t.masked_fill(~text_ok[:, None, :], float("-inf")))
            e = torch.cat(z, -1)
            e = torch.exp(e - e.amax(-1, keepdim=True))
            p_all = e / e.sum(-1, keepdim=True)
            P = p_all[..., :nv]
            cols = torch.cat([P, p_all[..., nv:].sum(-1, keepdim=True)], -1) if L else P
        else:
            P = torch.softmax(s_vis, -1)
            cols = P
        nc = cols.shape[-1]
        idx = torch.arange(nc, device=dev)
        # rank_c = number of columns ahead of c (larger mass, or equal mass and a lower index)
        ahead = (cols[..., None, :] > cols[..., :, None]) | (
            (cols[..., None, :] == cols[..., :, None]) & (idx[None, :] < idx[:, None])
        )
        rank = ahead.sum(-1)
        through = (cols[..., None, :] * (rank[..., None, :] <= rank[..., :, None])).sum(-1)
        n_le = (through <= (math.inf if config.cum_threshold >= 1.0 else config.cum_threshold)).sum(-1)
        count = torch.clamp(torch.maximum(n_le + 1, torch.full_like(n_le, k_min)), max=nc)
        kept = (rank < count[..., None])[..., :nv]
        if nbr is not None:
            kept = kept | nbr[i]
        if ff is not None and bool(ff[i]):
            kept = kept | ff
        if config.gapr:
            gain = torch.einsum("bhd,bhjd->bhj", qm[:, :, i], km).abs()
            err = (
                torch.einsum("bhd,bhjd->bhj", dq[:, :, i], km).abs()
                + torch.einsum("bhd,bhjd->bhj", qm[:, :, i], dk).abs()
            )
            rect = ~kept & (gain > err)
        else:
            rect = torch.zeros_like(kept)
        R = 1.0 - (P * rect).sum(-1)
        C = torch.einsum("bhj,bhjd->bhd", P * rect, vm)
        s, e_ = spans[i]
        tok_kept = torch.where(
            key_blk >= 0,
            kept.gather(-1, key_blk.clamp(min=0).expand(B, H, N)),
            key_ok[:, None, :].expand(B, H, N),
        )
        tok_kept = tok_kept & key_ok[:, None, :]
        o_sp = _masked_attention(qc[:, :, s:e_], kc, vc, tok_kept, scale)
        out[:, :, s:e_] = R[..., None, None] * o_sp + C[:, :, None, :]
        kept_all[:, :, i], rect_all[:, :, i], R_all[:, :, i], C_all[:, :, i] = kept, rect, R, C
    if L:  # text query rows: dense over all valid keys
        out[:, :, ts : ts + L] = _masked_attention(
            qc[:, :, ts : ts + L], kc, vc, key_ok[:, None, :].expand(B, H, N), scale
        )
    out = out.to(q.dtype)
    out = out.transpose(1, 2) if layout == "BNHD" else out
    return (out, kept_all, rect_all, R_all, C_all) if return_maps else out


def _masked_attention(q, k, v, key_mask, scale):
    """softmax(scale q kᵀ) v over the keys with ``key_mask`` [B, H, N] (rows with no key give 0)."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_mask[:, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    d = e.sum(-1, keepdim=True)
    return (e / torch.where(d > 0, d, torch.ones_like(d))) @ v
