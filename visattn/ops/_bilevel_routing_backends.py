"""Backends of ``visattn.ops.routed_attention``: Triton (custom ops), torch reference, FlexAttention.

Every backend takes 2-D maps ``[B, H, W, heads, d]`` (1-D maps arrive as ``1 x N``), the routing
``idx`` ``[B, Hh, P, topk]`` (``Hh`` 1 or heads), the optional soft weights, the region geometry and
the padding mode, and returns ``(out, lse)``.
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._flex import flex_attention_lse
from ._bilevel_routing_ref import _boxed, _ref_gather, _ref_mask
from .bilevel_routing_plan import _cdiv, choose_group

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
_OPTION_KEYS = {"block_m", "block_n", "group", "impl"}


def _check_options(opts: dict) -> None:
    unknown = set(opts) - _OPTION_KEYS
    if unknown:
        raise ValueError(f"expected backend_options keys in {sorted(_OPTION_KEYS)}, got {sorted(unknown)}")
    for key in ("block_m", "block_n"):
        val = opts.get(key)
        if val is not None and (not isinstance(val, int) or val < 16 or val & (val - 1)):
            raise ValueError(f"expected backend_options[{key!r}] to be a power of two >= 16, got {val!r}")
    g = opts.get("group")
    if g is not None and (not isinstance(g, (tuple, list)) or len(g) != 2 or min(g) < 1 or g[0] * g[1] > 32):
        raise ValueError(
            f"expected backend_options['group'] = (g_H, g_W) with 1 <= g_H * g_W <= 32, got {g!r}"
        )


# ---------------------------------------------------------------------------------------------
# Triton. The custom ops serve torch.compile (fake impls, one opaque call each); eager calls go through
# the autograd.Function below, which skips the custom-op dispatcher's per-call host overhead (~0.5 ms,
# more than these kernels take at BiFormer's stage shapes) and builds the inverse plan only when a
# gradient will be needed.


@torch.library.custom_op("visattn::bilevel_routing_plan", mutates_args=())
def _plan_op(
    idx: torch.Tensor, grid: list[int], group: list[int], inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.bilevel_routing import bra_plan

    return bra_plan(idx, tuple(grid), tuple(group), inverse)


@_plan_op.register_fake
def _(idx, grid, group, inverse):
    B, Hh, P, K = idx.shape
    n_tiles = _cdiv(grid[0], group[0]) * _cdiv(grid[1], group[1])
    cap, icap = min(group[0] * group[1] * K, P), (P if inverse else 0)
    new = idx.new_empty
    return (new((B, Hh, n_tiles, cap), dtype=torch.int32), new((B, Hh, n_tiles, cap), dtype=torch.int32),
            new((B, Hh, n_tiles), dtype=torch.int32), new((B, Hh, n_tiles, icap), dtype=torch.int32),
            new((B, Hh, n_tiles, icap), dtype=torch.int32), new((B, Hh, n_tiles), dtype=torch.int32))


@torch.library.custom_op("visattn::bilevel_routing_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lst: torch.Tensor,
    sel: torch.Tensor,
    cnt: torch.Tensor,
    ilst: torch.Tensor,
    isel: torch.Tensor,
    icnt: torch.Tensor,
    geo: list[int],
    scale: float,
    zeros: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.bilevel_routing import bra_fwd

    return bra_fwd(q, k, v, lst, sel, cnt, tuple(geo), scale, zeros)


@_fwd_op.register_fake
def _(q, k, v, lst, sel, cnt, ilst, isel, icnt, geo, scale, zeros):
    B, H, W, heads, _ = q.shape
    return q.new_empty((B, H, W, heads, v.shape[-1])), q.new_empty((B, H, W, heads), dtype=torch.float32)


@torch.library.custom_op("visattn::bilevel_routing_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    lst: torch.Tensor,
    sel: torch.Tensor,
    cnt: torch.Tensor,
    ilst: torch.Tensor,
    isel: torch.Tensor,
    icnt: torch.Tensor,
    geo: list[int],
    scale: float,
    zeros: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.bilevel_routing import bra_bwd

    return bra_bwd(do, q, k, v, out, lse, dlse, lst, sel, cnt, ilst, isel, icnt, tuple(geo), scale, zeros)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, lst, sel, cnt, ilst, isel, icnt, geo, scale, zeros):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _bwd_inputs(dout, dlse, out):
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()  # the kernels need a dense head dim
    return dout, (None if dlse is None else dlse.contiguous())


def _setup_context(ctx, inputs, output):
    q, k, v, lst, sel, cnt, ilst, isel, icnt, geo, scale, zeros = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lst, sel, cnt, ilst, isel, icnt)
    ctx.geo, ctx.scale, ctx.zeros = geo, scale, zeros


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, lst, sel, cnt, ilst, isel, icnt = ctx.saved_tensors
    dout, dlse = _bwd_inputs(dout, dlse, out)
    dq, dk, dv = _bwd_op(
        dout, q, k, v, out, lse, dlse, lst, sel, cnt, ilst, isel, icnt, ctx.geo, ctx.scale, ctx.zeros
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _RoutedFunction(torch.autograd.Function):
    """Eager path: plan (inverse lists only when a gradient flows), forward and backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, idx, geo, scale, zeros):
        from ..kernels.bilevel_routing import bra_fwd, bra_plan

        grid, group = (geo[2], geo[3]), (geo[4], geo[5])
        plan = bra_plan(idx, grid, group, any(ctx.needs_input_grad[:3]))
        out, lse = bra_fwd(q, k, v, plan[0], plan[1], plan[2], tuple(geo), scale, zeros)
        ctx.save_for_backward(q, k, v, out, lse, *plan)
        ctx.geo, ctx.scale, ctx.zeros = tuple(geo), scale, zeros
        ctx.set_materialize_grads(False)  # an unused LSE costs no zeros tensor in the backward
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from ..kernels.bilevel_routing import bra_bwd

        q, k, v, out, lse, *plan = ctx.saved_tensors
        dout, dlse = _bwd_inputs(dout, dlse, out)
        dq, dk, dv = bra_bwd(dout, q, k, v, out, lse, dlse, *plan, ctx.geo, ctx.scale, ctx.zeros)
        return dq, dk, dv, None, None, None, None


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    # the kernels address (b, y, x, head) by strides but need a dense channel dim
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_can_run(q, k, v, idx, weight, region, grid, padding, opts) -> list[str]:
    reasons = _dispatch.triton_reasons(q.device)
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        reasons.append(
            "Triton's interpreter computes bfloat16 tl.dot wrongly; use float16/float32 on the CPU"
        )
    if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dims d_qk={q.shape[-1]}, d_v={v.shape[-1]} exceed {_TRITON_MAX_HEAD_DIM}")
    if weight is not None:
        reasons.append("soft routing (region_weight) runs on the 'torch' backend only")
    if opts.get("impl") is not None:
        reasons.append("backend_options['impl'] belongs to the 'torch' backend")
    return reasons


def triton_geometry(device, dtype, region, grid, opts) -> tuple[int, ...]:
    """``(r_H, r_W, R_H, R_W, g_H, g_W, block_m, block_n)`` of a launch (options override defaults)."""
    from ..kernels.bilevel_routing import default_blocks

    bm, bn = default_blocks(device, dtype, region[0] * region[1])
    bm, bn = opts.get("block_m") or bm, opts.get("block_n") or bn
    group = tuple(opts["group"]) if opts.get("group") else choose_group(region, grid, bm)
    return (region[0], region[1], grid[0], grid[1], group[0], group[1], bm, bn)


@_dispatch.register_backend(
    "bilevel_routing", "triton", can_run=_triton_can_run, doc="fused Triton fwd + bwd, K/V read in place"
)
def _run_triton(q, k, v, idx, weight, region, grid, scale, padding, opts):
    _check_options(opts)
    geo = triton_geometry(q.device, q.dtype, region, grid, opts)
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    if not torch.compiler.is_compiling():
        return _RoutedFunction.apply(q, k, v, idx, geo, scale, padding == "zeros")
    plan = _plan_op(idx, [grid[0], grid[1]], [geo[4], geo[5]], True)
    return _fwd_op(q, k, v, *plan, list(geo), scale, padding == "zeros")


# ---------------------------------------------------------------------------------------------
# torch reference


def _torch_can_run(q, k, v, idx, weight, region, grid, padding, opts) -> list[str]:
    impl = opts.get("impl")
    if impl not in (None, "mask", "gather"):
        return [f"backend_options['impl'] must be 'mask' or 'gather', got {impl!r}"]
    return []


@_dispatch.register_backend(
    "bilevel_routing",
    "torch",
    can_run=_torch_can_run,
    auto_devices=("cpu",),
    doc="pure-PyTorch reference (mask or gather, whichever is cheaper)",
)
def _run_torch(q, k, v, idx, weight, region, grid, scale, padding, opts):
    _check_options(opts)
    # the dense mask costs N^2 per head, the gather N * topk * T: take the cheaper one
    T = region[0] * region[1]
    N = grid[0] * grid[1] * T
    impl = opts.get("impl") or ("mask" if N <= 4096 and N <= 2 * idx.shape[-1] * T else "gather")
    fn = _ref_mask if impl == "mask" else _ref_gather
    # matmuls in the input dtype, softmax statistics in fp32 for fp16/bf16 (as BiFormer under autocast)
    out, lse = fn(q, k, v, idx, weight, region, grid, scale, padding == "zeros", q.dtype)
    return out.to(q.dtype), (lse if q.dtype == torch.float64 else lse.float())


# ---------------------------------------------------------------------------------------------
# FlexAttention with a mask from the routing (comparison), on region-permuted copies of q, k, v


def _flex_can_run(q, k, v, idx, weight, region, grid, padding, opts) -> list[str]:
    reasons = _dispatch.flex_reasons()
    if weight is not None:
        reasons.append("soft routing (region_weight) runs on the 'torch' backend only")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        reasons.append("FlexAttention's CUDA kernels do not support float64")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("FlexAttention has no backward on the CPU")
    if q.shape[-1] != v.shape[-1] and q.device.type == "cpu":
        reasons.append("FlexAttention on the CPU needs d_qk == d_v")
    return reasons


_FLEX_CACHE: dict = {}
_VALID: dict = {}  # (H, W, region, grid, padding, device) -> which region-permuted positions are keys


def flex_block_mask(idx: torch.Tensor, region, grid, valid: torch.Tensor, heads: int):
    """A FlexAttention ``BlockMask`` of the routing on the region-permuted token order (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (
        idx.data_ptr(),
        idx._version,
        tuple(idx.shape),
        tuple(region),
        tuple(grid),
        valid.data_ptr(),
        heads,
    )
    if _FLEX_CACHE.get("key") == key:
        return _FLEX_CACHE["mask"]
    B, Hh, P, _ = idx.shape
    T = region[0] * region[1]
    routed = torch.zeros((B, Hh, P, P), dtype=torch.bool, device=idx.device).scatter_(-1, idx.long(), True)
    per_head = Hh > 1

    def mask_mod(b, h, q_idx, kv_idx):
        hh = h if per_head else 0
        return routed[b, hh, q_idx // T, kv_idx // T] & valid[kv_idx]

    n = P * T
    bm = create_block_mask(
        mask_mod, B, heads if per_head else None, n, n, device=idx.device, _compile=idx.device.type == "cuda"
    )
    _FLEX_CACHE.update(key=key, mask=bm)
    return bm


def _regions(x, region, grid):
    """``[B, H, W, h, d]`` -> region-permuted ``[B, h, P * T, d]`` (boxes zero-padded)."""
    B, nh = x.shape[0], x.shape[3]
    x = _boxed(x, region, grid).view(B, grid[0], region[0], grid[1], region[1], nh, -1)
    return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(B, nh, grid[0] * grid[1] * region[0] * region[1], -1)


@_dispatch.register_backend(
    "bilevel_routing",
    "flex",
    can_run=_flex_can_run,
    auto=False,
    doc="FlexAttention with a BlockMask of the routing (comparison)",
)
def _run_flex(q, k, v, idx, weight, region, grid, scale, padding, opts):
    B, H, W, nh, _ = q.shape
    vkey = (H, W, tuple(region), tuple(grid), padding, str(q.device))
    if vkey not in _VALID:
        yy = torch.arange(grid[0] * region[0], device=q.device)[:, None]
        xx = torch.arange(grid[1] * region[1], device=q.device)[None, :]
        inside = ((yy < H) & (xx < W)).view(grid[0], region[0], grid[1], region[1]).permute(0, 2, 1, 3)
        _VALID[vkey] = torch.ones_like(inside.reshape(-1)) if padding == "zeros" else inside.reshape(-1)
    bm = flex_block_mask(idx, region, grid, _VALID[vkey], nh)
    qr, kr, vr = (_regions(t, region, grid) for t in (q, k, v))
    out, lse = flex_attention_lse(qr, kr, vr, bm, scale)

    def unregion(x):  # [B, h, P*T, c] -> [B, H, W, h, c]
        x = x.view(B, nh, grid[0], grid[1], region[0], region[1], -1).permute(0, 2, 4, 3, 5, 1, 6)
        return x.reshape(B, grid[0] * region[0], grid[1] * region[1], nh, -1)[:, :H, :W]

    return unregion(out), unregion(lse[..., None])[..., 0]
