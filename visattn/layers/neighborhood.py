"""Neighborhood attention layers (NA / DiNA / GNA), NATTEN-compatible.

"Neighborhood Attention Transformer" (https://arxiv.org/abs/2204.07143), "Dilated Neighborhood
Attention Transformer" (https://arxiv.org/abs/2209.15001), "Generalized Neighborhood Attention"
(https://arxiv.org/abs/2504.16922). :class:`NeighborhoodAttention` owns the QKV and output projections
and the optional relative positional bias (RPB) table and calls
:func:`visattn.ops.neighborhood_attention`; ``NeighborhoodAttention1D/2D/3D`` fix the spatial rank for
NATTEN users. Parameter names (``qkv``, ``rpb``, ``proj``) equal NATTEN <= 0.17's, so those module
state dicts load unchanged.

The module does not use ``from __future__ import annotations``: TorchScript must read the ``Final``
class annotations as objects. The op call sits in a ``@torch.jit.ignore`` method: a scripted model keeps the projections in
TorchScript and runs attention through Python, on the ``"torch"`` backend whenever the layer was
built under ``timm.layers.set_scriptable`` / ``set_exportable`` (``use_kernel`` is False).
"""


import math
from typing import Final

import torch
import torch.nn.functional as F
from timm.layers import is_exportable, is_scriptable, trunc_normal_
from torch import nn

from ..ops._dispatch import current_backend
from ..ops.neighborhood import clamp_neighborhood, neighborhood_attention, neighborhood_mask

__all__ = ["NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

_SMALL_INPUT_MODES = ("error", "legacy_pad", "clamp")
_IntOrTuple = int | tuple[int, ...]


def _check_int(value, name: str) -> int:
    # train.py's --model-kwargs turns non-literals into strings and bools are ints: reject both (timm.md §8.1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} to be an int, got {name}={value!r}")
    return value


def _per_axis(value, n: int, name: str, kind: type = int) -> tuple:
    if kind is bool:
        if isinstance(value, bool):
            return (value,) * n
    elif isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"expected {name} to be a {kind.__name__} or a tuple of {n}, got {name}={value!r}")
    if len(value) != n:
        raise ValueError(f"expected {name} to have one entry per spatial axis ({n}), got {name}={value!r}")
    for a, x in enumerate(value):
        if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
            raise TypeError(f"expected {name}[{a}] to be a {kind.__name__}, got {name}[{a}]={x!r}")
    return tuple(value)


def _infer_spatial_dims(*values) -> int:
    for v in values:
        if isinstance(v, (tuple, list)):
            return len(v)
    return 2


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last map ``[B, *spatial, dim]``.

    Equivalent PyTorch: ``proj(neighborhood_attention_ref(q, k, v, kernel_size, ..., rpb=rpb))`` with
    ``q, k, v`` the head-major thirds of ``qkv(x)`` (see :func:`visattn.ops.neighborhood_attention`).

    Args:
        dim: channels of the input and output.
        num_heads: attention heads; ``dim`` must be divisible by it.
        kernel_size: window extent, int or per-axis tuple.
        spatial_dims: 1, 2 or 3; inferred from the first per-axis tuple among ``kernel_size``,
            ``stride``, ``dilation``, ``is_causal``, else 2.
        stride: GNA stride (``1 <= stride <= kernel_size``), int or per-axis tuple. Default 1.
        dilation: DiNA dilation, int or per-axis tuple. Default 1.
        is_causal: causal masking, bool or per-axis tuple. Default False.
        qkv_bias: bias of the QKV projection. Default True.
        qk_scale: attention scale; ``None`` means ``head_dim ** -0.5`` (any given value, 0.0 included,
            is used as is).
        rel_pos_bias: learn a relative positional bias table ``rpb [H, 2k_1-1, ...]`` (NAT/DiNAT).
        attn_drop: attention-probability dropout in training; runs on the ``"torch"`` backend only
            (a dense masked softmax; another backend raises ``NotImplementedError``).
        proj_drop: dropout after the output projection.
        small_input: what to do when ``kernel_size * dilation`` exceeds the input along an axis:
            ``"error"`` (default, the op raises), ``"legacy_pad"`` (NATTEN <= 0.15 / transformers: zero-pad
            the input at the end of each short axis up to ``k * d`` before the QKV projection, crop
            after), ``"clamp"`` (shrink the window with ``clamp_neighborhood``; the RPB table is centre-
            cropped so every offset keeps its bias).
        backend: op backend (``None`` follows ``visattn.use_backend``); forwarded untouched.
        device, dtype: factory kwargs of the parameters.

    Raises:
        TypeError: an argument of the wrong type (e.g. a string where an int is expected).
        ValueError: inconsistent values, naming the argument and axis.
    """

    use_kernel: Final[bool]
    spatial_dims: Final[int]
    num_heads: Final[int]
    head_dim: Final[int]
    small_input: Final[str]
    attn_drop: Final[float]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: _IntOrTuple,
        *,
        spatial_dims: int | None = None,
        stride: _IntOrTuple = 1,
        dilation: _IntOrTuple = 1,
        is_causal: bool | tuple[bool, ...] = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        rel_pos_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        small_input: str = "error",
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim, num_heads = _check_int(dim, "dim"), _check_int(num_heads, "num_heads")
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"expected positive dim divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        n = spatial_dims if spatial_dims is not None else _infer_spatial_dims(kernel_size, stride, dilation, is_causal)
        n = _check_int(n, "spatial_dims")
        if n not in (1, 2, 3):
            raise ValueError(f"expected spatial_dims in (1, 2, 3), got spatial_dims={n}")
        ks = _per_axis(kernel_size, n, "kernel_size")
        st = _per_axis(stride, n, "stride")
        dl = _per_axis(dilation, n, "dilation")
        ca = _per_axis(is_causal, n, "is_causal", bool)
        for a in range(n):
            for name, vals in (("kernel_size", ks), ("stride", st), ("dilation", dl)):
                if vals[a] < 1:
                    raise ValueError(f"expected {name}[{a}] >= 1, got {name}[{a}]={vals[a]}")
            if st[a] > ks[a]:
                raise ValueError(f"stride[{a}]={st[a]} must be <= kernel_size[{a}]={ks[a]}")
        for name, flag in (("qkv_bias", qkv_bias), ("rel_pos_bias", rel_pos_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"expected {name} to be a bool, got {name}={flag!r}")
        if qk_scale is not None and (isinstance(qk_scale, bool) or not isinstance(qk_scale, (int, float))
                                     or not math.isfinite(qk_scale)):
            raise ValueError(f"expected qk_scale to be None or a finite float, got qk_scale={qk_scale!r}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"expected {name} in [0, 1), got {name}={p!r}")
        if small_input not in _SMALL_INPUT_MODES:
            raise ValueError(f"expected small_input in {_SMALL_INPUT_MODES}, got small_input={small_input!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"expected backend to be None or a backend name, got backend={backend!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.spatial_dims = n
        self.kernel_size, self.stride, self.dilation, self.is_causal = ks, st, dl, ca
        self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
        self.small_input = small_input
        self.attn_drop = float(attn_drop)
        self.backend = backend
        # per-axis minimum size under "legacy_pad" (a list: TorchScript cannot index tuples by a variable)
        self.pad_to: list[int] = [k_ * d_ if small_input == "legacy_pad" else 0 for k_, d_ in zip(ks, dl)]
        # kernel path chosen once (timm.md §6): never under scriptable/exportable or the torch backend
        resolved = backend if backend is not None else current_backend()
        self.use_kernel = not (is_scriptable() or is_exportable()) and resolved != "torch"

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in ks), **dd))
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear layers as ``nn.Linear``; the RPB table trunc-normal with std 0.02 (NATTEN)."""
        self.qkv.reset_parameters()
        self.proj.reset_parameters()
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}, scale={self.scale:.4g}, attn_drop={self.attn_drop}, "
                f"small_input={self.small_input!r}, backend={self.backend!r}, use_kernel={self.use_kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, *spatial, dim]`` channels-last -> ``[B, *spatial, dim]``."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError("expected x of shape [B, *spatial, dim] with {} spatial axes, got x.shape={}".format(  # noqa: UP032 (TorchScript)
                self.spatial_dims, list(x.shape)))
        size = [int(s) for s in x.shape[1:-1]]
        pads = self._legacy_pads(size)
        if sum(pads) > 0:
            x = F.pad(x, pads)  # zeros at the end of each short axis, before the projection (NATTEN <= 0.15)
        padded = [int(s) for s in x.shape[1:-1]]
        B = x.shape[0]
        qkv = self.qkv(x).reshape([B] + padded + [3, self.num_heads, self.head_dim])
        q, k, v = qkv.unbind(-3)  # each [B, *spatial, H, D], strided views of the packed projection
        if self.use_kernel and not torch.jit.is_scripting():
            out = self._attend(q, k, v, self.backend)
        else:
            out = self._attend(q, k, v, "torch")
        out = out.reshape([B] + padded + [self.dim])
        if sum(pads) > 0:
            if self.spatial_dims == 1:
                out = out[:, :size[0]]
            elif self.spatial_dims == 2:
                out = out[:, :size[0], :size[1]]
            else:
                out = out[:, :size[0], :size[1], :size[2]]
        return self.proj_drop(self.proj(out))

    def _legacy_pads(self, size: list[int]) -> list[int]:
        """``F.pad`` amounts (last axis first) for ``small_input="legacy_pad"``; all zero otherwise."""
        pads = [0, 0]
        for a in range(self.spatial_dims - 1, -1, -1):
            pads += [0, max(0, self.pad_to[a] - size[a])]
        return pads

    @torch.jit.ignore
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> torch.Tensor:
        size = tuple(q.shape[1:-2])
        ks, st, dl, rpb = self.kernel_size, self.stride, self.dilation, self.rpb
        if self.small_input == "clamp" and any(k_ * d_ > x_ for k_, d_, x_ in zip(ks, dl, size)):
            ks, st, dl = clamp_neighborhood(size, ks, st, dl)
            if rpb is not None:  # keep the central 2k'-1 offsets of each axis: offset o keeps its bias
                rpb = rpb[(slice(None), *(slice(k0 - k1, k0 + k1 - 1) for k0, k1 in zip(self.kernel_size, ks)))]
        if self.training and self.attn_drop > 0.0:
            return self._attend_dropout(q, k, v, ks, st, dl, rpb, backend)
        return neighborhood_attention(q, k, v, ks, stride=st, dilation=dl, is_causal=self.is_causal,
                                      scale=self.scale, rpb=rpb, backend=backend)

    def _attend_dropout(self, q, k, v, ks, st, dl, rpb, backend) -> torch.Tensor:
        """Attention dropout: a dense masked softmax (the reference semantics), torch backend only."""
        resolved = backend if backend is not None else current_backend()
        if resolved not in ("torch", "auto") or (resolved == "auto" and q.device.type != "cpu"):
            raise NotImplementedError(
                f"attention dropout (attn_drop={self.attn_drop}) runs on the 'torch' backend only, got "
                f"backend={resolved!r} on {q.device}; use backend='torch' or attn_drop=0")
        size = tuple(q.shape[1:-2])
        B, H = q.shape[0], q.shape[-2]
        N = math.prod(size)
        mask = neighborhood_mask(size, ks, st, dl, self.is_causal, device=q.device)  # [N, N] bool
        bias = torch.zeros(H, N, N, dtype=q.dtype, device=q.device)
        if rpb is not None:
            coords = torch.unravel_index(torch.arange(N, device=q.device), size)
            idx = [((c[None, :] // d) - (c[:, None] // d) + kk - 1).clamp(0, 2 * kk - 2)
                   for c, d, kk in zip(coords, dl, ks)]
            bias = rpb[(slice(None), *idx)].to(q.dtype)
        bias = bias.masked_fill(~mask, float("-inf"))
        qh, kh, vh = (t.reshape(B, N, H, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, dropout_p=self.attn_drop, scale=self.scale)
        return out.transpose(1, 2).reshape(B, *size, H, v.shape[-1])


class NeighborhoodAttention1D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, L, dim]`` (NATTEN's ``NeighborhoodAttention1D``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: _IntOrTuple, **kwargs) -> None:
        super().__init__(dim, num_heads, kernel_size, spatial_dims=1, **kwargs)


class NeighborhoodAttention2D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, H, W, dim]`` (NATTEN's ``NeighborhoodAttention2D``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: _IntOrTuple, **kwargs) -> None:
        super().__init__(dim, num_heads, kernel_size, spatial_dims=2, **kwargs)


class NeighborhoodAttention3D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, T, H, W, dim]`` (NATTEN's ``NeighborhoodAttention3D``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: _IntOrTuple, **kwargs) -> None:
        super().__init__(dim, num_heads, kernel_size, spatial_dims=3, **kwargs)
