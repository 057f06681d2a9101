"""Index helpers of the neighborhood kernels (kernels/neighborhood.py): boxes of tokens in group
coordinates, their memory offsets, the per-axis window tables, window masks and RPB gathers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _box(s0, s1, s2, E0: tl.constexpr, E1: tl.constexpr, E2: tl.constexpr):
    """Group coordinates of the ``E0*E1*E2`` points of a box starting at (s0, s1, s2), row-major."""
    r = tl.arange(0, E0 * E1 * E2)
    return s0 + r // (E1 * E2), s1 + (r // E2) % E1, s2 + r % E2


@triton.jit
def _off(c0, c1, c2, g0, g1, g2, d0, d1, d2, st0, st1, st2):
    """int64 memory offset of the tokens with group coordinates (c0, c1, c2) of group (g0, g1, g2)."""
    return ((c0 * d0 + g0).to(tl.int64) * st0 + (c1 * d1 + g1).to(tl.int64) * st1
            + (c2 * d2 + g2).to(tl.int64) * st2)


@triton.jit
def _kv_box_rel(d0, d1, d2, sk0, sk1, sk2, sv0, sv1, sv2, od, ov, K0: tl.constexpr, K1: tl.constexpr,
                K2: tl.constexpr):
    """In-box coordinates of a ``K0 x K1 x K2`` KV box and its K and V tile offsets relative to the box
    origin: a walk adds only the origin's scalar offset per iteration (``_off`` of the origin)."""
    r0, r1, r2 = _box(0, 0, 0, K0, K1, K2)
    k_rel = _off(r0, r1, r2, 0, 0, 0, d0, d1, d2, sk0, sk1, sk2)[:, None] + od[None, :]
    v_rel = _off(r0, r1, r2, 0, 0, 0, d0, d1, d2, sv0, sv1, sv2)[:, None] + ov[None, :]
    return r0, r1, r2, k_rel, v_rel


@triton.jit
def _kv_box_load(j0, j1, j2, hi0, hi1, hi2, r0, r1, r2, k_box, v_box, k_rel, v_rel, od, ov, D: tl.constexpr,
                 DV: tl.constexpr):
    """Key coordinates, valid columns (inside the union window ``[.., hi]``) and the K and V tiles of the KV
    box at origin ``j`` (``k_box``/``v_box``: its base pointers)."""
    col_ok = (r0 <= hi0 - j0) & (r1 <= hi1 - j1) & (r2 <= hi2 - j2)
    k = tl.load(k_box + k_rel, mask=col_ok[:, None] & (od[None, :] < D), other=0.0)
    v = tl.load(v_box + v_rel, mask=col_ok[:, None] & (ov[None, :] < DV), other=0.0)
    return j0 + r0, j1 + r1, j2 + r2, col_ok, k, v


@triton.jit
def _kv_walk_start(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, s0, s1, s2, K0: tl.constexpr, K1: tl.constexpr,
                   K2: tl.constexpr):
    """Offset of a walk's first KV box (origin ``lo``) and the three offset deltas of ``_kv_walk_next``:
    the next box on axis 2, the first box of the next axis-1 row, the first box of the next axis-0 slab."""
    st2 = (K2 * d2).to(tl.int64) * s2
    st1 = (K1 * d1).to(tl.int64) * s1
    st0 = (K0 * d0).to(tl.int64) * s0
    back2 = (n2 - 1).to(tl.int64) * st2
    back1 = (n1 - 1).to(tl.int64) * st1
    return _off(lo0, lo1, lo2, g0, g1, g2, d0, d1, d2, s0, s1, s2), st0 - back1 - back2, st1 - back2, st2


@triton.jit
def _kv_walks(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, sk0, sk1, sk2, sv0, sv1, sv2, K0: tl.constexpr,
              K1: tl.constexpr, K2: tl.constexpr):
    """``_kv_walk_start`` of the K and of the V tensor: ``(ko, vo, kd0, kd1, kd2, vd0, vd1, vd2)``."""
    ko, kd0, kd1, kd2 = _kv_walk_start(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, sk0, sk1, sk2, K0, K1, K2)
    vo, vd0, vd1, vd2 = _kv_walk_start(lo0, lo1, lo2, n1, n2, g0, g1, g2, d0, d1, d2, sv0, sv1, sv2, K0, K1, K2)
    return ko, vo, kd0, kd1, kd2, vd0, vd1, vd2


@triton.jit
def _kv_walk_next(j0, j1, j2, lo1, lo2, hi1, hi2, ko, vo, kd0, kd1, kd2, vd0, vd1, vd2,
                  K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """One step of a row-major walk over the KV boxes covering ``[lo, hi]``, without divisions: the box
    origins ``j`` and the K/V offsets ``ko``/``vo`` advanced by the walk's deltas (``_kv_walk_start``)."""
    w2 = j2 + K2 > hi2  # the last box of this axis-2 row
    w1 = w2 & (j1 + K1 > hi1)
    j2 = tl.where(w2, lo2, j2 + K2)
    j1 = tl.where(w1, lo1, tl.where(w2, j1 + K1, j1))
    j0 = tl.where(w1, j0 + K0, j0)
    ko += tl.where(w1, kd0, tl.where(w2, kd1, kd2))
    vo += tl.where(w1, vd0, tl.where(w2, vd1, vd2))
    return j0, j1, j2, ko, vo


@triton.jit
def _flat(c0, c1, c2, g0, g1, g2, d0, d1, d2, L1, L2):
    """Row-major flat token index (natural coordinates) for the LSE/delta/scratch tables."""
    return (((c0 * d0 + g0).to(tl.int64) * L1 + (c1 * d1 + g1)) * L2 + (c2 * d2 + g2))


@triton.jit
def _span(ST, EN, first, last, g, d, K: tl.constexpr):
    """Window tables of one axis for a box of queries [first, last]: the union interval (lo, hi), the
    intersection (fs, fe) that full KV boxes lie in, and the number of ``K``-wide KV boxes covering
    the union."""
    lo = tl.load(ST + first * d + g)
    hi = tl.load(EN + last * d + g)
    fs = tl.load(ST + last * d + g)
    fe = tl.load(EN + first * d + g)
    return lo, hi, fs, fe, (hi - lo + K) // K


@triton.jit
def _load_rows(base, row_off, offs, DIM: tl.constexpr, ok):
    """[rows, DIM_PAD] tile at int64 row offsets, masked on valid rows and real head-dim lanes."""
    return tl.load(base + row_off[:, None] + offs[None, :], mask=ok[:, None] & (offs[None, :] < DIM), other=0.0)


@triton.jit
def _row_windows(ST0, EN0, ST1, EN1, ST2, EN2, x0, x1, x2, row_ok):
    """Per-row window [start, end] on each axis; rows past the grid get an empty window."""
    return (tl.load(ST0 + x0, mask=row_ok, other=0), tl.load(EN0 + x0, mask=row_ok, other=-1),
            tl.load(ST1 + x1, mask=row_ok, other=0), tl.load(EN1 + x1, mask=row_ok, other=-1),
            tl.load(ST2 + x2, mask=row_ok, other=0), tl.load(EN2 + x2, mask=row_ok, other=-1))


@triton.jit
def _axis_in(j, c, s, e, K: tl.constexpr):
    """[rows, cols] test that key coordinates ``c`` lie in each row's window ``[s, e]`` on one axis; a KV box
    1 wide on this axis has one key coordinate, its origin ``j`` (scalar): a [rows, 1] test."""
    if K == 1:
        return ((j >= s) & (j <= e))[:, None]
    else:
        return (c[None, :] >= s[:, None]) & (c[None, :] <= e[:, None])


@triton.jit
def _win_mask(j0, j1, j2, k0, k1, k2, s0, e0, s1, e1, s2, e2, K0: tl.constexpr, K1: tl.constexpr,
              K2: tl.constexpr):
    """[rows, cols] mask: the keys (group coordinates ``k``) of the KV box at origin ``j`` inside every row's
    per-axis window."""
    return _axis_in(j0, k0, s0, e0, K0) & _axis_in(j1, k1, s1, e1, K1) & _axis_in(j2, k2, s2, e2, K2)


@triton.jit
def _rpb_lin(a0, a1, a2, sr0, sr1, sr2):
    """Linear RPB-table offset of per-axis relative positions (the in-box row / column parts)."""
    return a0 * sr0 + a1 * sr1 + a2 * sr2


@triton.jit
def _rpb_logits(RPB, h, f0, f1, f2, j0, j1, j2, row_rel, col_rel, ks0, ks1, ks2, sr_h, sr0, sr1, sr2):
    """RPB bias per (row, col) of the Q box at ``f`` and the KV box at ``j`` (group coordinates):
    ``rpb[h, c0 - i0 + ks0 - 1, ...]`` as one linear table index, a scalar of the box origins plus the
    loop-invariant in-box parts ``row_rel``/``col_rel`` (``sum_a r_a * sr_a`` of each row / column).
    Pairs outside a window read a clamped index; the caller masks them."""
    base = (j0 - f0 + ks0 - 1) * sr0 + (j1 - f1 + ks1 - 1) * sr1 + (j2 - f2 + ks2 - 1) * sr2
    top = (2 * ks0 - 2) * sr0 + (2 * ks1 - 2) * sr1 + (2 * ks2 - 2) * sr2
    idx = tl.minimum(tl.maximum(base + col_rel[None, :] - row_rel[:, None], 0), top)
    return tl.load(RPB + h * sr_h + idx).to(tl.float32)


@triton.jit
def _ids(pid_t, pid_bh, gid, nt1, nt2, d1, d2, H):
    t2 = pid_t % nt2
    t1 = (pid_t // nt2) % nt1
    t0 = pid_t // (nt2 * nt1)
    g2 = gid % d2
    g1 = (gid // d2) % d1
    g0 = gid // (d2 * d1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    return t0, t1, t2, g0, g1, g2, b, h
