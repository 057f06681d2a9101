"""Token orders for video tokens: the 3-D generalised Hilbert ("Gilbert") curve and block neighbours.

Shared by the sparse video methods (``rectified``, ``pyramid``) and the diffusers token-order adapters
(``specs/rectified.md`` §2.2). No diffusers import: ops use it.

The curve is the one of Jakub Červený's public gilbert3d algorithm (BSD-2-Clause) on the W×H×T
cuboid, starting at the origin, with a chosen major / middle / minor axis. Upstream (Jenga,
Rectified SpaAttn) evaluates the point-to-index function from the root for every point in Python;
here one recursive traversal emits the curve as straight runs, which numpy expands, so a grid of N
points costs O(N) work (about 0.1 s for 118 800 points) and is cached per (grid, axis order).

``perm[i]`` is the raster index (``t*H*W + h*W + w``, ``w`` fastest) of the i-th curve point, so
``x_curve = x_raster[:, perm]`` reorders tokens onto the curve and ``x_raster = x_curve[:, inverse]``
undoes it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

AXES = ("w", "h", "t")


class TokenOrder(NamedTuple):
    """A permutation of the raster video tokens; ``perm[i]`` = raster index of the i-th token."""

    perm: torch.Tensor     # int64 [N_v], CPU
    inverse: torch.Tensor  # int64 [N_v], CPU: inverse[perm[i]] = i
    name: str


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


def _add(*vs: tuple[int, int, int]) -> tuple[int, int, int]:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _sub(u: tuple[int, int, int], v: tuple[int, int, int]) -> tuple[int, int, int]:
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2])


def _neg(u: tuple[int, int, int]) -> tuple[int, int, int]:
    return (-u[0], -u[1], -u[2])


def _half(u: tuple[int, int, int], unit: tuple[int, int, int], extent: int) -> tuple[int, int, int]:
    # floor half of an axis vector; an odd half grows by one step when the extent is > 2, so that
    # sub-cuboids keep even extents where possible ("prefer even steps")
    h = (u[0] // 2, u[1] // 2, u[2] // 2)
    if abs(sum(h)) % 2 and extent > 2:
        h = _add(h, unit)
    return h


def _curve_runs(o, a, b, c, out: list) -> None:
    """Append the straight runs ``(x, y, z, dx, dy, dz, n)`` of the curve of the cuboid at ``o``.

    ``a`` is the major axis vector (its length is the extent along it), ``b`` and ``c`` the middle
    and minor ones. The split rules are gilbert3d's; the three leaf cases are runs along one axis.
    An explicit stack replaces recursion; children are pushed in reverse so they pop in curve order.
    """
    stack = [(o, a, b, c)]
    while stack:
        o, a, b, c = stack.pop()
        w, h, d = abs(sum(a)), abs(sum(b)), abs(sum(c))
        if w * h * d == 0:
            # an empty sub-cuboid (a unit axis halved to 0) holds no points; upstream's point-index
            # function skips it the same way (its bounds test never matches)
            continue
        ua = (_sgn(a[0]), _sgn(a[1]), _sgn(a[2]))
        ub = (_sgn(b[0]), _sgn(b[1]), _sgn(b[2]))
        uc = (_sgn(c[0]), _sgn(c[1]), _sgn(c[2]))
        if h == 1 and d == 1:
            out.append((*o, *ua, w))
            continue
        if w == 1 and d == 1:
            out.append((*o, *ub, h))
            continue
        if w == 1 and h == 1:
            out.append((*o, *uc, d))
            continue
        a2, b2, c2 = _half(a, ua, w), _half(b, ub, h), _half(c, uc, d)
        if 2 * w > 3 * h and 2 * w > 3 * d:  # wide: split the major axis only
            kids = [(o, a2, b, c), (_add(o, a2), _sub(a, a2), b, c)]
        elif 3 * h > 4 * d:  # flat in the minor axis: do not split it
            kids = [
                (o, b2, c, a2),
                (_add(o, b2), a, _sub(b, b2), c),
                (_add(o, _sub(a, ua), _sub(b2, ub)), _neg(b2), c, _neg(_sub(a, a2))),
            ]
        elif 3 * d > 4 * h:  # flat in the middle axis: do not split it
            kids = [
                (o, c2, a2, b),
                (_add(o, c2), a, b, _sub(c, c2)),
                (_add(o, _sub(a, ua), _sub(c2, uc)), _neg(c2), _neg(_sub(a, a2)), b),
            ]
        else:  # regular: split all three axes into five parts
            kids = [
                (o, b2, c2, a2),
                (_add(o, b2), c, a2, _sub(b, b2)),
                (_add(o, _sub(b2, ub), _sub(c, uc)), a, _neg(b2), _neg(_sub(c, c2))),
                (_add(o, _sub(a, ua), b2, _sub(c, uc)), _neg(c), _neg(_sub(a, a2)), _sub(b, b2)),
                (_add(o, _sub(a, ua), _sub(b2, ub)), _neg(b2), c2, _neg(_sub(a, a2))),
            ]
        stack.extend(reversed(kids))


def _axis_vectors(grid: tuple[int, int, int], axis_order) -> tuple[tuple[int, ...], ...]:
    t, h, w = grid
    vec = {"w": (w, 0, 0), "h": (0, h, 0), "t": (0, 0, t)}
    if axis_order == "largest":
        # gilbert3d's own choice: the largest extent is major; ties prefer w, then h.
        if w >= h and w >= t:
            names = ("w", "h", "t")
        elif h >= w and h >= t:
            names = ("h", "w", "t")
        else:
            names = ("t", "w", "h")
    else:
        names = tuple(axis_order)
    return tuple(vec[n] for n in names)


def _normalise(video_grid, axis_order) -> tuple[tuple[int, int, int], str | tuple[str, str, str]]:
    grid = tuple(video_grid) if isinstance(video_grid, (tuple, list)) else video_grid
    if (not isinstance(grid, tuple) or not 1 <= len(grid) <= 3
            or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in grid)):
        raise ValueError(f"expected video_grid as (T, H, W) of positive ints, got video_grid={video_grid!r}")
    grid = (1,) * (3 - len(grid)) + grid
    if axis_order != "largest":
        order = tuple(axis_order) if isinstance(axis_order, (tuple, list)) else None
        if order is None or sorted(order) != sorted(AXES):
            raise ValueError(
                "expected axis_order as 'largest' or a permutation of ('w', 'h', 't'), "
                f"got axis_order={axis_order!r}"
            )
        axis_order = order
    return grid, axis_order


def _order_name(axis_order) -> str:
    return "gilbert_largest" if axis_order == "largest" else "gilbert_" + "".join(axis_order)


def gilbert_perm_numpy(video_grid, axis_order=AXES) -> np.ndarray:
    """Raster indices of the curve points in curve order (int64 numpy array of ``T*H*W``)."""
    grid, axis_order = _normalise(video_grid, axis_order)
    t, h, w = grid
    runs: list[tuple[int, ...]] = []
    _curve_runs((0, 0, 0), *_axis_vectors(grid, axis_order), runs)
    r = np.asarray(runs, dtype=np.int64)  # [R, 7]: x, y, z, dx, dy, dz, n
    n = r[:, 6]
    start = np.repeat(np.cumsum(n) - n, n)
    step = np.arange(int(n.sum()), dtype=np.int64) - start  # position inside the run
    rep = np.repeat(np.arange(len(r)), n)
    xs = r[rep, 0] + r[rep, 3] * step
    ys = r[rep, 1] + r[rep, 4] * step
    zs = r[rep, 2] + r[rep, 5] * step
    return (zs * h + ys) * w + xs


_LOCK = threading.Lock()
_ORDERS: dict[tuple, TokenOrder] = {}
_NEIGHBOURS: dict[tuple, torch.Tensor] = {}


def gilbert_order(video_grid: Sequence[int], axis_order: Sequence[str] | str = AXES) -> TokenOrder:
    """The 3-D Gilbert curve order of a ``(T, H, W)`` video grid, cached per (grid, axis order).

    Args:
        video_grid: ``(T, H, W)`` (``(H, W)`` is read as ``T = 1``).
        axis_order: ``(major, middle, minor)`` axis names from ``"w", "h", "t"`` (default
            ``("w", "h", "t")``, Jenga and Rectified SpaAttn), or ``"largest"`` (gilbert3d's own choice:
            the largest extent is major, as PSA uses).

    Returns:
        ``TokenOrder(perm, inverse, name)`` with CPU int64 tensors of ``T*H*W`` entries; the caller moves
        them to its device. Equal, point for point, to upstream's ``gilbert3d`` / ``gilbert_xyz2d``.

    Raises:
        ValueError: a malformed ``video_grid`` or ``axis_order``.
    """
    grid, axis_order = _normalise(video_grid, axis_order)
    key = (grid, axis_order)
    with _LOCK:
        hit = _ORDERS.get(key)
    if hit is not None:
        return hit
    perm = torch.from_numpy(gilbert_perm_numpy(grid, axis_order))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    order = TokenOrder(perm, inverse, _order_name(axis_order))
    with _LOCK:
        return _ORDERS.setdefault(key, order)


def order_from_name(name: str | None, video_grid: Sequence[int]) -> TokenOrder | None:
    """Resolve ``SequenceLayout.token_order``: ``None``/``"raster"``, ``"gilbert"`` (= ``"gilbert_wht"``),
    ``"gilbert_<major><middle><minor>"`` or ``"gilbert_largest"``."""
    if name is None or name == "raster":
        return None
    if name == "gilbert":
        return gilbert_order(video_grid)
    if name == "gilbert_largest":
        return gilbert_order(video_grid, "largest")
    if name.startswith("gilbert_") and sorted(name[8:]) == sorted("wht"):
        return gilbert_order(video_grid, tuple(name[8:]))
    raise ValueError(
        "expected token_order None, 'raster', 'gilbert', 'gilbert_largest' or 'gilbert_<axes>' "
        f"(e.g. 'gilbert_wht'), got token_order={name!r}"
    )


def block_neighbours(video_grid: Sequence[int], block: int, order: TokenOrder | None = None) -> torch.Tensor:
    """Which blocks of ``block`` consecutive tokens touch each other on the video grid.

    Block ``I`` holds the tokens at positions ``[I*block, (I+1)*block)`` of the token order (raster
    when ``order`` is None). ``nbr[I, J]`` is True iff some token of ``I`` and some token of ``J``
    are within Chebyshev distance 1 on the ``(T, H, W)`` grid (26-neighbourhood, diagonal set).
    Built from 27 shifted copies of the block-id grid; cached for raster and Gilbert orders.

    Returns:
        BoolTensor ``[n_v, n_v]`` on the CPU, ``n_v = ceil(T*H*W / block)``; symmetric.
    """
    grid, _ = _normalise(video_grid, AXES)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"expected a positive int block, got block={block!r}")
    n = math.prod(grid)
    if order is not None and order.perm.numel() != n:
        raise ValueError(
            f"expected order over {n} tokens of video_grid={grid}, got order with {order.perm.numel()} tokens"
        )
    cacheable = order is None or any(o.perm is order.perm for o in list(_ORDERS.values()))
    key = (grid, block, None if order is None else order.name)
    if cacheable:
        with _LOCK:
            hit = _NEIGHBOURS.get(key)
        if hit is not None:
            return hit
    pos = torch.arange(n) if order is None else order.inverse  # curve position of each raster token
    bid = (pos // block).reshape(grid)
    nb = -(-n // block)
    table = torch.zeros(nb * nb, dtype=torch.bool)
    t, h, w = grid
    for dt in (-1, 0, 1):
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                # Pairs (token, token shifted by (dt, dh, dw)) that stay inside the grid.
                src = bid[max(0, -dt):t - max(0, dt), max(0, -dh):h - max(0, dh), max(0, -dw):w - max(0, dw)]
                dst = bid[max(0, dt):t + min(0, dt), max(0, dh):h + min(0, dh), max(0, dw):w + min(0, dw)]
                if src.numel():
                    table[(src.reshape(-1) * nb + dst.reshape(-1)).unique()] = True
    table = table.view(nb, nb)
    if cacheable:
        with _LOCK:
            table = _NEIGHBOURS.setdefault(key, table)
    return table


__all__ = ["AXES", "TokenOrder", "block_neighbours", "gilbert_order", "gilbert_perm_numpy", "order_from_name"]
