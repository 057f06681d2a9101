"""Neighborhood attention (NA / DiNA / GNA): the public op, its custom ops and backends.

"Neighborhood Attention Transformer" (https://arxiv.org/abs/2204.07143), "Dilated Neighborhood
Attention Transformer" (https://arxiv.org/abs/2209.15001), "Generalized Neighborhood Attention"
(https://arxiv.org/abs/2504.16922). Semantics are NATTEN 0.21's, restated in
:mod:`visattn.ops.neighborhood_ref` (window tables, masks, the float64 reference).

Contents: :func:`neighborhood_attention`; the ``torch.library`` custom ops
``visattn::neighborhood_fwd`` / ``visattn::neighborhood_bwd`` (fake impls and autograd, so
``torch.compile(fullgraph=True)`` works); backends ``"triton"`` (fused kernels), ``"torch"`` (the
reference), ``"flex"`` (FlexAttention with a cached block mask) and ``"natten"`` (NATTEN, when
installed), the last two for comparison.
"""

from __future__ import annotations

import math

import torch

from . import _dispatch
from .neighborhood_ref import (
    NAParams,
    _windows,
    clamp_neighborhood,
    merge_attentions,
    neighborhood_attention_gather,
    neighborhood_attention_ref,
    neighborhood_attention_weights,
    neighborhood_mask,
    neighborhood_windows,
    normalize_na_args,
    suggest_block_sparse,
)

__all__ = [
    "neighborhood_attention",
    "neighborhood_attention_ref",
    "neighborhood_attention_weights",
    "neighborhood_windows",
    "neighborhood_mask",
    "clamp_neighborhood",
    "suggest_block_sparse",
    "merge_attentions",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_OPTION_KEYS = ("q_tile", "kv_tile", "num_warps", "num_stages", "bwd_mode")


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    *,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    rpb: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    backend_options: dict | None = None,
):
    """Neighborhood attention over a 1-D, 2-D or 3-D token grid (NATTEN 0.21 semantics).

    Each query attends the ``prod(kernel_size)`` keys of its window (fewer when causal), plus every
    extra token, in one softmax. Equivalent PyTorch: :func:`neighborhood_attention_ref`.

    Args:
        q: ``[B, X_1, .., X_n, H, D]`` (heads-last; n = 1, 2, 3 from ``q.dim() - 3``); any strides
            with a dense head dim (e.g. slices of a packed QKV projection).
        k: ``[B, X_1, .., X_n, H_kv, D]``; ``H`` must be a multiple of ``H_kv`` (GQA/MQA).
        v: ``[B, X_1, .., X_n, H_kv, D_v]``.
        kernel_size: window size, an int or one per axis (``kernel_size[a] * dilation[a] <= X_a``).
        stride: GNA stride, ``1 <= stride[a] <= kernel_size[a]`` (default 1).
        dilation: DiNA dilation (default 1).
        is_causal: bool or one per axis.
        scale: softmax scale (default ``D ** -0.5``); any finite value, including 0.0, is used.
        extra_kv: ``(k_e, v_e)`` of shapes ``[B, N_e, H_kv, D]`` / ``[B, N_e, H_kv, D_v]``, attended by
            every query, unmasked and unbiased.
        rpb: relative positional bias ``[H, 2k_1 - 1, .., 2k_n - 1]`` (NAT/DiNAT), differentiable.
        key_padding_mask: bool ``[B, X_1, .., X_n]``, True = keep; rows left without keys give 0.
        return_lse: also return the LSE ``[B, X_1, .., X_n, H]`` (fp32, natural log, differentiable).
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``, ``"torch"``,
            ``"flex"`` or ``"natten"``.

    Other Args:
        backend_options: ``dict(q_tile=, kv_tile=, num_warps=, num_stages=, bwd_mode="deterministic")``
            for the Triton backend; never changes results.

    Returns:
        ``out`` ``[B, X_1, .., X_n, H, D_v]`` in q's dtype, or ``(out, lse)``.

    Raises:
        ValueError: bad shapes, dtypes, devices or per-axis arguments (message names the axis).
        NotImplementedError: the requested backend cannot run these inputs (with its reasons).
    """
    p, info = _check(q, k, v, kernel_size, stride, dilation, is_causal, scale, extra_kv, rpb, key_padding_mask)
    opts = _check_options(backend_options)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _dispatch.select("neighborhood", backend, q.device, info, q, k, v, p, extra_kv, rpb, key_padding_mask,
                              opts)
    out, lse = chosen.fn(q, k, v, p, scale, extra_kv, rpb, key_padding_mask, opts)
    return (out, lse) if return_lse else out


def _check(q, k, v, kernel_size, stride, dilation, is_causal, scale, extra_kv, rpb, kpm):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"expected {name} to be a torch.Tensor, got {name}={type(t).__name__}")
    if q.dim() not in (4, 5, 6):
        raise ValueError(f"expected q of rank 4, 5 or 6 ([B, *spatial, H, D] with 1-3 spatial axes), "
                         f"got q.shape={tuple(q.shape)}")
    n = q.dim() - 3
    for name, t in (("k", k), ("v", v)):
        if t.dim() != q.dim():
            raise ValueError(f"expected {name} of rank {q.dim()} like q, got {name}.shape={tuple(t.shape)}")
        for ax in range(n + 1):
            if t.shape[ax] != q.shape[ax]:
                raise ValueError(f"expected {name}.shape[{ax}] == q.shape[{ax}] (batch/spatial axis {ax}), "
                                 f"got q.shape={tuple(q.shape)}, {name}.shape={tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"expected a floating dtype (float16, bfloat16, float32, float64), got q.dtype={q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"expected q, k, v on one device, got {q.device}, {k.device}, {v.device}")
    H, Hk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if v.shape[-2] != Hk:
        raise ValueError(f"expected k and v to share the head count, got k heads={Hk}, v heads={v.shape[-2]}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"expected the query heads to be a multiple of the key/value heads, got H={H}, H_kv={Hk}")
    if k.shape[-1] != D:
        raise ValueError(f"expected q and k to share the head dim, got q.shape[-1]={D}, k.shape[-1]={k.shape[-1]}")
    if min(q.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"expected non-empty tensors, got q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    if scale is not None:
        if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"expected scale to be a finite float or None, got scale={scale!r}")
    p = normalize_na_args(tuple(q.shape[1:1 + n]), kernel_size, stride, dilation, is_causal)
    if extra_kv is not None:
        if not isinstance(extra_kv, (tuple, list)) or len(extra_kv) != 2:
            raise ValueError(f"expected extra_kv to be a pair (k_e, v_e), got extra_kv={type(extra_kv).__name__}")
        ke, ve = extra_kv
        want_k = (q.shape[0], None, Hk, D)
        for name, t, dv in (("extra_kv[0]", ke, D), ("extra_kv[1]", ve, v.shape[-1])):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"expected {name} of shape [B, N_e, H_kv, D], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.shape[0] != want_k[0] or t.shape[2] != Hk or t.shape[3] != dv:
                raise ValueError(f"expected {name}.shape == [{q.shape[0]}, N_e, {Hk}, {dv}], got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"expected {name} with q's dtype and device, got {t.dtype} on {t.device}")
        if ke.shape[1] != ve.shape[1]:
            raise ValueError(f"expected extra keys and values of one length, got {ke.shape[1]} and {ve.shape[1]}")
    if rpb is not None:
        want = (H, *(2 * kk - 1 for kk in p.kernel_size))
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want or not rpb.is_floating_point():
            raise ValueError(f"expected rpb of shape [H, 2k-1, ...] = {list(want)} (floating), got "
                             f"{tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__}")
        if rpb.device != q.device:
            raise ValueError(f"expected rpb on q's device {q.device}, got rpb.device={rpb.device}")
    if kpm is not None:
        want = (q.shape[0], *p.size)
        if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool or tuple(kpm.shape) != want:
            raise ValueError(f"expected key_padding_mask to be a bool tensor of shape {list(want)}, got "
                             f"{(kpm.dtype, tuple(kpm.shape)) if isinstance(kpm, torch.Tensor) else type(kpm).__name__}")
        if kpm.device != q.device:
            raise ValueError(f"expected key_padding_mask on q's device {q.device}, got {kpm.device}")
    # built only for an error message (host time per call otherwise); one f-string, no concatenation:
    # with symbolic shapes dynamo cannot add two formatted strings (fullgraph)
    def info() -> str:
        extra_shape = None if extra_kv is None else tuple(extra_kv[0].shape)
        return (f"q: shape={tuple(q.shape)} dtype={q.dtype} device={q.device}; k: {tuple(k.shape)}; "
                f"v: {tuple(v.shape)}; kernel_size={p.kernel_size}, stride={p.stride}, dilation={p.dilation}, "
                f"is_causal={p.is_causal}; extra_kv: {extra_shape}; rpb: {rpb is not None}; "
                f"key_padding_mask: {kpm is not None}")

    return p, info


def _check_options(opts):
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ValueError(f"expected backend_options to be a dict or None, got {type(opts).__name__}")
    bad = sorted(set(opts) - set(_OPTION_KEYS))
    if bad:
        raise ValueError(f"unknown backend_options keys {bad}; valid keys are {list(_OPTION_KEYS)}")
    mode = opts.get("bwd_mode", "deterministic")
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"expected backend_options['bwd_mode'] in ('deterministic', 'atomic'), got {mode!r}")
    return dict(opts)


# ---------------------------------------------------------------------------------------------
# custom ops: q/k/v arrive as [B, *spatial, H, D]; per-axis lists have 3 entries (leading axes of size 1)


def _tables(size, ks, st, dl, causal, device):
    """Window tables of the launchers' checked per-axis tuples: a cache lookup, no re-normalisation."""
    return _windows(NAParams(size, ks, st, dl, tuple(bool(c) for c in causal)), device)


def _cfg_from(opts, device, size, ks, D, dtype):
    if not opts.get("q_tile") and not opts.get("kv_tile"):
        return None
    from ..kernels import _configs

    base = _configs.neighborhood_config(device, size, ks, D, dtype, "fwd", False)
    q_tile = tuple(opts.get("q_tile") or base.q_tile)
    kv_tile = tuple(opts.get("kv_tile") or base.kv_tile)
    q_tile = (1,) * (3 - len(q_tile)) + q_tile
    kv_tile = (1,) * (3 - len(kv_tile)) + kv_tile
    return _configs.NATileConfig(q_tile, kv_tile, opts.get("num_warps", base.num_warps),
                                 opts.get("num_stages", base.num_stages))


def _geometry(q):
    from ..kernels.neighborhood import geometry

    return geometry(q)


def _fwd_impl(q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles):
    from ..kernels import _configs
    from ..kernels.neighborhood import neighborhood_fwd

    size = _geometry(q)[1]
    start, end, _, _ = _tables(size, tuple(kernel_size), tuple(stride), tuple(dilation), causal, q.device)
    cfg = _configs.NATileConfig(tuple(tiles[0:3]), tuple(tiles[3:6]), tiles[6], tiles[7]) if tiles else None
    return neighborhood_fwd(q, k, v, (start, end), tuple(kernel_size), tuple(dilation), scale,
                            (ke, ve) if ke is not None else None, rpb, _as_u8(kpm), cfg)


def _bwd_impl(do, q, k, v, out, lse, dlse, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, rpb_grad):
    from ..kernels.neighborhood import neighborhood_bwd

    size = _geometry(q)[1]
    ks = tuple(kernel_size)
    tables = _tables(size, ks, tuple(stride), tuple(dilation), causal, q.device)
    dq, dk, dv, dke, dve, ds = neighborhood_bwd(do, q, k, v, out, lse, dlse, tables, ks, tuple(dilation), scale,
                                                (ke, ve) if ke is not None else None, rpb, _as_u8(kpm), rpb_grad)
    drpb = _rpb_grad(ds, tables[0], ks, tuple(dilation), rpb) if rpb_grad else None
    return dq, dk, dv, dke, dve, drpb


# The custom ops serve torch.compile (fake impls, no graph breaks); eager calls go through the
# autograd.Function below, because the custom-op dispatcher's per-call checks cost ~0.5 ms on the
# host, more than the kernels of a small layer (measured on an H100, benchmarks/NOTES.md).


@torch.library.custom_op("visattn::neighborhood_fwd", mutates_args=())
def _neighborhood_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ke: torch.Tensor | None, ve: torch.Tensor | None,
    rpb: torch.Tensor | None, kpm: torch.Tensor | None, kernel_size: list[int], stride: list[int],
    dilation: list[int], causal: list[int], scale: float, tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles)


@_neighborhood_fwd_op.register_fake
def _(q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("visattn::neighborhood_bwd", mutates_args=())
def _neighborhood_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, ke: torch.Tensor | None, ve: torch.Tensor | None, rpb: torch.Tensor | None,
    kpm: torch.Tensor | None, kernel_size: list[int], stride: list[int], dilation: list[int],
    causal: list[int], scale: float, rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dke, dve, drpb = _bwd_impl(do, q, k, v, out, lse, dlse, ke, ve, rpb, kpm, kernel_size, stride,
                                           dilation, causal, scale, rpb_grad)
    return (dq, dk, dv, dke if dke is not None else q.new_empty(0), dve if dve is not None else q.new_empty(0),
            drpb if drpb is not None else q.new_empty(0))


@_neighborhood_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, rpb_grad):
    # the launchers allocate contiguous gradients whatever the inputs' strides (e.g. packed qkv views)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            ke.new_empty(ke.shape) if ke is not None else q.new_empty(0),
            ve.new_empty(ve.shape) if ve is not None else q.new_empty(0),
            rpb.new_empty(rpb.shape) if rpb_grad else q.new_empty(0))


def _as_u8(kpm):
    return None if kpm is None else kpm.view(torch.uint8)


def _rpb_grad(ds, starts, ks, dil, rpb):
    """Fixed-order reduction of per-slot score gradients ``[B, L0, L1, L2, H, prod(k)]`` into the table:
    per axis a one-hot ``[L_a, k_a, 2k_a - 1]`` maps (query, slot) to the offset ``j - i + k - 1``."""
    B, L0, L1, L2, H, _ = ds.shape
    ks = tuple(ks)
    ds = ds.view(B, L0, L1, L2, H, *ks)
    onehots = []
    for a, L in enumerate((L0, L1, L2)):
        x = torch.arange(L, device=ds.device)
        i = x // dil[a]
        t = torch.arange(ks[a], device=ds.device)
        off = starts[a].long()[:, None] + t[None, :] - i[:, None] + ks[a] - 1  # [L, k]
        # a comparison, not F.one_hot: one_hot checks its input's range on the host (a sync that breaks
        # CUDA-graph capture of the backward)
        bins = torch.arange(2 * ks[a] - 1, device=ds.device)
        onehots.append((off.clamp(0, 2 * ks[a] - 2)[..., None] == bins).to(ds.dtype))
    g = torch.einsum("bxyzhuvw,xuo,yvp,zwq->hopq", ds, *onehots)
    return g.reshape(rpb.shape).to(rpb.dtype).contiguous()  # einsum may return a permuted layout


def _setup_context(ctx, inputs, output):
    q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, ke, ve, rpb, kpm)
    ctx.args = (kernel_size, stride, dilation, causal, scale)
    ctx.rpb_grad = rpb is not None and ctx.needs_input_grad[5]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, ke, ve, rpb, kpm = ctx.saved_tensors
    kernel_size, stride, dilation, causal, scale = ctx.args
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    dq, dk, dv, dke, dve, drpb = _neighborhood_bwd_op(dout, q, k, v, out, lse, dlse, ke, ve, rpb, kpm, kernel_size,
                                                      stride, dilation, causal, scale, ctx.rpb_grad)
    return (dq, dk, dv, dke if ke is not None else None, dve if ve is not None else None,
            drpb if ctx.rpb_grad else None, None, None, None, None, None, None, None)


_neighborhood_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _NeighborhoodFunction(torch.autograd.Function):
    """Eager path: the same kernels as the custom ops, without the dispatcher's per-call overhead."""

    @staticmethod
    def forward(ctx, q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles):
        out, lse = _fwd_impl(q, k, v, ke, ve, rpb, kpm, kernel_size, stride, dilation, causal, scale, tiles)
        ctx.save_for_backward(q, k, v, out, lse, ke, ve, rpb, kpm)
        ctx.args = (kernel_size, stride, dilation, causal, scale)
        ctx.rpb_grad = rpb is not None and ctx.needs_input_grad[5]
        ctx.set_materialize_grads(False)  # an unused LSE costs no zeros tensor in the backward
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, ke, ve, rpb, kpm = ctx.saved_tensors
        kernel_size, stride, dilation, causal, scale = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv, dke, dve, drpb = _bwd_impl(dout, q, k, v, out, lse, dlse, ke, ve, rpb, kpm, kernel_size, stride,
                                               dilation, causal, scale, ctx.rpb_grad)
        return dq, dk, dv, dke, dve, drpb, None, None, None, None, None, None, None


def _neighborhood_fwd(*args):
    if torch.compiler.is_compiling():
        return _neighborhood_fwd_op(*args)
    return _NeighborhoodFunction.apply(*args)


def _pad3(values, fill):
    return [fill] * (3 - len(values)) + [int(x) for x in values]


# ---------------------------------------------------------------------------------------------
# backends, in "auto" priority order


def _triton_can_run(q, k, v, p, extra_kv, rpb, kpm, opts) -> list[str]:
    reasons = _dispatch.triton_reasons(q.device)
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        reasons.append("Triton's interpreter computes bfloat16 tl.dot wrongly; use float16/float32 on the CPU")
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        reasons.append(f"head dims up to {_MAX_HEAD_DIM} are supported, got D={q.shape[-1]}, D_v={v.shape[-1]}")
    if opts.get("bwd_mode", "deterministic") == "atomic":
        reasons.append("bwd_mode='atomic' is not implemented; the deterministic backward is the default")
    if rpb is not None and rpb.dtype == torch.float64:
        reasons.append("rpb in float64 is not supported by the Triton kernels")
    return reasons


@_dispatch.register_backend("neighborhood", "triton", can_run=_triton_can_run, doc="fused Triton fwd + bwd")
def _run_triton(q, k, v, p: NAParams, scale, extra_kv, rpb, kpm, opts):
    n = len(p.size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # kernels need a dense head dim
    ke, ve = (None, None) if extra_kv is None else (
        t if t.stride(-1) == 1 else t.contiguous() for t in extra_kv)
    cfg = _cfg_from(opts, q.device, (1,) * (3 - n) + p.size, (1,) * (3 - n) + p.kernel_size, q.shape[-1], q.dtype)
    tiles = [] if cfg is None else [*cfg.q_tile, *cfg.kv_tile, cfg.num_warps, cfg.num_stages]
    return _neighborhood_fwd(q, k, v, ke, ve, rpb, kpm, _pad3(p.kernel_size, 1), _pad3(p.stride, 1),
                             _pad3(p.dilation, 1), _pad3([int(c) for c in p.is_causal], 0), scale, tiles)


@_dispatch.register_backend("neighborhood", "torch", can_run=lambda *a: [], auto_devices=("cpu",),
                            doc="pure-PyTorch reference")
def _run_torch(q, k, v, p: NAParams, scale, extra_kv, rpb, kpm, opts):
    if math.prod(p.kernel_size) * 4 <= math.prod(p.size):  # windows much smaller than the grid: gather them
        return neighborhood_attention_gather(q, k, v, p, scale, extra_kv, rpb, kpm)
    return neighborhood_attention_ref(q, k, v, p.kernel_size, stride=p.stride, dilation=p.dilation,
                                      is_causal=p.is_causal, scale=scale, extra_kv=extra_kv, rpb=rpb,
                                      key_padding_mask=kpm, return_lse=True, upcast=q.dtype == torch.float64)


from . import _neighborhood_compare  # noqa: E402,F401  (registers "flex" and "natten" after the defaults)
