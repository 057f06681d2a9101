"""Fused neighborhood attention (NA / DiNA / GNA) forward and backward in Triton.

Every rank runs as 3-D: a 1-D or 2-D input gets leading axes of size 1 (kernel 1). One program owns a
box of ``T0 x T1 x T2`` queries of one dilation group (group coordinates) of one (batch, head); it
iterates exactly the KV boxes (``K0 x K1 x K2`` keys) covering the union of its queries' windows,
read from the per-axis window tables of :mod:`visattn.ops.neighborhood_ref` (one interval per axis by
monotonicity). Q, K, V, O and dO are addressed in place by strides: no permutation copies. A KV box
inside every row's window (the intersection ``[start(i_last), end(i_first)]`` per axis) is *full* and
skips all mask arithmetic; other boxes mask per (row, column) with per-axis comparisons.

Backward (deterministic, no atomics): a preprocess pass (``delta = rowsum(dO * O) - dLSE``); dK/dV per
KV box and KV head, looping over the query heads of its GQA group and the Q boxes of the inverse
windows; dQ per Q box with the forward's walk, which also stores dS per (query, window slot) for the
RPB gradient (reduced in a fixed order by the op). Extra KV tokens form contiguous tiles after the
neighborhood in the forward/dQ walks and get their own dK/dV programs over all queries.

Caution/limits: tested with Triton 3.6 (GPU) and 3.9 (interpreter). fp16, bf16, fp32 (IEEE dots);
head dims up to 256, padded to a power of two >= 16 with masked lanes. Sizes, kernel sizes, strides,
dilations, scale and the extra-token count are runtime values; tile extents, head dims and the
causal/rpb/mask/extra flags are constexpr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    _fwd_epilogue,
    _online_softmax_step,
    _online_softmax_step_scaled,
    cdiv,
    dot_precision,
    head_dim_pad,
)
from ._launch import launch
from ._neighborhood_index import (
    _box,
    _flat,
    _ids,
    _kv_box_load,
    _kv_box_rel,
    _kv_walk_next,
    _kv_walks,
    _load_rows,
    _off,
    _row_windows,
    _rpb_lin,
    _rpb_logits,
    _span,
    _win_mask,
)


@triton.jit(do_not_specialize=["L0", "L1", "L2", "d0", "d1", "d2", "ks0", "ks1", "ks2", "n_extra", "nt1", "nt2"])
def _neighborhood_fwd_kernel(
    Q, K, V, O, LSE, KE, VE, RPB, KPM,
    ST0, EN0, ST1, EN1, ST2, EN2,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    so_b, so_0, so_1, so_2, so_h,
    ske_b, ske_n, ske_h, sve_b, sve_n, sve_h,
    sr_h, sr_0, sr_1, sr_2, sm_b, sm_0, sm_1, sm_2,
    L0, L1, L2, d0, d1, d2, ks0, ks1, ks2, nt1, nt2, H, kv_group, n_extra, qk_scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_RPB: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr = False,  # qk_scale > 0 and no RPB: scale folded into the softmax's FMA
):
    t0, t1, t2, g0, g1, g2, b, h = _ids(tl.program_id(0), tl.program_id(1), tl.program_id(2), nt1, nt2, d1, d2, H)
    hk = (h // kv_group).to(tl.int64)
    Lg0 = (L0 - g0 + d0 - 1) // d0
    Lg1 = (L1 - g1 + d1 - 1) // d1
    Lg2 = (L2 - g2 + d2 - 1) // d2
    f0, f1, f2 = t0 * T0, t1 * T1, t2 * T2
    if (f0 >= Lg0) | (f1 >= Lg1) | (f2 >= Lg2):
        return  # this dilation group is one token shorter than the tile grid on some axis
    BLOCK_N: tl.constexpr = K0 * K1 * K2
    i0, i1, i2 = _box(f0, f1, f2, T0, T1, T2)
    row_ok = (i0 < Lg0) & (i1 < Lg1) & (i2 < Lg2)
    od = tl.arange(0, DP)
    ov = tl.arange(0, DVP)
    q_off = _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sq_0, sq_1, sq_2)
    q = tl.load(Q + b * sq_b + h * sq_h + q_off[:, None] + od[None, :], mask=row_ok[:, None] & (od[None, :] < D),
                other=0.0)
    # per-row windows (group coordinates)
    x0, x1, x2 = i0 * d0 + g0, i1 * d1 + g1, i2 * d2 + g2
    rs0, re0, rs1, re1, rs2, re2 = _row_windows(ST0, EN0, ST1, EN1, ST2, EN2, x0, x1, x2, row_ok)
    lo0, hi0, fs0, fe0, n0 = _span(ST0, EN0, f0, tl.minimum(f0 + T0 - 1, Lg0 - 1), g0, d0, K0)
    lo1, hi1, fs1, fe1, n1 = _span(ST1, EN1, f1, tl.minimum(f1 + T1 - 1, Lg1 - 1), g1, d1, K1)
    lo2, hi2, fs2, fe2, n2 = _span(ST2, EN2, f2, tl.minimum(f2 + T2 - 1, Lg2 - 1), g2, d2, K2)

    m_i = tl.full([T0 * T1 * T2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([T0 * T1 * T2], dtype=tl.float32)
    acc = tl.zeros([T0 * T1 * T2, DVP], dtype=tl.float32)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    r0, r1, r2, k_rel, v_rel = _kv_box_rel(d0, d1, d2, sk_0, sk_1, sk_2, sv_0, sv_1, sv_2, od, ov, K0, K1, K2)
    if HAS_RPB:
        rpb_rows = _rpb_lin(i0 - f0, i1 - f1, i2 - f2, sr_0, sr_1, sr_2)
        rpb_cols = _rpb_lin(r0, r1, r2, sr_0, sr_1, sr_2)
    ko, vo, kd0, kd1, kd2, vd0, vd1, vd2 = _kv_walks(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, sk_0, sk_1, sk_2,
                                                     sv_0, sv_1, sv_2, K0, K1, K2)
    j0, j1, j2 = lo0, lo1, lo2
    for _ in range(0, n0 * n1 * n2):
        c0, c1, c2, col_ok, k, v = _kv_box_load(j0, j1, j2, hi0, hi1, hi2, r0, r1, r2, k_base + ko, v_base + vo,
                                                k_rel, v_rel, od, ov, D, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if not FOLD_SCALE:
            s = s * qk_scale
        if HAS_RPB:
            s += _rpb_logits(RPB, h, f0, f1, f2, j0, j1, j2, rpb_rows, rpb_cols, ks0, ks1, ks2, sr_h, sr_0, sr_1,
                             sr_2) * 1.4426950408889634
        full = ((j0 >= fs0) & (j0 + K0 - 1 <= fe0) & (j1 >= fs1) & (j1 + K1 - 1 <= fe1)
                & (j2 >= fs2) & (j2 + K2 - 1 <= fe2))
        if not full:
            s = tl.where(_win_mask(j0, j1, j2, c0, c1, c2, rs0, re0, rs1, re1, rs2, re2, K0, K1, K2), s,
                         float("-inf"))
        if HAS_KPM:
            m_off = _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sm_0, sm_1, sm_2)
            keep = tl.load(KPM + b * sm_b + m_off, mask=col_ok, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        if FOLD_SCALE:  # the scale rides in the exponent's FMA (s is the raw q.k here)
            p, m_i, l_i, acc = _online_softmax_step_scaled(s, qk_scale, m_i, l_i, acc)
        else:
            p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        j0, j1, j2, ko, vo = _kv_walk_next(j0, j1, j2, lo1, lo2, hi1, hi2, ko, vo, kd0, kd1, kd2, vd0, vd1, vd2, K0,
                                           K1, K2)
    if HAS_EXTRA:
        oe = tl.arange(0, BLOCK_N)
        ke_base = KE + b * ske_b + hk * ske_h
        ve_base = VE + b * sve_b + hk * sve_h
        for e0 in tl.range(0, n_extra, BLOCK_N, num_stages=1):  # no second set of pipelined buffers
            e_ok = (e0 + oe) < n_extra
            e_idx = (e0 + oe).to(tl.int64)
            k = _load_rows(ke_base, e_idx * ske_n, od, D, e_ok)
            v = _load_rows(ve_base, e_idx * sve_n, ov, DV, e_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(e_ok[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    out, lse = _fwd_epilogue(acc, m_i, l_i)
    o_off = _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, so_0, so_1, so_2)
    tl.store(O + b * so_b + h * so_h + o_off[:, None] + ov[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (ov[None, :] < DV))
    n_flat = _flat(i0, i1, i2, g0, g1, g2, d0, d1, d2, L1, L2)
    tl.store(LSE + (b * L0 * L1 * L2 + n_flat) * H + h, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, LSE, DELTA, LSE2, n_rows,
                           HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """Over flat (token, head) rows of contiguous O/dO: delta = rowsum(O*dO) - dLSE; LSE in log2 units with
    empty rows (LSE -inf) mapped to +inf so that their probabilities recompute as 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    ov = tl.arange(0, DVP)
    mask = ok[:, None] & (ov[None, :] < DV)
    o = tl.load(O + rows[:, None] * DV + ov[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * DV + ov[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)
    lse = tl.load(LSE + rows, mask=ok, other=0.0)
    tl.store(LSE2 + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=ok)


@triton.jit(do_not_specialize=["L0", "L1", "L2", "d0", "d1", "d2", "ks0", "ks1", "ks2", "n_extra", "nt1", "nt2"])
def _neighborhood_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, DS, KE, VE, RPB, KPM,
    ST0, EN0, ST1, EN1, ST2, EN2,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sdq_b, sdq_0, sdq_1, sdq_2, sdq_h,
    ske_b, ske_n, ske_h, sve_b, sve_n, sve_h,
    sr_h, sr_0, sr_1, sr_2, sm_b, sm_0, sm_1, sm_2,
    L0, L1, L2, d0, d1, d2, ks0, ks1, ks2, nt1, nt2, H, kv_group, n_extra, qk_scale, scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_RPB: tl.constexpr, HAS_KPM: tl.constexpr, STORE_DS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one Q box (the forward's walk, recomputing P); dS per window slot for the RPB gradient."""
    t0, t1, t2, g0, g1, g2, b, h = _ids(tl.program_id(0), tl.program_id(1), tl.program_id(2), nt1, nt2, d1, d2, H)
    hk = (h // kv_group).to(tl.int64)
    Lg0 = (L0 - g0 + d0 - 1) // d0
    Lg1 = (L1 - g1 + d1 - 1) // d1
    Lg2 = (L2 - g2 + d2 - 1) // d2
    f0, f1, f2 = t0 * T0, t1 * T1, t2 * T2
    if (f0 >= Lg0) | (f1 >= Lg1) | (f2 >= Lg2):
        return
    BLOCK_N: tl.constexpr = K0 * K1 * K2
    i0, i1, i2 = _box(f0, f1, f2, T0, T1, T2)
    row_ok = (i0 < Lg0) & (i1 < Lg1) & (i2 < Lg2)
    od = tl.arange(0, DP)
    ov = tl.arange(0, DVP)
    q_mask = row_ok[:, None] & (od[None, :] < D)
    q = tl.load(Q + b * sq_b + h * sq_h + _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sq_0, sq_1, sq_2)[:, None]
                + od[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sdo_0, sdo_1, sdo_2)[:, None]
                 + ov[None, :], mask=row_ok[:, None] & (ov[None, :] < DV), other=0.0)
    n_flat = _flat(i0, i1, i2, g0, g1, g2, d0, d1, d2, L1, L2)
    stat = (b * L0 * L1 * L2 + n_flat) * H + h
    lse2 = tl.load(LSE2 + stat, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    x0, x1, x2 = i0 * d0 + g0, i1 * d1 + g1, i2 * d2 + g2
    rs0, re0, rs1, re1, rs2, re2 = _row_windows(ST0, EN0, ST1, EN1, ST2, EN2, x0, x1, x2, row_ok)
    lo0, hi0, fs0, fe0, n0 = _span(ST0, EN0, f0, tl.minimum(f0 + T0 - 1, Lg0 - 1), g0, d0, K0)
    lo1, hi1, fs1, fe1, n1 = _span(ST1, EN1, f1, tl.minimum(f1 + T1 - 1, Lg1 - 1), g1, d1, K1)
    lo2, hi2, fs2, fe2, n2 = _span(ST2, EN2, f2, tl.minimum(f2 + T2 - 1, Lg2 - 1), g2, d2, K2)
    dq = tl.zeros([T0 * T1 * T2, DP], dtype=tl.float32)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    r0, r1, r2, k_rel, v_rel = _kv_box_rel(d0, d1, d2, sk_0, sk_1, sk_2, sv_0, sv_1, sv_2, od, ov, K0, K1, K2)
    if HAS_RPB:
        rpb_rows = _rpb_lin(i0 - f0, i1 - f1, i2 - f2, sr_0, sr_1, sr_2)
        rpb_cols = _rpb_lin(r0, r1, r2, sr_0, sr_1, sr_2)
    if STORE_DS:
        slot_cols = (r0 * ks1 + r1) * ks2 + r2
        ds_rows = stat * (ks0 * ks1 * ks2) - ((rs0 * ks1 + rs1) * ks2 + rs2)
    ko, vo, kd0, kd1, kd2, vd0, vd1, vd2 = _kv_walks(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, sk_0, sk_1, sk_2,
                                                     sv_0, sv_1, sv_2, K0, K1, K2)
    j0, j1, j2 = lo0, lo1, lo2
    for _ in range(0, n0 * n1 * n2):
        c0, c1, c2, col_ok, k, v = _kv_box_load(j0, j1, j2, hi0, hi1, hi2, r0, r1, r2, k_base + ko, v_base + vo,
                                                k_rel, v_rel, od, ov, D, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            s += _rpb_logits(RPB, h, f0, f1, f2, j0, j1, j2, rpb_rows, rpb_cols, ks0, ks1, ks2, sr_h, sr_0, sr_1,
                             sr_2) * 1.4426950408889634
        full = ((j0 >= fs0) & (j0 + K0 - 1 <= fe0) & (j1 >= fs1) & (j1 + K1 - 1 <= fe1)
                & (j2 >= fs2) & (j2 + K2 - 1 <= fe2))
        if not full:
            s = tl.where(_win_mask(j0, j1, j2, c0, c1, c2, rs0, re0, rs1, re1, rs2, re2, K0, K1, K2), s,
                         float("-inf"))
        if HAS_KPM:
            keep = tl.load(KPM + b * sm_b + _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sm_0, sm_1, sm_2),
                           mask=col_ok, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        if STORE_DS:
            # slot (c - rs) per axis in row-major window order: the box origin's part is a scalar, the
            # rows' and columns' parts are loop-invariant; pairs outside a window have s = -inf
            ds_cols = (j0 * ks1 + j1) * ks2 + j2 + slot_cols
            tl.store(DS + ds_rows[:, None] + ds_cols[None, :], ds, mask=row_ok[:, None] & (s != float("-inf")))
        j0, j1, j2, ko, vo = _kv_walk_next(j0, j1, j2, lo1, lo2, hi1, hi2, ko, vo, kd0, kd1, kd2, vd0, vd1, vd2, K0,
                                           K1, K2)
    if HAS_EXTRA:
        oe = tl.arange(0, BLOCK_N)
        ke_base = KE + b * ske_b + hk * ske_h
        ve_base = VE + b * sve_b + hk * sve_h
        for e0 in tl.range(0, n_extra, BLOCK_N, num_stages=1):  # no second set of pipelined buffers
            e_ok = (e0 + oe) < n_extra
            e_idx = (e0 + oe).to(tl.int64)
            k = _load_rows(ke_base, e_idx * ske_n, od, D, e_ok)
            v = _load_rows(ve_base, e_idx * sve_n, ov, DV, e_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq *= scale
    tl.store(DQ + b * sdq_b + h * sdq_h + _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sdq_0, sdq_1, sdq_2)[:, None]
             + od[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["L0", "L1", "L2", "d0", "d1", "d2", "ks0", "ks1", "ks2", "nk1", "nk2"])
def _neighborhood_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV_, RPB, KPM,
    ST0, EN0, ST1, EN1, ST2, EN2, IL0, IH0, IL1, IH1, IL2, IH2,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sdk_b, sdk_0, sdk_1, sdk_2, sdk_h,
    sdv_b, sdv_0, sdv_1, sdv_2, sdv_h,
    sr_h, sr_0, sr_1, sr_2, sm_b, sm_0, sm_1, sm_2,
    L0, L1, L2, d0, d1, d2, ks0, ks1, ks2, nk1, nk2, H, kv_group, qk_scale, scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one KV box of KV head hk: over its group's query heads and the Q boxes of the inverse windows."""
    Hk = H // kv_group
    t0, t1, t2, g0, g1, g2, b, hk = _ids(tl.program_id(0), tl.program_id(1), tl.program_id(2), nk1, nk2, d1, d2, Hk)
    Lg0 = (L0 - g0 + d0 - 1) // d0
    Lg1 = (L1 - g1 + d1 - 1) // d1
    Lg2 = (L2 - g2 + d2 - 1) // d2
    j0, j1, j2 = t0 * K0, t1 * K1, t2 * K2
    if (j0 >= Lg0) | (j1 >= Lg1) | (j2 >= Lg2):
        return
    c0, c1, c2 = _box(j0, j1, j2, K0, K1, K2)
    col_ok = (c0 < Lg0) & (c1 < Lg1) & (c2 < Lg2)
    od = tl.arange(0, DP)
    ov = tl.arange(0, DVP)
    k_off = _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sk_0, sk_1, sk_2)
    v_off = _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sv_0, sv_1, sv_2)
    k_mask = col_ok[:, None] & (od[None, :] < D)
    v_mask = col_ok[:, None] & (ov[None, :] < DV)
    k = tl.load(K + b * sk_b + hk * sk_h + k_off[:, None] + od[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + v_off[:, None] + ov[None, :], mask=v_mask, other=0.0)
    if HAS_KPM:
        keep = tl.load(KPM + b * sm_b + _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sm_0, sm_1, sm_2),
                       mask=col_ok, other=0) != 0
    # queries whose windows reach this box: one interval per axis (inverse windows are monotone)
    jl0 = tl.minimum(j0 + K0 - 1, Lg0 - 1)
    jl1 = tl.minimum(j1 + K1 - 1, Lg1 - 1)
    jl2 = tl.minimum(j2 + K2 - 1, Lg2 - 1)
    qlo0 = tl.load(IL0 + j0 * d0 + g0)
    qhi0 = tl.load(IH0 + jl0 * d0 + g0)
    qlo1 = tl.load(IL1 + j1 * d1 + g1)
    qhi1 = tl.load(IH1 + jl1 * d1 + g1)
    qlo2 = tl.load(IL2 + j2 * d2 + g2)
    qhi2 = tl.load(IH2 + jl2 * d2 + g2)
    n0 = tl.maximum((qhi0 - qlo0 + T0) // T0, 0)
    n1 = tl.maximum((qhi1 - qlo1 + T1) // T1, 0)
    n2 = tl.maximum((qhi2 - qlo2 + T2) // T2, 0)
    dk = tl.zeros([K0 * K1 * K2, DP], dtype=tl.float32)
    dv = tl.zeros([K0 * K1 * K2, DVP], dtype=tl.float32)
    N = L0 * L1 * L2
    if HAS_RPB:
        rq0, rq1, rq2 = _box(0, 0, 0, T0, T1, T2)
        rpb_rows = _rpb_lin(rq0, rq1, rq2, sr_0, sr_1, sr_2)
        rpb_cols = _rpb_lin(c0 - j0, c1 - j1, c2 - j2, sr_0, sr_1, sr_2)
    for hh in range(0, kv_group):
        h = hk * kv_group + hh
        for it in range(0, n0 * n1 * n2):
            f0 = qlo0 + (it // (n1 * n2)) * T0
            f1 = qlo1 + ((it // n2) % n1) * T1
            f2 = qlo2 + (it % n2) * T2
            i0, i1, i2 = _box(f0, f1, f2, T0, T1, T2)
            row_ok = (i0 < Lg0) & (i1 < Lg1) & (i2 < Lg2)
            q = tl.load(Q + b * sq_b + h * sq_h + _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sq_0, sq_1, sq_2)[:, None]
                        + od[None, :], mask=row_ok[:, None] & (od[None, :] < D), other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h
                         + _off(i0, i1, i2, g0, g1, g2, d0, d1, d2, sdo_0, sdo_1, sdo_2)[:, None] + ov[None, :],
                         mask=row_ok[:, None] & (ov[None, :] < DV), other=0.0)
            stat = (b * N + _flat(i0, i1, i2, g0, g1, g2, d0, d1, d2, L1, L2)) * H + h
            lse2 = tl.load(LSE2 + stat, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if HAS_RPB:
                s += _rpb_logits(RPB, h, f0, f1, f2, j0, j1, j2, rpb_rows, rpb_cols, ks0, ks1, ks2, sr_h, sr_0,
                                 sr_1, sr_2) * 1.4426950408889634
            ql0 = tl.minimum(f0 + T0 - 1, Lg0 - 1)
            ql1 = tl.minimum(f1 + T1 - 1, Lg1 - 1)
            ql2 = tl.minimum(f2 + T2 - 1, Lg2 - 1)
            full = ((tl.load(ST0 + ql0 * d0 + g0) <= j0) & (tl.load(EN0 + f0 * d0 + g0) >= j0 + K0 - 1)
                    & (tl.load(ST1 + ql1 * d1 + g1) <= j1) & (tl.load(EN1 + f1 * d1 + g1) >= j1 + K1 - 1)
                    & (tl.load(ST2 + ql2 * d2 + g2) <= j2) & (tl.load(EN2 + f2 * d2 + g2) >= j2 + K2 - 1))
            if not full:
                x0, x1, x2 = i0 * d0 + g0, i1 * d1 + g1, i2 * d2 + g2
                rs0, re0, rs1, re1, rs2, re2 = _row_windows(ST0, EN0, ST1, EN1, ST2, EN2, x0, x1, x2, row_ok)
                s = tl.where(_win_mask(j0, j1, j2, c0, c1, c2, rs0, re0, rs1, re1, rs2, re2, K0, K1, K2)
                             & col_ok[None, :], s, float("-inf"))
            if HAS_KPM:
                s = tl.where(keep[None, :], s, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dk *= scale
    dk_off = _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sdk_0, sdk_1, sdk_2)
    dv_off = _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, sdv_0, sdv_1, sdv_2)
    tl.store(DK + b * sdk_b + hk * sdk_h + dk_off[:, None] + od[None, :], dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV_ + b * sdv_b + hk * sdv_h + dv_off[:, None] + ov[None, :], dv.to(DV_.dtype.element_ty), mask=v_mask)


@triton.jit(do_not_specialize=["N", "L1", "L2", "n_extra"])
def _extra_bwd_dkdv_kernel(
    Q, KE, VE, DO, LSE2, DELTA, DKE, DVE,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    ske_b, ske_n, ske_h, sve_b, sve_n, sve_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sdke_b, sdke_n, sdke_h, sdve_b, sdve_n, sdve_h,
    N, L1, L2, H, kv_group, n_extra, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one tile of extra tokens: every query attends them, so loop over all query tokens."""
    Hk = H // kv_group
    pid_e = tl.program_id(0)
    b = (tl.program_id(1) // Hk).to(tl.int64)
    hk = tl.program_id(1) % Hk
    oe = pid_e * BLOCK_N + tl.arange(0, BLOCK_N)
    e_ok = oe < n_extra
    od = tl.arange(0, DP)
    ov = tl.arange(0, DVP)
    ke_ptr = KE + b * ske_b + hk * ske_h + oe.to(tl.int64)[:, None] * ske_n + od[None, :]
    ve_ptr = VE + b * sve_b + hk * sve_h + oe.to(tl.int64)[:, None] * sve_n + ov[None, :]
    k_mask = e_ok[:, None] & (od[None, :] < D)
    v_mask = e_ok[:, None] & (ov[None, :] < DV)
    k = tl.load(ke_ptr, mask=k_mask, other=0.0)
    v = tl.load(ve_ptr, mask=v_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DVP], dtype=tl.float32)
    om = tl.arange(0, BLOCK_M)
    for hh in range(0, kv_group):
        h = hk * kv_group + hh
        for r0 in range(0, N, BLOCK_M):
            n = r0 + om
            row_ok = n < N
            x0 = n // (L1 * L2)
            x1 = (n // L2) % L1
            x2 = n % L2
            q_off = x0.to(tl.int64) * sq_0 + x1.to(tl.int64) * sq_1 + x2.to(tl.int64) * sq_2
            do_off = x0.to(tl.int64) * sdo_0 + x1.to(tl.int64) * sdo_1 + x2.to(tl.int64) * sdo_2
            q = tl.load(Q + b * sq_b + h * sq_h + q_off[:, None] + od[None, :], mask=row_ok[:, None] & (od[None, :] < D),
                        other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + do_off[:, None] + ov[None, :],
                         mask=row_ok[:, None] & (ov[None, :] < DV), other=0.0)
            stat = (b * N + n) * H + h
            lse2 = tl.load(LSE2 + stat, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dk *= scale
    tl.store(DKE + b * sdke_b + hk * sdke_h + oe.to(tl.int64)[:, None] * sdke_n + od[None, :], dk.to(DKE.dtype.element_ty),
             mask=k_mask)
    tl.store(DVE + b * sdve_b + hk * sdve_h + oe.to(tl.int64)[:, None] * sdve_n + ov[None, :], dv.to(DVE.dtype.element_ty),
             mask=v_mask)


# ---------------------------------------------------------------------------------------------
# Host launchers. q/k/v arrive as [B, *spatial, H, D] (1-3 spatial axes) in any memory order with a
# dense head dim; 1-D/2-D inputs run as 3-D with leading axes of size 1 and stride 0, so no view (and
# no autograd node) is created. Tables are the per-axis int32 window tables of the padded 3-D problem.


def _pad_strides(t: torch.Tensor, n_lead: int) -> tuple[int, ...]:
    # (lead, axis 0, axis 1, axis 2) strides of a [lead.., *spatial] tensor, missing axes stride 0
    n = t.dim() - n_lead
    return (*t.stride()[:n_lead], *([0] * (3 - n)), *t.stride()[n_lead:])


def _s5(t: torch.Tensor) -> tuple[int, ...]:
    # (batch, axis 0, axis 1, axis 2, head) strides of a [B, *spatial, H, D] tensor
    st = t.stride()
    return (st[0], *([0] * (6 - len(st))), *st[1:-1])


def geometry(q: torch.Tensor) -> tuple[int, tuple[int, int, int], int]:
    """``(B, (L0, L1, L2), H)`` of a ``[B, *spatial, H, D]`` tensor, spatial padded with leading 1s."""
    spatial = tuple(q.shape[1:-2])
    return q.shape[0], (1,) * (3 - len(spatial)) + spatial, q.shape[-2]


def _s3(t: torch.Tensor | None) -> tuple[int, int, int]:
    # (batch, token, head) strides of a [B, N_e, H, D] tensor
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _rpb_strides(rpb):
    return (0, 0, 0, 0) if rpb is None else _pad_strides(rpb, 1)


def _kpm_strides(kpm):
    return (0, 0, 0, 0) if kpm is None else _pad_strides(kpm, 1)


def _dims(q, v):
    D, DV = q.shape[-1], v.shape[-1]
    return dict(D=D, DP=head_dim_pad(D), DV=DV, DVP=head_dim_pad(DV))


def neighborhood_fwd(q, k, v, tables, kernel_size, dilation, scale, extra=None, rpb=None, kpm=None, cfg=None):
    """Forward launcher: returns ``out`` (q's dtype, [B, *spatial, H, D_v] contiguous) and ``lse``
    (fp32 [B, *spatial, H], natural log)."""
    from . import _configs

    B, (L0, L1, L2), H = geometry(q)
    Hk = k.shape[-2]
    st, en = tables[0], tables[1]
    cfg = cfg or _configs.neighborhood_config(q.device, (L0, L1, L2), kernel_size, q.shape[-1], q.dtype, "fwd",
                                              extra is not None, rpb is not None)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    ng = [-(-L // d) for L, d in zip((L0, L1, L2), dilation)]
    nt = [-(-n // t) for n, t in zip(ng, cfg.q_tile)]
    grid = (nt[0] * nt[1] * nt[2], B * H, dilation[0] * dilation[1] * dilation[2])
    ke, ve = extra if extra is not None else (None, None)
    dummy = st[0]
    launch(
        _neighborhood_fwd_kernel, grid,
        (q, k, v, out, lse, ke if ke is not None else dummy, ve if ve is not None else dummy,
         rpb if rpb is not None else dummy, kpm if kpm is not None else dummy,
         st[0], en[0], st[1], en[1], st[2], en[2]),
        (*_s5(q), *_s5(k), *_s5(v), *_s5(out), *_s3(ke), *_s3(ve), *_rpb_strides(rpb), *_kpm_strides(kpm),
         L0, L1, L2, *dilation, *kernel_size, nt[1], nt[2], H, H // Hk, 0 if ke is None else ke.shape[1]),
        (scale * LOG2E,),
        T0=cfg.q_tile[0], T1=cfg.q_tile[1], T2=cfg.q_tile[2], K0=cfg.kv_tile[0], K1=cfg.kv_tile[1], K2=cfg.kv_tile[2],
        **_dims(q, v), HAS_EXTRA=ke is not None, HAS_RPB=rpb is not None, HAS_KPM=kpm is not None,
        PRECISION=dot_precision(q.dtype), FOLD_SCALE=scale > 0 and rpb is None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def neighborhood_bwd(do, q, k, v, out, lse, dlse, tables, kernel_size, dilation, scale, extra=None, rpb=None,
                     kpm=None, rpb_grad=False):
    """Backward launcher: returns ``(dq, dk, dv, dke, dve, ds)``; ``ds`` is the fp32 per-slot score gradient
    ``[B, L0, L1, L2, H, prod(kernel_size)]`` when ``rpb_grad`` (else None). ``out``/``do`` contiguous."""
    from . import _configs

    B, (L0, L1, L2), H = geometry(q)
    Hk = k.shape[-2]
    dev = q.device
    st, en, il, ih = tables
    dims = _dims(q, v)
    n_rows = B * L0 * L1 * L2 * H
    delta = torch.empty(q.shape[:-1], device=dev, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    pre = 64
    launch(
        _bwd_preprocess_kernel, (cdiv(n_rows, pre),),
        (out, do, dlse if dlse is not None else delta, lse, delta, lse2), (n_rows,),
        HAS_DLSE=dlse is not None, BLOCK=pre, DV=dims["DV"], DVP=dims["DVP"],
    )
    ke, ve = extra if extra is not None else (None, None)
    n_extra = 0 if ke is None else ke.shape[1]
    dummy = st[0]
    prec = dot_precision(q.dtype)
    ng = [-(-L // d) for L, d in zip((L0, L1, L2), dilation)]
    ngroups = dilation[0] * dilation[1] * dilation[2]
    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    ks_total = kernel_size[0] * kernel_size[1] * kernel_size[2]
    ds = torch.zeros((B, L0, L1, L2, H, ks_total), device=dev, dtype=torch.float32) if rpb_grad else None
    cfg = _configs.neighborhood_config(dev, (L0, L1, L2), kernel_size, q.shape[-1], q.dtype, "dq", ke is not None,
                                       rpb is not None)
    nt = [-(-n // t) for n, t in zip(ng, cfg.q_tile)]
    launch(
        _neighborhood_bwd_dq_kernel, (nt[0] * nt[1] * nt[2], B * H, ngroups),
        (q, k, v, do, lse2, delta, dq, ds if ds is not None else delta,
         ke if ke is not None else dummy, ve if ve is not None else dummy,
         rpb if rpb is not None else dummy, kpm if kpm is not None else dummy,
         st[0], en[0], st[1], en[1], st[2], en[2]),
        (*_s5(q), *_s5(k), *_s5(v), *_s5(do), *_s5(dq), *_s3(ke), *_s3(ve), *_rpb_strides(rpb), *_kpm_strides(kpm),
         L0, L1, L2, *dilation, *kernel_size, nt[1], nt[2], H, H // Hk, n_extra),
        (scale * LOG2E, scale),
        T0=cfg.q_tile[0], T1=cfg.q_tile[1], T2=cfg.q_tile[2], K0=cfg.kv_tile[0], K1=cfg.kv_tile[1], K2=cfg.kv_tile[2],
        **dims, HAS_EXTRA=ke is not None, HAS_RPB=rpb is not None, HAS_KPM=kpm is not None,
        STORE_DS=ds is not None, PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv = torch.empty(v.shape, device=dev, dtype=v.dtype)
    cfg = _configs.neighborhood_config(dev, (L0, L1, L2), kernel_size, q.shape[-1], q.dtype, "dkdv", ke is not None,
                                       rpb is not None)
    nk = [-(-n // t) for n, t in zip(ng, cfg.kv_tile)]
    launch(
        _neighborhood_bwd_dkdv_kernel, (nk[0] * nk[1] * nk[2], B * Hk, ngroups),
        (q, k, v, do, lse2, delta, dk, dv, rpb if rpb is not None else dummy, kpm if kpm is not None else dummy,
         st[0], en[0], st[1], en[1], st[2], en[2], il[0], ih[0], il[1], ih[1], il[2], ih[2]),
        (*_s5(q), *_s5(k), *_s5(v), *_s5(do), *_s5(dk), *_s5(dv), *_rpb_strides(rpb), *_kpm_strides(kpm),
         L0, L1, L2, *dilation, *kernel_size, nk[1], nk[2], H, H // Hk),
        (scale * LOG2E, scale),
        T0=cfg.q_tile[0], T1=cfg.q_tile[1], T2=cfg.q_tile[2], K0=cfg.kv_tile[0], K1=cfg.kv_tile[1], K2=cfg.kv_tile[2],
        **dims, HAS_RPB=rpb is not None, HAS_KPM=kpm is not None, PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dke = dve = None
    if ke is not None:
        dke = torch.empty(ke.shape, device=dev, dtype=ke.dtype)
        dve = torch.empty(ve.shape, device=dev, dtype=ve.dtype)
        bm = cfg.q_tile[0] * cfg.q_tile[1] * cfg.q_tile[2]
        bn = cfg.kv_tile[0] * cfg.kv_tile[1] * cfg.kv_tile[2]
        launch(
            _extra_bwd_dkdv_kernel, (cdiv(n_extra, bn), B * Hk),
            (q, ke, ve, do, lse2, delta, dke, dve),
            (*_s5(q), *_s3(ke), *_s3(ve), *_s5(do), *_s3(dke), *_s3(dve), L0 * L1 * L2, L1, L2, H, H // Hk, n_extra),
            (scale * LOG2E, scale),
            BLOCK_M=bm, BLOCK_N=bn, **dims, PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv, dke, dve, ds
