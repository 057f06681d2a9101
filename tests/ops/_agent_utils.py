"""Independent float64 references for agent-attention tests (spec agent.md §2), written from the spec.

Nothing here calls visattn: pooling uses the bin formula of §2.2 with explicit loops, the biases use
upstream's formula (interpolate the block map to the grid, add broadcast row and column terms), the
attention is two explicit softmaxes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bins(L: int, o: int) -> list[tuple[int, int]]:
    """Bin i covers [floor(i L / o), ceil((i + 1) L / o))."""
    return [(i * L // o, -(-(i + 1) * L // o)) for i in range(o)]


def pool_naive(x: torch.Tensor, grid, agent_shape) -> torch.Tensor:
    """x: [B, H, prod(grid), D] grid tokens -> agents [B, H, prod(agent_shape), D] (loops over bins)."""
    B, H, _, D = x.shape
    xg = x.reshape(B, H, *grid, D)
    out = []
    for idx in torch.cartesian_prod(*[torch.arange(a) for a in agent_shape]).reshape(-1, len(agent_shape)).tolist():
        sl = [slice(None), slice(None)]
        for ax, i in enumerate(idx):
            s, e = bins(grid[ax], agent_shape[ax])[i]
            sl.append(slice(s, e))
        region = xg[tuple(sl)]
        out.append(region.reshape(B, H, -1, D).mean(2))
    return torch.stack(out, dim=2)


def random_bias_params(heads, n0, grid, key_grid=None, prefix=0, dtype=torch.float64, std=0.5):
    """Upstream-layout bias parameters (larger std than upstream's 0.02 so the bias matters)."""
    key_grid = key_grid or grid
    r = lambda *s: torch.randn(*s, dtype=dtype) * std  # noqa: E731
    d = dict(an=r(heads, n0, 7, 7), na=r(heads, n0, 7, 7),
             ah=r(1, heads, n0, key_grid[0], 1), aw=r(1, heads, n0, 1, key_grid[1]),
             ha=r(1, heads, grid[0], 1, n0), wa=r(1, heads, 1, grid[1], n0))
    if prefix:
        d.update(ac=r(1, heads, n0, prefix), ca=r(1, heads, prefix, n0))
    return d


def upstream_biases(d, grid, key_grid):
    """B1 [h, n, P+Nk], B2 [h, P+N, n] at the trained grids, by upstream's formula."""
    h, n = d["an"].shape[:2]
    b1 = F.interpolate(d["an"], size=tuple(key_grid), mode="bilinear") + (d["ah"] + d["aw"]).reshape(h, n, *key_grid)
    b1 = b1.reshape(h, n, -1)
    b2 = F.interpolate(d["na"], size=tuple(grid), mode="bilinear").reshape(h, n, -1).transpose(1, 2)
    b2 = b2 + (d["ha"] + d["wa"]).reshape(h, -1, n)
    if "ac" in d:
        b1 = torch.cat([d["ac"][0], b1], dim=-1)
        b2 = torch.cat([d["ca"][0], b2], dim=-2)
    return b1, b2


def naive_agent_attention(q, k, v, *, grid=None, agent_shape=None, agents=None, b1=None, b2=None, mask=None,
                          s1=None, s2=None):
    """q [B, H, N, D] etc. (BHND), float64; explicit formula of §2.3."""
    q, k, v = q.double(), k.double(), v.double()
    D = q.shape[-1]
    s1 = D**-0.5 if s1 is None else s1
    s2 = D**-0.5 if s2 is None else s2
    if agents is None:
        P = q.shape[2] - math.prod(grid)
        agents = pool_naive(q[:, :, P:], grid, agent_shape)
    a = agents.double().expand(q.shape[0], -1, -1, -1)
    z1 = a @ k.transpose(-1, -2) * s1
    if b1 is not None:
        z1 = z1 + b1.double()
    if mask is not None:
        z1 = z1.masked_fill(~mask[:, None, None, :], float("-inf"))
    p1 = torch.softmax(z1, -1)
    if mask is not None:
        p1 = torch.nan_to_num(p1, nan=0.0)  # rows with every key masked: zero agent features
    va = p1 @ v
    z2 = q @ a.transpose(-1, -2) * s2
    if b2 is not None:
        z2 = z2 + b2.double()
    return torch.softmax(z2, -1) @ va
