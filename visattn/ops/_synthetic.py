"""Synthetic structured q/k/v on a video grid (``specs/pyramid.md`` §6), for error-vs-density studies.

On a ``T x H x W`` grid, ``q = a * phi(p) + s * eps`` and ``k = a * phi(p) + s * eps'`` with ``phi`` the
``D`` random Fourier features ``sqrt(2 / D) * cos(w . p + c)``, ``w ~ N(0, diag(l^-2))``, so that
``q . k / sqrt(D) ~ a^2 / sqrt(D) * exp(-|delta / l|^2 / 2) + noise``: attention concentrates on grid
neighbours at length scales ``l``. V is standard normal. Per-head kinds: ``"local"`` (small l_t,
l_y, l_x), ``"temporal"`` (spatial-only: l_t = inf), ``"frame"`` (frame-local: l_y = l_x = inf) and
``"broad"``. Seeded; tokens in Gilbert order (``order="gilbert"``, needs ``visattn.ops._token_order``)
or raster order (``order="raster"``).
"""

from __future__ import annotations

import math

import torch

# length scales (t, y, x) per kind; inf = the axis does not matter
KINDS = {
    "local": (1.0, 1.0, 1.0),
    "temporal": (math.inf, 1.0, 1.0),
    "frame": (1.0, math.inf, math.inf),
    "broad": (4.0, 6.0, 6.0),
}
ALPHA2_OVER_SQRT_D = (
    10.5  # s * a^2: local head puts ~56 % of dense mass in its 3x3x3 neighbourhood at 16x32x32, D=128
)
SIGMA = 0.5


def local_qkv(
    grid: tuple[int, int, int],
    heads: int = 4,
    head_dim: int = 64,
    *,
    batch: int = 1,
    kinds: tuple[str, ...] = ("local", "temporal", "frame", "broad"),
    seed: int = 0,
    order: str = "gilbert",
    dtype: torch.dtype = torch.float32,
    device=None,
    gain: float = ALPHA2_OVER_SQRT_D,
    sigma: float = SIGMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic ``(q, k, v)``, each ``[batch, T*H*W, heads, head_dim]``; head h has kind ``kinds[h % len]``."""
    if order not in ("gilbert", "raster"):
        raise ValueError(f"expected order 'gilbert' or 'raster', got order={order!r}")
    for kd in kinds:
        if kd not in KINDS:
            raise ValueError(f"expected kinds from {sorted(KINDS)}, got kinds={kinds!r}")
    T, H, W = grid
    N, D = T * H * W, head_dim
    g = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([t, y, x], -1).reshape(N, 3).double()
    alpha = math.sqrt(gain * math.sqrt(D))
    perm = None
    if order == "gilbert":
        from ._token_order import gilbert_order  # owned by the token-order module (specs/rectified.md §2.2)

        perm = gilbert_order(tuple(grid), axis_order="largest").perm
    out = [torch.empty(batch, N, heads, D, dtype=dtype, device=device) for _ in range(3)]
    for h in range(heads):  # one head at a time in float64, stored in the target dtype (bounded memory)
        ell = torch.tensor(KINDS[kinds[h % len(kinds)]], dtype=torch.float64)
        w = torch.randn(D, 3, generator=g, dtype=torch.float64) / ell  # inf length scale -> 0 frequency
        c = torch.rand(D, generator=g, dtype=torch.float64) * 2 * math.pi
        phi = math.sqrt(2.0 / D) * torch.cos(pos @ w.T + c)  # [N, D]
        for i in range(2):
            x = alpha * phi + sigma * torch.randn(batch, N, D, generator=g, dtype=torch.float64)
            out[i][:, :, h] = (x if perm is None else x[:, perm]).to(device=device, dtype=dtype)
    for h in range(heads):
        x = torch.randn(batch, N, D, generator=g, dtype=torch.float64)
        out[2][:, :, h] = (x if perm is None else x[:, perm]).to(device=device, dtype=dtype)
    return tuple(out)  # type: ignore[return-value]


def neighbourhood_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int, int],
    head: int = 0,
    rows: int = 256,
    seed: int = 0,
) -> float:
    """Mean dense-attention mass of sampled raster-order query rows in their 3x3x3 neighbourhood."""
    T, H, W = grid
    N, D = q.shape[1], q.shape[-1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (rows,), generator=g)
    s = q[0, idx, head].double() @ k[0, :, head].double().T / math.sqrt(D)
    p = torch.softmax(s, -1)
    t, y, x = idx // (H * W), idx // W % H, idx % W
    kt = torch.arange(N) // (H * W)
    ky, kx = torch.arange(N) // W % H, torch.arange(N) % W
    near = (
        ((kt[None] - t[:, None]).abs() <= 1)
        & ((ky[None] - y[:, None]).abs() <= 1)
        & ((kx[None] - x[:, None]).abs() <= 1)
    )
    return (p * near).sum(-1).mean().item()


__all__ = ["local_qkv", "neighbourhood_mass", "KINDS"]
