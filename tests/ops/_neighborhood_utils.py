"""Test helpers for neighborhood attention: an independent window rule, a dense oracle, input builders.

Nothing here imports ``visattn``: the per-axis rule is restated in plain Python from
``specs/neighborhood.md`` §2.2 (loops over integers, no tensor ops), and the oracle is a dense masked
softmax in float64, so a bug in ``neighborhood_ref`` cannot hide itself behind a shared helper.
"""

from __future__ import annotations

import itertools
import math

import torch


def spec_window(L: int, k: int, s: int, d: int, causal: bool, x: int) -> list[int]:
    """Keys (natural coordinates) of query ``x`` on one axis, restated from spec §2.2."""
    g, i = x % d, x // d
    lg = L // d + (1 if g < L % d else 0)
    if causal:
        lead = min((i // s) * s + s - 1, lg - 1)
        js = range(max(lead - k + 1, 0), i + 1)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        lead = min((i // s) * s + s // 2, lg - 1)
        c = min(max(lead, left), lg - 1 - right)
        js = range(c - left, c + right + 1)
    return [j * d + g for j in js]


def spec_axis_mask(L, k, s, d, causal) -> torch.Tensor:
    m = torch.zeros(L, L, dtype=torch.bool)
    for x in range(L):
        m[x, spec_window(L, k, s, d, causal, x)] = True
    return m


def spec_mask(size, ks, st, dl, cs) -> torch.Tensor:
    """Dense ``[N, N]`` neighborhood mask: Cartesian product of the per-axis rule, row-major tokens."""
    out = None
    for a in range(len(size)):
        m = spec_axis_mask(size[a], ks[a], st[a], dl[a], cs[a])
        out = m if out is None else torch.kron(out.int(), m.int()).bool()
    return out


def spec_rpb_bias(rpb: torch.Tensor, size, ks, dl) -> torch.Tensor:
    """``[H, N, N]`` bias ``rpb[h, (j_1 - i_1) + k_1 - 1, ...]`` (group coordinates, spec §2.4), with
    out-of-table pairs set to 0 (they are never neighbors)."""
    coords = list(itertools.product(*[range(x) for x in size]))
    H = rpb.shape[0]
    N = len(coords)
    bias = torch.zeros(H, N, N, dtype=torch.float64)
    for qi, xq in enumerate(coords):
        for ki, yk in enumerate(coords):
            idx = tuple(yk[a] // dl[a] - xq[a] // dl[a] + ks[a] - 1 for a in range(len(size)))
            if all(0 <= idx[a] <= 2 * ks[a] - 2 for a in range(len(size))):
                bias[:, qi, ki] = rpb[(slice(None), *idx)].double()
    return bias


def dense_oracle(q, k, v, mask, *, scale=None, extra_kv=None, bias=None, key_padding_mask=None):
    """Dense float64 attention of heads-last ``q [B, *sp, H, D]`` under a ``[N, N]`` bool mask.

    Extras are always attended and unbiased; GQA reads key head ``h // (H // H_kv)``. Returns
    ``(out [B, *sp, H, D_v], lse [B, *sp, H])``; rows without keys give 0 and ``-inf``.
    """
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    sp = q.shape[1:-2]
    N = math.prod(sp)
    Hk = k.shape[-2]
    qf = q.reshape(B, N, H, D).double()
    kf = k.reshape(B, N, Hk, D).double()
    vf = v.reshape(B, N, Hk, v.shape[-1]).double()
    tok = mask[None, None].expand(B, H, N, N)
    if key_padding_mask is not None:
        tok = tok & key_padding_mask.reshape(B, 1, 1, N)
    if extra_kv is not None:
        kf = torch.cat([kf, extra_kv[0].double()], 1)
        vf = torch.cat([vf, extra_kv[1].double()], 1)
        ne = extra_kv[0].shape[1]
        tok = torch.cat([tok, torch.ones(B, H, N, ne, dtype=torch.bool)], -1)
    heads = torch.arange(H) // (H // Hk)
    kf, vf = kf[:, :, heads], vf[:, :, heads]
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
    if bias is not None:
        s[..., :N] += bias.double()[None]
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(tok, torch.exp(s - shift[..., None]), torch.zeros_like(s))
    out = torch.einsum("bhnm,bmhd->bnhd", p, vf)
    return out.reshape(B, *sp, H, -1), lse.transpose(1, 2).reshape(B, *sp, H)


def make_qkv(B, size, H, Hk, D, Dv=None, *, dtype=torch.float32, device="cpu", requires_grad=False):
    """Random heads-last q, k, v (``~N(0, 1)`` rounded to ``dtype``)."""
    Dv = D if Dv is None else Dv

    def one(h, dd):
        return torch.randn(B, *size, h, dd, device=device).to(dtype).requires_grad_(requires_grad)

    return one(H, D), one(Hk, D), one(Hk, Dv)
