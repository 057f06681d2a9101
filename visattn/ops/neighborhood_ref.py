"""Neighborhood attention semantics in pure PyTorch: window tables, masks and the float64 reference.

NATTEN 0.21's neighborhoods ("Neighborhood Attention Transformer", https://arxiv.org/abs/2204.07143;
"Dilated Neighborhood Attention Transformer", https://arxiv.org/abs/2209.15001; "Generalized
Neighborhood Attention", https://arxiv.org/abs/2504.16922), restated from the per-axis rule of
``specs/neighborhood.md`` §2.2. Everything here is shared by every backend: the Triton kernels read
the same window tables, FlexAttention's ``mask_mod`` reads them too, and
:func:`neighborhood_attention_ref` is the single reference used by the ``"torch"`` backend, the tests
and the benchmarks.

Layout: heads-last ``[B, X_1, .., X_n, H, D]`` with n = 1, 2 or 3 spatial axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "NAParams",
    "normalize_na_args",
    "neighborhood_windows",
    "neighborhood_mask",
    "neighborhood_attention_ref",
    "neighborhood_attention_weights",
    "clamp_neighborhood",
    "suggest_block_sparse",
    "merge_attentions",
]


class NAParams(NamedTuple):
    """Validated per-axis parameters (one entry per spatial axis)."""

    size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]


def _per_axis(value, n: int, name: str, kind: type) -> tuple:
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return (value,) * n
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"expected {name} to be a {kind.__name__} or a tuple of {n}, got {name}={value!r}") from None
    if len(out) != n:
        raise ValueError(f"expected {name} to have one entry per spatial axis ({n}), got {name}={value!r}")
    for a, x in enumerate(out):
        if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
            raise ValueError(f"expected {name}[{a}] to be a {kind.__name__}, got {name}[{a}]={x!r}")
    return out


def normalize_na_args(size: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False) -> NAParams:
    """Normalise int-or-tuple arguments to per-axis tuples and check them (spec §2.6).

    Raises:
        ValueError: naming the argument, the axis and the values.
    """
    size = tuple(int(x) for x in size)
    n = len(size)
    if n not in (1, 2, 3):
        raise ValueError(f"expected 1, 2 or 3 spatial axes, got {n} (size={size})")
    ks = _per_axis(kernel_size, n, "kernel_size", int)
    st = _per_axis(stride, n, "stride", int)
    dl = _per_axis(dilation, n, "dilation", int)
    ca = _per_axis(is_causal, n, "is_causal", bool)
    for a in range(n):
        if ks[a] < 1:
            raise ValueError(f"expected kernel_size[{a}] >= 1, got kernel_size[{a}]={ks[a]}")
        if dl[a] < 1:
            raise ValueError(f"expected dilation[{a}] >= 1, got dilation[{a}]={dl[a]}")
        if st[a] < 1:
            raise ValueError(f"expected stride[{a}] >= 1, got stride[{a}]={st[a]}")
        if st[a] > ks[a]:
            raise ValueError(f"stride[{a}]={st[a]} must be <= kernel_size[{a}]={ks[a]}")
        if ks[a] * dl[a] > size[a]:
            raise ValueError(
                f"kernel_size[{a}] * dilation[{a}] must be <= the input size along spatial axis {a}, got "
                f"kernel_size[{a}]={ks[a]}, dilation[{a}]={dl[a]}, size[{a}]={size[a]} (layers offer "
                f"small_input='legacy_pad' or 'clamp')"
            )
    return NAParams(size, ks, st, dl, ca)


def axis_windows(length: int, k: int, s: int, d: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ``[start, end]`` (inclusive, dilation-group coordinates) of every query ``x`` on one axis.

    Returns two int32 tensors of shape ``[length]`` indexed by the natural coordinate ``x``; the keys
    of ``x`` are ``y = j * d + x % d`` for ``j`` in ``[start[x], end[x]]`` (spec §2.2).
    """
    x = torch.arange(length, device=device, dtype=torch.int64)
    g, i = x % d, x // d
    lg = length // d + (g < length % d).long()  # group length
    if causal:
        lead = torch.minimum((i // s) * s + s - 1, lg - 1)
        start = (lead - k + 1).clamp_min(0)
        end = i
    else:
        lead = torch.minimum((i // s) * s + s // 2, lg - 1)
        start = torch.minimum((lead - k // 2).clamp_min(0), lg - k)
        end = start + k - 1
    return start.int(), end.int()


def axis_inverse_windows(length: int, k: int, s: int, d: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every key ``y`` on one axis, the interval ``[lo, hi]`` (group coordinates) of queries whose window
    holds it (``lo > hi`` when none does). Windows are monotone in the query, so this is one interval."""
    start, end = axis_windows(length, k, s, d, causal, device)
    lo = torch.empty(length, dtype=torch.int32, device=device)
    hi = torch.empty(length, dtype=torch.int32, device=device)
    for g in range(min(d, length)):
        st, en = start[g::d].contiguous(), end[g::d].contiguous()
        j = torch.arange(st.numel(), device=device, dtype=torch.int32)
        lo[g::d] = torch.searchsorted(en, j, right=False).int()
        hi[g::d] = (torch.searchsorted(st, j, right=True) - 1).int()
    return lo, hi


_TABLE_CACHE: dict[tuple, tuple] = {}


def neighborhood_windows(size, kernel_size, stride=1, dilation=1, is_causal=False, device=None):
    """Per-axis window tables and their inverses (cached per arguments and device).

    Returns:
        ``(start, end, inv_lo, inv_hi)``: tuples with one int32 tensor ``[X_a]`` per spatial axis,
        indexed by the natural coordinate; values are dilation-group coordinates.
    """
    p = normalize_na_args(size, kernel_size, stride, dilation, is_causal)
    return _windows(p, torch.device(device) if device is not None else torch.device("cpu"))


def _windows(p: NAParams, device: torch.device):
    """``neighborhood_windows`` of validated parameters on a ``torch.device`` (the launchers' per-call lookup)."""
    key = (p, device)
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        fwd = [axis_windows(p.size[a], p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], device)
               for a in range(len(p.size))]
        inv = [axis_inverse_windows(p.size[a], p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], device)
               for a in range(len(p.size))]
        hit = (tuple(w[0] for w in fwd), tuple(w[1] for w in fwd), tuple(w[0] for w in inv), tuple(w[1] for w in inv))
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = hit
    return hit


def _axis_mask(length: int, k: int, s: int, d: int, causal: bool, device) -> torch.Tensor:
    start, end = axis_windows(length, k, s, d, causal, device)
    x = torch.arange(length, device=device)
    same_group = (x[:, None] % d) == (x[None, :] % d)
    j = (x // d)[None, :]
    return same_group & (j >= start[:, None]) & (j <= end[:, None])


def neighborhood_mask(size, kernel_size, stride=1, dilation=1, is_causal=False, device=None) -> torch.Tensor:
    """Dense ``[N, N]`` bool mask (row = query, column = key, tokens row-major): for tests and Flex."""
    p = normalize_na_args(size, kernel_size, stride, dilation, is_causal)
    mask = None
    for a in range(len(p.size)):
        m = _axis_mask(p.size[a], p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], device)
        mask = m if mask is None else (mask[:, None, :, None] & m[None, :, None, :]).flatten(2).flatten(0, 1)
    return mask


def clamp_neighborhood(size, kernel_size, stride=1, dilation=1) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shrink the kernel on every axis where ``k * d > X_a``: ``k' = max(1, min(k, X_a // d))``, ``s' = min(s, k')``.

    Returns:
        ``(kernel_size, stride, dilation)`` as per-axis tuples (dilation unchanged).
    """
    size = tuple(int(x) for x in size)
    n = len(size)
    ks = _per_axis(kernel_size, n, "kernel_size", int)
    st = _per_axis(stride, n, "stride", int)
    dl = _per_axis(dilation, n, "dilation", int)
    k2 = tuple(max(1, min(k, x // d)) if k * d > x else k for k, x, d in zip(ks, size, dl))
    return k2, tuple(min(s, k) for s, k in zip(st, k2)), dl


def suggest_block_sparse(size, kernel_size, stride=1, dilation=1) -> dict | None:
    """Per-axis Q tile, KV tile and stride for which every KV tile is full (GNA's "perfectly block-sparse").

    Returns ``dict(q_tile=..., kv_tile=..., stride=...)``: a stride that is a tile multiple, a kernel
    that is a multiple of it, with tile extents whose product is 64 or 128 and that divide the size;
    ``None`` when no such choice exists for these sizes (the kernel then mixes full and partial tiles).
    """
    p = normalize_na_args(size, kernel_size, stride, dilation, False)
    n = len(p.size)
    best = None
    candidates = [1, 2, 4, 8, 16, 32, 64, 128]
    for tiles in _tile_products(candidates, n):
        if math.prod(tiles) not in (64, 128):
            continue
        ok = all(
            (p.size[a] // p.dilation[a]) % tiles[a] == 0 and p.size[a] % p.dilation[a] == 0
            and p.kernel_size[a] % tiles[a] == 0
            for a in range(n)
        )
        if ok:
            strides = tuple(max(tiles[a], (p.stride[a] // tiles[a]) * tiles[a]) for a in range(n))
            strides = tuple(min(strides[a], p.kernel_size[a]) for a in range(n))
            if all(p.kernel_size[a] % strides[a] == 0 for a in range(n)):
                cand = dict(q_tile=tiles, kv_tile=tiles, stride=strides)
                if best is None or math.prod(tiles) > math.prod(best["q_tile"]):
                    best = cand
    return best


def _tile_products(cands, n):
    if n == 0:
        yield ()
        return
    for c in cands:
        for rest in _tile_products(cands, n - 1):
            yield (c,) + rest


# ---------------------------------------------------------------------------------------------
# reference


def _rpb_bias(rpb: torch.Tensor, p: NAParams, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """RPB logits ``[H, rows, N]`` for query coordinates ``xs`` (per axis ``[rows]``) and keys ``ys``."""
    idx = []
    for a in range(len(p.size)):
        d, k = p.dilation[a], p.kernel_size[a]
        off = (ys[a][None, :] // d) - (xs[a][:, None] // d) + k - 1
        idx.append(off.clamp(0, 2 * k - 2))  # out-of-window pairs are masked afterwards
    return rpb[(slice(None), *idx)]


def neighborhood_attention_ref(
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
    upcast: bool = True,
    chunk_rows: int = 1024,
):
    """Pure-PyTorch reference: a masked dense softmax over ``N(x) ∪ extras``, chunked over query rows.

    Arguments and returns as :func:`visattn.ops.neighborhood_attention` (inputs are not re-checked
    beyond the per-axis arguments). Computes in float64 when ``upcast``. Memory
    ``O(B * H * chunk_rows * (N + N_e))``. Rows without any key give zeros and LSE ``-inf``.
    """
    n = q.dim() - 3
    spatial = tuple(q.shape[1:1 + n])
    p = normalize_na_args(spatial, kernel_size, stride, dilation, is_causal)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hk = k.shape[-2]
    N = math.prod(spatial)
    scale = D**-0.5 if scale is None else float(scale)
    dtype = torch.float64 if upcast else q.dtype
    dev = q.device
    qf = q.reshape(B, N, H, D).transpose(1, 2).to(dtype)  # [B, H, N, D]
    kf = k.reshape(B, N, Hk, -1).transpose(1, 2).to(dtype)
    vf = v.reshape(B, N, Hk, v.shape[-1]).transpose(1, 2).to(dtype)
    if extra_kv is not None:
        kf = torch.cat([kf, extra_kv[0].transpose(1, 2).to(dtype)], dim=2)
        vf = torch.cat([vf, extra_kv[1].transpose(1, 2).to(dtype)], dim=2)
    if Hk != H:  # GQA: query head h reads key head h // (H // Hk)
        kf, vf = kf.repeat_interleave(H // Hk, dim=1), vf.repeat_interleave(H // Hk, dim=1)
    n_extra = kf.shape[2] - N
    masks = [_axis_mask(p.size[a], p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], dev) for a in range(n)]
    flat = torch.arange(N, device=dev)
    coords = list(torch.unravel_index(flat, spatial))
    kpm = None if key_padding_mask is None else key_padding_mask.reshape(B, 1, 1, N)
    outs, lses = [], []
    for r0 in range(0, N, chunk_rows):
        rows = flat[r0:r0 + chunk_rows]
        xs = [c[rows] for c in coords]
        mask = torch.ones(rows.numel(), N, dtype=torch.bool, device=dev)
        for a in range(n):
            mask = mask & masks[a][xs[a]][:, coords[a]]
        mask = mask[None, None]  # [1, 1, rows, N]
        if kpm is not None:
            mask = mask & kpm
        s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale  # [B, H, rows, N + N_e]
        if rpb is not None:
            bias = _rpb_bias(rpb.to(dtype), p, xs, coords)  # [H, rows, N]
            s = torch.cat([s[..., :N] + bias, s[..., N:]], dim=-1)
        if n_extra:
            mask = torch.cat([mask.expand(B, H, -1, -1),
                              torch.ones(B, H, rows.numel(), n_extra, dtype=torch.bool, device=dev)], dim=-1)
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        has = denom > 0
        safe = torch.where(has, denom, torch.ones_like(denom))
        outs.append(torch.matmul(e / safe, vf))
        lses.append(torch.where(has, torch.log(safe) + m, torch.full_like(m, float("-inf"))).squeeze(-1))
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, *spatial, H, vf.shape[-1]).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2).transpose(1, 2).reshape(B, *spatial, H)
    return out, (lse if q.dtype == torch.float64 else lse.float())


def neighborhood_attention_weights(q: torch.Tensor, k: torch.Tensor, kernel_size, *, stride=1, dilation=1,
                                   is_causal=False, scale: float | None = None, rpb: torch.Tensor | None = None,
                                   key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax probabilities in window-slot layout ``[B, *spatial, H, prod(k)]`` (NATTEN's old ``na2d_qk``).

    Slot ``(t_1, .., t_n)`` of query ``x`` is the key with group coordinates ``start_a(x) + t_a``;
    slots past a causal window's end hold 0. Computed in float64 and returned in q's dtype.
    """
    n = q.dim() - 3
    spatial = tuple(q.shape[1:1 + n])
    p = normalize_na_args(spatial, kernel_size, stride, dilation, is_causal)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    N = math.prod(spatial)
    eye = torch.eye(N, dtype=torch.float64, device=q.device)
    # one-hot values: the output row of query x is its probability row over all N keys
    v = eye.reshape(1, *spatial, 1, N).expand(B, *spatial, k.shape[-2], N)
    probs = neighborhood_attention_ref(q, k, v, kernel_size, stride=stride, dilation=dilation,
                                       is_causal=is_causal, scale=scale, rpb=rpb,
                                       key_padding_mask=key_padding_mask).to(torch.float64)
    # gather each query's window slots: key index per slot, and whether the slot exists
    start = [axis_windows(p.size[a], p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a], q.device)
             for a in range(n)]
    key_idx = torch.zeros((N, 1), dtype=torch.long, device=q.device)
    valid = torch.ones((N, 1), dtype=torch.bool, device=q.device)
    coords = torch.unravel_index(torch.arange(N, device=q.device), spatial)
    for a in range(n):
        d, kk = p.dilation[a], p.kernel_size[a]
        x = coords[a]
        st, en = start[a][0][x].long(), start[a][1][x].long()
        t = torch.arange(kk, device=q.device)
        j = st[:, None] + t[None, :]  # [N, k_a]
        ok = j <= en[:, None]
        y = (j.clamp(max=en[:, None]) * d + (x % d)[:, None])  # natural coordinate on axis a
        stride_a = math.prod(spatial[a + 1:])
        key_idx = (key_idx[:, :, None] + (y * stride_a)[:, None, :]).flatten(1)
        valid = (valid[:, :, None] & ok[:, None, :]).flatten(1)
    flatp = probs.reshape(B, N, H, N)
    w = torch.gather(flatp, 3, key_idx[None, :, None, :].expand(B, N, H, -1))
    w = w * valid[None, :, None, :]
    return w.reshape(B, *spatial, H, -1).to(q.dtype)


def merge_attentions(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention outputs over disjoint key sets by their log-sum-exps (differentiable).

    Args:
        outs: tensors ``[B, ..., H, D]`` of one shape.
        lses: their LSEs ``[B, ..., H]`` (natural log; ``-inf`` for rows with no key).

    Returns:
        ``(out, lse)``: the attention over the union of the key sets, in ``outs[0]``'s dtype, and its
        LSE in float32 (float64 for float64 input). Rows empty in every part give zeros and ``-inf``.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"expected as many outs as lses (>= 1), got {len(outs)} outs and {len(lses)} lses")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != l.shape or o.shape != outs[0].shape:
            raise ValueError(f"expected outs[{i}].shape[:-1] == lses[{i}].shape and equal out shapes, got "
                             f"outs[{i}].shape={tuple(o.shape)}, lses[{i}].shape={tuple(l.shape)}")
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    stack = torch.stack([l.to(acc) for l in lses])  # [P, B, ..., H]
    m = stack.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(stack - m_safe)  # exp(-inf) = 0 for empty parts
    total = w.sum(0)
    has = total > 0
    safe = torch.where(has, total, torch.ones_like(total))
    out = sum(wi[..., None] * o.to(acc) for wi, o in zip(w, outs)) / safe[..., None]
    lse = torch.where(has, torch.log(safe) + m_safe, torch.full_like(m_safe, float("-inf")))
    return out.to(outs[0].dtype), lse


_SLOT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _window_slots(p: NAParams, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query its window slots: flat key index ``[N, K]``, slot validity ``[N, K]`` (causal windows
    are shorter) and the per-axis RPB offsets ``[n, N, K]`` (``j - i + k - 1``); cached."""
    key = (p, str(device))
    hit = _SLOT_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(p.size)
    N = math.prod(p.size)
    coords = torch.unravel_index(torch.arange(N, device=device), p.size)
    idx = torch.zeros((N, 1), dtype=torch.long, device=device)
    valid = torch.ones((N, 1), dtype=torch.bool, device=device)
    offs = []
    for a in range(n):
        d, kk = p.dilation[a], p.kernel_size[a]
        start, end = axis_windows(p.size[a], kk, p.stride[a], d, p.is_causal[a], device)
        x = coords[a]
        st, en = start[x].long(), end[x].long()
        j = st[:, None] + torch.arange(kk, device=device)[None, :]  # [N, k_a]
        ok = j <= en[:, None]
        j = torch.minimum(j, en[:, None])
        y = j * d + (x % d)[:, None]
        idx = (idx[:, :, None] + (y * math.prod(p.size[a + 1:]))[:, None, :]).flatten(1)
        valid = (valid[:, :, None] & ok[:, None, :]).flatten(1)
        offs.append((j - (x // d)[:, None] + kk - 1))
    K = idx.shape[1]
    off = torch.stack([
        o.reshape(N, *([1] * a), o.shape[1], *([1] * (n - a - 1))).expand(N, *p.kernel_size).reshape(N, K)
        for a, o in enumerate(offs)
    ])
    hit = (idx, valid, off)
    if len(_SLOT_CACHE) > 64:
        _SLOT_CACHE.clear()
    _SLOT_CACHE[key] = hit
    return hit


def neighborhood_attention_gather(q, k, v, p: NAParams, scale: float, extra_kv=None, rpb=None,
                                  key_padding_mask=None):
    """The ``"torch"`` backend: each query's window keys gathered (NATTEN's old unfused QK/AV layout).

    Cost ``O(N * prod(k))`` instead of the reference's ``O(N^2)``; same semantics as
    :func:`neighborhood_attention_ref` (tested against it). Returns ``(out, lse)``.
    """
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hk, Dv = k.shape[-2], v.shape[-1]
    G = H // Hk
    N = math.prod(p.size)
    idx, valid, off = _window_slots(p, q.device)
    K = idx.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Head-major layouts: keys are gathered straight into [B, Hk, N, K, D], the batched-matmul layout,
    # so the K-times-larger gathered tensors are never permuted (only q and out, N x H x D, are).
    qf = q.reshape(B, N, Hk, G, D).permute(0, 2, 1, 3, 4)  # [B, Hk, N, G, D]
    kg = k.reshape(B, N, Hk, D).transpose(1, 2)[:, :, idx]  # [B, Hk, N, K, D]
    vg = v.reshape(B, N, Hk, Dv).transpose(1, 2)[:, :, idx]
    s = torch.matmul(qf, kg.transpose(-1, -2)).to(acc) * scale  # [B, Hk, N, G, K]
    if rpb is not None:
        bias = rpb[(slice(None), *off)]  # [H, N, K]
        s = s + bias.reshape(Hk, G, N, K).transpose(1, 2).to(acc)
    mask = valid[:, None, :]  # [N, 1, K]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.reshape(B, N)[:, idx][:, None, :, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    if extra_kv is not None:
        # extra keys [B, E, Hk, D]: the flat query rows against them, no broadcast copy per query
        se = torch.matmul(qf.reshape(B, Hk, N * G, D), extra_kv[0].permute(0, 2, 3, 1)).to(acc) * scale
        s = torch.cat([s, se.reshape(B, Hk, N, G, -1)], dim=-1)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    has = denom > 0
    safe = torch.where(has, denom, torch.ones_like(denom))
    prob = (e / safe).to(q.dtype)
    out = torch.matmul(prob[..., :K], vg)  # [B, Hk, N, G, Dv]
    if extra_kv is not None:
        pe = prob[..., K:].reshape(B, Hk, N * G, -1)
        out = out + torch.matmul(pe, extra_kv[1].transpose(1, 2)).reshape(B, Hk, N, G, Dv)
    lse = torch.where(has, torch.log(safe) + m, torch.full_like(m, float("-inf"))).squeeze(-1)
    out = out.permute(0, 2, 1, 3, 4).reshape(B, *p.size, H, Dv)
    lse = lse.permute(0, 2, 1, 3).reshape(B, *p.size, H)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
