"""Agent-attention layer (Agent Attention, https://arxiv.org/abs/2312.08874; spec agent.md §3.3).

:class:`AgentAttention` owns the projections, the depthwise conv on V and the decomposed agent biases
under upstream's parameter names and shapes, so original checkpoints load unchanged. The Swin (one
global window), PVT (separate ``q``/``kv`` projections, spatial reduction), DeiT (prefix-token biases
``ac_bias``/``ca_bias``) and CSwin (projections owned by the block, DWC named ``get_v`` as LePE)
variants are constructor options. The attention itself is :func:`visattn.ops.agent_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..ops.agent import agent_attention
from ..ops.agent_bias import AgentBias

__all__ = ["AgentAttention"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise TypeError(f"expected {name} to be a positive int or a pair of them, got {name}={value!r}")
    return (int(value[0]), int(value[1]))


class AgentAttention(nn.Module):
    """Agent attention over a token grid with learned decomposed biases and a DWC on V.

    Input ``x [B, N, C]``: ``num_prefix_tokens`` prefix tokens, then the ``grid`` tokens row-major.
    Output ``[B, N, C]``: ``proj(agent_attention(q, k, v) + DWC(V))``, the DWC on grid tokens only
    (V upsampled bilinearly to the query grid first when ``kv_reduction > 1``).

    Args:
        dim: channels ``C``; ``num_heads`` must divide it.
        num_heads: heads.
        grid: the trained query grid ``(H0, W0)``; the biases are stored at this size and resampled at
            run time for other grids.
        agent_shape: agent grid pooled from the queries (default ``(7, 7)``: 49 agents).
        num_prefix_tokens: prefix (cls) tokens; they get ``ac_bias``/``ca_bias`` and no DWC.
        kv_reduction: PVT's spatial reduction ``r`` of keys/values (conv ``sr`` + LayerNorm ``norm``).
        qkv_bias: bias of the q/k/v projections.
        dwc_kernel: kernel of the depthwise conv on V (padding ``dwc_kernel // 2``).
        attn_drop: dropout on both softmaxes (training only). proj_drop: dropout after ``proj``.
        backend: forwarded to :func:`visattn.ops.agent_attention` untouched.
        qkv_mode: ``"qkv"`` (one ``qkv`` linear), ``"q_kv"`` (PVT's ``q`` and ``kv``; the default when
            ``kv_reduction > 1``) or ``"none"`` (CSwin: the block owns ``qkv`` and ``proj``; call
            :meth:`forward_qkv`).
        lepe: name the depthwise conv ``get_v`` (CSwin's LePE) instead of ``dwc``.
        norm_eps: eps of the spatial-reduction LayerNorm.

    Raises:
        ValueError: inconsistent sizes (``dim`` not divisible by ``num_heads``, ``agent_shape`` larger
            than ``grid``, ``grid`` not divisible by ``kv_reduction``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid: int | Sequence[int],
        agent_shape: int | Sequence[int] = (7, 7),
        num_prefix_tokens: int = 0,
        kv_reduction: int = 1,
        qkv_bias: bool = True,
        dwc_kernel: int = 3,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
        qkv_mode: Literal["qkv", "q_kv", "none"] | None = None,
        lepe: bool = False,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f"expected num_heads to divide dim, got dim={dim}, num_heads={num_heads}")
        self.grid = _pair(grid, "grid")
        self.agent_shape = _pair(agent_shape, "agent_shape")
        if any(a > g for a, g in zip(self.agent_shape, self.grid)):
            raise ValueError(f"expected agent_shape no larger than grid, got agent_shape={self.agent_shape}, "
                             f"grid={self.grid}")
        if kv_reduction < 1 or any(g % kv_reduction for g in self.grid):
            raise ValueError(f"expected kv_reduction >= 1 dividing grid={self.grid}, got {kv_reduction=}")
        qkv_mode = qkv_mode or ("q_kv" if kv_reduction > 1 else "qkv")
        if qkv_mode not in ("qkv", "q_kv", "none"):
            raise ValueError(f"expected qkv_mode in ('qkv', 'q_kv', 'none'), got {qkv_mode=}")
        if qkv_mode == "none" and kv_reduction > 1:
            raise ValueError("qkv_mode='none' cannot apply a kv_reduction (the block owns the projections)")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_prefix_tokens, self.kv_reduction, self.qkv_mode, self.lepe = num_prefix_tokens, kv_reduction, qkv_mode, lepe
        self.backend = backend
        self.attn_drop = float(attn_drop)
        if qkv_mode == "qkv":
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        elif qkv_mode == "q_kv":
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        if kv_reduction > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_reduction, stride=kv_reduction, **dd)
            self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd)
        if qkv_mode != "none":
            self.proj = nn.Linear(dim, dim, **dd)
            self.proj_drop = nn.Dropout(proj_drop)
        conv = nn.Conv2d(dim, dim, kernel_size=dwc_kernel, padding=dwc_kernel // 2, groups=dim, **dd)
        if lepe:
            self.get_v = conv
        else:
            self.dwc = conv
        h, n0 = num_heads, self.agent_shape[0] * self.agent_shape[1]
        H0, W0 = self.grid
        Hk, Wk = H0 // kv_reduction, W0 // kv_reduction
        self.an_bias = nn.Parameter(torch.zeros(h, n0, 7, 7, **dd))
        self.na_bias = nn.Parameter(torch.zeros(h, n0, 7, 7, **dd))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n0, Hk, 1, **dd))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n0, 1, Wk, **dd))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, H0, 1, n0, **dd))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, W0, n0, **dd))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, h, n0, num_prefix_tokens, **dd))
            self.ca_bias = nn.Parameter(torch.zeros(1, h, num_prefix_tokens, n0, **dd))
        self.bias_agent_grid = self.agent_shape  # the agent grid the bias parameters are stored for
        self._bias_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("an", "na", "ah", "aw", "ha", "wa", "ac", "ca"):
            p = getattr(self, f"{name}_bias", None)
            if p is not None:
                trunc_normal_(p, std=0.02)

    @torch.jit.ignore
    def agent_bias(self) -> AgentBias:
        """The bias parameters as an :class:`AgentBias` sharing this layer's cache."""
        return AgentBias.from_module(self, cache=self._bias_cache)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, agent_shape={self.agent_shape}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, kv_reduction={self.kv_reduction}")

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """``x [B, N, C]`` with ``N = num_prefix_tokens + H * W`` for ``grid = (H, W)`` (default the
        configured grid); a grid other than the trained one resamples the biases (§2.4)."""
        if self.qkv_mode == "none":
            raise RuntimeError("this AgentAttention has no projections (qkv_mode='none'); call forward_qkv")
        grid = self.grid if grid is None else (int(grid[0]), int(grid[1]))
        B, N, C = x.shape
        P, r = self.num_prefix_tokens, self.kv_reduction
        if self.qkv_mode == "qkv":
            q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        else:
            q = self.q(x)
            if r > 1:
                xs = x[:, P:].transpose(1, 2).reshape(B, C, grid[0], grid[1])
                xs = self.norm(self.sr(xs).flatten(2).transpose(1, 2))
                xs = torch.cat([x[:, :P], xs], dim=1) if P else xs
            else:
                xs = x
            k, v = self.kv(xs).reshape(B, xs.shape[1], 2, C).unbind(2)
        out = self.forward_qkv(q, k, v, grid)
        return self.proj_drop(self.proj(out))

    def forward_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    grid: Sequence[int] | None = None) -> torch.Tensor:
        """Attention plus DWC from projected ``q [B, N, C]``, ``k, v [B, N_k, C]``; no output projection."""
        grid = self.grid if grid is None else (int(grid[0]), int(grid[1]))
        B, N, C = q.shape
        H, D, P, r = self.num_heads, self.head_dim, self.num_prefix_tokens, self.kv_reduction
        Nk = k.shape[1]
        # visattn extension: on a grid smaller than the agent grid (tiny inputs) the agent grid is
        # clipped to it and the biases resampled along the agent grid; never the case at trained sizes
        agent_shape = (min(self.agent_shape[0], grid[0]), min(self.agent_shape[1], grid[1]))
        out = agent_attention(
            q.reshape(B, N, H, D), k.reshape(B, Nk, H, D), v.reshape(B, Nk, H, D),
            agent_shape=agent_shape, grid=grid, bias=self.agent_bias(),
            dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend,
        ).reshape(B, N, C)
        kg = (grid[0] // r, grid[1] // r)
        # DWC in channels_last: V's tokens are already [B, H, W, C] in memory, so the conv input needs at
        # most one copy (V is a slice of the qkv output) and its output views back as tokens for free
        vg = v[:, P:].reshape(B, kg[0], kg[1], C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        if r > 1:
            vg = F.interpolate(vg, size=grid, mode="bilinear", align_corners=False)
        conv = self.get_v if self.lepe else self.dwc
        d = conv(vg).permute(0, 2, 3, 1).reshape(B, grid[0] * grid[1], C)  # [B, H*W, C]
        if P:
            return torch.cat([out[:, :P], out[:, P:] + d], dim=1)
        return out + d
