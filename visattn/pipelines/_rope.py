"""RoPE where the default processors apply it: one fused kernel launch on CUDA, their torch code elsewhere
(Wan's inline RoPE; diffusers' ``apply_rotary_emb`` with real interleaved tables for the others).

Wan's default processor spends about ten eager elementwise launches per tensor on RoPE (2.3 ms per
Wan2.1-1.3B layer at 480p on an H100, ~70 ms of a 640 ms forward); ``kernels/rope.py`` rotates q and k
in one pass. Same formula, fp32 arithmetic (fp64 with fp64 tables) rounded once to the input dtype,
as the default's type promotion does; it differs from the eager result only by FMA contraction in the
fp32 step. Differentiable in q and k (the transposed rotation); the tables never need a gradient, and
tables that require one take the torch code, whose autograd covers them. Under ``torch.compile`` the
torch code is traced (Inductor fuses it into one kernel of its own). For Wan's inference the same launch
also applies the ``norm_q`` / ``norm_k`` RMSNorms that precede RoPE (``wan_norm_rope``).
"""

from __future__ import annotations

import torch

from ..kernels.rope import rope_pairs_fwd


class _RopePairsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ce, co, se, so, *xs):
        ctx.save_for_backward(ce, co, se, so)
        return rope_pairs_fwd(xs, ce, co, se, so)

    @staticmethod
    def backward(ctx, *grads):
        ce, co, se, so = ctx.saved_tensors
        dxs = tuple(
            None if g is None else rope_pairs_fwd((g.contiguous(),), ce, co, se, so, transpose=True)[0]
            for g in grads
        )
        return (None, None, None, None, *dxs)


def _fusable(xs: tuple[torch.Tensor, ...], tables: tuple[torch.Tensor, ...]) -> bool:
    x0 = xs[0]
    return (
        x0.is_cuda
        and not torch.compiler.is_compiling()  # traced: Inductor fuses the torch code itself
        and x0.ndim == 4
        and x0.shape[-1] % 2 == 0
        and x0.dtype.is_floating_point
        and all(x.shape == x0.shape and x.stride() == x0.stride() and x.dtype == x0.dtype for x in xs)
        and x0.stride(-1) == 1
        and all(t.device == x0.device and t.dtype.is_floating_point and not t.requires_grad for t in tables)
    )


def rope_pairs(
    xs: tuple[torch.Tensor, ...],
    ce: torch.Tensor,
    co: torch.Tensor,
    se: torch.Tensor,
    so: torch.Tensor,
    *,
    fused: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Rotate the interleaved pairs of each ``[B, S, H, D]`` tensor in ``xs`` (one or two tensors).

    ``out[2i] = x[2i] ce[i] - x[2i+1] se[i]``, ``out[2i+1] = x[2i+1] co[i] + x[2i] so[i]`` with ``[S, D/2]``
    tables (``ce``/``co`` sharing strides, ``se``/``so`` too). ``fused=None`` runs the kernel on CUDA
    tensors; ``True`` runs it anywhere Triton runs (the interpreter on the CPU, for tests).
    """
    if fused is None:
        fused = _fusable(xs, (ce, co, se, so))
    if fused:
        return _RopePairsFunction.apply(ce, co, se, so, *xs)
    return tuple(_pairs_eager(x, ce[:, None], co[:, None], se[:, None], so[:, None]) for x in xs)


def _wan_fused_tables(query, key, cos, sin):
    """The kernel's ``(ce, se)`` views of Wan's ``[1, S, 1, D]`` tables (one angle per pair: cos at even, sin
    at odd positions) for ``[B, S, H, D]`` q and k, or ``None`` where the fused kernel does not apply."""
    S, D = query.shape[1], query.shape[-1]
    if cos.shape == sin.shape == (1, S, 1, D) and _fusable((query, key), (cos, sin)):
        return cos[0, :, 0, 0::2], sin[0, :, 0, 1::2]
    return None


def wan_rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``WanAttnProcessor``'s RoPE of ``[B, S, H, D]`` q and k with its ``[1, S, 1, D]`` tables."""
    tables = _wan_fused_tables(query, key, cos, sin)
    if tables is not None:
        ce, se = tables
        return rope_pairs((query, key), ce, ce, se, se, fused=True)
    return _wan_rope_eager(query, cos, sin), _wan_rope_eager(key, cos, sin)


def wan_norm_rope(query: torch.Tensor, key: torch.Tensor, norm_q, norm_k, heads: int, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``WanAttnProcessor``'s ``norm_q`` / ``norm_k``, head split and RoPE of the ``[B, S, H * D]`` self-attention
    projections in one launch, returning ``[B, S, H, D]`` q and k; ``None`` where this fusion does not
    apply, and the caller runs those three steps as the default processor does.

    Applies to inference (no tensor needing a gradient) on CUDA when both norms are ``torch.nn.RMSNorm`` over
    the whole projection with weights and one ``eps``: the normalisation is torch's fused RMSNorm
    (``x * rsqrt(mean(x^2) + eps) * w`` in fp32, rounded once), then the rotation of ``wan_rope``. Saves the
    norms' round trip of q and k through memory: 0.317 -> 0.163 ms per Wan2.1-1.3B layer at 480p on an H100.
    """
    norms = (norm_q, norm_k)
    if not all(isinstance(n, torch.nn.RMSNorm) and n.weight is not None for n in norms):
        return None
    HD = query.shape[-1]
    weights = (norm_q.weight, norm_k.weight)
    if (
        (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, *weights)))
        or norm_q.eps != norm_k.eps
        or any(tuple(n.normalized_shape) != (HD,) for n in norms)
        or HD % heads
        or query.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or any(w.device != query.device or not w.is_contiguous() or not w.dtype.is_floating_point for w in weights)
    ):
        return None
    q4, k4 = query.unflatten(-1, (heads, -1)), key.unflatten(-1, (heads, -1))
    tables = _wan_fused_tables(q4, k4, cos, sin)
    if tables is None:
        return None
    eps = norm_q.eps if norm_q.eps is not None else torch.finfo(torch.float32).eps
    ce, se = tables
    return rope_pairs_fwd((q4, k4), ce, ce, se, se, norm=(weights, eps))


def diffusers_rope(query: torch.Tensor, key: torch.Tensor | None, freqs):
    """``diffusers.models.embeddings.apply_rotary_emb(x, freqs, sequence_dim=1)`` (real tables, pairs
    interleaved: Flux, HunyuanVideo, CogVideoX) of ``[B, S, H, D]`` q and k (``key=None``: q only)."""
    xs = (query,) if key is None else (query, key)
    if isinstance(freqs, (tuple, list)) and len(freqs) == 2:
        cos, sin = freqs
        S, D = query.shape[1], query.shape[-1]
        if cos.shape == sin.shape == (S, D) and _fusable(xs, (cos, sin)):
            out = rope_pairs(xs, cos[:, 0::2], cos[:, 1::2], sin[:, 0::2], sin[:, 1::2], fused=True)
            return out if key is not None else (out[0], None)
    from diffusers.models.embeddings import apply_rotary_emb

    out = tuple(apply_rotary_emb(x, freqs, sequence_dim=1) for x in xs)
    return out if key is not None else (out[0], None)


def _wan_rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # WanAttnProcessor's own code: one angle per pair (cos at even, sin at odd positions)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return _pairs_eager(x, c, c, s, s)


def _pairs_eager(x, ce, co, se, so) -> torch.Tensor:
    """The rotation in eager torch ops, tables broadcast against ``x[..., 0::2]``; the result is
    rounded to ``x``'s dtype once (the assignment into ``out``)."""
    xe, xo = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = xe * ce - xo * se
    out[..., 1::2] = xo * co + xe * so
    return out
