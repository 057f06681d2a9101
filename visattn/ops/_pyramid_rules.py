"""PSA planning on the device: importance estimators (§2.4), level assignment (§2.5), the similarity cap
and text rules, turned into a :class:`PyramidPlan`. Pure tensor ops, no host sync.

Tensors here are ``[B, H, N, D]`` views. Scores cover video blocks only (``n_q x n_k``); text blocks
are appended by :func:`build_plan`.
"""

from __future__ import annotations

import math

import torch

from ._layout import SequenceLayout
from ._pyramid_config import FACTORS, PyramidConfig
from .pyramid_plan import PyramidPlan, _cdiv

_CHUNK_BYTES = 256 << 20  # bound on the logits scratch of one chunk of the torch estimators


def _video_span(seq_len: int, seq_layout: SequenceLayout | None) -> tuple[int, int]:
    if seq_layout is None:
        return 0, seq_len
    return seq_layout.video_start, seq_layout.num_video


def sample_offsets(
    B: int, H: int, block: int, n: int, device, generator: torch.Generator | None
) -> torch.Tensor:
    """``n`` distinct offsets in ``[0, block)`` per (batch, head), int64 ``[B, H, n]``.

    With a generator they come from it; without one from a fixed integer hash computed on the device
    (reproducible, no global RNG, capturable in a CUDA graph).
    """
    if generator is not None:
        r = torch.rand((B, H, block), generator=generator, device=generator.device).to(device)
    else:
        i = torch.arange(B * H * block, device=device, dtype=torch.int64).view(B, H, block)
        r = ((i * 2654435761 + 40503) % 2147483647 * 48271) % 2147483647  # two Lehmer steps
    return r.argsort(dim=-1)[..., :n]


def _sample_index(
    B: int,
    H: int,
    start: int,
    length: int,
    block: int,
    n: int,
    device,
    generator: torch.Generator | None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Rows ``start + I*block + min(off, len_I - 1)`` of every block I of a segment (int64 ``[B, H, nb*n]``),
    or with ``chunk`` in the Triton estimator's key order for chunks of that many keys where it
    applies (``kernels._pyramid_planning.chunk_key_order``).

    Without a generator the rows depend on the shapes only, so they are built once per shape and device
    and reused (not while tracing for torch.compile or capturing a CUDA graph: those build them inline).
    """
    dev = torch.device(device)
    key = (B, H, start, length, block, n, dev, chunk)
    cache = generator is None and not torch.compiler.is_compiling() and not _capturing(dev)
    if cache and key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    off = sample_offsets(B, H, block, n, device, generator)
    nb = _cdiv(length, block)
    base = torch.arange(nb, device=off.device) * block
    blen = (length - base).clamp(max=block)
    rows = (start + base[:, None] + torch.minimum(off[:, :, None, :], blen[:, None] - 1)).flatten(2)
    if chunk is not None:
        from ..kernels._pyramid_planning import chunk_key_order, chunk_order_applies

        if chunk_order_applies(n, chunk):
            rows = rows[:, :, chunk_key_order(nb, n, chunk, rows.device)]
    if cache:
        if len(_INDEX_CACHE) >= 64:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = rows
    return rows


_INDEX_CACHE: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sample_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (``[B, H, r]``) of ``x`` (``[B, H, N, D]``): ``[B, H, r, D]``."""
    return torch.gather(x, 2, rows[..., None].expand(-1, -1, -1, x.shape[-1]))


def sampled_scores(
    q,
    k,
    config: PyramidConfig,
    seq_layout: SequenceLayout | None,
    scale: float,
    generator: torch.Generator | None = None,
    use_triton: bool = False,
) -> torch.Tensor:
    """Sampled max-attention scores ``S [B, H, n_q, n_k]`` (float32, rows sum to 1), spec §2.4.

    ``use_triton`` runs the Triton estimator (sample counts must be powers of two; q read in place, the
    sampled keys gathered by one kernel), else a chunked torch path (same arithmetic)."""
    B, H, N, _ = q.shape
    bq, bk = config.block_q, config.block_k
    sq, sk = int(bq * config.sample_fraction), int(bk * config.sample_fraction)
    vs, nv = _video_span(N, seq_layout)
    nq, nk = _cdiv(nv, bq), _cdiv(nv, bk)
    qrows = _sample_index(B, H, vs, nv, bq, sq, q.device, generator)
    if use_triton and sq & (sq - 1) == 0 and sk & (sk - 1) == 0:
        from ..kernels._pyramid_planning import gather_rows, key_chunk
        from ..kernels._pyramid_planning import sampled_scores as _kernel

        kc = key_chunk(q.device, sk)
        krows = _sample_index(B, H, vs, nv, bk, sk, q.device, generator, chunk=kc)
        return _kernel(
            q,
            gather_rows(k, krows),
            qrows,
            krows,
            nq,
            nk,
            sk,
            scale,
            key_chunk=kc,
            softmax=config.estimator == "sampled_softmax_max",
            mean=config.reduce == "mean",
            causal=config.causal,
        )
    krows = _sample_index(B, H, vs, nv, bk, sk, q.device, generator)
    qs, ks = _sample_rows(q, qrows).float(), _sample_rows(k, krows).float()
    per_block = B * H * sq * nk * sk * 4
    step = max(1, _CHUNK_BYTES // max(per_block, 1))
    out = []
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        lg = torch.matmul(qs[:, :, i0 * sq : i1 * sq], ks.transpose(-1, -2)) * scale  # [B, H, r, nk*sk]
        if config.causal:
            fut = krows[:, :, None, :] > qrows[:, :, i0 * sq : i1 * sq, None]
            lg = lg.masked_fill(fut, float("-inf"))
        m_blk = lg.view(B, H, -1, nk, sk).amax(-1)  # [B, H, r, nk]
        m_row = m_blk.amax(-1, keepdim=True)
        m_row = torch.where(torch.isfinite(m_row), m_row, torch.zeros_like(m_row))
        e = torch.exp(m_blk - m_row)
        if config.estimator == "sampled_softmax_max":
            den = torch.exp(lg - m_row).sum(-1, keepdim=True)
            e = e / torch.where(den > 0, den, torch.ones_like(den))  # rows with no visible key: 0
        e = e.view(B, H, i1 - i0, sq, nk)
        out.append(e.amax(3) if config.reduce == "max" else e.mean(3))
    s = torch.cat(out, 2)
    return s / s.sum(-1, keepdim=True).clamp_min(1e-30)


def antidiagonal_scores(q, k, config: PyramidConfig, seq_layout: SequenceLayout | None) -> torch.Tensor:
    """XAttention's antidiagonal scores ``S [B, H, n_q, n_k]`` (block sums of group softmaxes), §2.4."""
    B, H, N, D = q.shape
    bq, bk, S = config.block_q, config.block_k, config.antidiagonal_stride
    vs, nv = _video_span(N, seq_layout)
    nq, nk = _cdiv(nv, bq), _cdiv(nv, bk)

    def groups(x, blocks, block, reverse):
        x = x[:, :, vs : vs + nv].float()
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - nv))
        x = x.view(B, H, -1, S, D)
        return (x.flip(3) if reverse else x).flatten(3)  # [B, H, G, S*D]

    qg, kg = groups(q, nq, bq, True), groups(k, nk, bk, False)
    gq, gk = qg.shape[2], kg.shape[2]
    key_ok = torch.arange(gk, device=q.device) * S < nv
    step_rows = max(bq // S, (_CHUNK_BYTES // max(B * H * gk * 4, 1)) // (bq // S) * (bq // S))
    out = []
    for g0 in range(0, gq, step_rows):
        g1 = min(gq, g0 + step_rows)
        lg = torch.matmul(qg[:, :, g0:g1], kg.transpose(-1, -2)) / (math.sqrt(D) * S)
        mask = ~key_ok[None, :]
        if config.causal:
            mask = mask | (
                torch.arange(gk, device=q.device)[None, :] > torch.arange(g0, g1, device=q.device)[:, None]
            )
        lg = lg.masked_fill(mask, float("-inf"))
        p = torch.softmax(lg, -1).nan_to_num(0.0)
        p = p * (torch.arange(g0, g1, device=q.device) * S < nv)[:, None]  # padded query groups
        out.append(p.view(B, H, (g1 - g0) // (bq // S), bq // S, nk, bk // S).sum((3, 5)))
    return torch.cat(out, 2)


def assign_ends(scores: torch.Tensor, config: PyramidConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank order and level ends of §2.5: ``(order [B, H, n_q, n_k], ends [B, H, n_q, 4])`` (int64);
    ranks ``[ends[l-1], ends[l])`` take factor ``2**l`` (``ends[-1]`` = 0), later ranks are skipped."""
    nk = scores.shape[-1]
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    cum = vals.cumsum(-1)
    C = cum / cum[..., -1:].clamp_min(1e-30)
    e_prev = torch.zeros(scores.shape[:-1], dtype=torch.long, device=scores.device)
    ends = []
    for m, tau in zip(FACTORS, config.level_ends, strict=False):
        if config.mode == "topk":
            e = torch.clamp(e_prev, min=min(nk, int(nk * tau)))
        elif config.mode == "thresholdbound":
            c = (C <= tau + 1e-6).sum(-1)
            e = torch.where(c > 0, c + 1, e_prev).clamp(max=nk)
            e = torch.maximum(e, e_prev)
            if m == 1:
                e = e.clamp(min=min(nk, int(nk * config.min_full_fraction) + 1))
        else:  # energybound: rank r takes the level whose interval (tau_prev, tau_m] holds C_r
            e = torch.maximum((C <= tau + 1e-6).sum(-1), e_prev)
        a = -(-m * config.align_tile // config.block_k)
        if config.align == "upstream" and a > 1:
            up = e_prev + -(-(e - e_prev) // a) * a
            end = up.clamp(max=nk)
            e = torch.where(end == nk, e_prev + (end - e_prev) // a * a, end)
        ends.append(e)
        e_prev = e
    return order, torch.stack(ends, -1)


def similarity_cap(k, config: PyramidConfig, seq_layout: SequenceLayout | None) -> torch.Tensor:
    """Largest allowed pool factor per video KV block ``[B, H, n_k]`` (int64), spec §2.5."""
    B, H, N, D = k.shape
    bk = config.block_k
    vs, nv = _video_span(N, seq_layout)
    nk = _cdiv(nv, bk)
    x = torch.nn.functional.pad(k[:, :, vs : vs + nv].float(), (0, 0, 0, nk * bk - nv)).view(B, H, nk, bk, D)
    blen = (nv - torch.arange(nk, device=k.device) * bk).clamp(max=bk)
    cap = torch.ones((B, H, nk), dtype=torch.long, device=k.device)
    for m, th in zip((2, 4, 8), config.sim_thresholds, strict=False):
        g = x.view(B, H, nk, bk // m, m, D)
        start = torch.arange(bk // m, device=k.device) * m
        cnt = (blen[:, None] - start[None]).clamp(0, m)  # [nk, P] real tokens per group
        last = (cnt - 1).clamp(min=0)
        first_k = g[..., 0, :]
        last_k = torch.gather(g, 4, last[None, None, :, :, None, None].expand(B, H, -1, -1, 1, D)).squeeze(4)
        cos = torch.nn.functional.cosine_similarity(first_k, last_k, dim=-1, eps=1e-12)
        ok = cnt > 0
        sim = (cos * ok).sum(-1) / ok.sum(-1).clamp_min(1)
        cap = torch.where(sim > th, torch.full_like(cap, m), cap)  # factors in increasing order: max wins
    return cap


def _kernel_plan(scores, config: PyramidConfig, seq_len: int, seq_layout, keep_scores: bool) -> PyramidPlan:
    from ..kernels._pyramid_planning import pyramid_plan_lists

    nk = scores.shape[-1]
    bq, bk = config.block_q, config.block_k
    ntq = _cdiv(seq_layout.text_len, bq) if seq_layout is not None else 0
    ntk = _cdiv(seq_layout.text_len, bk) if seq_layout is not None else 0
    aligns = [-(-m * config.align_tile // bk) if config.align == "upstream" else 1 for m in FACTORS]
    kv_index, level_ptr = pyramid_plan_lists(
        scores,
        n_tq=ntq,
        n_tk=ntk,
        mode=config.mode,
        ends=config.level_ends,
        topk_ends=[min(nk, int(nk * t)) for t in config.level_ends],
        aligns=aligns,
        min_full=min(nk, int(nk * config.min_full_fraction) + 1),
    )
    return PyramidPlan(
        kv_index, level_ptr, bq, bk, seq_len, seq_layout, config, scores if keep_scores else None
    )


def build_plan(
    scores: torch.Tensor,
    config: PyramidConfig,
    *,
    seq_len: int,
    seq_layout: SequenceLayout | None,
    k: torch.Tensor | None = None,
    keep_scores: bool = False,
    use_triton: bool = False,
) -> PyramidPlan:
    """Level map from ``scores`` (video blocks) by the rules of ``config``, plus text rows and columns.

    ``use_triton``: the one-kernel planner for topk / thresholdbound rows of at most 2048 blocks
    without the similarity cap or causal masking (the same lists as the torch path)."""
    B, H, nq, nk = scores.shape
    dev = scores.device
    bq, bk = config.block_q, config.block_k
    if (
        use_triton
        and config.mode in ("topk", "thresholdbound")
        and not config.causal
        and config.sim_thresholds is None
        and nk <= 2048
    ):
        return _kernel_plan(scores, config, seq_len, seq_layout, keep_scores)
    vs, nv = _video_span(seq_len, seq_layout)
    if config.causal:  # blocks fully in the future never rank
        first = torch.arange(nq, device=dev) * bq
        last_row = (first + bq).clamp(max=nv) - 1
        kstart = torch.arange(nk, device=dev) * bk
        future = kstart[None, :] > last_row[:, None]
        scores = scores.masked_fill(future, 0.0)
    order, ends = assign_ends(scores, config)
    code = (torch.arange(nk, device=dev) >= ends[..., None]).sum(-2)  # per rank: 0..3 level, 4 skip
    fac_rank = torch.where(code < 4, 1 << code.clamp(max=3), 0)
    lv = torch.zeros_like(fac_rank).scatter_(-1, order, fac_rank)  # per block
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nk, device=dev).expand_as(order))
    if config.sim_thresholds is not None:
        if k is None:
            raise ValueError("expected k for the similarity cap (config.sim_thresholds is set)")
        cap = similarity_cap(k, config, seq_layout)
        lv = torch.minimum(lv, cap[:, :, None, :])
    if config.causal or config.mode == "energybound":
        first = torch.arange(nq, device=dev) * bq
        last_row = (first + bq).clamp(max=nv) - 1
        kstart = torch.arange(nk, device=dev) * bk
        diag = (kstart[None, :] <= last_row[:, None]) & (kstart[None, :] + bk > first[:, None])
        if config.causal:
            lv = lv.masked_fill(kstart[None, :] > last_row[:, None], 0)  # blocks fully in the future
        if config.mode == "energybound":  # the sink block (KV block 0) at m = 1
            lv = torch.where(torch.arange(nk, device=dev) == 0, 1, lv)
        lv = torch.where(diag, 1, lv)  # the diagonal block at m = 1
    if seq_layout is not None and seq_layout.text_len > 0:
        ntq, ntk = _cdiv(seq_layout.text_len, bq), _cdiv(seq_layout.text_len, bk)
        lv = torch.cat(
            [lv, torch.ones((B, H, nq, ntk), dtype=lv.dtype, device=dev)], -1
        )  # text keys at m = 1
        lv = torch.cat(
            [lv, torch.ones((B, H, ntq, nk + ntk), dtype=lv.dtype, device=dev)], -2
        )  # dense text rows
        rank = torch.cat([rank, torch.arange(nk, nk + ntk, device=dev).expand(B, H, nq, ntk)], -1)
        rank = torch.cat([rank, torch.arange(nk + ntk, device=dev).expand(B, H, ntq, nk + ntk)], -2)
    return PyramidPlan.from_dense(
        lv,
        block_q=bq,
        block_k=bk,
        seq_len=seq_len,
        seq_layout=seq_layout,
        config=config,
        rank=rank,
        scores=scores if keep_scores else None,
    )


__all__ = [
    "sampled_scores",
    "antidiagonal_scores",
    "assign_ends",
    "similarity_cap",
    "build_plan",
    "sample_offsets",
]
