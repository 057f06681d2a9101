"""The two pure-PyTorch formulations behind ``routed_attention_ref`` and the ``"torch"`` backend.

``_ref_mask``: a dense ``[N, N]`` boolean mask per (batch, head), chunked over query rows.
``_ref_gather``: BiFormer's own formulation, the K/V of the routed regions copied ``topk``-fold per query
region. Both take 2-D maps ``[B, H, W, heads, d]``, ``idx`` ``[B, Hh, P, topk]`` and compute in ``dtype``
(softmax statistics in fp32 for fp16/bf16, as BiFormer under autocast).
"""

from __future__ import annotations

import torch


def _boxed(x: torch.Tensor, region, grid) -> torch.Tensor:
    """Zero-pad a ``[B, H, W, h, d]`` map to whole region boxes."""
    H, W = x.shape[1:3]
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, grid[1] * region[1] - W, 0, grid[0] * region[0] - H))


def _softmax_dtype(s: torch.Tensor) -> torch.Tensor:
    # half-precision logits get fp32 softmax statistics (as under autocast); fp32/fp64 stay
    return s.float() if s.dtype in (torch.float16, torch.bfloat16) else s


def _ref_mask(q, k, v, idx, weight, region, grid, scale, zeros, dtype, chunk=1024):
    B, H, W, nh, _ = q.shape
    Hp, Wp = grid[0] * region[0], grid[1] * region[1]
    P = grid[0] * grid[1]
    yy = torch.arange(Hp, device=q.device)[:, None]
    xx = torch.arange(Wp, device=q.device)[None, :]
    rid = ((yy // region[0]) * grid[1] + xx // region[1]).reshape(-1)
    inside = ((yy < H) & (xx < W)).reshape(-1)
    key_ok = torch.ones_like(inside) if zeros else inside
    qb, kb, vb = (
        _boxed(t.to(dtype), region, grid).flatten(1, 2).transpose(1, 2) for t in (q, k, v)
    )  # [B,h,N,d]
    Hi = idx.shape[1]
    routed = torch.zeros((B, Hi, P, P), dtype=torch.bool, device=q.device).scatter_(-1, idx.long(), True)
    wmat = None
    if weight is not None:
        w = weight if weight.dim() == 4 else weight.unsqueeze(1)
        wmat = torch.zeros((B, Hi, P, P), dtype=dtype, device=q.device).scatter(-1, idx.long(), w.to(dtype))
    outs, lses = [], []
    N = Hp * Wp
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        m = routed[:, :, rid[r0:r1]][..., rid] & key_ok  # [B, Hi, rows, N]
        s = qb[:, :, r0:r1] @ kb.transpose(-1, -2) * scale
        if wmat is not None:
            wt = wmat[:, :, rid[r0:r1]][..., rid]
            s = s * wt
        s = _softmax_dtype(s.masked_fill(~m, float("-inf")))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])
        if wmat is not None:
            p = p * wt
        outs.append(p.to(dtype) @ vb)
        lses.append(lse)
    out = torch.cat(outs, 2).transpose(1, 2).reshape(B, Hp, Wp, nh, -1)[:, :H, :W]
    lse = torch.cat(lses, 2).transpose(1, 2).reshape(B, Hp, Wp, nh)[:, :H, :W]
    return out, lse


def _ref_gather(q, k, v, idx, weight, region, grid, scale, zeros, dtype):
    """BiFormer's formulation: copy the K/V of the routed regions for every query region."""
    B, H, W, nh, _ = q.shape
    P, T = grid[0] * grid[1], region[0] * region[1]

    def regions(x):  # [B, H, W, h, d] -> [B, h, P, T, d]
        x = _boxed(x.to(dtype), region, grid)
        x = x.view(B, grid[0], region[0], grid[1], region[1], nh, -1)
        return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(B, nh, P, T, -1)

    qr, kr, vr = regions(q), regions(k), regions(v)
    yy = torch.arange(grid[0] * region[0], device=q.device)[:, None]
    xx = torch.arange(grid[1] * region[1], device=q.device)[None, :]
    inside = (
        ((yy < H) & (xx < W)).view(grid[0], region[0], grid[1], region[1]).permute(0, 2, 1, 3).reshape(P, T)
    )
    ix = idx.long().expand(B, nh, P, idx.shape[-1])
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(nh, device=q.device)[None, :, None, None]
    kg, vg = kr[bi, hi, ix], vr[bi, hi, ix]  # [B, h, P, topk, T, d]: the topk-fold copy
    if weight is not None:
        w = (weight if weight.dim() == 4 else weight.unsqueeze(1)).to(dtype).expand(B, nh, P, -1)
        kg, vg = kg * w[..., None, None], vg * w[..., None, None]
    s = torch.einsum("bhptd,bhpkld->bhptkl", qr, kg).flatten(-2) * scale  # [B, h, P, T, topk*T]
    if not zeros:
        s = s.masked_fill(~inside[ix].flatten(-2)[:, :, :, None, :], float("-inf"))
    s = _softmax_dtype(s)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]).to(dtype) @ vg.flatten(3, 4)  # [B, h, P, T, d_v]

    def unregion(x):  # [B, h, P, T, c] -> [B, H, W, h, c]
        x = x.view(B, nh, grid[0], grid[1], region[0], region[1], -1).permute(0, 2, 4, 3, 5, 1, 6)
        return x.reshape(B, grid[0] * region[0], grid[1] * region[1], nh, -1)[:, :H, :W]

    return unregion(out), unregion(lse[..., None])[..., 0]
