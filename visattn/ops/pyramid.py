"""Pyramid Sparse Attention (PSA): multi-level block-sparse attention over mean-pooled K/V.

"PSA: Pyramid Sparse Attention" (Li, Gu, Lin, Wang, Zhuang; https://arxiv.org/abs/2512.04025). Each
(query tile, KV block) pair attends the raw block, a 2x/4x/8x mean-pooled copy with a ``+ln c``
logit bias (``c`` the group's true token count), or skips it (``specs/pyramid.md`` §2).

Contents: :func:`pyramid_plan` and :func:`pyramid_attention` (public ops); the ``torch.library``
custom ops ``visattn::pyramid_fwd`` / ``visattn::pyramid_bwd`` (fake impls and autograd);
:func:`pyramid_attention_ref`, the single float64-capable reference; backends ``"triton"`` and
``"torch"``. Planning (estimators, level rules) lives in ``_pyramid_rules.py``, the plan in
``pyramid_plan.py``, the config in ``_pyramid_config.py``.
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._checks import check_layout, check_qkv, check_scale, describe_tensors
from ._layout import SequenceLayout
from ._pyramid_config import FACTORS, PyramidConfig
from ._pyramid_rules import antidiagonal_scores, build_plan, sampled_scores
from ._types import Layout
from .pyramid_plan import PyramidPlan, block_ranges

__all__ = ["pyramid_attention", "pyramid_plan", "pyramid_attention_ref", "PyramidPlan", "PyramidConfig"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BNHD" else t


def _check_inputs(q, k, v, layout, seq_layout):
    layout = check_layout(layout)
    B, Nq, Nk, H, Hk, D = check_qkv(q, k, v, layout)
    if Hk != H:
        raise NotImplementedError(
            f"pyramid attention does not support GQA/MQA yet, got {H} query heads and {Hk} key/value heads"
        )
    if Nq != Nk:
        raise ValueError(f"expected self-attention (N_q == N_k), got N_q={Nq}, N_k={Nk}")
    if seq_layout is not None:
        if not isinstance(seq_layout, SequenceLayout):
            raise ValueError(
                f"expected seq_layout to be a visattn.ops.SequenceLayout or None, "
                f"got seq_layout={type(seq_layout).__name__}"
            )
        seq_layout.check_length(Nq, "seq_layout")
    return layout, B, Nq, H, D


def _triton_interpreted() -> bool:
    from ..kernels._common import INTERPRET

    return INTERPRET


def _plan_layout(config: PyramidConfig, seq_layout: SequenceLayout | None) -> SequenceLayout | None:
    # text_keys="as_video": the whole sequence is one segment (upstream's new format, parity only)
    return None if config.text_keys == "as_video" else seq_layout


def pyramid_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    config: PyramidConfig | None = None,
    seq_layout: SequenceLayout | None = None,
    layout: Layout = "BNHD",
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    keep_scores: bool = False,
) -> PyramidPlan:
    """Estimate block importance and assign pool levels (spec §2.4-2.5); runs under ``no_grad``.

    Args:
        q, k: ``[B, N, H, D]`` (``"BNHD"``) or ``[B, H, N, D]`` (``"BHND"``).
        config: a :class:`PyramidConfig` (default ``PyramidConfig()``).
        seq_layout: where video and text tokens sit (None: one segment).
        scores: caller-supplied importance ``[B, H, n_q, n_k]`` over video blocks (skips estimation).
        generator: draws the sampled offsets (default: a fixed device-side hash, reproducible).
        backend: ``"triton"`` runs the sampled estimator as a Triton kernel (default on CUDA),
            ``"torch"`` as chunked torch ops (default on the CPU); the level rules are device-side torch.
        keep_scores: keep the scores on the plan.

    Returns:
        A :class:`PyramidPlan` on q's device.
    """
    config = PyramidConfig() if config is None else config
    if not isinstance(config, PyramidConfig):
        raise ValueError(f"expected config to be a PyramidConfig or None, got config={type(config).__name__}")
    layout, B, N, H, D = _check_inputs(q, k, k, layout, seq_layout)
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"expected backend in (None, 'auto', 'torch', 'triton'), got backend={backend!r}")
    lay = _plan_layout(config, seq_layout)
    nv = lay.num_video if lay is not None else N
    nq, nk = -(-nv // config.block_q), -(-nv // config.block_k)
    if config.estimator == "antidiagonal":
        S = config.antidiagonal_stride
        if config.block_q % S or config.block_k % S:
            raise ValueError(f"expected config.antidiagonal_stride to divide block_q and block_k, got {S}")
    with torch.no_grad():
        qb, kb = _bhnd(q, layout), _bhnd(k, layout)
        use_triton = backend == "triton" or (
            backend in (None, "auto")
            and q.device.type == "cuda"
            and _dispatch.current_backend() in ("auto", "triton")
            and q.dtype in _TRITON_DTYPES
        )
        if use_triton and q.device.type == "cpu" and not _triton_interpreted():
            raise NotImplementedError(
                "the Triton planner needs a CUDA GPU or TRITON_INTERPRET=1; use backend='torch'"
            )
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, H, nq, nk):
                raise ValueError(
                    f"expected scores of shape {(B, H, nq, nk)}, got scores.shape="
                    f"{tuple(getattr(scores, 'shape', ()))}"
                )
            s = scores.to(device=q.device, dtype=torch.float32)
        elif config.estimator == "antidiagonal":
            s = antidiagonal_scores(qb, kb, config, lay)
        else:
            if use_triton and q.dtype not in _TRITON_DTYPES:
                raise NotImplementedError(f"the Triton estimator cannot run {q.dtype}; use backend='torch'")
            s = sampled_scores(qb, kb, config, lay, D**-0.5, generator, use_triton=use_triton)
        return build_plan(
            s, config, seq_len=N, seq_layout=lay, k=kb, keep_scores=keep_scores, use_triton=use_triton
        )


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    plan: PyramidPlan | None = None,
    config: PyramidConfig | None = None,
    seq_layout: SequenceLayout | None = None,
    layout: Layout = "BNHD",
    scale: float | None = None,
    backend: str | None = None,
    return_plan: bool = False,
    return_lse: bool = False,
):
    """Pyramid sparse attention (spec §2.3): per (query tile, KV block) raw, pooled x2/x4/x8 or skipped.

    Equivalent PyTorch: :func:`pyramid_attention_ref` (dense softmax over group means with a
    ``+ln c`` bias; equal to attention over keys replaced by their group means).

    Args:
        q, k, v: ``[B, N, H, D]`` (``layout="BNHD"``, default) or ``[B, H, N, D]`` (``"BHND"``);
            fp16/bf16 on ``"triton"``, fp32/fp64 on ``"torch"`` (fp32 also on ``"triton"``).
        plan: a :class:`PyramidPlan` (used as is); None plans first with ``config``.
        config: :class:`PyramidConfig` (default ``PyramidConfig()``); must agree with ``plan``.
        seq_layout: :class:`SequenceLayout` of a joint text + video sequence (None: one segment).
        scale: softmax scale, ``D ** -0.5`` by default.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        return_plan, return_lse: also return the plan / the LSE (fp32 ``[B, H, N]``, natural log).

    Returns:
        ``out`` in q's layout, then ``lse`` if requested, then the plan if requested.

    Raises:
        ValueError: bad shapes, dtypes, layout, config or a plan that does not fit (naming it).
        NotImplementedError: GQA, or a backend that cannot run these inputs (with reasons).
    """
    layout, B, N, H, D = _check_inputs(q, k, v, layout, seq_layout)
    scale = check_scale(scale, D)
    if plan is None:
        plan = pyramid_plan(q, k, config=config, seq_layout=seq_layout, layout=layout, backend=backend)
    else:
        if not isinstance(plan, PyramidPlan):
            raise ValueError(f"expected plan to be a PyramidPlan or None, got plan={type(plan).__name__}")
        if (
            config is not None
            and plan.config is not None
            and ((config.block_q, config.block_k, config.causal) != (plan.block_q, plan.block_k, plan.causal))
        ):
            raise ValueError(
                f"expected config to agree with plan (block_q, block_k, causal), got config="
                f"{(config.block_q, config.block_k, config.causal)}, plan="
                f"{(plan.block_q, plan.block_k, plan.causal)}"
            )
        plan.check_against(B, H, N, seq_layout)
        if plan.device != q.device:
            raise ValueError(f"expected the plan on q's device {q.device}, got plan.device={plan.device}")
    chosen = _dispatch.select(
        "pyramid",
        backend,
        q.device,
        lambda: describe_tensors(q=q, k=k, v=v) + f"; plan={plan!r}; layout={layout}",
        q,
        k,
        v,
        plan,
    )
    out, lse = chosen.fn(q, k, v, plan, scale, layout)
    res = (out,) + ((lse,) if return_lse else ()) + ((plan,) if return_plan else ())
    return res[0] if len(res) == 1 else res


# ---------------------------------------------------------------------------------------------
# reference


def pyramid_attention_ref(
    q,
    k,
    v,
    plan: PyramidPlan,
    *,
    scale: float | None = None,
    layout: Layout = "BNHD",
    return_lse: bool = False,
    upcast: bool = True,
    tail: str | None = None,
    chunk_rows: int = 1024,
):
    """Pure-PyTorch reference of spec §2.3: chunked over query tiles, differentiable.

    Group means over real tokens (``tail="exact"``; ``"replicate"`` pads the last block of a
    one-segment sequence with copies of the last token, counted, as upstream's new kernel does)
    with a ``+ln c`` logit bias; float64 when ``upcast``.

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` (lse ``[B, H, N]``, fp32; fp64 for fp64 input).
    """
    layout = check_layout(layout)
    B, N, _, H, _, D = check_qkv(q, k, v, layout)
    scale = check_scale(scale, D)
    tail = tail or (plan.config.tail if plan.config is not None else "exact")
    dtype = torch.float64 if upcast else q.dtype
    qb, kb, vb = (_bhnd(t, layout).to(dtype) for t in (q, k, v))
    dev, bq, bk = q.device, plan.block_q, plan.block_k
    lay = plan.seq_layout
    dense = plan.to_dense().long().expand(B, H, -1, -1)  # [B, H, nqt, nkb]
    kstart, klen = block_ranges(N, bk, lay, B, dev)  # [B, nkb]
    qstart, qlen = block_ranges(N, bq, lay, B, dev, valid_text=False)
    nqt, nkb = dense.shape[2], dense.shape[3]
    u = torch.arange(bk, device=dev)
    tok = (kstart[..., None] + u).clamp(max=N - 1)  # [B, nkb, bk]
    real = u < klen[..., None]
    levels = []  # (factor, K, V, bias [B, G], last token [B, G], block id [G])
    for m in FACTORS:
        P = bk // m
        if tail == "replicate" and m > 1 and lay is None:
            last_tok = kstart + klen - 1
            tk = torch.minimum(tok, last_tok[..., None])
            rk = (kstart[..., None] + u) >= 0  # every slot counts (copies of the last token)
        else:
            tk, rk = tok, real
        idx = tk.flatten(1)[:, None, :, None].expand(B, H, -1, D)
        w = rk.flatten(1)[:, None, :, None].to(dtype)
        km = (torch.gather(kb, 2, idx) * w).view(B, H, nkb, P, m, D).sum(4)
        vm = (torch.gather(vb, 2, idx) * w).view(B, H, nkb, P, m, D).sum(4)
        cnt = rk.view(B, nkb, P, m).sum(-1)  # [B, nkb, P]
        km = km / cnt.clamp(min=1)[:, None, ..., None]
        vm = vm / cnt.clamp(min=1)[:, None, ..., None]
        bias = torch.where(cnt > 0, torch.log(cnt.clamp(min=1).to(dtype)), float("-inf"))
        g_last = (
            kstart[..., None]
            + torch.arange(P, device=dev) * m
            + torch.minimum(cnt, real.view(B, nkb, P, m).sum(-1))
            - 1
        )
        levels.append((m, km.flatten(2, 3), vm.flatten(2, 3), bias.flatten(1), g_last.flatten(1), P))
    tiles_per_chunk = max(1, chunk_rows // bq)
    outs, rows_all = [], []
    lses = []
    r = torch.arange(bq, device=dev)
    for t0 in range(0, nqt, tiles_per_chunk):
        t1 = min(nqt, t0 + tiles_per_chunk)
        rows = (qstart[0, t0:t1, None] + r).flatten()  # [ct*bq] (tiles do not depend on the batch)
        ok = (r[None, :] < qlen[0, t0:t1, None]).flatten()
        rows_c = rows.clamp(max=N - 1)
        qc = qb[:, :, rows_c]  # [B, H, R, D]
        logits = []
        vals = []
        for m, km, vm, bias, g_last, P in levels:
            s = torch.matmul(qc, km.transpose(-1, -2)) * scale + bias[:, None, None, :]
            # [B, H, tiles, 1, groups]: broadcast over the rows of each tile
            allowed = (dense[:, :, t0:t1] == m).repeat_interleave(P, -1)[:, :, :, None, :]
            s = s.view(B, H, t1 - t0, bq, -1).masked_fill(~allowed, float("-inf")).flatten(2, 3)
            if plan.causal:
                s = s.masked_fill(g_last[:, None, None, :] > rows[None, None, :, None], float("-inf"))
            logits.append(s)
            vals.append(vm)
        s = torch.cat(logits, -1)
        lse = torch.logsumexp(s, -1)
        fin = torch.isfinite(lse)
        p = torch.exp(s - torch.where(fin, lse, torch.zeros_like(lse))[..., None])
        outs.append(torch.matmul(p, torch.cat(vals, 2))[:, :, ok])
        lses.append(lse[:, :, ok])
        rows_all.append(rows[ok])
    rows_all = torch.cat(rows_all)
    out = torch.zeros_like(qb).index_copy(2, rows_all, torch.cat(outs, 2))
    lse = torch.full((B, H, N), float("-inf"), dtype=dtype, device=dev).index_copy(
        2, rows_all, torch.cat(lses, 2)
    )
    out = _bhnd(out.to(q.dtype), layout)
    lse = lse if q.dtype == torch.float64 else lse.float()
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# custom ops (the Triton path): q/k/v arrive as [B, N, H, D] views


def _segments(video_start, num_video, text_start, text_len, text_valid, use_segments):
    from ..kernels.block_sparse import segments_for

    return segments_for(video_start, num_video, text_start, text_len, text_valid) if use_segments else None


@torch.library.custom_op("visattn::pyramid_fwd", mutates_args=())
def _pyramid_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor,
    level_ptr: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    seg: list[int],
    text_valid: torch.Tensor | None,
    use_segments: bool,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.block_sparse import block_sparse_fwd
    from ..kernels.pyramid import pyramid_pool, tile_order

    segments = _segments(*seg, text_valid, use_segments)
    pyr = pyramid_pool(k, v, block_k, segments=segments)
    order = tile_order(level_ptr)  # heavy tiles first
    return block_sparse_fwd(
        q,
        k,
        v,
        kv_index,
        level_ptr[..., 4],
        block_q,
        block_k,
        scale,
        segments=segments,
        level_ptr=level_ptr,
        pyramid=pyr,
        causal=causal,
        tile_order=order,
    )


@_pyramid_fwd_op.register_fake
def _(q, k, v, kv_index, level_ptr, block_q, block_k, scale, seg, text_valid, use_segments, causal):
    B, N, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("visattn::pyramid_bwd", mutates_args=())
def _pyramid_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    kv_index: torch.Tensor,
    level_ptr: torch.Tensor,
    q_index: torch.Tensor,
    q_count: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    seg: list[int],
    text_valid: torch.Tensor | None,
    use_segments: bool,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.pyramid import pyramid_bwd

    segments = _segments(*seg, text_valid, use_segments)
    return pyramid_bwd(
        do,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        kv_index,
        level_ptr,
        q_index,
        q_count,
        block_q,
        block_k,
        scale,
        segments=segments,
        causal=causal,
    )


@_pyramid_bwd_op.register_fake
def _(
    do,
    q,
    k,
    v,
    out,
    lse,
    dlse,
    kv_index,
    level_ptr,
    q_index,
    q_count,
    block_q,
    block_k,
    scale,
    seg,
    text_valid,
    use_segments,
    causal,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, level_ptr, block_q, block_k, scale, seg, text_valid, use_segments, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_index, level_ptr, text_valid)
    ctx.args = (block_q, block_k, scale, seg, use_segments, causal)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_index, level_ptr, text_valid = ctx.saved_tensors
    block_q, block_k, scale, seg, use_segments, causal = ctx.args
    q_index, q_count = _transpose(kv_index, level_ptr, k.shape[1], block_k, seg, use_segments)
    dout = torch.zeros_like(out) if dout is None else (dout if dout.stride(-1) == 1 else dout.contiguous())
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = _pyramid_bwd_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        kv_index,
        level_ptr,
        q_index,
        q_count,
        block_q,
        block_k,
        scale,
        seg,
        text_valid,
        use_segments,
        causal,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _transpose(kv_index, level_ptr, N, block_k, seg, use_segments):
    nk = (-(-seg[1] // block_k) - (-seg[3] // block_k)) if use_segments else -(-N // block_k)
    plan = PyramidPlan.__new__(PyramidPlan)  # a light view: only the tensors and nk are needed
    plan.kv_index, plan.level_ptr, plan._cache = kv_index, level_ptr, {}
    plan.block_k, plan.seq_layout, plan.seq_len, plan.block_q = block_k, None, nk * block_k, 1
    return plan.transpose()


_pyramid_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_args(plan: PyramidPlan, B: int, device):
    lay = plan.seq_layout
    if lay is None:
        return [0, 0, 0, 0], None, False
    tv = lay.valid_text(B, device) if lay.text_len else None  # video only: no segments (``segments_for``)
    return [lay.video_start, lay.num_video, lay.text_start, lay.text_len], tv, True


def _as_bnhd(t: torch.Tensor, layout: str) -> torch.Tensor:
    t = t.transpose(1, 2) if layout == "BHND" else t
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# backends, in "auto" priority order


def _triton_can_run(q, k, v, plan) -> list[str]:
    reasons = _dispatch.triton_reasons(q.device)
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        reasons.append(
            "Triton's interpreter computes bfloat16 tl.dot wrongly; use float16/float32 on the CPU"
        )
    if q.shape[-1] > 256:
        reasons.append(f"head dim {q.shape[-1]} > 256 is not supported")
    if plan.config is not None and plan.config.tail == "replicate":
        reasons.append("tail='replicate' (upstream parity) is implemented by the 'torch' reference only")
    return reasons


@_dispatch.register_backend(
    "pyramid", "triton", can_run=_triton_can_run, doc="block-sparse core + PSA levels"
)
def _run_triton(q, k, v, plan, scale, layout):
    seg, text_valid, use_seg = _kernel_args(plan, q.shape[0], q.device)
    out, lse = _pyramid_fwd_op(
        _as_bnhd(q, layout),
        _as_bnhd(k, layout),
        _as_bnhd(v, layout),
        plan.kv_index,
        plan.level_ptr,
        plan.block_q,
        plan.block_k,
        scale,
        seg,
        text_valid,
        use_seg,
        plan.causal,
    )
    return (out.transpose(1, 2) if layout == "BHND" else out), lse


@_dispatch.register_backend(
    "pyramid", "torch", can_run=lambda *a: [], auto_devices=("cpu",), doc="pure-PyTorch reference"
)
def _run_torch(q, k, v, plan, scale, layout):
    return pyramid_attention_ref(q, k, v, plan, scale=scale, layout=layout, return_lse=True, upcast=False)
