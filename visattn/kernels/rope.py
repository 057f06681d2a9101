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
padded to a power of two and masked). ``NORM`` (Wan's inference) first RMS-normalises each token over all its
heads, as torch's fused RMSNorm does (fp32, one rounding), in a first pass for the sums of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tokens per program; H100 sweep, q + k [1, 32760, 12, 128] bf16: 8-16 tokens 0.168 ms, 32: 0.190, 64: 0.191
_BLOCK_S = 16


@triton.jit
def _rope_tile(x_ptr, o_ptr, rows, ok, offs_d, h, sx_s, sx_h, so_s, so_h, ce, co, se, so, w_ptr, rstd, head_dim,
               HALF_P: tl.constexpr, TRANSPOSE: tl.constexpr, NORM: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None] * sx_s + h * sx_h + offs_d[None, :], mask=ok, other=0.0)
    if NORM:  # torch's fused RMSNorm: x * rstd * weight in fp32, rounded once to the input dtype
        w = tl.load(w_ptr + h * head_dim + offs_d, mask=offs_d < head_dim, other=0.0)
        x = (x.to(tl.float32) * rstd[:, None] * w.to(tl.float32)[None, :]).to(x.dtype)
    xe, xo = tl.split(tl.reshape(x.to(ce.dtype), (x.shape[0], HALF_P, 2)))
    if TRANSPOSE:  # [[ce, -se], [so, co]]^T
        oe = xe * ce + xo * so
        oo = xo * co - xe * se
    else:
        oe = xe * ce - xo * se
        oo = xo * co + xe * so
    out = tl.reshape(tl.join(oe, oo), (x.shape[0], 2 * HALF_P))
    o_ptrs = o_ptr + rows[:, None] * so_s + h * so_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(
    x0_ptr, x1_ptr, o0_ptr, o1_ptr, ce_ptr, co_ptr, se_ptr, so_ptr, w0_ptr, w1_ptr,
    S, H, HALF, eps,
    sx_b, sx_s, sx_h, so_b, so_s, so_h,
    sc_s, sc_d, ss_s, ss_d,
    HALF_P: tl.constexpr, BLOCK_S: tl.constexpr, F64: tl.constexpr, TRANSPOSE: tl.constexpr,
    NORM: tl.constexpr = False,
):
    # grid: (token tiles, batch, tensor); the tables are read once per tile for every head.
    # NORM: RMSNorm over all heads of a token first (weights w0 / w1, one pass for the sums of squares)
    pid_s, b, t = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < S
    rows = rows.to(tl.int64)
    offs_i = tl.arange(0, HALF_P)
    offs_d = tl.arange(0, 2 * HALF_P)  # pairs padded to a power of two, masked past D
    tab_ok = row_ok[:, None] & (offs_i[None, :] < HALF)
    tab_c = rows[:, None] * sc_s + offs_i[None, :] * sc_d
    tab_s = rows[:, None] * ss_s + offs_i[None, :] * ss_d
    ce = tl.load(ce_ptr + tab_c, mask=tab_ok, other=0.0)
    co = tl.load(co_ptr + tab_c, mask=tab_ok, other=0.0)
    se = tl.load(se_ptr + tab_s, mask=tab_ok, other=0.0)
    so = tl.load(so_ptr + tab_s, mask=tab_ok, other=0.0)
    ok = row_ok[:, None] & (offs_d[None, :] < 2 * HALF)
    cdt = tl.float64 if F64 else tl.float32
    ce, co, se, so = ce.to(cdt), co.to(cdt), se.to(cdt), so.to(cdt)
    if t == 0:
        x_ptr, o_ptr, w_ptr = x0_ptr + b * sx_b, o0_ptr + b * so_b, w0_ptr
    else:
        x_ptr, o_ptr, w_ptr = x1_ptr + b * sx_b, o1_ptr + b * so_b, w1_ptr
    rstd = tl.zeros([BLOCK_S], dtype=tl.float32)
    if NORM:
        for h in range(H):
            x = tl.load(x_ptr + rows[:, None] * sx_s + h * sx_h + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            rstd += tl.sum(x * x, 1)
        rstd = tl.math.rsqrt(rstd / (H * 2 * HALF) + eps)
    for h in range(H):
        _rope_tile(x_ptr, o_ptr, rows, ok, offs_d, h, sx_s, sx_h, so_s, so_h, ce, co, se, so, w_ptr, rstd, 2 * HALF,
                   HALF_P, TRANSPOSE, NORM)


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
    grid = (triton.cdiv(S, _BLOCK_S), B, len(xs))
    (w0, w1), eps = norm if norm is not None else ((ce, ce), 0.0)
    _rope_kernel[grid](
        x0, x1, outs[0], o1, ce, co, se, so, w0, w1 if len(xs) == 2 else w0,
        S, H, D // 2, eps,
        x0.stride(0), x0.stride(1), x0.stride(2), outs[0].stride(0), outs[0].stride(1), outs[0].stride(2),
        ce.stride(0), ce.stride(1), se.stride(0), se.stride(1),
        HALF_P=max(2, triton.next_power_of_2(D // 2)), BLOCK_S=_BLOCK_S,
        F64=torch.float64 in (x0.dtype, ce.dtype, se.dtype), TRANSPOSE=transpose, NORM=norm is not None,
        num_warps=4,
    )
    return outs
