"""DiNAT_s: the Swin-layout variant of DiNAT, registered with timm.

"Dilated Neighborhood Attention Transformer" (https://arxiv.org/abs/2209.15001), ``DiNAT_s`` from
``SHI-Labs/Neighborhood-Attention-Transformer`` (``classification/dinats.py``): a 4x4/4 patch embedding
(padded to a multiple of 4) + LayerNorm, Swin's patch merging between stages, no layer scale, and
blocks that alternate NA and DiNA. Blocks are NAT's (:class:`visattn.backbones.nat.NATBlock`).

visattn layout: ``patch_embed.{proj,norm}`` (timm ``PatchEmbed``), ``stages.{i}`` with the patch
merging at the *start* of stages 1-3 (``downsample.{norm,reduction}``), ``norm``, ``head.fc``.
Stages take and return NCHW (specs/timm.md §6). :func:`checkpoint_filter_fn` maps upstream's
``layers.{i}`` names.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ._cfgs import DINAT_S_CFGS, DINAT_S_VARIANTS
from .nat import (
    HierarchicalNA,
    NATBlock,
    _from_nat_repo,
    check_nat_args,
    finish_state_dict,
    unwrap_state_dict,
)

__all__ = ["DiNATs", "PatchMerging", "DiNATsStage"]


class PatchMerging(nn.Module):
    """Swin patch merging on ``[B, H, W, C]``: 2x2 neighbours concatenated, LayerNorm(4C), Linear 4C->2C.

    Odd sizes are zero-padded at the end (upstream). Concatenation order is upstream's:
    ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``.
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps, device=device, dtype=dtype)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # [B, H/2, 2(h), W/2, 2(w), C] -> [B, H/2, W/2, 2(w), 2(h), C]: (h, w) = (0,0), (1,0), (0,1), (1,1)
        x = x.reshape(B, (H + 1) // 2, 2, (W + 1) // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class DiNATsStage(nn.Module):
    """Optional patch merging, then blocks; NCHW in and out, channels-last inside."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, kernel_size: int,
                 dilations: tuple[int, ...], downsample: bool, drop_path: list[float], block_kwargs: dict,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = PatchMerging(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            NATBlock(dim, num_heads, kernel_size, dilations[j], drop_path=drop_path[j], **block_kwargs, **dd)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x.permute(0, 2, 3, 1))  # [B, C, H, W] -> [B, H, W, C]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class DiNATs(HierarchicalNA):
    """DiNAT_s (timm model API of :class:`~visattn.backbones.nat.HierarchicalNA`).

    Args as :class:`~visattn.backbones.nat.NAT`, plus ``patch_size`` (4) of the stem; ``mlp_ratio``
    4 and no layer scale by default.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        embed_dim: int = 96,
        patch_size: int = 4,
        kernel_size: int = 7,
        dilations: tuple[tuple[int, ...], ...] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        layer_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        small_input: str = "legacy_pad",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        depths, num_heads, dilations = check_nat_args(
            depths, num_heads, dilations,
            dict(in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim, kernel_size=kernel_size,
                 patch_size=patch_size),
            dict(mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate), layer_scale)
        n = len(depths)
        dims = [embed_dim * 2 ** i for i in range(n)]
        # NCHW out with a channel LayerNorm (eps 1e-5 as upstream), so feature wrappers that call the
        # modules in order (features_only) see NCHW at every boundary
        self.patch_embed = PatchEmbed(None, patch_size, in_chans, embed_dim,
                                      norm_layer=partial(LayerNorm2d, eps=1e-5), flatten=False, output_fmt="NCHW",
                                      strict_img_size=False, dynamic_img_pad=True, **dd)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                            attn_drop=attn_drop_rate, layer_scale=layer_scale, small_input=small_input)
        self.stages = nn.Sequential(*[
            DiNATsStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], kernel_size, dilations[i],
                        downsample=i > 0, drop_path=dpr[i], block_kwargs=block_kwargs, **dd)
            for i in range(n)
        ])
        self._init_tail(dims, num_classes, global_pool, drop_rate, dd)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Original DiNAT_s checkpoints (``layers.{i}``) or visattn state dicts -> visattn names.

    ``layers.{i}.blocks.{j}.*`` -> ``stages.{i}.blocks.{j}.*``; ``layers.{i}.downsample.*`` ->
    ``stages.{i+1}.downsample.*``; ``head.*`` -> ``head.fc.*``. RPB tables are resized when the
    kernel differs; no learnable key is dropped.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith("layers.") for k in state_dict):
        state_dict = _from_nat_repo(state_dict, "layers")
    return finish_state_dict(dict(state_dict), model)


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs) -> DiNATs:
    return build_model_with_cfg(
        DiNATs, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(DINAT_S_CFGS)


def _entry(name: str, pretrained: bool, kwargs: dict) -> DiNATs:
    return _create_dinat_s(name, pretrained=pretrained, **dict(DINAT_S_VARIANTS[name], **kwargs))


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_tiny", pretrained, kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_small", pretrained, kwargs)


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_base", pretrained, kwargs)


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_large", pretrained, kwargs)


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_large_384", pretrained, kwargs)


@register_model
def dinat_s_large_21k(pretrained: bool = False, **kwargs) -> DiNATs:
    return _entry("dinat_s_large_21k", pretrained, kwargs)
