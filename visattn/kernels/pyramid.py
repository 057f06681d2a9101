"""PSA-specific Triton kernels: pyramid pooling, pooled-level backward, importance estimation.

"PSA: Pyramid Sparse Attention" (Li et al., https://arxiv.org/abs/2512.04025). The attention itself
runs on the shared core ``kernels/block_sparse.py`` (``level_ptr`` + :class:`Pyramid`); this file
holds what only PSA needs:

- ``pyramid_pool``: one pass over K and V writing the mean-pooled levels (factors 2, 4, 8) of every
  KV block, with true group counts for partial blocks (fp32 sums, stored in the input dtype);
- ``pyramid_bwd``: dQ (the forward's multi-level walk), dK/dV per (KV block, level) over the query
  tiles of the transposed plan (no atomics), and the scatter of pooled gradients to tokens;
- ``sampled_max_scores``: the sampled max-attention estimator (two passes, no [rows x n_k] scratch).

Caution/limits: tested with Triton 3.6 (GPU) and 3.9 (interpreter). fp16, bf16, fp32; head dims up to
256; ``block_k`` a power of two >= 16 (32, 64, 128 in the op). No GQA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import head_dim_pad
from .block_sparse import Pyramid, Segments, _bhn_strides, _entry_range, _segment_args

POOL_FACTORS = (2, 4, 8)


@triton.jit
def _pool_level(x, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K: tl.constexpr, MF: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    P: tl.constexpr = BLOCK_K // MF
    sums = tl.sum(tl.reshape(x, (P, MF, HEAD_DIM_PAD)), axis=1)  # [P, D]
    g = tl.arange(0, P)
    cnt = tl.minimum(tl.maximum(end - (start + g * MF), 0), MF)
    mean = sums / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    rows = (n_blk * (BLOCK_K - 2 * P) + j * P + g).to(tl.int64)
    mask = (g[:, None] < P) & (offs_d[None, :] < HEAD_DIM)
    tl.store(out_base + rows[:, None] * stride_on + offs_d[None, :], mean.to(out_base.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seq_k", "n_blk", "video_start", "num_video", "text_start", "n_vk", "n_tk"])
def _pyramid_pool_kernel(
    K, V, KP, VP, TEXT_VALID,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpb, stride_kph, stride_kpn, stride_vpb, stride_vph, stride_vpn,
    seq_k, n_heads, n_blk, video_start, num_video, text_start, n_vk, n_tk,
    BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SEGMENTS: tl.constexpr,
    DO2: tl.constexpr, DO4: tl.constexpr, DO8: tl.constexpr,
):
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    text_valid = tl.load(TEXT_VALID + b) if SEGMENTS else 0
    start, end = _entry_range(j, seq_k, text_valid, video_start, num_video, text_start, n_vk, n_tk, BLOCK_K, SEGMENTS)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = ((start + offs_n) < end)[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = start.to(tl.int64) + offs_n
    for which in tl.static_range(2):
        if which == 0:
            x = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            out_base = KP + b * stride_kpb + h * stride_kph
            stride_on = stride_kpn
        else:
            x = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            out_base = VP + b * stride_vpb + h * stride_vph
            stride_on = stride_vpn
        if DO2:
            _pool_level(x, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 2, HEAD_DIM, HEAD_DIM_PAD)
        if DO4:
            _pool_level(x, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 4, HEAD_DIM, HEAD_DIM_PAD)
        if DO8:
            _pool_level(x, start, end, out_base, stride_on, j, n_blk, offs_d, BLOCK_K, 8, HEAD_DIM, HEAD_DIM_PAD)


def num_kv_blocks(seq_k: int, block_k: int, segments: Segments | None) -> int:
    return triton.cdiv(seq_k, block_k) if segments is None else segments.num_kv_blocks(block_k)


def pyramid_pool(k: torch.Tensor, v: torch.Tensor, block_k: int, *, segments: Segments | None = None,
                 factors: tuple[int, ...] = POOL_FACTORS) -> Pyramid:
    """Mean-pooled levels of K and V (``[B, N, H_kv, D]`` views) for the pool ``factors`` listed.

    Groups of ``m`` consecutive tokens never straddle blocks; a partial group averages its real
    tokens only (text blocks: the first ``text_valid`` tokens). Levels not listed are left
    uninitialised (the plan must not use them).
    """
    B, Nk, Hk, D = k.shape
    n_blk = num_kv_blocks(Nk, block_k, segments)
    rows = n_blk * (block_k - block_k // 8)  # levels 2, 4, 8 back to back
    # [B, H, L, D] storage (each head's rows contiguous), handed out as a [B, L, H, D] view
    kp = k.new_empty((B, Hk, rows, D)).transpose(1, 2)
    vp = v.new_empty((B, Hk, rows, D)).transpose(1, 2)
    text_valid, seg, _ = _segment_args(segments, B, 16, block_k, k.device)
    vs, nv, ts, _, _, n_vk, n_tk = seg
    _pyramid_pool_kernel[(n_blk, B * Hk)](
        k, v, kp, vp, text_valid, *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(kp), *_bhn_strides(vp),
        Nk, Hk, n_blk, vs, nv, ts, n_vk, n_tk,
        BLOCK_K=block_k, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), SEGMENTS=segments is not None,
        DO2=2 in factors, DO4=4 in factors, DO8=8 in factors, num_warps=4 if block_k * D <= 8192 else 8,
    )
    return Pyramid(kp, vp, n_blk)
