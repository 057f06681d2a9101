"""Rotary position embedding on interleaved pairs, fused (the processors' RoPE).

diffusers applies RoPE to ``[B, S, H, D]`` queries and keys as pairs ``(x[2i], x[2i+1])``::

    out[2i]   = x[2i] * ce[i] - x[2i+1] * se[i]
    out[2i+1] = x[2i+1] * co[i] + x[2i] * so[i]

with per-token tables ``ce, co, se, so`` of ``D / 2`` entries. ``WanAttnProcessor`` takes
``ce = co = cos[..., 0::2]`` and ``se = so = sin[..., 1::2]``; ``diffusers.models.embeddings.
apply_rotary_emb`` (real, interleaved) takes ``cos[..., 0::2], cos[..., 1::2], sin[..., 0::2],
sin[..., 1::2]``. Eager torch spends about ten elementwise launches per tensor on this (strided
multiplies into fp32 temporaries, strided copies back): 2.3 ms per Wan2.1-1.3B layer at 480p on an
H100, 11 % of the forward. ``_rope_kernel`` reads each tile once and writes it once, for q and k in
one launch.

The arithmetic is fp32 (fp64 when the input or the tables are fp64), as torch's type promotion does
it for low-precision inputs with fp32 tables; the result is rounded to the input dtype. The backward of the
rotation is the same kernel with the transposed pair matrix (``TRANSPOSE``). The tables take no
gradient. Tables and tensors are addressed by strides; the head dim must be contiguous and even (pairs are
padded to a power of two and masked). ``_norm_rope_kernel`` (Wan's inference) first RMS-normalises each token
over all its heads, as torch's fused RMSNorm does (fp32, one rounding), from one read of the token's heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2

# tokens per program; H100 sweep, q + k [1, 32760, 12, 128] bf16: 8-16 tokens 0.168 ms, 32: 0.190, 64: 0.191
_BLOCK_S = 16
# the one-pass norm + rotation holds every head of its tokens; H100, Wan's q + k as above (the two-pass
# per-head loop before it: 0.236 ms), ms by tokens / warps: 4 / 4 0.163, 2 / 4 0.176, 4 / 8 0.163,
# 8 / 8 0.231, 8 / 4 0.159, 1 / 4 0.165
_NORM_BLOCK_S, _NORM_WARPS = 4, 4


@triton.jit
def _rotate(xe, xo, ce, co, se, so, TRANSPOSE: tl.constexpr):
    """The pair rotation of the even / odd elements ``xe`` / ``xo`` (in the tables' dtype) by tables
    broadcast to their shape; returns the joined ``[..., HALF_P, 2]`` pairs."""
    if TRANSPOSE:  # [[ce, -se], [so, co]]^T
        oe = xe * ce + xo * so
        oo = xo * co - xe * se
    else:
        oe = xe * ce - xo * se
        oo = xo * co + xe * so
    return tl.join(oe, oo)


@triton.jit
def _rope_tile(x_ptr, o_ptr, rows, ok, offs_d, h, sx_s, sx_h, so_s, so_h, ce, co, se, so, HALF_P: tl.constexpr,
               TRANSPOSE: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None] * sx_s + h * sx_h + offs_d[None, :], mask=ok, other=0.0)
    xe, xo = tl.split(tl.reshape(x.to(ce.dtype), (x.shape[0], HALF_P, 2)))
    out = tl.reshape(_rotate(xe, xo, ce, co, se, so, TRANSPOSE), (x.shape[0], 2 * HALF_P))
    o_ptrs = o_ptr + rows[:, None] * so_s + h * so_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_tables(ce_ptr, co_ptr, se_ptr, so_ptr, rows, row_ok, HALF, sc_s, sc_d, ss_s, ss_d, HALF_P: tl.constexpr,
                 F64: tl.constexpr):
    """The four ``[len(rows), HALF_P]`` tables of a token tile in the arithmetic dtype (fp32, fp64 with ``F64``)."""
    offs_i = tl.arange(0, HALF_P)
    tab_ok = row_ok[:, None] & (offs_i[None, :] < HALF)
    tab_c = rows[:, None] * sc_s + offs_i[None, :] * sc_d
    tab_s = rows[:, None] * ss_s + offs_i[None, :] * ss_d
    cdt = tl.float64 if F64 else tl.float32
    ce = tl.load(ce_ptr + tab_c, mask=tab_ok, other=0.0).to(cdt)
    co = tl.load(co_ptr + tab_c, mask=tab_ok, other=0.0).to(cdt)
    se = tl.load(se_ptr + tab_s, mask=tab_ok, other=0.0).to(cdt)
    so = tl.load(so_ptr + tab_s, mask=tab_ok, other=0.0).to(cdt)
    return ce, co, se, so


@triton.jit
def _tile_of_program(x0_ptr, x1_ptr, o0_ptr, o1_ptr, S, sx_b, so_b, BLOCK_S: tl.constexpr):
    """Grid (token tiles, batch, tensor): this program's token rows (int64), their validity, and the input and
    output base pointers of its batch and tensor (``t`` 0 or 1)."""
    pid_s, b, t = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    if t == 0:
        x_ptr, o_ptr = x0_ptr + b * sx_b, o0_ptr + b * so_b
    else:
        x_ptr, o_ptr = x1_ptr + b * sx_b, o1_ptr + b * so_b
    return rows.to(tl.int64), rows < S, x_ptr, o_ptr, t


@triton.jit
def _rope_kernel(
    x0_ptr, x1_ptr, o0_ptr, o1_ptr, ce_ptr, co_ptr, se_ptr, so_ptr,
    S, H, HALF,
    sx_b, sx_s, sx_h, so_b, so_s, so_h,
    sc_s, sc_d, ss_s, ss_d,
    HALF_P: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    # the tables are read once per tile for every head
    rows, row_ok, x_ptr, o_ptr, _ = _tile_of_program(x0_ptr, x1_ptr, o0_ptr, o1_ptr, S, sx_b, so_b, BLOCK_S)
    offs_d = tl.arange(0, 2 * HALF_P)  # pairs padded to a power of two, masked past D
    ce, co, se, so = _load_tables(ce_ptr, co_ptr, se_ptr, so_ptr, rows, row_ok, HALF, sc_s, sc_d, ss_s, ss_d, HALF_P,
                                  F64)
    ok = row_ok[:, None] & (offs_d[None, :] < 2 * HALF)
    for h in range(H):
        _rope_tile(x_ptr, o_ptr, rows, ok, offs_d, h, sx_s, sx_h, so_s, so_h, ce, co, se, so, HALF_P, TRANSPOSE)


@triton.jit
def _norm_rope_kernel(
    x0_ptr, x1_ptr, o0_ptr, o1_ptr, ce_ptr, co_ptr, se_ptr, so_ptr, w0_ptr, w1_ptr,
    S, H, HALF, eps,
    sx_b, sx_s, sx_h, so_b, so_s, so_h,
    sc_s, sc_d, ss_s, ss_d,
    H_P: tl.constexpr, HALF_P: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr,
):
    # One pass: a [BLOCK_S, H_P, 2 * HALF_P] tile holds every head of its tokens, so the sums of squares and the
    # rotation read x once (the per-head loop of _rope_kernel would read it twice, each head's load waiting on the
    # previous one).
    rows, row_ok, x_ptr, o_ptr, t = _tile_of_program(x0_ptr, x1_ptr, o0_ptr, o1_ptr, S, sx_b, so_b, BLOCK_S)
    w_ptr = w0_ptr
    if t != 0:
        w_ptr = w1_ptr
    offs_h = tl.arange(0, H_P)
    offs_d = tl.arange(0, 2 * HALF_P)
    ce, co, se, so = _load_tables(ce_ptr, co_ptr, se_ptr, so_ptr, rows, row_ok, HALF, sc_s, sc_d, ss_s, ss_d, HALF_P,
                                  F64)
    hd_ok = (offs_h[:, None] < H) & (offs_d[None, :] < 2 * HALF)
    ok = row_ok[:, None, None] & hd_ok[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * sx_s + offs_h[None, :, None] * sx_h + offs_d[None, None, :], mask=ok,
                other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(tl.sum(xf * xf, 2), 1) / (H * 2 * HALF) + eps)
    # torch's fused RMSNorm: x * rstd * weight in fp32, rounded once to the input dtype
    w = tl.load(w_ptr + offs_h[:, None] * (2 * HALF) + offs_d[None, :], mask=hd_ok, other=0.0).to(tl.float32)
    xn = (xf * rstd[:, None, None] * w[None, :, :]).to(x.dtype)
    xe, xo = tl.split(tl.reshape(xn.to(ce.dtype), (BLOCK_S, H_P, HALF_P, 2)))
    out = _rotate(xe, xo, ce[:, None, :], co[:, None, :], se[:, None, :], so[:, None, :], False)
    out = tl.reshape(out, (BLOCK_S, H_P, 2 * HALF_P))
    o_ptrs = o_ptr + rows[:, None, None] * so_s + offs_h[None, :, None] * so_h + offs_d[None, None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok)


def rope_pairs_fwd(
    xs: tuple[torch.Tensor, ...],
    ce: torch.Tensor,
    co: torch.Tensor,
    se: torch.Tensor,
    so: torch.Tensor,
    *,
    transpose: bool = False,
    norm: tuple[tuple[torch.Tensor, ...], float] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Rotate one or two ``[B, S, H, D]`` tensors of one shape, dtype and strides (one launch).

    ``ce``/``co`` and ``se``/``so`` are ``[S, D / 2]`` views sharing strides (e.g. ``cos[0, :, 0, 0::2]``
    and ``cos[0, :, 0, 1::2]``). ``norm=((w0, w1), eps)``: each tensor is first RMS-normalised over its
    ``H * D`` values per token with the contiguous ``[H * D]`` weight of its position (forward only: no
    autograd). Returns new contiguous tensors. Callers check the arguments (``visattn.pipelines._rope``).
    """
    x0 = xs[0]
    B, S, H, D = x0.shape
    outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs)
    x1, o1 = (xs[1], outs[1]) if len(xs) == 2 else (x0, outs[0])
    args = (S, H, D // 2)
    strides = (x0.stride(0), x0.stride(1), x0.stride(2), outs[0].stride(0), outs[0].stride(1), outs[0].stride(2),
               ce.stride(0), ce.stride(1), se.stride(0), se.stride(1))
    half_p = max(2, next_pow2(D // 2))
    f64 = torch.float64 in (x0.dtype, ce.dtype, se.dtype)
    if norm is None:
        _rope_kernel[(cdiv(S, _BLOCK_S), B, len(xs))](
            x0, x1, outs[0], o1, ce, co, se, so, *args, *strides,
            HALF_P=half_p, BLOCK_S=_BLOCK_S, F64=f64, TRANSPOSE=transpose, num_warps=4,
        )
        return outs
    if transpose:
        raise NotImplementedError("rope_pairs_fwd: norm= is forward only (transpose=False)")
    (w0, w1), eps = norm
    _norm_rope_kernel[(cdiv(S, _NORM_BLOCK_S), B, len(xs))](
        x0, x1, outs[0], o1, ce, co, se, so, w0, w1 if len(xs) == 2 else w0, *args, eps, *strides,
        H_P=next_pow2(H), HALF_P=half_p, BLOCK_S=_NORM_BLOCK_S, F64=f64, num_warps=_NORM_WARPS,
    )
    return outs
