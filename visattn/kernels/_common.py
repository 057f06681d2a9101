"""Shared Triton helpers: the online-softmax step and small host utilities.

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were defined: Triton
decides at decoration time whether ``@triton.jit`` functions are compiled or interpreted, so the
dispatcher uses this flag to explain a mismatch instead of failing inside Triton.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (persistent and occupancy-sized grids)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Host-side ``ceil(a / b)``: ``triton.cdiv`` is a constexpr function since Triton 3.5 and costs ~3 us
    of host time per call outside a kernel."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side ``triton.next_power_of_2`` (0 for n <= 0), without its constexpr-function overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def head_dim_pad(head_dim: int) -> int:
    """Head dim rounded up to the power of two >= 16 that ``tl.arange`` and ``tl.dot`` need."""
    return max(16, next_pow2(head_dim))


def is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE for fp32 inputs (so fp32 means fp32), TF32 otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _online_softmax_step(qk, m_i, l_i, acc):
    """One online-softmax update with logits ``qk`` already in log2 units.

    Rows whose running max is still -inf (every key so far masked) use 0 as their shift, so that
    ``exp2(-inf - -inf)`` never produces a NaN. Returns the probabilities (fp32, unnormalised),
    the new max and sum, and ``acc`` rescaled to the new max (the caller adds ``p @ v``).
    """
    return _online_softmax_step_scaled(qk, 1.0, m_i, l_i, acc)  # (x * 1.0 folds away: same code)


@triton.jit
def _online_softmax_step_scaled(qk, scale, m_i, l_i, acc, GROUP: tl.constexpr = 1):
    """``_online_softmax_step`` of the logits ``qk * scale + log2 GROUP`` for a ``scale > 0`` (log2 units;
    ``GROUP`` 1, 2, 4 or 8, PSA's pooled-key bias): the row max is taken on ``qk`` and the scale (and the
    constant bias) fold into the exponent's FMA, one multiply per logit fewer."""
    if GROUP == 1:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale - m_shift[:, None])
    else:
        BIAS: tl.constexpr = 1.0 if GROUP == 2 else (2.0 if GROUP == 4 else 3.0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale + BIAS)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale - (m_shift - BIAS)[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _fwd_epilogue(acc, m_i, l_i):
    """Normalise the online-softmax accumulator; rows that saw no key give 0 and LSE -inf (natural log)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def _bh_ids(pid_bh, n_heads, kv_group):
    """(batch, query head, key/value head) of a program, as int64 for the offset arithmetic."""
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    return b, h, h // kv_group


@triton.jit
def _tile_mask(row_ok, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Load/store mask of a [rows, HEAD_DIM_PAD] tile: valid rows, and real head-dim lanes.

    When the head dim is a power of two the mask is ``[rows, 1]``: constant along the head dim,
    so the compiler keeps 16-byte vector accesses.
    """
    if HEAD_DIM == HEAD_DIM_PAD:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def _load_tile(base, start, stride, offs_r, offs_d, mask):
    """Rows ``start + offs_r`` of a [tokens, head_dim] slice addressed by its token stride.

    The large part of the offset (``start * stride``) is a scalar in int64; the per-element part
    stays int32. The head dim is dense (stride 1).
    """
    return tl.load(base + start.to(tl.int64) * stride + offs_r[:, None] * stride + offs_d[None, :], mask=mask,
                   other=0.0)
