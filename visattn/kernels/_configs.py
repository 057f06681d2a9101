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
    pool_n: int = 32  # PSA: lanes of a pooled-level execution tile (general split/merge)
    maxnreg: int | None = None  # register cap per thread (two resident programs per SM); None: the compiler's


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
    # 64x64 at 2 stages needs ~107 KB of shared memory at D = 128 (H100 sweep, benchmarks/NOTES.md);
    # GPUs with ~100 KB per block (sm_86 / sm_89) take half the keys
    if head_dim > 64 and torch.cuda.get_device_properties(device).shared_memory_per_block_optin < 128 * 1024:
        return _fit(TileConfig(64, 32, 4, 2), block_q, block_k)
    return _fit(TileConfig(64, 64, 4, 2), block_q, block_k)


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


def pyramid_fwd_config(device: torch.device, head_dim: int, block_q: int, block_k: int, dtype: torch.dtype,
                       segments: bool = False) -> TileConfig:
    """PSA forward: level-1 tiles of ``block_n`` keys (wider than a 32-key block: entries are packed),
    pooled levels in tiles of ``pool_n`` lanes; ``block_m`` divides ``block_q``. ``segments``: the sequence has
    text segments (its kernel variant takes other tiles at 32-key blocks)."""
    if "pyramid_fwd" in OVERRIDES:
        c = OVERRIDES["pyramid_fwd"]
        return TileConfig(min(c.block_m, block_q), c.block_n, c.num_warps, c.num_stages, c.tail_branch, c.prefetch,
                          c.pool_n, c.maxnreg)
    return _pyramid_fwd_config(device, head_dim, block_q, block_k, dtype, segments)


@functools.lru_cache(maxsize=None)
def _pyramid_fwd_config(device, head_dim, block_q, block_k, dtype, segments) -> TileConfig:
    if INTERPRET or device.type != "cuda":
        return TileConfig(min(32, block_q), 32, 4, 1, True, True, 16)
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(min(64, block_q), 32, 4, 2, True, True, 32)
    if head_dim <= 64:
        return TileConfig(min(128, block_q), min(128, max(64, block_k)), 4, 3, True, True, 64)
    big_smem = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor >= 200 * 1024
    if block_k <= 32 and not segments and big_smem:
        # 32-key blocks: 32-lane tiles at 2 stages (96 KB of shared memory) and <= 128 registers per thread, so
        # two programs share an SM and one's list set-up, Q load and O store overlap the other's loop (H100, Wan
        # 480p, wan21_1p3b_topk: 1.89 -> 1.82 ms; causal 2.85 -> 2.63). With text segments the capped registers
        # spill more: 2.92 -> 3.18 ms, so segmented sequences keep the tiles below.
        return TileConfig(min(128, block_q), 32, 8, 2, True, True, 32, 128)
    return TileConfig(min(128, block_q), min(128, max(64, block_k)), 8, 3, True, True, 64)


def pyramid_bwd_config(device: torch.device, head_dim: int, block_q: int, block_k: int,
                       dtype: torch.dtype) -> TileConfig:
    """PSA backward: ``block_m`` query rows per step, ``pool_n`` gathered lanes in the dQ walk, dK/dV
    programs of ``min(block_n, block_k / m)`` pooled keys (at least 16)."""
    if "pyramid_bwd" in OVERRIDES:
        c = OVERRIDES["pyramid_bwd"]
        return TileConfig(min(c.block_m, block_q), c.block_n, c.num_warps, c.num_stages, True, True, c.pool_n)
    if INTERPRET or device.type != "cuda":
        return TileConfig(min(16, block_q), 32, 4, 1, True, True, 16)
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(min(32, block_q), 32, 4, 1, True, True, 32)
    return TileConfig(min(64, block_q), 64, 4, 2, True, True, 64)


@dataclass(frozen=True)
class NATileConfig:
    """Neighborhood kernels: Q box and KV box extents per axis (3-D; 1-D/2-D use leading 1s)."""

    q_tile: tuple[int, int, int]
    kv_tile: tuple[int, int, int]
    num_warps: int
    num_stages: int


def _fit_box(box: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, int, int]:
    """Move box extent from axes shorter than the box onto the last axis (keeps the product)."""
    box = list(box)
    for a in range(2):
        while box[a] > 1 and box[a] >= 2 * size[a]:
            box[a] //= 2
            box[2] *= 2
    return tuple(box)  # type: ignore[return-value]


def neighborhood_config(device: torch.device, size: tuple[int, int, int], kernel_size: tuple[int, int, int],
                        head_dim: int, dtype: torch.dtype, which: str, has_extra: bool = False,
                        has_rpb: bool = False) -> NATileConfig:
    if which in OVERRIDES:
        return OVERRIDES[which]  # type: ignore[return-value]
    rank = 3 - sum(1 for s in size[:2] if s == 1)
    return _neighborhood_config(device.type, size, kernel_size, head_dim, dtype, which, rank, has_extra, has_rpb)


@functools.lru_cache(maxsize=None)
def _neighborhood_config(device_type, size, kernel_size, head_dim, dtype, which, rank, has_extra,
                         has_rpb=False) -> NATileConfig:
    if INTERPRET or device_type != "cuda":
        q, kv = {1: ((1, 1, 16), (1, 1, 16)), 2: ((1, 4, 4), (1, 4, 4)), 3: ((2, 2, 4), (2, 4, 2))}[rank]
        return NATileConfig(_fit_box(q, size), _fit_box(kv, size), 4, 1)
    big = head_dim > 64 or dtype == torch.float32
    bm = 64 if (dtype == torch.float32 or head_dim > 128) else 128
    bn = 32 if (dtype == torch.float32 or head_dim > 128) else (128 if head_dim > 64 else 64)
    if which != "fwd":
        bm, bn = 64, 64
    shapes = {
        1: {64: (1, 1, 64), 128: (1, 1, 128), 32: (1, 1, 32)},
        2: {64: (1, 8, 8), 128: (1, 8, 16), 32: (1, 4, 8)},
        3: {64: (2, 4, 8), 128: (2, 8, 8), 32: (2, 4, 4)},
    }[rank]
    if which == "fwd" and bn == 128 and rank == 2:
        # H100, D = 128, 256x256 window 80x80: 16x8 boxes for both Q and KV hold the forward at 255 registers
        # without spills (8x16: 104 bytes of stack); 14.6 ms against 16.2 (benchmarks/NOTES.md)
        shapes[128] = (1, 16, 8)
    if which == "fwd" and bn == 128 and rank == 3:
        bn = 64  # 2x8x8 KV boxes spill (96 bytes); 2x4x8: 30x48x80 window 18x24x24 57 ms against 62
    warps = 8 if (bm == 128 and head_dim > 64) else 4
    stages = 2 if which != "fwd" else 3
    # shared memory with a padded head dim (masked lanes): Q plus `stages` K and V buffers must stay
    # well under the 228 KB of an H100 (a D=80 fp16 forward at 128x128x3 asked for 360 KB and failed
    # to launch); power-of-two head dims at these tiles were measured to fit
    dp = max(16, 1 << (head_dim - 1).bit_length())
    esize = 4 if dtype == torch.float32 else 2
    if has_rpb:
        # the RPB gather is pipelined like K and V: a [bm, bn] fp32 buffer per stage (a 3-D D=128
        # forward with RPB at 128x128x3 asked for 352 KB); fewer keys first, then fewer stages
        def need(stages, bn):  # (+ the extra-token loop's own unpipelined K/V tiles)
            return (bm * dp + (stages + has_extra) * 2 * bn * dp) * esize + stages * bm * bn * 4
        while need(stages, bn) > 160 * 1024 and (stages > 1 or bn > 32):
            if bn > 64 or stages == 1:
                bn //= 2
            else:
                stages -= 1
    elif dp != head_dim or has_extra:  # the extra-token loop holds its own K/V tiles in shared memory
        while stages > 1 and (bm * dp + stages * 2 * bn * dp) * esize > 160 * 1024:
            stages -= 1
        while bn > 32 and (bm * dp + stages * 2 * bn * dp) * esize > 160 * 1024:
            bn //= 2
    return NATileConfig(_fit_box(shapes[bm], size), _fit_box(shapes[bn], size), warps, stages)


def agent_config(device: torch.device, which: str, head_dim_pad: int, block_a: int, dtype: torch.dtype) -> TileConfig:
    """Agent kernels (kernels/agent.py): ``which`` in {"pool", "fwd", "bwd_dq", "bwd_dkdv"}.

    ``block_a`` is the agent count padded to a power of two >= 16: every tile holds all agents, so the
    token tile shrinks as ``block_a * head_dim_pad`` grows. ``block_m`` tiles queries ("fwd",
    "bwd_dq"), ``block_n`` keys ("pool", "bwd_dkdv"). GPU values are first guesses for an H100, not
    yet swept (benchmarks/bench_agent.py measures the models that use them).
    """
    if which in OVERRIDES:
        return OVERRIDES[which]
    return _agent_config(device.type, which, head_dim_pad, block_a, dtype)


@functools.lru_cache(maxsize=None)
def _agent_config(device_type: str, which: str, dp: int, ba: int, dtype: torch.dtype) -> TileConfig:
    if INTERPRET or device_type != "cuda":
        return TileConfig(16, 16, 4, 1)
    # Chosen without spills in `ptxas -v` for sm_90 (Triton 3.9 codegen; no H100 sweep yet): the
    # small-M products of the agent tiles use many registers, so the key/query tiles stay at 32-64
    # rows and the backward runs 8 warps.
    big = ba * dp * (2 if dtype == torch.float32 else 1)  # one agent tile, in 16-bit element units
    if which == "pool":
        return TileConfig(16, 64 if big <= 64 * 64 else (32 if big <= 128 * 128 else 16), 8, 2)
    if which == "fwd":
        bm = 128 if big <= 16 * 64 else (64 if big <= 64 * 64 else (32 if big <= 128 * 128 else 16))
        return TileConfig(bm, 16, 4 if big <= 64 * 64 else 8, 2)
    tile = 64 if big <= 16 * 64 else (32 if big <= 64 * 64 else 16)
    stages = 2 if big <= 128 * 128 else 1  # (256 agents, D = 128): the fp32 dV_A tile alone is 128 KB
    if which == "bwd_dq":
        return TileConfig(tile, 16, 8, stages)
    return TileConfig(16, tile, 8, stages)
