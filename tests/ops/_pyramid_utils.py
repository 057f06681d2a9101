"""Test helpers for PSA: host-built geometry, random level maps and the expanded-key oracle.

Nothing here imports visattn's PSA code: the oracle replaces every token of a kept block by its
group mean (over the group's real tokens), drops skipped blocks and runs a plain float64 softmax
(no bias; the multiplicity plays the role of ln c), exactly the identity of spec §2.3.
"""

from __future__ import annotations

import math

import torch


def cdiv(a, b):
    return (a + b - 1) // b


def geometry(N, bq, bk, seg=None, b=0):
    """(query tile row ranges, kv block token ranges) of sample ``b``; ``seg`` = (vs, nv, ts, tlen, valid list|None)."""
    if seg is None:
        return (
            [range(i * bq, min((i + 1) * bq, N)) for i in range(cdiv(N, bq))],
            [range(j * bk, min((j + 1) * bk, N)) for j in range(cdiv(N, bk))],
        )
    vs, nv, ts, tlen, valid = seg
    tv = tlen if valid is None else valid[b]
    qt = [range(vs + i * bq, min(vs + (i + 1) * bq, vs + nv)) for i in range(cdiv(nv, bq))]
    qt += [range(ts + i * bq, min(ts + (i + 1) * bq, ts + tlen)) for i in range(cdiv(tlen, bq))]
    kb = [range(vs + j * bk, min(vs + (j + 1) * bk, vs + nv)) for j in range(cdiv(nv, bk))]
    kb += [range(ts + j * bk, min(ts + (j + 1) * bk, ts + tv)) for j in range(cdiv(tlen, bk))]
    return qt, kb


def random_level_map(B, H, nq, nk, factors=(1, 2, 4, 8), p_skip=0.4, gen=None):
    choices = torch.tensor([0] + list(factors), dtype=torch.int8)
    probs = torch.tensor([p_skip] + [(1 - p_skip) / len(factors)] * len(factors))
    idx = torch.multinomial(probs, B * H * nq * nk, replacement=True, generator=gen)
    return choices[idx].view(B, H, nq, nk)


def lists_from_map(lmap, gen=None, pad=0):
    """(kv_index, level_ptr) grouping entries by factor 1, 2, 4, 8 in a random order within a level."""
    B, H, nq, nk = lmap.shape
    idx = torch.full((B, H, nq, nk + pad), -7, dtype=torch.int32)
    lp = torch.zeros(B, H, nq, 5, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                e = 0
                for li, m in enumerate((1, 2, 4, 8)):
                    lp[b, h, i, li] = e
                    js = [j for j in range(nk) if int(lmap[b, h, i, j]) == m]
                    perm = torch.randperm(len(js), generator=gen).tolist()
                    for p in perm:
                        idx[b, h, i, e] = js[p]
                        e += 1
                lp[b, h, i, 4] = e
    return idx, lp


def expanded_oracle(q, k, v, lmap, bq, bk, seg=None, scale=None, causal=False):
    """float64 ``(out [B, N, H, D], lse [B, H, N])`` from a pool-factor map over (query tile, kv block)."""
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    qd, kd, vd = (t.detach().double().cpu() for t in (q, k, v))
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    lse = torch.full((B, H, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        qt, kb = geometry(N, bq, bk, seg, b)
        for h in range(H):
            for i, rows in enumerate(qt):
                keys, vals, last = [], [], []
                for j, toks in enumerate(kb):
                    m = int(lmap[min(b, lmap.shape[0] - 1), min(h, lmap.shape[1] - 1), i, j])
                    toks = list(toks)
                    if m == 0 or not toks:
                        continue
                    for g0 in range(0, len(toks), m):
                        grp = toks[g0 : g0 + m]
                        km, vm = kd[b, grp, h].mean(0), vd[b, grp, h].mean(0)
                        for _ in grp:  # every token replaced by its group mean
                            keys.append(km)
                            vals.append(vm)
                            last.append(grp[-1])
                if not keys or not rows:
                    continue
                K, V = torch.stack(keys), torch.stack(vals)
                r = torch.tensor(list(rows))
                s = qd[b, r, h] @ K.T * scale
                if causal:
                    s = s.masked_fill(torch.tensor(last)[None, :] > r[:, None], float("-inf"))
                l_ = torch.logsumexp(s, -1)
                ok = torch.isfinite(l_)
                p = torch.where(ok[:, None], torch.exp(s - torch.where(ok, l_, 0)[:, None]), 0.0)
                out[b, r, h] = p @ V
                lse[b, h, r] = l_
    return out, lse


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_abs(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


__all__ = [
    "cdiv",
    "geometry",
    "random_level_map",
    "lists_from_map",
    "expanded_oracle",
    "rel_l2",
    "max_abs",
    "math",
]
