"""Tile plans of the routed-attention kernels: grouped query tiles and the inverse routing graph.

A region grid of ``R_H x R_W`` regions is covered by groups of ``g_H x g_W`` regions (one query tile
each, partial at the grid edge). For a routing ``index[b, h, rho, :]`` the forward list of group ``t``
is the ascending union of its regions' rows, with a bit mask per entry (bit ``s`` set when the group's
slot ``s`` routed to it). The inverse plan does the same for groups of *key* regions: the query
regions routing to any of them, with the bit of the key slot. Everything is built with device tensor
ops of static shapes: no host sync, deterministic (integer scatter-adds of distinct bits, stable
sorts), so CUDA graphs and ``torch.compile`` see fixed shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)  # a search over up to 32 x 32 groups, on every call of the op
def choose_group(region: tuple[int, int], grid: tuple[int, int], block_m: int) -> tuple[int, int]:
    """Regions per query tile ``(g_H, g_W)``: one region when it fills a tile, else as many as fit.

    The group is about square, holds at most ``block_m`` tokens and at most 32 regions (the select
    bits are one int32).
    """
    T = region[0] * region[1]
    if 2 * T > block_m:
        return 1, 1
    best, best_score = (1, 1), (1, 0)
    for g_H in range(1, min(grid[0], 32) + 1):
        for g_W in range(1, min(grid[1], 32) + 1):
            if g_H * g_W <= 32 and g_H * g_W * T <= block_m:
                score = (g_H * g_W, -abs(g_H - g_W))
                if score > best_score:
                    best, best_score = (g_H, g_W), score
    return best


@dataclass
class RoutingPlan:
    """Forward and inverse lists (int32, ``[B, Hh, n_tiles, cap]``) plus counts ``[B, Hh, n_tiles]``."""

    lst: torch.Tensor
    sel: torch.Tensor
    cnt: torch.Tensor
    ilst: torch.Tensor
    isel: torch.Tensor
    icnt: torch.Tensor
    group: tuple[int, int]


def _slots(
    grid: tuple[int, int], group: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group id and slot of every region (row-major region ids)."""
    R_H, R_W = grid
    g_H, g_W = group
    u = torch.arange(R_H, device=device)[:, None]
    w = torch.arange(R_W, device=device)[None, :]
    n_gW = _cdiv(R_W, g_W)
    tile = ((u // g_H) * n_gW + (w // g_W)).reshape(-1)
    slot = ((u % g_H) * g_W + (w % g_W)).reshape(-1)
    return tile, slot


def _compact(sel: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ascending list of the nonzero columns of ``sel`` ``[..., P]`` (first ``cap``), their bits, count."""
    present = sel != 0
    cnt = present.sum(-1, dtype=torch.int32)
    # a stable sort of the "absent" flags puts present columns first, in ascending order
    order = torch.sort((~present).to(torch.uint8), dim=-1, stable=True).indices[..., :cap]
    return order.to(torch.int32).contiguous(), sel.gather(-1, order).contiguous(), cnt.contiguous()


def build_plan(index: torch.Tensor, grid: tuple[int, int], group: tuple[int, int]) -> RoutingPlan:
    """Plans for routing ``index`` ``[B, Hh, P, k]`` (Hh = 1: shared over heads) on ``grid``."""
    B, Hh, P, kk = index.shape
    dev = index.device
    idx = index.long().clamp(0, P - 1)  # out-of-range ids: undefined results, never bad addresses
    tile, slot = _slots(grid, group, dev)
    n_tiles = _cdiv(grid[0], group[0]) * _cdiv(grid[1], group[1])
    bits = torch.ones((), dtype=torch.int32, device=dev) << slot.to(torch.int32)  # [P]
    # forward: sel[b, h, tile(rho), j] |= bit(rho) for j in index[rho]; distinct bits, so add == or
    flat = (tile[:, None] * P + idx).reshape(B, Hh, P * kk)
    val = bits[:, None].expand(P, kk).reshape(1, 1, P * kk).expand(B, Hh, P * kk)
    sel = torch.zeros((B, Hh, n_tiles * P), dtype=torch.int32, device=dev).scatter_add_(-1, flat, val)
    lst, sel_l, cnt = _compact(sel.view(B, Hh, n_tiles, P), min(group[0] * group[1] * kk, P))
    # inverse: isel[b, h, tile(j), rho] |= bit(j) for j in index[rho]
    iflat = (tile[idx] * P + torch.arange(P, device=dev)[:, None]).reshape(B, Hh, P * kk)
    ival = bits[idx].reshape(B, Hh, P * kk)
    isel = torch.zeros((B, Hh, n_tiles * P), dtype=torch.int32, device=dev).scatter_add_(-1, iflat, ival)
    ilst, isel_l, icnt = _compact(isel.view(B, Hh, n_tiles, P), P)
    return RoutingPlan(lst, sel_l, cnt, ilst, isel_l, icnt, group)
