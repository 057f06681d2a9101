"""Rectified SpaAttn: block-sparse attention with IPAR reweighting and GAPR pooled compensation.

"Rectified SpaAttn" (Liu, Li, Zhang, Chen, Gu; https://arxiv.org/abs/2511.19835). Jenga-style
critical blocks are chosen from mean-pooled q/k (text keys stay unpooled); the sparse output of
every query block is scaled by R (the pooled mass outside the rectified dropped blocks) and
compensated by Σ P·V̄ over dropped blocks whose pooled estimate passes the gain/error test
(``specs/rectified.md`` §2).

Contents: :func:`rectified_plan` and :func:`rectified_attention` (public ops); the custom op
``visattn::rectified_fwd`` (the shared block-sparse core with segments and the R/C epilogue); the
plan applied in torch (``"torch"`` backend, differentiable); backends ``"triton"`` and ``"torch"``.
:func:`rectified_attention_ref`, the float64 reference written from the spec, lives in
``_rectified_ref.py``; config and plan in ``rectified_plan.py``; statistics and planner kernels in
``kernels/rectified.py``.
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._checks import check_layout, check_qkv, check_scale, describe_tensors
from ._layout import SequenceLayout
from ._rectified_ref import _masked_attention, rectified_attention_ref
from ._token_order import block_neighbours, order_from_name
from ._types import Layout
from .rectified_plan import RectifiedConfig, RectifiedPlan

__all__ = [
    "rectified_attention",
    "rectified_plan",
    "rectified_attention_ref",
    "RectifiedConfig",
    "RectifiedPlan",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEVICE_TABLES: dict = {}


def _bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BNHD" else t


def _bnhd(t: torch.Tensor, layout: str) -> torch.Tensor:
    t = t.transpose(1, 2) if layout == "BHND" else t
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernels need a dense head dim


def _check_inputs(q, k, v, layout, seq_layout, need_layout: bool):
    layout = check_layout(layout)
    B, Nq, Nk, H, Hk, D = check_qkv(q, k, v, layout)
    if Hk != H:
        raise NotImplementedError(
            f"rectified attention does not support GQA/MQA, got {H} query heads and {Hk} key/value heads"
        )
    if Nq != Nk:
        raise ValueError(f"expected self-attention (N_q == N_k), got N_q={Nq}, N_k={Nk}")
    if seq_layout is None and need_layout:
        raise ValueError(
            "expected seq_layout (a visattn.ops.SequenceLayout) when no plan is given, got seq_layout=None"
        )
    if seq_layout is not None:
        if not isinstance(seq_layout, SequenceLayout):
            raise ValueError(
                f"expected seq_layout to be a visattn.ops.SequenceLayout, "
                f"got seq_layout={type(seq_layout).__name__}"
            )
        seq_layout.check_length(Nq, "seq_layout")
        tv = seq_layout.text_valid_len
        if isinstance(tv, torch.Tensor) and tv.shape[0] != B:
            raise ValueError(
                f"expected text_valid_len of shape [{B}], got text_valid_len.shape={tuple(tv.shape)}"
            )
    return layout, B, Nq, H, D


def _check_config(config) -> RectifiedConfig:
    config = RectifiedConfig() if config is None else config
    if not isinstance(config, RectifiedConfig):
        raise ValueError(
            f"expected config to be a RectifiedConfig or None, got config={type(config).__name__}"
        )
    return config


def _tables(seq_layout: SequenceLayout, config: RectifiedConfig, device):
    """(neighbour table, first-frame blocks) on ``device``, cached (built once on the CPU)."""
    from ..kernels.rectified import first_frame_blocks

    key = (
        seq_layout.video_grid,
        seq_layout.token_order,
        config.block_size,
        config.neighbours,
        config.first_frame,
        str(device),
    )
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        order = order_from_name(seq_layout.token_order, seq_layout.video_grid)
        nbr = block_neighbours(seq_layout.video_grid, config.block_size, order) if config.neighbours else None
        ff = first_frame_blocks(config.first_frame, seq_layout.video_grid, config.block_size, order)
        hit = (None if nbr is None else nbr.to(device), None if ff is None else ff.to(device))
        _DEVICE_TABLES[key] = hit
    return hit


def _v_key(v: torch.Tensor) -> tuple:
    return (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v._version)


def _use_triton(q: torch.Tensor, backend: str | None) -> bool:
    from ..kernels._common import INTERPRET

    if backend == "torch" or q.dtype not in _TRITON_DTYPES:
        return False
    if backend == "triton":
        return True
    return q.device.type == "cuda" or INTERPRET and _dispatch.current_backend() == "triton"


def rectified_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_layout: SequenceLayout,
    config: RectifiedConfig | None = None,
    layout: Layout = "BNHD",
    keep_probs: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> RectifiedPlan:
    """Select critical blocks and compute the rectification terms (spec §2.4-2.7); no gradients.

    Args:
        q, k, v: ``[B, N, H, D]`` (``"BNHD"``) or ``[B, H, N, D]`` (``"BHND"``).
        seq_layout: where the video and text tokens sit (required).
        config: a :class:`RectifiedConfig` (default ``RectifiedConfig()``).
        keep_probs: keep P restricted to 𝒢 on the plan, so C can be recomputed for a new ``v``.
        scale: the attention scale used for the pooled logits too (default ``D ** -0.5``).
        backend: ``"triton"`` (statistics kernel; default on CUDA) or ``"torch"``; the planner is
            device-side torch either way.

    Returns:
        A :class:`RectifiedPlan` on q's device.
    """
    from ..kernels._rectified_rows import MAX_ROW_BLOCKS, plan_tensors_rows
    from ..kernels.rectified import (
        MAX_FUSED_BLOCKS,
        block_stats_torch,
        block_stats_triton,
        plan_tensors,
        plan_tensors_triton,
    )

    config = _check_config(config)
    layout, B, N, H, D = _check_inputs(q, k, v, layout, seq_layout, True)
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"expected backend in (None, 'auto', 'torch', 'triton'), got backend={backend!r}")
    scale = check_scale(scale, D)
    lay, b = seq_layout, config.block_size
    upstream = config.tail == "upstream"
    with torch.no_grad():
        if _use_triton(q, backend):
            stats = block_stats_triton(
                _bnhd(q, layout),
                _bnhd(k, layout),
                _bnhd(v, layout),
                lay.video_start,
                lay.num_video,
                b,
                upstream,
            )
            sdt = torch.float32
        else:
            sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
            stats = block_stats_torch(
                _bhnd(q, layout).transpose(1, 2),
                _bhnd(k, layout).transpose(1, 2),
                _bhnd(v, layout).transpose(1, 2),
                lay.video_start,
                lay.num_video,
                b,
                upstream,
                sdt,
            )
        # fused planner up to 511 visual blocks, the row planner up to 2047, device-side torch beyond
        n_v = lay.num_video_blocks(b)
        planner = plan_tensors
        if sdt == torch.float32 and _use_triton(q, backend):
            planner = (
                plan_tensors_triton
                if n_v <= MAX_FUSED_BLOCKS
                else plan_tensors_rows if n_v <= MAX_ROW_BLOCKS else plan_tensors
            )
        k_text = tv = None
        if lay.text_len:
            k_text = _bhnd(k, layout)[:, :, lay.text_slice]  # [B, H, L, D] view; the fused planner reads it
            k_text = k_text if planner is plan_tensors_triton else k_text.to(sdt)
            tv = lay.valid_text(B, q.device)
        nbr, ff = _tables(lay, config, q.device)
        t = planner(
            *stats,
            k_text,
            tv,
            scale=scale,
            block=b,
            num_video=lay.num_video,
            n_text_blocks=lay.num_text_blocks(b),
            config=config,
            nbr=nbr,
            first_frame=ff,
            keep_probs=keep_probs,
        )
    return RectifiedPlan(
        t["kv_index"],
        t["kv_count"],
        t["rect_scale"],
        t["rect_bias"],
        t["rect_map"],
        t["density"],
        t["rect_frac"],
        b,
        lay,
        config,
        t["rect_prob"],
        None if torch.compiler.is_compiling() else _v_key(v),
        t.get("tile_order"),
    )


def rectified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_layout: SequenceLayout | None = None,
    plan: RectifiedPlan | None = None,
    config: RectifiedConfig | None = None,
    layout: Layout = "BNHD",
    scale: float | None = None,
    backend: str | None = None,
    return_plan: bool = False,
):
    """Rectified SpaAttn over a joint text + video sequence.

    Equivalent PyTorch: :func:`rectified_attention_ref`. Video query block I attends its kept visual
    blocks and every valid text key; its rows are ``R_I * O_sparse + C_I``. Text query rows are dense
    over all valid keys. Padded text keys never attend; padded text query rows are finite, unspecified.

    Args:
        q, k, v: ``[B, N, H, D]`` (``layout="BNHD"``, default) or ``[B, H, N, D]`` (``"BHND"``);
            fp16/bf16 (fp32) on ``"triton"``, fp32/fp64 on ``"torch"``. Head dims up to 256.
        seq_layout: a :class:`SequenceLayout` with ``seq_len == N`` (required without ``plan``).
        plan: a :class:`RectifiedPlan` to reuse (its C is recomputed from ``rect_prob`` when ``v``
            is a new tensor; without stored probabilities that is an error).
        config: a :class:`RectifiedConfig` (default ``RectifiedConfig()``); ignored with ``plan``.
        scale: softmax scale, ``D ** -0.5`` by default.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        return_plan: also return the plan.

    Returns:
        ``out`` in q's layout and dtype, or ``(out, plan)``.

    Raises:
        ValueError: bad shapes/dtypes/devices, missing or mismatched ``seq_layout``, config out of
            range, a ``plan`` that does not fit, or plan reuse with a new ``v`` and no ``rect_prob``.
        NotImplementedError: GQA, or a backend that cannot run the inputs (e.g. gradients on ``"triton"``).
    """
    from ..kernels.rectified import block_stats_torch, block_stats_triton

    layout, B, N, H, D = _check_inputs(q, k, v, layout, seq_layout, plan is None)
    scale = check_scale(scale, D)
    if plan is None:
        config = _check_config(config)
        plan = rectified_plan(
            q,
            k,
            v,
            seq_layout=seq_layout,
            config=config,
            layout=layout,
            scale=scale,
            backend=backend if backend in ("torch", "triton") else None,
        )
    else:
        if not isinstance(plan, RectifiedPlan):
            raise ValueError(f"expected plan to be a RectifiedPlan, got plan={type(plan).__name__}")
        plan.check_against(B, H, N, D, seq_layout)
        if plan.device != q.device:
            raise ValueError(f"expected the plan on q's device {q.device}, got plan.device={plan.device}")
        gapr = plan.config is None or plan.config.gapr
        if torch.compiler.is_compiling():
            # traced tensors have no storage to compare: recompute C when the plan can, else trust the plan
            new_v = plan.rect_prob is not None
        else:
            new_v = plan._v_key != _v_key(v)
        if gapr and new_v:
            if plan.rect_prob is None:
                raise ValueError(
                    "plan reused with a new v: C depends on v, so make the plan with keep_probs=True "
                    "(got plan.rect_prob=None)"
                )
            lay = plan.seq_layout
            with torch.no_grad():
                if _use_triton(q, backend):
                    vm = block_stats_triton(
                        _bnhd(q, layout),
                        _bnhd(k, layout),
                        _bnhd(v, layout),
                        lay.video_start,
                        lay.num_video,
                        plan.block_size,
                        plan.config.tail == "upstream",
                    )[2]
                else:
                    vv = _bhnd(v, layout).transpose(1, 2)
                    vm = block_stats_torch(
                        vv,
                        vv,
                        vv,
                        lay.video_start,
                        lay.num_video,
                        plan.block_size,
                        plan.config.tail == "upstream",
                        torch.float32,
                    )[2]
                bias = plan.rect_bias.clone()
                bias[..., : plan.num_video_blocks, :] = (plan.rect_prob.to(vm.dtype) @ vm).to(bias.dtype)
            plan = RectifiedPlan(
                plan.kv_index,
                plan.kv_count,
                plan.rect_scale,
                bias,
                plan.rect_map,
                plan.density,
                plan.rect_fraction,
                plan.block_size,
                plan.seq_layout,
                plan.config,
                plan.rect_prob,
                None if torch.compiler.is_compiling() else _v_key(v),
                plan._tile_order,
            )
    chosen = _dispatch.select(
        "rectified",
        backend,
        q.device,
        lambda: describe_tensors(q=q, k=k, v=v) + f"; plan={plan!r}; layout={layout}",
        q,
        k,
        v,
        plan,
    )
    out = chosen.fn(q, k, v, plan, scale, layout)
    return (out, plan) if return_plan else out


# ---------------------------------------------------------------------------------------------
# applying a plan: the Triton core (custom op) and a torch path


@torch.library.custom_op("visattn::rectified_fwd", mutates_args=())
def _rectified_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    rect_scale: torch.Tensor,
    rect_bias: torch.Tensor,
    block: int,
    scale: float,
    seg: list[int],
    text_valid: torch.Tensor,
    tile_order: torch.Tensor,
) -> torch.Tensor:
    from ..kernels.block_sparse import block_sparse_fwd, segments_for

    # heavy tiles first (text tiles list every block): load balance across the grid
    out, _ = block_sparse_fwd(
        q,
        k,
        v,
        kv_index,
        kv_count,
        block,
        block,
        scale,
        segments=segments_for(*seg, text_valid),
        rect_scale=rect_scale,
        rect_bias=rect_bias,
        tile_order=tile_order,
    )
    return out


@_rectified_fwd_op.register_fake
def _(q, k, v, kv_index, kv_count, rect_scale, rect_bias, block, scale, seg, text_valid, tile_order):
    return torch.empty_like(q)


def _apply_plan_torch(q, k, v, plan: RectifiedPlan, scale: float, layout: str) -> torch.Tensor:
    """R·O_sp + C per query tile with a dense masked softmax (differentiable in q, k, v; plan constant)."""
    qc, kc, vc = _bhnd(q, layout), _bhnd(k, layout), _bhnd(v, layout)
    B, H, N, D = qc.shape
    lay, b = plan.seq_layout, plan.block_size
    nv, dev = plan.num_video_blocks, q.device
    kept, _ = plan.to_dense()  # [B, H, n_tiles, nb]
    tv = lay.valid_text(B, dev).long()
    pos = torch.arange(N, device=dev)
    blk = torch.full((N,), -1, dtype=torch.long, device=dev)
    blk[lay.video_slice] = (pos[lay.video_slice] - lay.video_start) // b
    if lay.text_len:
        blk[lay.text_slice] = nv + (pos[lay.text_slice] - lay.text_start) // b
    key_ok = torch.ones(B, N, dtype=torch.bool, device=dev)
    if lay.text_len:
        key_ok[:, lay.text_slice] = (pos[lay.text_slice] - lay.text_start)[None, :] < tv[:, None]
    rs, rb = plan.rect_scale.to(qc.dtype), plan.rect_bias.to(qc.dtype)
    out = torch.zeros_like(qc)
    for t in range(plan.num_tiles):
        if t < nv:
            s = lay.video_start + t * b
            e = min(s + b, lay.video_start + lay.num_video)
        else:
            s = lay.text_start + (t - nv) * b
            e = min(s + b, lay.text_start + lay.text_len)
        mask = kept[:, :, t].gather(-1, blk.clamp(min=0).expand(B, H, N)) & key_ok[:, None, :]
        o = _masked_attention(qc[:, :, s:e], kc, vc, mask, scale)
        out[:, :, s:e] = rs[:, :, t, None, None] * o + rb[:, :, t, None, :]
    return out.transpose(1, 2) if layout == "BNHD" else out


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
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("no backward on 'triton' (upstream has none); use backend='torch' for gradients")
    return reasons


@_dispatch.register_backend(
    "rectified", "triton", can_run=_triton_can_run, doc="block-sparse core + fused R/C epilogue"
)
def _run_triton(q, k, v, plan, scale, layout):
    lay = plan.seq_layout
    seg = [lay.video_start, lay.num_video, lay.text_start, lay.text_len]
    out = _rectified_fwd_op(
        _bnhd(q, layout),
        _bnhd(k, layout),
        _bnhd(v, layout),
        plan.kv_index,
        plan.kv_count,
        plan.rect_scale,
        plan.rect_bias,
        plan.block_size,
        scale,
        seg,
        lay.valid_text(q.shape[0], q.device),
        plan.tile_order(),
    )
    return out.transpose(1, 2) if layout == "BHND" else out


@_dispatch.register_backend(
    "rectified",
    "torch",
    can_run=lambda *a: [],
    auto_devices=("cpu",),
    doc="pure-PyTorch (plan applied with a dense masked softmax)",
)
def _run_torch(q, k, v, plan, scale, layout):
    return _apply_plan_torch(q, k, v, plan, scale, layout)
