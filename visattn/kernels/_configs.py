"""Tile and launch configurations for the Triton kernels.

Configurations are chosen from a small table keyed by what shapes the code (device, head dim, plan
blocks, dtype), never by sequence length, so a new resolution reuses the compiled kernel. Under
``TRITON_INTERPRET=1`` small tiles keep the interpreter fast while still exercising sub-tiling.
The table's GPU values were picked from measurements on an H100 (see ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._common import INTERPRET


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tail_branch: bool = True  # forward: mask only tiles that reach past seq_k
    prefetch: bool = True  # forward: read the next block id one iteration ahead


# benchmarks/sweep_block_sparse.py sets these to time other tiles; empty in normal use
OVERRIDES: dict[str, TileConfig] = {}


def _fit(cfg: TileConfig, block_q: int, block_k: int) -> TileConfig:
    # kernel tiles must divide the plan blocks (both powers of two)
    return TileConfig(min(cfg.block_m, block_q), min(cfg.block_n, block_k), cfg.num_warps, cfg.num_stages,
                      cfg.tail_branch, cfg.prefetch)


def fwd_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if "fwd" in OVERRIDES:
        return _fit(OVERRIDES["fwd"], block_q, block_k)
    return _fwd_config(device, head_dim, block_q, block_k, dtype)


@functools.lru_cache(maxsize=None)
def _fwd_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if INTERPRET or device.type != "cuda":
        return _fit(TileConfig(32, 32, 4, 1), block_q, block_k)
    if dtype == torch.float32:
        return _fit(TileConfig(64, 32, 4, 2), block_q, block_k)
    if head_dim <= 64:
        return _fit(TileConfig(128, 64, 4, 3), block_q, block_k)
    if head_dim <= 128:
        return _fit(TileConfig(128, 128, 8, 3), block_q, block_k)
    return _fit(TileConfig(64, 32, 4, 2), block_q, block_k)


def bwd_dkdv_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if "dkdv" in OVERRIDES:
        return _fit(OVERRIDES["dkdv"], block_q, block_k)
    return _bwd_dkdv_config(device, head_dim, block_q, block_k, dtype)


@functools.lru_cache(maxsize=None)
def _bwd_dkdv_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if INTERPRET or device.type != "cuda":
        return _fit(TileConfig(32, 32, 4, 1), block_q, block_k)
    if dtype == torch.float32 or head_dim > 128:
        return _fit(TileConfig(32, 64, 4, 2), block_q, block_k)
    return _fit(TileConfig(64, 64, 4, 3), block_q, block_k)


def bwd_dq_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if "dq" in OVERRIDES:
        return _fit(OVERRIDES["dq"], block_q, block_k)
    return _bwd_dq_config(device, head_dim, block_q, block_k, dtype)


@functools.lru_cache(maxsize=None)
def _bwd_dq_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype) -> TileConfig:
    if INTERPRET or device.type != "cuda":
        return _fit(TileConfig(32, 32, 4, 1), block_q, block_k)
    if dtype == torch.float32 or head_dim > 128:
        return _fit(TileConfig(64, 32, 4, 2), block_q, block_k)
    return _fit(TileConfig(128, 128, 8, 2), block_q, block_k)
