"""Bi-level routing attention layers (BiFormer).

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023,
https://arxiv.org/abs/2303.08810). :class:`BilevelRoutingAttention` is the BRA block attention of
stages 1-3 (packed ``qkv`` projection, local context enhancement ``lepe``, output projection ``proj``)
and calls :func:`visattn.ops.bilevel_routing_attention`; :class:`AttentionLePE` is the full attention
of stage 4 with its quirks (specs/routing.md §2.5-2.8, §3.4). Both take and return NHWC maps.

The module does not use ``from __future__ import annotations``: TorchScript must read the ``Final``
class annotations as objects. ``BilevelRoutingAttention.forward`` is ``@torch.jit.ignore``: a scripted
BiFormer runs its BRA layers through Python (the routing and the op are Python-level); everything
else, ``AttentionLePE`` included, is TorchScript.
"""

from typing import Final, List

import torch
import torch.nn.functional as F
from timm.layers import is_exportable, is_scriptable
from torch import nn

from ..ops._dispatch import current_backend
from ..ops.bilevel_routing import bilevel_routing_attention, region_grid

__all__ = ["BilevelRoutingAttention", "AttentionLePE"]

_PADDINGS = ("mask", "legacy", "legacy_nchw")


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} to be an int, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {name}={value!r}")
    return value


def _lepe(dim: int, kernel: int, dd: dict) -> nn.Module | None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 0:
        raise ValueError(f"expected lepe_kernel to be 0 (off) or an odd int >= 1, got lepe_kernel={kernel!r}")
    if kernel == 0:
        return None
    if kernel % 2 == 0:
        raise ValueError(
            f"expected an odd lepe_kernel (zero padding kernel // 2 keeps the size), got {kernel=}"
        )
    return nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, **dd)


class BilevelRoutingAttention(nn.Module):
    """Bi-level routing attention over an NHWC map (BiFormer's BRA).

    Equivalent PyTorch: ``q, k, v = qkv(x).split([qk_dim, qk_dim, dim])``, then
    :func:`visattn.ops.bilevel_routing_attention_ref` per head with ``scale = qk_dim ** -0.5``, plus
    ``lepe(v)`` (depthwise conv over the V map), then ``proj``.

    Args:
        dim: channels C of ``x: [B, H, W, C]``.
        num_heads: heads m (``dim`` and ``qk_dim`` must be divisible by it).
        n_win: regions per axis (int or ``(n_H, n_W)``); default 7.
        topk: routed regions per query region; clamped to the region count when ``clamp_topk``.
        qk_dim: q/k channels (default ``dim``).
        qk_scale: softmax and routing scale; default ``qk_dim ** -0.5`` (BiFormer's quirk: the whole
            qk width, not the head dim). 0.0 is used as given.
        qkv_bias: bias of the packed ``qkv`` Linear ``C -> 2 qk_dim + C``.
        lepe_kernel: odd kernel of the depthwise LCE conv on V (BiFormer models: 5); 0 disables it.
        param_attention: ``"qkvo"`` (with output projection) or ``"qkv"`` (``proj`` is Identity).
        region_size: tokens per region and axis instead of ``n_win`` (any input size keeps the same
            region geometry).
        padding: ``"mask"`` (default: non-divisible maps get partial regions, padded keys do not
            exist), ``"legacy"`` (BiFormer ``auto_pad``: zeros appended to ``x`` before ``qkv``),
            ``"legacy_nchw"`` (BiFormer's nchw refactor: zero-padded q, k, v after ``qkv``).
        clamp_topk: use ``min(topk, P)`` on small maps (default True) instead of raising.
        routing: ``"hard"`` (every released model) or ``"soft"`` (torch backend only).
        backend: forwarded to the op (None: ``visattn.use_backend``'s choice, default ``"auto"``).

    Raises:
        ValueError: indivisible dims, even ``lepe_kernel``, unknown options, unsupported BiFormer
            options (``diff_routing`` with hard routing, ``kv_downsample_mode`` other than identity).
    """

    use_kernel: Final[bool]
    num_heads: Final[int]
    qk_dim: Final[int]
    dim: Final[int]
    padding: Final[str]
    clamp_topk: Final[bool]
    n_win_hw: List[int]
    region_hw: List[int]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win=7,
        topk: int = 4,
        *,
        qk_dim=None,
        qk_scale=None,
        qkv_bias: bool = True,
        lepe_kernel: int = 5,
        param_attention: str = "qkvo",
        region_size=None,
        padding: str = "mask",
        clamp_topk: bool = True,
        routing: str = "hard",
        diff_routing: bool = False,
        kv_downsample_mode: str = "identity",
        backend=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        qk_dim = dim if qk_dim is None else qk_dim
        for name, val in (("dim", dim), ("num_heads", num_heads), ("qk_dim", qk_dim), ("topk", topk)):
            _check_int(name, val)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(
                f"expected dim and qk_dim divisible by num_heads, got {dim=}, {qk_dim=}, {num_heads=}"
            )
        if padding not in _PADDINGS:
            raise ValueError(f"expected padding in {_PADDINGS}, got padding={padding!r}")
        if routing not in ("hard", "soft"):
            raise ValueError(f"expected routing in ('hard', 'soft'), got routing={routing!r}")
        if diff_routing:
            raise ValueError(
                "diff_routing=True is not supported: the routing index carries no gradient "
                f"(BiFormer raises for hard routing too), got {diff_routing=}, {routing=}"
            )
        if kv_downsample_mode != "identity":
            raise ValueError(
                f"expected kv_downsample_mode='identity' (the only mode released models use), "
                f"got kv_downsample_mode={kv_downsample_mode!r}"
            )
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"expected param_attention in ('qkvo', 'qkv'), got {param_attention=}")
        if (n_win is None) == (region_size is None):
            raise ValueError(f"expected exactly one of n_win and region_size, got {n_win=}, {region_size=}")
        if padding == "legacy" and region_size is not None:
            raise ValueError("padding='legacy' pads to an n_win x n_win grid; pass n_win, not region_size")
        region_grid((64, 64), n_win, region_size=region_size)  # validates n_win / region_size early
        if isinstance(clamp_topk, str) or isinstance(qkv_bias, str):
            raise TypeError(f"expected bools, got {clamp_topk=}, {qkv_bias=}")
        self.dim, self.num_heads, self.qk_dim = dim, num_heads, qk_dim
        self.n_win = n_win
        self.region_size = region_size
        # TorchScript-friendly copies: [] when unused
        self.n_win_hw: List[int] = (
            [] if n_win is None else list(n_win) if isinstance(n_win, (tuple, list)) else [n_win, n_win]
        )
        self.region_hw: List[int] = (
            []
            if region_size is None
            else list(region_size)
            if isinstance(region_size, (tuple, list))
            else [region_size, region_size]
        )
        self.topk = topk
        self.scale = float(qk_scale) if qk_scale is not None else qk_dim**-0.5
        self.padding = padding
        self.clamp_topk = bool(clamp_topk)
        self.routing = routing
        self.backend = backend
        self.backend_name = "" if backend is None else str(backend)  # "" = the use_backend default
        resolved = backend if backend is not None else current_backend()
        self.use_kernel = not (is_scriptable() or is_exportable()) and resolved != "torch"
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias, **dd)
        self.lepe = _lepe(dim, lepe_kernel, dd)
        self.proj = nn.Linear(dim, dim, **dd) if param_attention == "qkvo" else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, n_win={self.n_win}, "
            f"region_size={self.region_size}, topk={self.topk}, scale={self.scale:.4g}, padding={self.padding!r}, "
            f"routing={self.routing!r}, backend={self.backend!r}"
        )

    def forward(self, x: torch.Tensor, return_routing: bool = False) -> torch.Tensor:
        """``x: [B, H, W, C]`` -> ``[B, H, W, C]`` (and the :class:`~visattn.ops.RegionRouting` when
        ``return_routing``; not in TorchScript, where the routed attention runs as an ignored call)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, H, W, {self.dim}], got x.shape={list(x.shape)}")
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        pad_h, pad_w = 0, 0
        if self.padding == "legacy":  # BiFormer auto_pad: zeros appended to x before the projection
            pad_h = (self.n_win_hw[0] - H % self.n_win_hw[0]) % self.n_win_hw[0]
            pad_w = (self.n_win_hw[1] - W % self.n_win_hw[1]) % self.n_win_hw[1]
            if pad_h > 0 or pad_w > 0:
                x = F.pad(x, [0, 0, 0, pad_w, 0, pad_h])
        Hp, Wp = H + pad_h, W + pad_w
        qkv = self.qkv(x)
        d_qk = self.qk_dim // self.num_heads
        # strided views of the packed projection, [B, H, W, heads, d]. ``split`` rather than three
        # slices: its backward writes dqkv with one ``cat``, where each slice's backward would fill a
        # zero tensor of qkv's size and the three would then be summed
        q, k, v_map = qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        q = q.unflatten(-1, [self.num_heads, d_qk])
        k = k.unflatten(-1, [self.num_heads, d_qk])
        v = v_map.unflatten(-1, [self.num_heads, self.dim // self.num_heads])
        backend = self.backend_name if self.use_kernel else "torch"
        if torch.jit.is_scripting():
            out = _bra_attend_scripted(
                q,
                k,
                v,
                self.n_win_hw,
                self.region_hw,
                self.topk,
                self.clamp_topk,
                self.scale,
                self.padding,
                self.routing,
                backend,
            )
        else:
            out, routing = _bra_attend(
                q,
                k,
                v,
                self.n_win_hw,
                self.region_hw,
                self.topk,
                self.clamp_topk,
                self.scale,
                self.padding,
                self.routing,
                backend,
            )
        out = out.reshape(B, Hp, Wp, self.dim)
        if self.lepe is not None:
            # a dense NHWC copy of v: on the strided slice the depthwise conv takes torch's generic
            # kernel, ~3x slower than cuDNN's channels-last one (forward and backward, H100)
            out = out + self.lepe(v_map.contiguous().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if pad_h > 0 or pad_w > 0:
            out = out[:, :H, :W]
        y = self.proj(out)
        if not torch.jit.is_scripting():
            if return_routing:
                return y, routing  # type: ignore[return-value]
        return y


def _bra_attend(
    q,
    k,
    v,
    n_win: List[int],
    region: List[int],
    topk: int,
    clamp_topk: bool,
    scale: float,
    padding: str,
    routing: str,
    backend: str,
):
    """The layer's op call: ``n_win`` / ``region`` are ``[]`` when unused; returns ``(out, routing)``."""
    op_padding = "zeros" if padding == "legacy_nchw" else "mask"
    n_win_ = tuple(n_win) if n_win else None
    region_ = tuple(region) if region else None
    _, grid = region_grid(q.shape[1:3], n_win_, region_size=region_, padding=op_padding)
    topk = min(topk, grid[0] * grid[1]) if clamp_topk else topk
    return bilevel_routing_attention(
        q,
        k,
        v,
        n_win_,
        topk=topk,
        region_size=region_,
        scale=scale,
        padding=op_padding,
        routing=routing,
        return_routing=True,
        backend=None if backend == "" else backend,
    )


@torch.jit.ignore
def _bra_attend_scripted(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: List[int],
    region: List[int],
    topk: int,
    clamp_topk: bool,
    scale: float,
    padding: str,
    routing: str,
    backend: str,
) -> torch.Tensor:
    # TorchScript calls this through Python (the op and its routing are Python-level)
    return _bra_attend(q, k, v, n_win, region, topk, clamp_topk, scale, padding, routing, backend)[0]


class AttentionLePE(nn.Module):
    """Full multi-head attention with a depthwise LePE term: BiFormer's stage-4 attention.

    Quirks kept (specs/routing.md §2.8): 8 heads by default whatever the width, the standard
    ``head_dim ** -0.5`` scale, a ``qkv`` Linear without bias, and the LePE conv on the module input
    ``x`` (``lepe_source="x"``, legacy models) or on ``v`` (``"v"``, the nchw STL). Attention runs
    through ``F.scaled_dot_product_attention``.

    Args:
        dim: channels C of ``x: [B, H, W, C]``; num_heads: heads (default 8); qkv_bias: default False;
        qk_scale: default ``(dim // num_heads) ** -0.5``; lepe_kernel: odd, 0 disables;
        lepe_source: ``"x"`` or ``"v"``; backend: accepted for symmetry (SDPA picks its own kernel).
    """

    num_heads: Final[int]
    lepe_on_v: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        qk_scale=None,
        lepe_kernel: int = 5,
        lepe_source: str = "x",
        backend=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        _check_int("dim", dim)
        _check_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"expected dim divisible by num_heads, got {dim=}, {num_heads=}")
        if lepe_source not in ("x", "v"):
            raise ValueError(f"expected lepe_source in ('x', 'v'), got lepe_source={lepe_source!r}")
        self.dim, self.num_heads = dim, num_heads
        self.scale = float(qk_scale) if qk_scale is not None else (dim // num_heads) ** -0.5
        self.lepe_on_v = lepe_source == "v"
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.lepe = _lepe(dim, lepe_kernel, dd)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale:.4g}, lepe_on_v={self.lepe_on_v}"
        )

    def forward(self, x: torch.Tensor, return_routing: bool = False) -> torch.Tensor:
        """``x: [B, H, W, C]`` -> ``[B, H, W, C]``. ``return_routing`` must be False (full attention
        has no routing); it exists so that blocks call every BiFormer attention the same way."""
        if return_routing:
            raise ValueError("AttentionLePE is full attention: it has no routing to return")
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, d]; unbind's backward is one stack, not 3 zero fills
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            src = v.transpose(1, 2).reshape(B, H, W, C) if self.lepe_on_v else x
            out = out + self.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)
