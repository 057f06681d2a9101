"""Shared scaffolding of the sparse video self-attention layers (pyramid, rectified).

Both layers own the same projections (``qkv``, optional per-head ``q_norm``/``k_norm``, ``proj``) and
differ only in the op they call, so the checks, submodules and q/k/v split live here once.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SparseVideoAttentionBase(nn.Module):
    """qkv projection + optional per-head q/k norm + output projection; subclasses call their op."""

    config_cls: type = object

    def __init__(self, dim: int, num_heads: int, config, qkv_bias: bool, qk_norm: str | None, backend,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"expected num_heads to divide dim, got dim={dim!r}, num_heads={num_heads!r}")
        if qk_norm not in (None, "layer", "rms"):
            raise ValueError(f"expected qk_norm in (None, 'layer', 'rms'), got qk_norm={qk_norm!r}")
        name = self.config_cls.__name__
        if config is not None and not isinstance(config, self.config_cls):
            raise ValueError(f"expected config to be a {name}, got config={type(config).__name__}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.config = config or self.config_cls()
        self.backend = backend
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        if qk_norm is None:
            self.q_norm = self.k_norm = nn.Identity()
        else:
            cls = nn.LayerNorm if qk_norm == "layer" else nn.RMSNorm
            self.q_norm, self.k_norm = cls(self.head_dim, **kw), cls(self.head_dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, N, C]`` -> normalised q, k and v, each ``[B, N, H, D]``."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        return self.q_norm(q), self.k_norm(k), v
