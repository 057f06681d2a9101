"""Test helpers for bi-level routing: an independent per-token oracle and tolerance rules.

The oracle shares no code with ``visattn``: it derives the region geometry from specs/routing.md
§2.2/§2.6 with Python integers, ranks regions with Python's ``sorted`` (ties to the lower index), and
computes each query token's softmax over an explicitly listed key set in float64.
"""

from __future__ import annotations

import math

import torch

FLOORS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def geometry(L: int, n: int, padding: str) -> tuple[int, int]:
    """(region size, region count) of one axis."""
    r = L // n if padding == "zeros" else math.ceil(L / n)
    return r, math.ceil(L / r)


def oracle_routing(q, k, n_win, topk, scale, padding):
    """Python-level routing of float64 ``[B, H, W, heads, d]`` maps: list [B][P] of sorted index lists."""
    B, H, W = q.shape[:3]
    rH, RH = geometry(H, n_win[0], padding)
    rW, RW = geometry(W, n_win[1], padding)
    out = []
    for b in range(B):
        qd, kd = [], []
        for u in range(RH):
            for w in range(RW):
                ys = range(u * rH, min((u + 1) * rH, H))
                xs = range(w * rW, min((w + 1) * rW, W))
                toks = [(y, x) for y in ys for x in xs]
                qd.append(sum(q[b, y, x].reshape(-1) for y, x in toks) / len(toks))
                kd.append(sum(k[b, y, x].reshape(-1) for y, x in toks) / len(toks))
        rows = []
        for i in range(RH * RW):
            aff = [float((qd[i] * scale) @ kd[j]) for j in range(RH * RW)]
            best = sorted(range(RH * RW), key=lambda j: (-aff[j], j))[:topk]
            rows.append(sorted(best))
        out.append(rows)
    return out, (rH, rW), (RH, RW)


def oracle_attention(q, k, v, index, region, grid, scale, padding):
    """Per-token float64 attention over the routed regions; ``index`` is a nested list [B][P] (shared
    heads) or [B][heads][P]. Returns (out [B, H, W, heads, dv], lse [B, H, W, heads])."""
    B, H, W, nh, _ = q.shape
    rH, rW = region
    RH, RW = grid
    out = torch.zeros(B, H, W, nh, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(B, H, W, nh, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            rows = index[b][h] if isinstance(index[b][0][0], list) else index[b]
            for y in range(H):
                for x in range(W):
                    rho = (y // rH) * RW + x // rW
                    keys, n_pad = [], 0
                    for j in rows[rho]:
                        u, w = divmod(j, RW)
                        for yy in range(u * rH, (u + 1) * rH):
                            for xx in range(w * rW, (w + 1) * rW):
                                if yy < H and xx < W:
                                    keys.append((yy, xx))
                                elif padding == "zeros":
                                    n_pad += 1  # a zero key: logit 0, value 0
                    kk = torch.stack([k[b, yy, xx, h] for yy, xx in keys]).double()
                    vv = torch.stack([v[b, yy, xx, h] for yy, xx in keys]).double()
                    s = kk @ q[b, y, x, h].double() * scale
                    if n_pad:
                        s = torch.cat([s, torch.zeros(n_pad, dtype=torch.float64)])
                        vv = torch.cat([vv, torch.zeros(n_pad, vv.shape[1], dtype=torch.float64)])
                    p = torch.softmax(s, 0)
                    out[b, y, x, h] = p @ vv
                    lse[b, y, x, h] = torch.logsumexp(s, 0)
    return out, lse


def assert_close(actual, expected, dtype, ref_lowp=None, what="", factor=1.0):
    """Error at most 2x the low-precision reference's (when given), floored per dtype."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values")
    tol = FLOORS[dtype] * factor
    if ref_lowp is not None:
        tol = max(tol, 2 * (ref_lowp.double() - expected).abs().max().item())
    err = (actual - expected).abs()
    if err.max().item() > tol:
        i = tuple(int(j) for j in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{what}: max error {err.max().item():.3e} > tol {tol:.3e} at {i}")
