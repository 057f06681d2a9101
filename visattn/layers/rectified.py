"""Rectified SpaAttn layer (https://arxiv.org/abs/2511.19835; spec rectified.md §3).

:class:`RectifiedAttention` is a self-attention module for custom DiTs: qkv projection, optional q/k
norms, :func:`visattn.ops.rectified_attention` over ``[B, N, H, D]`` with the caller's
:class:`SequenceLayout`, output projection. A plan can be passed in (reused across steps; keep its
probabilities with ``keep_probs=True`` when v changes) or made on the fly from the layer's config.
"""

from __future__ import annotations

import torch

from ..ops._layout import SequenceLayout
from ..ops.rectified import rectified_attention, rectified_plan
from ..ops.rectified_plan import RectifiedConfig, RectifiedPlan
from ._sparse_video import SparseVideoAttentionBase

__all__ = ["RectifiedAttention"]


class RectifiedAttention(SparseVideoAttentionBase):
    """Self-attention with Rectified SpaAttn's block sparsity and rectification.

    Args:
        dim: channels ``C``; ``num_heads`` must divide it.
        num_heads: heads.
        config: :class:`RectifiedConfig` (default ``RectifiedConfig()``).
        qkv_bias: bias of the qkv projection.
        qk_norm: ``None``, ``"layer"`` or ``"rms"`` norm over each head's q and k.
        backend: forwarded to :func:`visattn.ops.rectified_attention` untouched.
        keep_probs: keep P ⊙ 𝒢 on the plans the layer makes, so a returned plan can be reused with the
            next step's v (default True).

    Input ``x [B, N, C]``; ``forward(x, seq_layout=None, plan=None, return_plan=False)`` (a
    ``seq_layout`` is required unless a plan is given).
    """

    config_cls = RectifiedConfig

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        config: RectifiedConfig | None = None,
        qkv_bias: bool = True,
        qk_norm: str | None = None,
        backend: str | None = None,
        keep_probs: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim, num_heads, config, qkv_bias, qk_norm, backend, device, dtype)
        self.keep_probs = keep_probs

    def forward(
        self,
        x: torch.Tensor,
        seq_layout: SequenceLayout | None = None,
        plan: RectifiedPlan | None = None,
        return_plan: bool = False,
    ):
        B, N, C = x.shape
        q, k, v = self._qkv(x)  # each [B, N, H, D]
        if plan is None:
            # keep P on the plan: reused at a later step (new v), C is recomputed instead of refused
            plan = rectified_plan(
                q,
                k,
                v,
                seq_layout=seq_layout,
                config=self.config,
                keep_probs=self.keep_probs,
                backend=self.backend if self.backend in ("torch", "triton") else None,
            )
        out = rectified_attention(q, k, v, plan=plan, seq_layout=seq_layout, backend=self.backend)
        out = self.proj(out.reshape(B, N, C))
        return (out, plan) if return_plan else out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, block_size={c.block_size}, "
            f"cum_threshold={c.cum_threshold}, drop_rate={c.drop_rate}, ipar={c.ipar}, gapr={c.gapr}"
        )
