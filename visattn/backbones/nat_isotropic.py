"""Isotropic NAT / DiNAT: ViT-like columns of neighborhood-attention blocks, registered with timm.

"Dilated Neighborhood Attention Transformer" (https://arxiv.org/abs/2209.15001), isotropic variants
from ``SHI-Labs/Neighborhood-Attention-Transformer`` (``classification/isotropic.py``): a 16x16/16 patch
embedding + LayerNorm (no position embedding, no class token), ``depth`` pre-norm blocks with NA and
its relative positional bias, a final LayerNorm and an average-pooled linear head. DiNAT's blocks
alternate dilation 1 and ``dilation`` (2 upstream), starting with 1. Blocks are NAT's
(:class:`visattn.backbones.nat.NATBlock`, no layer scale), so the parameter names inside a block equal
upstream's.

visattn layout (specs/timm.md §6, isotropic): ``patch_embed.{proj,norm}`` (timm ``PatchEmbed``),
``blocks.{i}`` (upstream ``layers.{i}``), ``norm``, ``head``. Blocks run on ``[B, H, W, C]``;
``forward_features`` returns NLC ``(B, H*W, C)`` like timm's ViTs, and ``forward_intermediates``
returns NCHW or NLC maps per block. Any input size works: the patch embedding pads to a multiple of the
patch size (upstream) and windows larger than a small map are padded like NATTEN <= 0.15.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import global_pool_nlc
from torch import nn

from ._cfgs import ISO_CFGS, ISO_VARIANTS
from .nat import NATBlock, _init_weights, check_scalar_args, finish_state_dict, unwrap_state_dict

__all__ = ["NATIsotropic"]

_POOL_TYPES = ("", "avg", "max", "avgmax")


def _check_pool(global_pool: str) -> str:
    if global_pool not in _POOL_TYPES:
        raise ValueError(f"expected global_pool in {_POOL_TYPES} (no class token), got {global_pool=}")
    return global_pool


class NATIsotropic(nn.Module):
    """Isotropic NAT / DiNAT (timm model API; see the module docstring).

    Args:
        in_chans, num_classes, global_pool (``'avg'``, ``'max'``, ``'avgmax'`` or ``''``), drop_rate
            (head dropout), drop_path_rate (linear schedule): timm's meanings.
        patch_size: patch embedding size and stride (16).
        embed_dim, depth, num_heads: width, blocks and heads.
        kernel_size: neighborhood size (7).
        dilation: dilation of the odd blocks (even blocks use 1); 1 is NAT, 2 DiNAT.
        mlp_ratio, qkv_bias, qk_scale: block options.
        proj_drop_rate, attn_drop_rate: dropout inside blocks.
        small_input: how attention handles maps smaller than ``kernel_size * dilation``
            (``NeighborhoodAttention``); padded like NATTEN <= 0.15 by default.
        device, dtype: factory kwargs.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
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
        ints = dict(in_chans=in_chans, num_classes=num_classes, patch_size=patch_size, embed_dim=embed_dim,
                    depth=depth, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation)
        check_scalar_args(ints, dict(mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate))
        self.num_classes = num_classes
        self.global_pool = _check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(None, patch_size, in_chans, embed_dim,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-5), flatten=False, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True, **dd)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            NATBlock(embed_dim, num_heads, kernel_size, 1 if i % 2 == 0 else dilation, mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                     drop_path=dpr[i], small_input=small_input, **dd)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        w = self.patch_embed.proj.weight
        dd = dict(device=w.device, dtype=w.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the selected blocks (NCHW or NLC), and ``forward_features(x)`` unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"expected output_fmt 'NCHW' or 'NLC', got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y.flatten(1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x.flatten(1, 2)), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last index (and the norm / head); returns the taken indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_blocks(self.patch_embed(x))
        return self.norm(x.flatten(1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=0)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Original isotropic checkpoints (``layers.{i}``) or visattn state dicts -> visattn names.

    ``layers.{i}.*`` -> ``blocks.{i}.*``; every other key (``patch_embed``, ``norm``, ``head``) is
    upstream's. RPB tables are resized when the kernel differs; no learnable key is dropped.
    """
    state_dict = unwrap_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("layers."):
            k = "blocks." + k[len("layers."):]
        out[k] = v
    return finish_state_dict(out, model)


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    return build_model_with_cfg(
        NATIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(ISO_CFGS)


def _entry(name: str, pretrained: bool, kwargs: dict) -> NATIsotropic:
    return _create_nat_isotropic(name, pretrained=pretrained, **dict(ISO_VARIANTS[name], **kwargs))


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _entry("nat_isotropic_small", pretrained, kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _entry("nat_isotropic_base", pretrained, kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _entry("dinat_isotropic_small", pretrained, kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    return _entry("dinat_isotropic_base", pretrained, kwargs)
