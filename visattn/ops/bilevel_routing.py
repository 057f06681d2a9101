"""Bi-level routing attention (BRA): region routing plus token attention over the routed regions.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023,
https://arxiv.org/abs/2303.08810). A 2-D map is cut into regions; region descriptors (means of the
detached q and k) pick, per query region, the ``topk`` regions with the largest affinity; each query
token then attends all tokens of those regions (specs/routing.md §2).

Contents: :func:`region_routing`, :func:`routed_attention`, :func:`bilevel_routing_attention` (the two
chained), the references :func:`bilevel_routing_attention_ref` / :func:`routed_attention_ref`
(``impl="mask"``: a dense masked softmax; ``impl="gather"``: BiFormer's own per-region K/V gather),
the ``torch.library`` custom ops of the Triton path, and the backends ``"triton"``, ``"torch"`` and
``"flex"`` (FlexAttention with a mask from the routing, for comparison).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import _dispatch
from ._bilevel_routing_ref import _ref_gather, _ref_mask
from ._checks import describe_tensors, normalize_tuple
from .bilevel_routing_plan import _cdiv

__all__ = [
    "RegionRouting",
    "region_grid",
    "region_routing",
    "routed_attention",
    "routed_attention_ref",
    "bilevel_routing_attention",
    "bilevel_routing_attention_ref",
]

_PADDINGS = ("mask", "zeros")
_ROUTINGS = ("hard", "soft")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_IMPL_MAX_TOKENS = 4096


class RegionRouting(NamedTuple):
    """Result of :func:`region_routing`.

    ``index``: int32 ``[B, P, topk]``, ascending per row; ``weight``: fp32 ``[B, P, topk]`` (soft
    routing) or None; ``grid``: regions per spatial axis; ``region_size``: tokens per axis of a region.
    """

    index: torch.Tensor
    weight: torch.Tensor | None
    grid: tuple[int, ...]
    region_size: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_maps(q, k, v=None) -> int:
    """Check ``[B, *spatial, heads, d]`` maps (spatial rank 1 or 2); returns the spatial rank."""
    names = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"expected {name} to be a torch.Tensor, got {name}={type(t).__name__}")
        if t.dim() not in (4, 5):
            raise ValueError(
                f"expected {name} of rank 5 [B, H, W, heads, d] (or rank 4 [B, N, heads, d] for 1-D maps), "
                f"got {name}.shape={tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"expected {name}.dtype in (float16, bfloat16, float32, float64), got {name}.dtype={t.dtype}"
            )
    for name, t in names[1:]:
        if t.dim() != q.dim():
            raise ValueError(
                f"expected {name} of the same rank as q, got q.shape={tuple(q.shape)}, "
                f"{name}.shape={tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise ValueError(
                f"expected q, k and v to share one dtype, got q.dtype={q.dtype}, {name}.dtype={t.dtype}"
            )
        if t.device != q.device:
            raise ValueError(
                f"expected q, k and v on one device, got q.device={q.device}, {name}.device={t.device}"
            )
        if t.shape[:-1] != q.shape[:-1]:  # axis labels are built only for the message (host time per call)
            axes = ["B"] + [f"spatial {i}" for i in range(q.dim() - 3)] + ["heads"]
            ax = next(i for i in range(q.dim() - 1) if t.shape[i] != q.shape[i])
            raise ValueError(
                f"expected q and {name} to match on axis {ax} ({axes[ax]}), got "
                f"q.shape[{ax}]={q.shape[ax]}, {name}.shape[{ax}]={t.shape[ax]}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"expected q and k to share d_qk (last axis), got q.shape[-1]={q.shape[-1]}, "
            f"k.shape[-1]={k.shape[-1]}"
        )
    if q.numel() == 0 or k.numel() == 0 or (v is not None and v.numel() == 0):
        raise ValueError(f"expected non-empty inputs, got q.shape={tuple(q.shape)}")
    return q.dim() - 3


def _as_2d(t: torch.Tensor | None) -> torch.Tensor | None:
    # a 1-D map [B, N, heads, d] is the 1 x N map [B, 1, N, heads, d] (a view)
    return t if t is None or t.dim() == 5 else t.unsqueeze(1)


def _check_padding(padding: str) -> str:
    if padding not in _PADDINGS:
        raise ValueError(f"expected padding in {_PADDINGS}, got padding={padding!r}")
    return padding


def _grid_of(size: tuple[int, int], region: tuple[int, int]) -> tuple[int, int]:
    return tuple(_cdiv(L, r) for L, r in zip(size, region))  # type: ignore[return-value]


def _geometry(size, rank, n_win, region_size, padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """(region size, grid) of a 2-D ``size`` per specs/routing.md §2.2 / §2.6."""
    axes = ("H", "W") if rank == 2 else ("N",)
    if (n_win is None) == (region_size is None):
        raise ValueError(f"expected exactly one of n_win and region_size, got {n_win=}, {region_size=}")
    if region_size is not None:
        rs = normalize_tuple(region_size, rank, "region_size")
        for ax, r in zip(axes, rs):
            if r < 1:
                raise ValueError(f"expected region_size >= 1 on every axis, got region_size={rs} (axis {ax})")
        region = (1,) + rs if rank == 1 else rs
    else:
        nw = normalize_tuple(n_win, rank, "n_win")
        for ax, n in zip(axes, nw):
            if n < 1:
                raise ValueError(f"expected n_win >= 1 on every axis, got n_win={nw} (axis {ax})")
        nw = (1,) + nw if rank == 1 else nw
        if padding == "zeros":
            for ax, L, n in zip(("H", "W"), size, nw):
                if L < n:
                    raise ValueError(
                        f"padding='zeros' (legacy_nchw) needs the map to be at least n_win "
                        f"on every axis, got size {L} < n_win {n} on axis {ax}"
                    )
            region = tuple(L // n for L, n in zip(size, nw))
        else:
            region = tuple(_cdiv(L, n) for L, n in zip(size, nw))
    return region, _grid_of(size, region)  # type: ignore[return-value]


def check_scale(scale, head_dim: int) -> float:
    """``head_dim ** -0.5`` when None; else a finite float >= 0 (0.0 is used as given: BiFormer
    layers may set ``qk_scale=0.0``, which upstream's ``qk_scale or ...`` silently replaced)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, (torch.Tensor, bool)) or not isinstance(scale, (int, float)):
        raise ValueError(f"expected scale to be a Python float or None, got scale={scale!r}")
    if not 0 <= scale < float("inf"):
        raise ValueError(f"expected scale to be a finite float >= 0, got scale={scale!r}")
    return float(scale)


def region_grid(size, n_win=None, *, region_size=None, padding: str = "mask"):
    """``(region_size, grid)`` per axis of a map of ``size`` (specs/routing.md §2.2 / §2.6); layers
    use it to clamp ``topk`` to the region count ``P = prod(grid)``."""
    size = tuple(int(s) for s in size)
    if len(size) not in (1, 2):
        raise ValueError(f"expected a 1-D or 2-D map size, got size={size}")
    rank = len(size)
    region, grid = _geometry(
        (1,) + size if rank == 1 else size, rank, n_win, region_size, _check_padding(padding)
    )
    return (region[1:], grid[1:]) if rank == 1 else (region, grid)


def _check_topk(topk, grid) -> int:
    P = grid[0] * grid[1]
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"expected topk to be an int, got topk={topk!r}")
    if topk < 1:
        raise ValueError(f"topk={topk} must be >= 1")
    if topk > P:
        raise ValueError(f"topk={topk} must be <= the number of regions P={P} (grid {grid[0]}x{grid[1]})")
    return topk


# ---------------------------------------------------------------------------------------------
# routing


_COUNTS: dict = {}  # (H, W, region, grid, device, dtype) -> valid tokens per region


def _region_counts(H, W, region, grid, device, dtype) -> torch.Tensor:
    key = (H, W, tuple(region), tuple(grid), str(device), dtype)
    hit = None if torch.compiler.is_compiling() else _COUNTS.get(key)
    if hit is None:
        rows = (torch.arange(grid[0], device=device) * region[0]).clamp(max=H)
        cols = (torch.arange(grid[1], device=device) * region[1]).clamp(max=W)
        n_rows = (rows + region[0]).clamp(max=H) - rows
        n_cols = (cols + region[1]).clamp(max=W) - cols
        hit = (n_rows[:, None] * n_cols[None, :]).reshape(-1, 1).to(dtype)
        if not torch.compiler.is_compiling():
            _COUNTS[key] = hit
    return hit


def _region_sums(x: torch.Tensor, region, grid, dtype) -> tuple[torch.Tensor, bool]:
    """Sums over the valid tokens of every region, all heads' channels ``[B, P, heads * d]`` (in
    ``dtype``, read from ``x`` without a converted copy), and whether the map needed padding."""
    B, H, W = x.shape[:3]
    C = x.shape[3] * x.shape[4]
    xf = x.detach().reshape(B, H, W, C)
    Hp, Wp = grid[0] * region[0], grid[1] * region[1]
    padded = (Hp, Wp) != (H, W)
    if padded:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, Wp - W, 0, Hp - H))
    s = xf.reshape(B, grid[0], region[0], grid[1], region[1], C).sum((2, 4), dtype=dtype)
    return s.reshape(B, grid[0] * grid[1], C), padded


def _region_means(x: torch.Tensor, region, grid, dtype) -> torch.Tensor:
    """Means over the valid tokens of every region, all heads' channels: ``[B, P, heads * d]``."""
    s, padded = _region_sums(x, region, grid, dtype)
    if not padded:
        return s / (region[0] * region[1])
    return s / _region_counts(x.shape[1], x.shape[2], region, grid, x.device, dtype)


def _route(q2, k2, region, grid, topk, scale, routing, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    if routing == "hard" and scale > 0 and (grid[0] * region[0], grid[1] * region[1]) == tuple(q2.shape[1:3]):
        # equal token counts: sums order the regions like scaled means do (fewer kernels per call)
        logits = _region_sums(q2, region, grid, dtype)[0] @ _region_sums(k2, region, grid, dtype)[0].mT
    else:
        qm = _region_means(q2, region, grid, dtype)
        km = _region_means(k2, region, grid, dtype)
        logits = (qm * scale) @ km.transpose(-1, -2)  # [B, P, P]
    if routing == "hard" and logits.is_cuda and not torch.compiler.is_compiling():
        from ..kernels.bilevel_routing import ROUTE_TOPK_MAX_P, route_topk

        if logits.shape[-1] <= ROUTE_TOPK_MAX_P:  # one launch for the two sorts below (eager host time)
            return route_topk(logits, topk), None
    # stable descending sort: ties go to the smaller region index; the chosen set is then sorted
    top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :topk]
    index = torch.sort(top, dim=-1).values
    weight = None
    if routing == "soft":
        weight = torch.softmax(logits.gather(-1, index), dim=-1).float()
    return index.to(torch.int32), weight


def region_routing(
    q,
    k,
    n_win=None,
    *,
    region_size=None,
    topk: int,
    scale: float | None = None,
    padding: str = "mask",
    routing: str = "hard",
) -> RegionRouting:
    """Top-k region routing (specs/routing.md §2.3) from the detached ``q``, ``k``.

    Args:
        q, k: ``[B, H, W, heads, d_qk]`` (or ``[B, N, heads, d_qk]`` for a 1-D map), any strides.
        n_win: regions per axis (int or per-axis tuple); exactly one of ``n_win`` / ``region_size``.
        region_size: tokens per region and axis.
        topk: regions per query region, ``1 <= topk <= P``.
        scale: logit scale, ``d_qk ** -0.5`` by default (a positive scale never changes hard routing).
        padding: ``"mask"`` (region size ``ceil(L / n_win)``) or ``"zeros"`` (``floor(L / n_win)``,
            BiFormer's nchw refactor). Means are over the tokens inside the map in both.
        routing: ``"hard"`` or ``"soft"`` (also returns softmax weights of the selected logits).

    Returns:
        :class:`RegionRouting`; descriptors and logits are fp32 (fp64 for fp64 input), no gradient.

    Raises:
        ValueError: bad shapes, ``topk`` outside ``[1, P]``, bad ``n_win``/``region_size``/options.
    """
    rank = _check_maps(q, k)
    padding = _check_padding(padding)
    if routing not in _ROUTINGS:
        raise ValueError(f"expected routing in {_ROUTINGS}, got routing={routing!r}")
    q2, k2 = _as_2d(q), _as_2d(k)
    # int(): the region geometry is meant to specialise on the map size (a new resolution re-traces;
    # the kernels take sizes as runtime arguments). Dynamo keeps int(SymInt) symbolic, and Inductor
    # then fails on the region reshapes ("CantSplit", torch 2.11): compile with dynamic=False.
    region, grid = _geometry(tuple(int(s) for s in q2.shape[1:3]), rank, n_win, region_size, padding)
    topk = _check_topk(topk, grid)
    scale = check_scale(scale, q.shape[-1])
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    index, weight = _route(q2, k2, region, grid, topk, scale, routing, dtype)
    if rank == 1:
        return RegionRouting(index, weight, grid[1:], region[1:])
    return RegionRouting(index, weight, grid, region)


# ---------------------------------------------------------------------------------------------
# references


def _check_index(region_index, region_weight, B, heads, P, grid, device) -> torch.Tensor:
    if not isinstance(region_index, torch.Tensor) or region_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"expected region_index to be an int32/int64 tensor, got "
            f"{getattr(region_index, 'dtype', type(region_index).__name__)}"
        )
    ok = region_index.dim() in (3, 4) and region_index.shape[0] == B and region_index.shape[-2] == P
    if ok and region_index.dim() == 4:
        ok = region_index.shape[1] == heads
    if not ok:
        raise ValueError(
            f"expected region_index of shape [B={B}, P={P}, topk] or [B={B}, heads={heads}, P={P}, "
            f"topk] (grid {grid[0]}x{grid[1]}), got region_index.shape={tuple(region_index.shape)}"
        )
    if region_index.device != device:  # a kernel handed a pointer of another device would read garbage
        raise ValueError(f"expected region_index on q's device {device}, "
                         f"got region_index.device={region_index.device}")
    _check_topk(region_index.shape[-1], grid)
    if region_weight is not None and (
        not isinstance(region_weight, torch.Tensor) or region_weight.shape != region_index.shape
    ):
        raise ValueError(
            f"expected region_weight of region_index's shape {tuple(region_index.shape)}, got "
            f"{getattr(region_weight, 'shape', region_weight)}"
        )
    idx = region_index if region_index.dim() == 4 else region_index.unsqueeze(1)
    if os.environ.get("VISATTN_DEBUG", "0") == "1" and not torch.compiler.is_compiling():
        # values are checked only on request: it synchronises with the device
        bad = (idx < 0) | (idx >= P)
        if bool(bad.any()):
            raise ValueError(
                f"expected region_index values in [0, P={P}) (grid {grid[0]}x{grid[1]}), got "
                f"min={int(idx.min())}, max={int(idx.max())}"
            )
        srt = idx.sort(-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError("expected duplicate-free region_index rows (VISATTN_DEBUG=1 check)")
    return idx


def routed_attention_ref(
    q,
    k,
    v,
    region_index,
    region_size,
    *,
    scale=None,
    padding="mask",
    region_weight=None,
    return_lse=False,
    impl="mask",
    upcast=True,
):
    """Pure-PyTorch reference of :func:`routed_attention` (differentiable through autograd).

    ``impl="mask"``: a dense ``[N, N]`` boolean mask per (batch, head), chunked over query rows;
    ``impl="gather"``: BiFormer's per-region K/V gather (``topk``-fold copy). ``upcast`` computes in
    float64. Returns ``out`` (q's dtype) or ``(out, lse)`` with lse float32 (float64 for fp64 input).
    """
    rank = _check_maps(q, k, v)
    padding = _check_padding(padding)
    q2, k2, v2 = _as_2d(q), _as_2d(k), _as_2d(v)
    rs = normalize_tuple(region_size, rank, "region_size")
    region = (1,) + rs if rank == 1 else rs
    grid = _grid_of(q2.shape[1:3], region)
    idx = _check_index(region_index, region_weight, q.shape[0], q.shape[-2], grid[0] * grid[1], grid,
                       q.device)
    scale = check_scale(scale, q.shape[-1])
    dtype = torch.float64 if upcast else q.dtype
    if impl not in ("mask", "gather"):
        raise ValueError(f"expected impl in ('mask', 'gather'), got impl={impl!r}")
    fn = _ref_mask if impl == "mask" else _ref_gather
    out, lse = fn(q2, k2, v2, idx, region_weight, region, grid, scale, padding == "zeros", dtype)
    out = out.to(q.dtype)
    lse = lse if q.dtype == torch.float64 else lse.float()
    if rank == 1:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def bilevel_routing_attention_ref(
    q,
    k,
    v,
    n_win=None,
    *,
    topk,
    region_size=None,
    scale=None,
    padding="mask",
    routing="hard",
    return_routing=False,
    return_lse=False,
    impl="mask",
    upcast=True,
):
    """Reference of :func:`bilevel_routing_attention`: routing in float64 (with ``upcast``) + reference attention."""
    _check_maps(q, k, v)
    dt = torch.float64 if upcast else q.dtype
    r = region_routing(
        q.detach().to(dt),
        k.detach().to(dt),
        n_win,
        region_size=region_size,
        topk=topk,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        padding=padding,
        routing=routing,
    )
    res = routed_attention_ref(
        q,
        k,
        v,
        r.index,
        r.region_size,
        scale=scale,
        padding=padding,
        region_weight=r.weight,
        return_lse=True,
        impl=impl,
        upcast=upcast,
    )
    return _pack(res[0], res[1], r, return_lse, return_routing)


def _pack(out, lse, routing, return_lse, return_routing):
    res = (out,) + ((lse,) if return_lse else ()) + ((routing,) if return_routing else ())
    return res[0] if len(res) == 1 else res


def routed_attention(
    q,
    k,
    v,
    region_index,
    region_size,
    *,
    scale: float | None = None,
    padding: str = "mask",
    region_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = "auto",
    backend_options: dict | None = None,
):
    """Token attention over routed regions: query token t attends every token of the regions
    ``region_index[b, (h,) region(t), :]`` lists (specs/routing.md §2.4).

    Equivalent PyTorch: :func:`routed_attention_ref`. The regions are ``region_size`` boxes tiling
    the map from the top-left (the last one per axis may be partial); ``P`` is their count.

    Args:
        q, k: ``[B, H, W, heads, d_qk]`` (``[B, N, heads, d_qk]`` for 1-D maps, MoBA-style), any strides.
        v: ``[B, H, W, heads, d_v]``.
        region_index: int32/int64 ``[B, P, topk]`` (shared by the heads) or ``[B, heads, P, topk]``;
            rows must be duplicate-free. Values are not checked (that would sync); out-of-range ids
            give undefined results.
        region_size: tokens per region and axis (int or tuple).
        scale: softmax scale, ``d_qk ** -0.5`` by default.
        padding: ``"mask"`` or ``"zeros"`` (box positions outside the map are zero keys, logit 0).
        region_weight: soft-routing weights of ``region_index``'s shape (scale the routed k and v rows).
        return_lse: also return the LSE, fp32 ``[B, H, W, heads]`` (natural log), differentiable.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"flex"``.

    Other Args:
        backend_options: ``{"block_m", "block_n", "group": (g_H, g_W)}`` (Triton), ``{"impl"}`` (torch).

    Returns:
        ``out`` ``[B, H, W, heads, d_v]`` in q's dtype, or ``(out, lse)``.

    Raises:
        ValueError: bad shapes, dtypes, devices, index shapes, ``topk`` or options.
        NotImplementedError: the requested backend cannot run these inputs (with its reasons).
    """
    rank = _check_maps(q, k, v)
    padding = _check_padding(padding)
    rs = normalize_tuple(region_size, rank, "region_size")
    if min(rs) < 1:
        raise ValueError(f"expected region_size >= 1 on every axis, got region_size={rs}")
    region = (1,) + rs if rank == 1 else rs
    q2, k2, v2 = _as_2d(q), _as_2d(k), _as_2d(v)
    grid = _grid_of(tuple(int(s) for s in q2.shape[1:3]), region)
    idx = _check_index(region_index, region_weight, q.shape[0], q.shape[-2], grid[0] * grid[1], grid,
                       q.device)
    scale = check_scale(scale, q.shape[-1])
    opts = dict(backend_options or {})
    def summary() -> str:
        return describe_tensors(q=q, k=k, v=v) + f"; region_size={region}, grid={grid}, topk={idx.shape[-1]}"

    chosen = _dispatch.select(
        "bilevel_routing",
        backend,
        q.device,
        summary,
        q2,
        k2,
        v2,
        idx,
        region_weight,
        region,
        grid,
        padding,
        opts,
    )
    out, lse = chosen.fn(q2, k2, v2, idx, region_weight, region, grid, scale, padding, opts)
    if rank == 1:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def bilevel_routing_attention(
    q,
    k,
    v,
    n_win=None,
    *,
    topk: int,
    region_size=None,
    scale: float | None = None,
    padding: str = "mask",
    routing: str = "hard",
    return_routing: bool = False,
    return_lse: bool = False,
    backend: str | None = "auto",
    backend_options: dict | None = None,
):
    """Bi-level routing attention: :func:`region_routing` then :func:`routed_attention`.

    Equivalent PyTorch: :func:`bilevel_routing_attention_ref`.

    Args:
        q, k: ``[B, H, W, heads, d_qk]`` (``[B, N, heads, d_qk]`` for 1-D maps), any strides.
        v: ``[B, H, W, heads, d_v]``.
        n_win / region_size: the region grid (exactly one), see :func:`region_routing`.
        topk: routed regions per query region, ``1 <= topk <= P``.
        scale: softmax (and routing) scale, ``d_qk ** -0.5`` by default (BiFormer layers pass
            ``qk_dim ** -0.5``).
        padding: ``"mask"`` (tokens outside the map do not exist) or ``"zeros"`` (BiFormer's nchw
            refactor: box positions outside the map are zero keys with logit 0).
        routing: ``"hard"`` or ``"soft"`` (soft scales the routed K and V rows by the route weights;
            ``"torch"`` backend only).
        return_routing / return_lse: also return the :class:`RegionRouting` / the fp32 LSE
            ``[B, H, W, heads]``.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"``, ``"torch"`` or ``"flex"``.

    Other Args:
        backend_options: ``{"block_m", "block_n", "group": (g_H, g_W)}`` (Triton), ``{"impl"}`` (torch).

    Returns:
        ``out`` ``[B, H, W, heads, d_v]`` in q's dtype, then ``lse`` and/or the routing when asked.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``topk`` or options (messages name the argument).
        NotImplementedError: the requested backend cannot run these inputs (with its reasons).
    """
    _check_maps(q, k, v)
    r = region_routing(
        q,
        k,
        n_win,
        region_size=region_size,
        topk=topk,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        padding=padding,
        routing=routing,
    )
    out, lse = routed_attention(
        q,
        k,
        v,
        r.index,
        r.region_size,
        scale=scale,
        padding=padding,
        region_weight=r.weight,
        return_lse=True,
        backend=backend,
        backend_options=backend_options,
    )
    return _pack(out, lse, r, return_lse, return_routing)


from . import _bilevel_routing_backends  # noqa: E402,F401  (registers the backends; needs the helpers above)
