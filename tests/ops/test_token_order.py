"""Token order: the 3-D Gilbert curve and the block-neighbour table (visattn/ops/_token_order.py).

The oracle below is a slow point-by-point generator written from the published description of
Červený's generalised Hilbert curve (recursive halving of the major axis with the "prefer even
halves" rule and the five-part / three-part / two-part split cases); it shares no code with the
run-based traversal under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from visattn.ops._token_order import block_neighbours, gilbert_order, order_from_name


def _slow_curve(a, b, c):
    """Points (x, y, z) of the generalised Hilbert curve of the cuboid spanned by a (major), b, c."""
    a, b, c = (np.array(v, dtype=np.int64) for v in (a, b, c))

    def unit(v):
        return np.sign(v)

    def size(v):
        return int(abs(v.sum()))

    def rec(p, a, b, c):
        w, h, d = size(a), size(b), size(c)
        if w * h * d == 0:  # an empty box (a unit axis halved to 0) has no points
            return
        if h == 1 and d == 1:
            for i in range(w):
                yield tuple(p + i * unit(a))
            return
        if w == 1 and d == 1:
            for i in range(h):
                yield tuple(p + i * unit(b))
            return
        if w == 1 and h == 1:
            for i in range(d):
                yield tuple(p + i * unit(c))
            return
        a2, b2, c2 = a // 2, b // 2, c // 2
        if size(a2) % 2 == 1 and w > 2:
            a2 = a2 + unit(a)
        if size(b2) % 2 == 1 and h > 2:
            b2 = b2 + unit(b)
        if size(c2) % 2 == 1 and d > 2:
            c2 = c2 + unit(c)
        ua, ub, uc = unit(a), unit(b), unit(c)
        if 2 * w > 3 * h and 2 * w > 3 * d:
            yield from rec(p, a2, b, c)
            yield from rec(p + a2, a - a2, b, c)
        elif 3 * h > 4 * d:
            yield from rec(p, b2, c, a2)
            yield from rec(p + b2, a, b - b2, c)
            yield from rec(p + (a - ua) + (b2 - ub), -b2, c, -(a - a2))
        elif 3 * d > 4 * h:
            yield from rec(p, c2, a2, b)
            yield from rec(p + c2, a, b, c - c2)
            yield from rec(p + (a - ua) + (c2 - uc), -c2, -(a - a2), b)
        else:
            yield from rec(p, b2, c2, a2)
            yield from rec(p + b2, c, a2, b - b2)
            yield from rec(p + (b2 - ub) + (c - uc), a, -b2, -(c - c2))
            yield from rec(p + (a - ua) + b2 + (c - uc), -c, -(a - a2), b - b2)
            yield from rec(p + (a - ua) + (b2 - ub), -b2, c2, -(a - a2))

    yield from rec(np.zeros(3, dtype=np.int64), a, b, c)


def _slow_perm(grid, axis_order):
    t, h, w = grid
    vec = {"w": (w, 0, 0), "h": (0, h, 0), "t": (0, 0, t)}
    if axis_order == "largest":
        if w >= h and w >= t:
            axis_order = ("w", "h", "t")
        elif h >= w and h >= t:
            axis_order = ("h", "w", "t")
        else:
            axis_order = ("t", "w", "h")
    pts = list(_slow_curve(*(vec[n] for n in axis_order)))
    return np.array([(z * h + y) * w + x for x, y, z in pts], dtype=np.int64)


GRIDS = [(1, 1, 1), (1, 1, 7), (1, 5, 1), (4, 1, 1), (2, 2, 2), (3, 4, 5), (1, 6, 9), (5, 3, 2),
         (4, 6, 8), (7, 3, 11), (2, 9, 13), (6, 5, 5), (3, 8, 16)]
ORDERS = [("w", "h", "t"), "largest", ("t", "h", "w"), ("h", "w", "t"), ("h", "t", "w")]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("axis_order", ORDERS, ids=str)
def test_gilbert_equals_slow_generator(grid, axis_order):
    order = gilbert_order(grid, axis_order)
    np.testing.assert_array_equal(order.perm.numpy(), _slow_perm(grid, axis_order))


def test_gilbert_slow_generator_larger_grid():
    grid = (9, 12, 20)
    np.testing.assert_array_equal(gilbert_order(grid).perm.numpy(), _slow_perm(grid, ("w", "h", "t")))
    np.testing.assert_array_equal(gilbert_order(grid, "largest").perm.numpy(), _slow_perm(grid, "largest"))


@pytest.mark.parametrize("grid", [(3, 4, 5), (21, 30, 52), (8, 6, 4), (5, 7, 9), (1, 33, 17), (16, 32, 32)])
@pytest.mark.parametrize("axis_order", [("w", "h", "t"), "largest"], ids=str)
def test_gilbert_bijection_and_adjacency(grid, axis_order):
    order = gilbert_order(grid, axis_order)
    n = int(np.prod(grid))
    perm, inv = order.perm, order.inverse
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    assert torch.equal(inv[perm], torch.arange(n))
    assert int(perm[0]) == 0  # starts at the origin
    t, h, w = grid
    coords = torch.stack([perm // (h * w), (perm // w) % h, perm % w], 1)
    step = (coords[1:] - coords[:-1]).abs()
    # gilbert3d is face-adjacent on even cuboids; odd extents force a few short jumps (upstream's
    # curve too: 26 steps of Chebyshev length 2 on 21x30x52, one of length 3 on 5x7x9)
    assert int(step.max()) <= 3
    assert float((step.sum(1) == 1).double().mean()) > 0.94
    if all(s % 2 == 0 for s in grid) or grid[0] == 1:
        assert int(step.max()) <= 1
    if all(s % 2 == 0 for s in grid):
        assert torch.all(step.sum(1) == 1)


def test_gilbert_cache_and_names():
    a = gilbert_order((3, 4, 5))
    assert gilbert_order([3, 4, 5], ["w", "h", "t"]) is a
    assert a.name == "gilbert_wht"
    assert gilbert_order((3, 4, 5), "largest").name == "gilbert_largest"
    assert order_from_name("gilbert", (3, 4, 5)) is a
    assert order_from_name("gilbert_wht", (3, 4, 5)) is a
    assert order_from_name(None, (3, 4, 5)) is None
    assert gilbert_order((4, 5)) is gilbert_order((1, 4, 5))
    with pytest.raises(ValueError, match="token_order"):
        order_from_name("hilbert", (3, 4, 5))
    with pytest.raises(ValueError, match="axis_order"):
        gilbert_order((3, 4, 5), ("w", "w", "t"))
    with pytest.raises(ValueError, match="video_grid"):
        gilbert_order((3, 0, 5))


def _brute_neighbours(grid, block, perm):
    t, h, w = grid
    n = t * h * w
    pos = np.empty(n, dtype=np.int64)
    pos[perm] = np.arange(n)
    nb = -(-n // block)
    table = np.zeros((nb, nb), dtype=bool)
    pts = list(itertools.product(range(t), range(h), range(w)))
    for (z1, y1, x1) in pts:
        for (z2, y2, x2) in pts:
            if max(abs(z1 - z2), abs(y1 - y2), abs(x1 - x2)) <= 1:
                i = pos[(z1 * h + y1) * w + x1] // block
                j = pos[(z2 * h + y2) * w + x2] // block
                table[i, j] = True
    return table


@pytest.mark.parametrize("grid,block", [((3, 4, 5), 4), ((2, 5, 7), 8), ((4, 4, 4), 16), ((1, 6, 9), 5),
                                        ((3, 3, 3), 1)])
@pytest.mark.parametrize("ordered", [False, True])
def test_block_neighbours_brute_force(grid, block, ordered):
    order = gilbert_order(grid) if ordered else None
    perm = order.perm.numpy() if ordered else np.arange(int(np.prod(grid)))
    nbr = block_neighbours(grid, block, order)
    assert nbr.dtype == torch.bool
    np.testing.assert_array_equal(nbr.numpy(), _brute_neighbours(grid, block, perm))
    assert torch.equal(nbr, nbr.T)
    assert bool(nbr.diagonal().all())


def test_block_neighbours_cached_and_checked():
    order = gilbert_order((5, 6, 7))
    assert block_neighbours((5, 6, 7), 8, order) is block_neighbours((5, 6, 7), 8, order)
    with pytest.raises(ValueError, match="block"):
        block_neighbours((5, 6, 7), 0)
    with pytest.raises(ValueError, match="order"):
        block_neighbours((5, 6, 8), 8, order)
