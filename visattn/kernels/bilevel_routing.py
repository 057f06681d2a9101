"""Routed (bi-level routing) attention: Triton forward and backward without a K/V gather copy.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023,
https://arxiv.org/abs/2303.08810). A 2-D map ``[B, H, W, heads, d]`` is cut into an ``R_H x R_W`` grid
of ``r_H x r_W`` regions; every query of region ``rho`` attends the tokens of the regions its routing
row lists. The kernels address those regions *in place* through the map's strides: a key tile is a
set of consecutive list entries (small regions, ``BLOCK_N // (r_H * r_W)`` per tile) or a chunk of one
region (large regions), so neither a ``k``-fold gathered K/V nor a score matrix is ever allocated.

Several small query regions (a ``g_H x g_W`` group) share one query tile. Their routing rows are
merged into one ascending list per tile; each entry carries a bit mask saying which regions of the
group routed to it, and the kernel masks the rows of the other regions (row-select bits).

Backward: ``dQ`` walks the forward lists; ``dK``/``dV`` walk the inverse routing graph (for a group of
key regions, the query regions that route to any of them, with symmetric select bits). There are no
atomics, so gradients are bitwise repeatable.

Routing (``_route_topk_kernel``): the hard top-k of the region logits, one row per program, ranked
as a stable descending sort ranks them; one launch where torch needs two sorts.

Caution/limits: tested with Triton 3.6 (GPU) and 3.9 (interpreter on CPU; its ``tl.dot`` is wrong
for bfloat16, so the op refuses bf16 CPU tensors). fp16, bf16, fp32 (fp32 dots in IEEE precision);
head dims up to 256 (non-powers of two are padded with masked lanes), ``d_qk`` and ``d_v`` may
differ. At most 32 regions per query group (the select bits are one int32). Region ids outside
``[0, P)`` are clamped (results are then undefined, never out-of-bounds reads).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LOG2E,
    _fwd_epilogue,
    _online_softmax_step,
    cdiv,
    dot_precision,
    head_dim_pad,
    next_pow2,
)
from ._launch import launch


@triton.jit
def _rows_of_group(tile, sub, n_gW, g_H, g_W, r_H, r_W, R_H, R_W, T, H, W, BLOCK: tl.constexpr):
    """Map coordinates of the rows of (group ``tile``, sub-tile ``sub``): returns (slot, y, x, ok).

    Row ``m`` is token ``m % T`` (row-major inside its region) of slot ``m // T`` of the group; the
    group's regions are the ``g_H x g_W`` block at group coordinates ``(tile // n_gW, tile % n_gW)``.
    """
    m = sub * BLOCK + tl.arange(0, BLOCK)
    slot = m // T
    off = m % T
    u = (tile // n_gW) * g_H + slot // g_W
    w = (tile % n_gW) * g_W + slot % g_W
    y = u * r_H + off // r_W
    x = w * r_W + off % r_W
    ok = (slot < g_H * g_W) & (u < R_H) & (w < R_W) & (y < H) & (x < W)
    return tl.minimum(slot, 31), y, x, ok


@triton.jit
def _cols_of_entries(LIST, SEL, list_base, count, t, C, E, T, r_H, r_W, R_W, P, H, W,
                     BLOCK: tl.constexpr, GROUPED: tl.constexpr):
    """Columns of iteration ``t`` of a list walk: entries ``(t // C) * E ...``, chunk ``t % C``.

    Small regions (``T <= BLOCK``): ``E = BLOCK // T`` whole entries per tile, ``C = 1``.
    Large regions: ``E = 1``, ``C = ceil(T / BLOCK)`` chunks per entry. Returns the map position of
    every column, whether its list entry is real, whether it lies inside the map, and the entry's
    select bits (0 when not ``GROUPED``).
    """
    local = (t % C) * BLOCK + tl.arange(0, BLOCK)
    e_rel = local // T
    off = local % T
    e = (t // C) * E + e_rel
    ent_ok = (e_rel < E) & (e < count)
    reg = tl.load(LIST + list_base + e, mask=ent_ok, other=0)
    reg = tl.minimum(tl.maximum(reg, 0), P - 1)  # bad ids read a real region, never out of bounds
    y = (reg // R_W) * r_H + off // r_W
    x = (reg % R_W) * r_W + off % r_W
    in_map = (y < H) & (x < W)
    if GROUPED:
        sel = tl.load(SEL + list_base + e, mask=ent_ok, other=0)
    else:
        sel = tl.zeros([BLOCK], dtype=tl.int32)
    return y, x, ent_ok, in_map, sel


@triton.jit
def _load_map(base, y, x, sy, sx, offs_d, ok, D: tl.constexpr, D_PAD: tl.constexpr):
    """Rows at map positions (y, x) of one (batch, head) slice; masked rows and pad lanes read 0."""
    ptrs = base + y[:, None] * sy + x[:, None] * sx + offs_d[None, :]
    if D == D_PAD:
        mask = ok[:, None]
    else:
        mask = ok[:, None] & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _lse_log2(lse):
    """LSE in log2 units; rows without keys (LSE -inf) and masked lanes become +inf, so P = 0 there."""
    return tl.where((lse == float("-inf")) | (lse == float("inf")), float("inf"), lse * 1.4426950408889634)


@triton.jit(do_not_specialize=["H", "W", "r_H", "r_W", "R_H", "R_W", "n_gW", "T", "n_sub", "P", "max_list"])
def _bra_fwd_kernel(
    Q, K, V, O, LSE, LIST, SEL, COUNT,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sob, soy, sox, soh,
    slb, slh, slt, scb, sch,
    H, W, r_H, r_W, R_H, R_W, g_H, g_W, n_gW, T, n_sub, P, max_list, n_heads, sm_scale_log2,
    ZEROS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tile = pid // n_sub
    sub = pid % n_sub
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)

    slot, y, x, row_ok = _rows_of_group(tile, sub, n_gW, g_H, g_W, r_H, r_W, R_H, R_W, T, H, W, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_map(Q + b * sqb + h * sqh, y, x, sqy, sqx, offs_d, row_ok, D, D_PAD)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    list_base = b * slb + h * slh + tile.to(tl.int64) * slt  # slh == 0: shared routing
    count = tl.load(COUNT + b * scb + h * sch + tile)
    count = tl.minimum(tl.maximum(count, 0), max_list)
    E = tl.maximum(BLOCK_N // T, 1)
    C = (T + BLOCK_N - 1) // BLOCK_N
    n_iter = ((count + E - 1) // E) * C

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    for t in range(0, n_iter):
        ky, kx, ent_ok, in_map, sel = _cols_of_entries(LIST, SEL, list_base, count, t, C, E, T, r_H, r_W, R_W,
                                                       P, H, W, BLOCK_N, GROUPED)
        load_ok = ent_ok & in_map
        # "zeros": box positions outside the map are keys with zero k and v (logit 0, value 0)
        key_ok = ent_ok if ZEROS else load_ok
        k = _load_map(k_base, ky, kx, sky, skx, offs_d, load_ok, D, D_PAD)
        v = _load_map(v_base, ky, kx, svy, svx, offs_dv, load_ok, DV, DV_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        allowed = key_ok[None, :]
        if GROUPED:
            allowed = allowed & (((sel[None, :] >> slot[:, None]) & 1) != 0)
        qk = tl.where(allowed, qk * sm_scale_log2, float("-inf"))
        p, m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)

    out, lse = _fwd_epilogue(acc, m_i, l_i)
    o_ptrs = O + b * sob + h * soh + y[:, None] * soy + x[:, None] * sox + offs_dv[None, :]
    o_mask = row_ok[:, None] if DV == DV_PAD else row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    # LSE is a contiguous [B, H, W, heads] fp32 tensor
    tl.store(LSE + ((b * H + y) * W + x) * n_heads + h, lse, mask=row_ok)


@triton.jit(do_not_specialize=["H", "W", "r_H", "r_W", "R_H", "R_W", "n_gW", "T", "n_sub", "P", "max_list"])
def _bra_bwd_dq_kernel(
    Q, K, V, DO, O, LSE, DLSE, DELTA, DQ, LIST, SEL, COUNT,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh,
    slb, slh, slt, scb, sch,
    H, W, r_H, r_W, R_H, R_W, g_H, g_W, n_gW, T, n_sub, P, max_list, n_heads, sm_scale, sm_scale_log2,
    HAS_DLSE: tl.constexpr,
    ZEROS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query tile, walking the forward list and recomputing P from the stored LSE.

    Also writes ``Delta = rowsum(dO * O) - dLSE`` (fp32, contiguous ``[B, H, W, heads]``) for the
    dK/dV kernel, which runs after this one: no separate preprocessing pass or fp32 copies.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tile = pid // n_sub
    sub = pid % n_sub
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)

    slot, y, x, row_ok = _rows_of_group(tile, sub, n_gW, g_H, g_W, r_H, r_W, R_H, R_W, T, H, W, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_map(Q + b * sqb + h * sqh, y, x, sqy, sqx, offs_d, row_ok, D, D_PAD)
    do = _load_map(DO + b * sdob + h * sdoh, y, x, sdoy, sdox, offs_dv, row_ok, DV, DV_PAD)
    stat = ((b * H + y) * W + x) * n_heads + h
    lse2 = _lse_log2(tl.load(LSE + stat, mask=row_ok, other=float("inf")))
    # out is a contiguous [B, H, W, heads, d_v] tensor (allocated by bra_fwd)
    o_mask = row_ok[:, None] if DV == DV_PAD else row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + stat[:, None] * DV + offs_dv[None, :], mask=o_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + stat, mask=row_ok, other=0.0)
    tl.store(DELTA + stat, delta, mask=row_ok)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    list_base = b * slb + h * slh + tile.to(tl.int64) * slt  # slh == 0: shared routing
    count = tl.load(COUNT + b * scb + h * sch + tile)
    count = tl.minimum(tl.maximum(count, 0), max_list)
    E = tl.maximum(BLOCK_N // T, 1)
    C = (T + BLOCK_N - 1) // BLOCK_N
    n_iter = ((count + E - 1) // E) * C
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for t in range(0, n_iter):
        ky, kx, ent_ok, in_map, sel = _cols_of_entries(LIST, SEL, list_base, count, t, C, E, T, r_H, r_W, R_W,
                                                       P, H, W, BLOCK_N, GROUPED)
        load_ok = ent_ok & in_map
        key_ok = ent_ok if ZEROS else load_ok
        k = _load_map(k_base, ky, kx, sky, skx, offs_d, load_ok, D, D_PAD)
        v = _load_map(v_base, ky, kx, svy, svx, offs_dv, load_ok, DV, DV_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        allowed = key_ok[None, :]
        if GROUPED:
            allowed = allowed & (((sel[None, :] >> slot[:, None]) & 1) != 0)
        p = tl.where(allowed, tl.math.exp2(qk * sm_scale_log2 - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq *= sm_scale
    # dq is a contiguous [B, H, W, heads, d_qk] tensor
    dq_ptrs = DQ + (((b * H + y) * W + x) * n_heads + h)[:, None] * D + offs_d[None, :]
    dq_mask = row_ok[:, None] if D == D_PAD else row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit(do_not_specialize=["H", "W", "r_H", "r_W", "R_H", "R_W", "n_gW", "T", "n_sub", "P", "max_list"])
def _bra_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVT, LIST, SEL, COUNT,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh,
    slb, slh, slt, scb, sch,
    H, W, r_H, r_W, R_H, R_W, g_H, g_W, n_gW, T, n_sub, P, max_list, n_heads, sm_scale, sm_scale_log2,
    ZEROS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one group of key regions, walking the inverse list (query regions routed to them).

    ``DK``/``DVT`` are contiguous ``[B, H, W, heads, d]`` outputs (DK shares q's strides layout).
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tile = pid // n_sub
    sub = pid % n_sub
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)

    slot, y, x, key_in = _rows_of_group(tile, sub, n_gW, g_H, g_W, r_H, r_W, R_H, R_W, T, H, W, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    # out-of-map keys ("zeros" mode) are zero rows: they still shape P like in the forward, and
    # their gradients are never stored
    k = _load_map(K + b * skb + h * skh, y, x, sky, skx, offs_d, key_in, D, D_PAD)
    v = _load_map(V + b * svb + h * svh, y, x, svy, svx, offs_dv, key_in, DV, DV_PAD)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh

    list_base = b * slb + h * slh + tile.to(tl.int64) * slt  # slh == 0: shared routing
    count = tl.load(COUNT + b * scb + h * sch + tile)
    count = tl.minimum(tl.maximum(count, 0), max_list)
    E = tl.maximum(BLOCK_N // T, 1)
    C = (T + BLOCK_N - 1) // BLOCK_N
    n_iter = ((count + E - 1) // E) * C
    dk = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    for t in range(0, n_iter):
        qy, qx, ent_ok, in_map, sel = _cols_of_entries(LIST, SEL, list_base, count, t, C, E, T, r_H, r_W, R_W,
                                                       P, H, W, BLOCK_N, GROUPED)
        q_ok = ent_ok & in_map  # queries exist only inside the map
        q = _load_map(q_base, qy, qx, sqy, sqx, offs_d, q_ok, D, D_PAD)
        do = _load_map(do_base, qy, qx, sdoy, sdox, offs_dv, q_ok, DV, DV_PAD)
        stat = ((b * H + qy) * W + qx) * n_heads + h
        lse2 = _lse_log2(tl.load(LSE + stat, mask=q_ok, other=float("inf")))
        delta = tl.load(DELTA + stat, mask=q_ok, other=0.0)
        # key rows are independent: rows that are not keys (outside the map) are simply not stored
        allowed = q_ok[None, :]
        if GROUPED:
            allowed = allowed & (((sel[None, :] >> slot[:, None]) & 1) != 0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        pT = tl.where(allowed, tl.math.exp2(qkT * sm_scale_log2 - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk *= sm_scale
    # dk / dv are contiguous [B, H, W, heads, d]
    dk_ptrs = DK + (((b * H + y) * W + x) * n_heads + h)[:, None] * D + offs_d[None, :]
    dv_ptrs = DVT + (((b * H + y) * W + x) * n_heads + h)[:, None] * DV + offs_dv[None, :]
    dk_mask = key_in[:, None] if D == D_PAD else key_in[:, None] & (offs_d[None, :] < D)
    dv_mask = key_in[:, None] if DV == DV_PAD else key_in[:, None] & (offs_dv[None, :] < DV)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dv.to(DVT.dtype.element_ty), mask=dv_mask)


@triton.jit
def _compact_store(bits, vals, offset, LST, SEL, base, cap):
    """Append the entries of ``vals`` whose ``bits`` are set at ``offset`` (ascending); new offset."""
    present = bits != 0
    pos = offset + tl.cumsum(present.to(tl.int32), 0) - 1
    ok = present & (pos < cap)
    tl.store(LST + base + pos, vals, mask=ok)
    tl.store(SEL + base + pos, bits, mask=ok)
    return offset + tl.sum(present.to(tl.int32), 0)


@triton.jit(do_not_specialize=["P", "K", "R_H", "R_W", "n_gW", "n_tiles", "cap"])
def _bra_plan_kernel(
    IDX, LST, SEL, CNT, ILST, ISEL, ICNT,
    P, K, R_H, R_W, g_H, g_W, n_gW, n_tiles, cap,
    INVERSE: tl.constexpr, P_CHUNK: tl.constexpr, E_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
):
    """Forward (and inverse) lists of one query (key) group ``tile`` of one (batch, routing head).

    Forward: entry ``j`` with bits ``OR_s [j in idx[rho(tile, s)]] << s``. Inverse: entry ``rho`` with
    bits ``OR_j [j in idx[rho]] << slot(j)`` over the key regions ``j`` of the tile. Distinct bits, so
    integer sums are ORs; lists ascend; entries past the count are left unwritten (never read).
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    idx_base = IDX + bh * P * K
    G = g_H * g_W
    u0 = (tile // n_gW) * g_H
    w0 = (tile % n_gW) * g_W
    off = tl.zeros([], dtype=tl.int32)
    base = (bh * n_tiles + tile) * cap
    for p0 in range(0, P, P_CHUNK):
        cols = p0 + tl.arange(0, P_CHUNK)
        bits = tl.zeros([P_CHUNK], dtype=tl.int32)
        for e0 in range(0, G * K, E_CHUNK):
            e = e0 + tl.arange(0, E_CHUNK)
            slot = e // K
            u = u0 + slot // g_W
            w = w0 + slot % g_W
            ok = (e < G * K) & (u < R_H) & (w < R_W)
            ids = tl.load(idx_base + (u * R_W + w) * K + e % K, mask=ok, other=-1)
            ids = tl.where(ok, tl.minimum(tl.maximum(ids, 0), P - 1), -1)
            bit = tl.where(ok, 1 << slot, 0)
            hit = ids[None, :] == cols[:, None]
            bits += tl.sum(tl.where(hit, bit[None, :], 0), 1)
        bits = tl.where(cols < P, bits, 0)
        off = _compact_store(bits, cols, off, LST, SEL, base, cap)
    tl.store(CNT + bh * n_tiles + tile, off)
    if INVERSE:
        ioff = tl.zeros([], dtype=tl.int32)
        ibase = (bh * n_tiles + tile) * P
        for r0 in range(0, P, P_CHUNK):
            rows = r0 + tl.arange(0, P_CHUNK)
            bits = tl.zeros([P_CHUNK], dtype=tl.int32)
            for k0 in range(0, K, K_CHUNK):
                kk = k0 + tl.arange(0, K_CHUNK)
                ok = (rows[:, None] < P) & (kk[None, :] < K)
                ids = tl.load(idx_base + rows[:, None] * K + kk[None, :], mask=ok, other=0)
                ids = tl.minimum(tl.maximum(ids, 0), P - 1)
                u = ids // R_W
                w = ids % R_W
                mine = ok & ((u // g_H) * n_gW + w // g_W == tile)
                bit = 1 << ((u % g_H) * g_W + w % g_W)
                bits += tl.sum(tl.where(mine, bit, 0), 1)
            ioff = _compact_store(bits, rows, ioff, ILST, ISEL, ibase, P)
        tl.store(ICNT + bh * n_tiles + tile, ioff)


@triton.jit(do_not_specialize=["P", "topk"])
def _route_topk_kernel(LOGITS, INDEX, P, topk, stride_lb, stride_lr, stride_ib, stride_ir,
                       P_PAD: tl.constexpr):
    """Routing row ``(b, r)``: the ``topk`` columns of ``logits[b, r, :P]`` that a stable descending sort
    puts first (ties to the smaller column), written in ascending column order to ``index[b, r]``."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, P_PAD)
    ok = offs < P
    row = tl.load(LOGITS + b * stride_lb + r * stride_lr + offs, mask=ok, other=0.0)
    # column i is ranked before column j: a larger logit, or an equal one at a smaller column
    li, lj = row[:, None], row[None, :]
    before = (li > lj) | ((li == lj) & (offs[:, None] < offs[None, :]))
    rank = tl.sum((before & ok[:, None]).to(tl.int32), 0)
    sel = (rank < topk) & ok
    pos = tl.cumsum(sel.to(tl.int32), 0) - sel.to(tl.int32)
    # pos < topk always holds for finite logits; NaN rows (invalid input) must not write past the row
    tl.store(INDEX + b * stride_ib + r * stride_ir + pos, offs, mask=sel & (pos < topk))


# ---------------------------------------------------------------------------------------------
# Host launchers. q/k/v are [B, H, W, heads, d] views with a dense last dim; plans come from
# visattn.ops.bilevel_routing_plan. ``geo`` = (r_H, r_W, R_H, R_W, g_H, g_W, block_m, block_n).


ROUTE_TOPK_MAX_P = 128  # the kernel holds a [P, P] comparison per row


def route_topk(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 ``[B, P, topk]``: per row of ``logits`` ``[B, P, P]`` the top-k columns (stable descending
    order decides ties), ascending. One launch in place of two sorts; ``P <= ROUTE_TOPK_MAX_P``."""
    B, P, _ = logits.shape
    logits = logits.contiguous()
    index = torch.empty((B, P, topk), device=logits.device, dtype=torch.int32)
    launch(
        _route_topk_kernel, (P, B), (logits, index),
        (P, topk, logits.stride(0), logits.stride(1), index.stride(0), index.stride(1)),
        P_PAD=max(16, next_pow2(P)), num_warps=4,
    )
    return index


def default_blocks(device: torch.device, dtype: torch.dtype, region_tokens: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 32 x 32 in the interpreter; on GPUs 64 x 32, or one region per query tile
    (``BLOCK_M`` = its token count rounded up to a power of two) for regions of 16-32 tokens.

    H100 sweeps at BiFormer-S's stage shapes (bf16, batch 64; benchmarks/NOTES.md): 64 x 32 with 4 warps
    and no software pipelining was fastest for 64-token (stage 1) and 4-token (stage 3) regions
    (64 x 64 / 2 stages: 1.2-2x slower; 8 warps: 2x slower). For 16-token regions (stage 2) a 16-row
    tile per region took fwd+bwd from 0.63 to 0.34 ms: a grouped tile attends the union of its
    regions' routed lists, so with 4 regions per tile ~3/4 of its scores are masked work.
    """
    if INTERPRET or device.type != "cuda":
        return 32, 32
    if 16 <= region_tokens <= 32:
        return next_pow2(region_tokens), 32
    return 64, 32


def _map_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride()[:4]  # one call: t.stride(i) four times costs 4x the host time


def _list_strides(lst: torch.Tensor, cnt: torch.Tensor) -> tuple[int, int, int, int, int]:
    # lists [B, Hh, n_tiles, cap] contiguous; Hh == 1 broadcasts over heads (stride 0)
    return (lst.stride(0), 0 if lst.shape[1] == 1 else lst.stride(1), lst.stride(2),
            cnt.stride(0), 0 if cnt.shape[1] == 1 else cnt.stride(1))


def _launch_args(q, geo, n_tiles):
    B, H, W, heads, D = q.shape
    r_H, r_W, R_H, R_W, g_H, g_W, block_m, _ = geo
    T = r_H * r_W
    n_sub = cdiv(g_H * g_W * T, block_m)
    n_gW = cdiv(R_W, g_W)
    grid = (n_tiles * n_sub, B * heads)
    return grid, (H, W, r_H, r_W, R_H, R_W, g_H, g_W, n_gW, T, n_sub, R_H * R_W)


def _num_warps(device: torch.device) -> int:
    return 4


def _num_stages() -> int:
    return 1


def bra_fwd(q, k, v, lst, sel, cnt, geo, scale: float, zeros: bool):
    """Forward: returns ``out`` ``[B, H, W, heads, d_v]`` (q's dtype) and ``lse`` fp32 ``[B, H, W, heads]``."""
    B, H, W, heads, D = q.shape
    Dv = v.shape[-1]
    out = q.new_empty((B, H, W, heads, Dv))
    lse = torch.empty((B, H, W, heads), device=q.device, dtype=torch.float32)
    grid, dims = _launch_args(q, geo, lst.shape[2])
    launch(
        _bra_fwd_kernel, grid, (q, k, v, out, lse, lst, sel, cnt),
        (*_map_strides(q), *_map_strides(k), *_map_strides(v), *_map_strides(out), *_list_strides(lst, cnt),
         *dims, lst.shape[-1], heads),
        (scale * LOG2E,),
        ZEROS=zeros, GROUPED=geo[4] * geo[5] > 1, BLOCK_M=geo[6], BLOCK_N=geo[7],
        D=D, D_PAD=head_dim_pad(D), DV=Dv, DV_PAD=head_dim_pad(Dv), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=_num_warps(q.device), num_stages=_num_stages(),
    )
    return out, lse


def bra_bwd(do, q, k, v, out, lse, dlse, lst, sel, cnt, ilst, isel, icnt, geo, scale: float, zeros: bool):
    """Backward: returns ``(dq, dk, dv)`` (contiguous, the inputs' dtypes)."""
    B, H, W, heads, D = q.shape
    Dv = v.shape[-1]
    out, lse = out.contiguous(), lse.contiguous()  # no-ops for bra_fwd's outputs
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)  # written by the dQ kernel
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    common = dict(ZEROS=zeros, BLOCK_M=geo[6], BLOCK_N=geo[7], D=D, D_PAD=head_dim_pad(D), DV=Dv,
                  DV_PAD=head_dim_pad(Dv), DOT_PRECISION=dot_precision(q.dtype),
                  num_warps=_num_warps(q.device), num_stages=_num_stages())
    grid, dims = _launch_args(q, geo, lst.shape[2])
    launch(
        _bra_bwd_dq_kernel, grid,
        (q, k, v, do, out, lse, dlse if dlse is not None else lse, delta, dq, lst, sel, cnt),
        (*_map_strides(q), *_map_strides(k), *_map_strides(v), *_map_strides(do), *_list_strides(lst, cnt),
         *dims, lst.shape[-1], heads),
        (scale, scale * LOG2E), HAS_DLSE=dlse is not None,
        GROUPED=geo[4] * geo[5] > 1, **common,
    )
    grid, dims = _launch_args(q, geo, ilst.shape[2])
    launch(
        _bra_bwd_dkdv_kernel, grid, (q, k, v, do, lse, delta, dk, dv, ilst, isel, icnt),
        (*_map_strides(q), *_map_strides(k), *_map_strides(v), *_map_strides(do), *_list_strides(ilst, icnt),
         *dims, ilst.shape[-1], heads),
        (scale, scale * LOG2E), GROUPED=geo[4] * geo[5] > 1, **common,
    )
    return dq, dk, dv


def bra_plan(idx: torch.Tensor, grid: tuple[int, int], group: tuple[int, int], inverse: bool):
    """Plans of routing ``idx`` ``[B, Hh, P, k]`` in one launch (see ``ops/bilevel_routing_plan.py``).

    Returns ``(lst, sel, cnt, ilst, isel, icnt)``: int32 ``[B, Hh, n_tiles, cap]`` lists with their
    counts ``[B, Hh, n_tiles]``; the inverse three are empty ``[B, Hh, n_tiles, 0]`` tensors unless
    ``inverse``. List entries past a tile's count are unspecified (the kernels never read them).
    """
    B, Hh, P, K = idx.shape
    R_H, R_W = grid
    g_H, g_W = group
    n_gW = cdiv(R_W, g_W)
    n_tiles = cdiv(R_H, g_H) * n_gW
    cap = min(g_H * g_W * K, P)
    idx = idx.to(torch.int32).contiguous()
    new = functools.partial(torch.empty, device=idx.device, dtype=torch.int32)
    lst, sel, cnt = new((B, Hh, n_tiles, cap)), new((B, Hh, n_tiles, cap)), new((B, Hh, n_tiles))
    icap = P if inverse else 0
    ilst, isel, icnt = new((B, Hh, n_tiles, icap)), new((B, Hh, n_tiles, icap)), new((B, Hh, n_tiles))
    p_chunk = min(64, max(16, next_pow2(P)))
    launch(
        _bra_plan_kernel, (n_tiles, B * Hh), (idx, lst, sel, cnt, ilst, isel, icnt),
        (P, K, R_H, R_W, g_H, g_W, n_gW, n_tiles, cap),
        INVERSE=inverse, P_CHUNK=p_chunk, E_CHUNK=min(64, max(16, next_pow2(g_H * g_W * K))),
        K_CHUNK=min(32, max(16, next_pow2(K))), num_warps=4,
    )
    return lst, sel, cnt, ilst, isel, icnt
