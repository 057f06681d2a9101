"""Pyramid sparse attention layer (PSA, https://arxiv.org/abs/2512.04025; spec pyramid.md §3.3).

:class:`PyramidAttention` is a self-attention module for custom DiTs: qkv projection, optional q/k
norms, :func:`visattn.ops.pyramid_attention` over ``[B, N, H, D]``, output projection. A plan can be
passed in (reused across steps) or made on the fly from the layer's :class:`PyramidConfig`.
"""

from __future__ import annotations

import torch

from ..ops._layout import SequenceLayout
from ..ops.pyramid import PyramidConfig, PyramidPlan, pyramid_attention
from ._sparse_video import SparseVideoAttentionBase

__all__ = ["PyramidAttention"]


class PyramidAttention(SparseVideoAttentionBase):
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

    config_cls = PyramidConfig

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
        super().__init__(dim, num_heads, config, qkv_bias, qk_norm, backend, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        seq_layout: SequenceLayout | None = None,
        plan: PyramidPlan | None = None,
        return_plan: bool = False,
    ):
        B, N, C = x.shape
        q, k, v = self._qkv(x)  # each [B, N, H, D]
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
