"""Pyramid sparse attention layer (PSA, https://arxiv.org/abs/2512.04025; spec pyramid.md §3.3).

:class:`PyramidAttention` is a self-attention module for custom DiTs: qkv projection, optional q/k
norms, :func:`visattn.ops.pyramid_attention` over ``[B, N, H, D]``, output projection. A plan can be
passed in (reused across steps) or made on the fly from the layer's :class:`PyramidConfig`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._layout import SequenceLayout
from ..ops.pyramid import PyramidConfig, PyramidPlan, pyramid_attention

__all__ = ["PyramidAttention"]


class PyramidAttention(nn.Module):
    """Self-attention with PSA's multi-level block sparsity.

    Args:
        dim: channels ``C``; ``num_heads`` must divide it.
        num_heads: heads.
        config: :class:`PyramidConfig` (default ``PyramidConfig()``).
        qkv_bias: bias of the qkv projection.
        qk_norm: ``None``, ``"layer"`` or ``"rms"`` norm over each head's q and k.
        backend: forwarded to :func:`visattn.ops.pyramid_attention` untouched.

    Input ``x [B, N, C]``; ``forward(x, seq_layout=None, plan=None, return_plan=False)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        config: PyramidConfig | None = None,
        qkv_bias: bool = True,
        qk_norm: str | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"expected num_heads to divide dim, got dim={dim!r}, num_heads={num_heads!r}")
        if qk_norm not in (None, "layer", "rms"):
            raise ValueError(f"expected qk_norm in (None, 'layer', 'rms'), got qk_norm={qk_norm!r}")
        if config is not None and not isinstance(config, PyramidConfig):
            raise ValueError(f"expected config to be a PyramidConfig, got config={type(config).__name__}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.config = config or PyramidConfig()
        self.backend = backend
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        if qk_norm is None:
            self.q_norm = self.k_norm = nn.Identity()
        else:
            cls = nn.LayerNorm if qk_norm == "layer" else nn.RMSNorm
            self.q_norm, self.k_norm = cls(self.head_dim, **kw), cls(self.head_dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)

    def forward(
        self,
        x: torch.Tensor,
        seq_layout: SequenceLayout | None = None,
        plan: PyramidPlan | None = None,
        return_plan: bool = False,
    ):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, N, H, D]
        q, k = self.q_norm(q), self.k_norm(k)
        out, plan = pyramid_attention(
            q,
            k,
            v,
            plan=plan,
            config=None if plan is not None else self.config,
            seq_layout=seq_layout,
            backend=self.backend,
            return_plan=True,
        )
        out = self.proj(out.reshape(B, N, C))
        return (out, plan) if return_plan else out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, block_q={c.block_q}, block_k={c.block_k}, "
            f"mode={c.mode}, levels={dict(c.levels)}"
        )
