"""NAT and DiNAT: hierarchical neighborhood-attention backbones, registered with timm.

"Neighborhood Attention Transformer" (Hassani et al., CVPR 2023, https://arxiv.org/abs/2204.07143) and
"Dilated Neighborhood Attention Transformer" (https://arxiv.org/abs/2209.15001); architecture and
checkpoints from ``SHI-Labs/Neighborhood-Attention-Transformer`` (``classification/nat.py``,
``dinat.py``). DiNAT is NAT with per-block dilations, so one class serves both.

visattn layout (specs/neighborhood.md §5, specs/timm.md §5-6): ``patch_embed`` (two 3x3/2 convs + LN),
``stages.{i}`` (downsampler at the *start* of stages 1-3: 3x3/2 conv without bias + LN, then blocks),
``norm``, ``head.fc``. Stages take and return NCHW; blocks run channels-last, one permute pair per
stage. Layer norms in NCHW are timm's ``LayerNorm2d`` with upstream's eps 1e-5, so their weights load
unchanged. Windows larger than a small map are handled like NATTEN <= 0.15 (``small_input="legacy_pad"``).
:func:`checkpoint_filter_fn` loads the original checkpoints and the Hugging Face ``nat-*``/``dinat-*``
layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, LayerScale, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn

from ..layers.neighborhood import NeighborhoodAttention2D
from ._cfgs import NAT_CFGS, NAT_VARIANTS

__all__ = ["NAT", "NATBlock", "NATStage", "HierarchicalNA"]

# FX feature extraction treats the attention layer as a leaf (its op is not traceable)
register_notrace_module(NeighborhoodAttention2D)


def _check_tuple(value, n: int, name: str, kind=int) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise TypeError(f"expected {name} to be a tuple of {n} {kind.__name__}s, got {name}={value!r}")
    for x in value:
        if not isinstance(x, kind) or isinstance(x, bool):
            raise TypeError(f"expected {name} to be a tuple of {n} {kind.__name__}s, got {name}={value!r}")
    return tuple(value)


class NATBlock(nn.Module):
    """Pre-norm transformer block on ``[B, H, W, C]``: NA with RPB, then MLP; optional layer scale."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 act_layer: Callable = nn.GELU, norm_eps: float = 1e-5, small_input: str = "legacy_pad",
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias,
                                            qk_scale=qk_scale, rel_pos_bias=True, attn_drop=attn_drop,
                                            proj_drop=proj_drop, small_input=small_input, **dd)
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv without bias, then LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_dim: int, out_dim: int, norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype)
        self.norm = LayerNorm2d(out_dim, eps=norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class ConvStem(nn.Module):
    """NAT's tokenizer: conv3x3/2 (C/2) -> conv3x3/2 (C), no activation, then LayerNorm; NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int, norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, **dd),
        )
        self.norm = LayerNorm2d(embed_dim, eps=norm_eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class NATStage(nn.Module):
    """Optional downsampler, then blocks; NCHW in and out, channels-last inside."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, kernel_size: int,
                 dilations: tuple[int, ...], downsample: bool, drop_path: list[float], block_kwargs: dict,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = ConvDownsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            NATBlock(dim, num_heads, kernel_size, dilations[j], drop_path=drop_path[j], **block_kwargs, **dd)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


def check_nat_args(depths, num_heads, dilations, ints: dict, floats: dict, layer_scale) -> tuple:
    """Type-check constructor kwargs (``--model-kwargs`` strings must raise ``TypeError``, timm.md §8.1).

    Returns ``(depths, num_heads, dilations)`` as tuples, dilations defaulting to all 1 (NAT).
    """
    if not isinstance(depths, (tuple, list)):
        raise TypeError(f"expected depths to be a tuple of ints, got {depths=}")
    depths = _check_tuple(depths, len(depths), "depths")
    n = len(depths)
    num_heads = _check_tuple(num_heads, n, "num_heads")
    if dilations is None:
        dilations = tuple((1,) * d for d in depths)
    if not isinstance(dilations, (tuple, list)) or len(dilations) != n:
        raise TypeError(f"expected dilations to be one tuple per stage ({n}), got {dilations=}")
    dilations = tuple(_check_tuple(dl, depths[i], f"dilations[{i}]") for i, dl in enumerate(dilations))
    check_scalar_args(ints, floats)
    if layer_scale is not None and (isinstance(layer_scale, bool) or not isinstance(layer_scale, (int, float))):
        raise TypeError(f"expected layer_scale to be None or a float, got {layer_scale=}")
    return depths, num_heads, dilations


def check_scalar_args(ints: dict, floats: dict) -> None:
    """``TypeError`` naming the argument for a non-int in ``ints`` or a non-number in ``floats``."""
    for name, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected {name} to be an int, got {name}={v!r}")
    for name, v in floats.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"expected {name} to be a float, got {name}={v!r}")


class HierarchicalNA(nn.Module):
    """The timm model API shared by NAT/DiNAT and DiNAT_s: ``patch_embed`` -> ``stages`` -> ``norm`` -> ``head``.

    Subclasses build ``patch_embed`` and ``stages`` (NCHW in and out), then call :meth:`_init_tail`.
    """

    def _init_tail(self, dims: list[int], num_classes: int, global_pool: str, drop_rate: float, dd: dict) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}") for i, c in enumerate(dims)]
        self.norm = LayerNorm2d(self.num_features, eps=1e-5, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NCHW", **dd)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the selected stages (NCHW), and ``forward_features(x)`` unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"expected output_fmt='NCHW' (NAT stages are NCHW), got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.patch_embed(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last index (and the norm / head); returns the taken indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NAT(HierarchicalNA):
    """NAT / DiNAT (timm model API; see the module docstring).

    Args:
        in_chans, num_classes, global_pool, drop_rate (head dropout), drop_path_rate (linear schedule):
            timm's meanings.
        depths, num_heads: blocks and heads per stage.
        embed_dim: channels of stage 0 (doubled per stage).
        kernel_size: neighborhood size (odd; 7 upstream, 11 for the ``*_11x11`` variants).
        dilations: per stage, the dilation of each block; ``None`` is NAT (all 1).
        mlp_ratio, qkv_bias, qk_scale, layer_scale: block options (``layer_scale`` None = off).
        proj_drop_rate, attn_drop_rate: dropout inside blocks (upstream used ``drop_rate`` for both
            the blocks and ``pos_drop``; timm's ``drop_rate`` is the head dropout).
        small_input: how attention handles maps smaller than ``kernel_size * dilation``
            (``NeighborhoodAttention``); backbones pad like NATTEN <= 0.15.
        device, dtype: factory kwargs.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (3, 4, 6, 5),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        embed_dim: int = 64,
        kernel_size: int = 7,
        dilations: tuple[tuple[int, ...], ...] | None = None,
        mlp_ratio: float = 3.0,
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
            dict(in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim, kernel_size=kernel_size),
            dict(mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate), layer_scale)
        n = len(depths)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.patch_embed = ConvStem(in_chans, embed_dim, **dd)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                            attn_drop=attn_drop_rate, layer_scale=layer_scale, small_input=small_input)
        self.stages = nn.Sequential(*[
            NATStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], kernel_size, dilations[i],
                     downsample=i > 0, drop_path=dpr[i], block_kwargs=block_kwargs, **dd)
            for i in range(n)
        ])
        self._init_tail(dims, num_classes, global_pool, drop_rate, dd)


def _init_weights(m: nn.Module) -> None:
    """Upstream init: Linear trunc-normal std 0.02 with zero bias (RPB tables: the layer's own init)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------ checkpoints


def unwrap_state_dict(state_dict: dict) -> dict:
    """The bare state dict inside ``model`` / ``state_dict`` / ``state_dict_ema`` containers."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return state_dict


def resize_rpb(rpb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Resize an RPB table ``[H, 2k-1, 2k-1]`` bicubically per head (as upstream's ``11x11interp``)."""
    if rpb.shape == shape:
        return rpb
    out = F.interpolate(rpb.float()[:, None], size=tuple(shape[1:]), mode="bicubic", align_corners=False)
    return out[:, 0].to(rpb.dtype)


_HF_RULES = [  # Hugging Face transformers' NatModel / DinatModel names (prefix stripped)
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.layernorm_before\.", r"stages.\1.blocks.\2.norm1."),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.layernorm_after\.", r"stages.\1.blocks.\2.norm2."),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.attention\.self\.rpb$", r"stages.\1.blocks.\2.attn.rpb"),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.attention\.output\.dense\.", r"stages.\1.blocks.\2.attn.proj."),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.intermediate\.dense\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.output\.dense\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head.fc."),
]
_HF_QKV = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
_HF_LS = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.layer_scale_parameters$")
_HF_DOWN = re.compile(r"^encoder\.levels\.(\d+)\.downsample\.(.*)$")


def _from_hf(state_dict: dict) -> dict:
    """Hugging Face layout -> visattn names: q/k/v concatenated in that order into ``attn.qkv``."""
    out, qkv = {}, {}
    for k, v in state_dict.items():
        k = re.sub(r"^(nat|dinat)\.", "", k)
        if m := _HF_QKV.match(k):
            qkv.setdefault((m[1], m[2], m[4]), {})[m[3]] = v
            continue
        if m := _HF_LS.match(k):  # [2, C]: attention then MLP scale
            out[f"stages.{m[1]}.blocks.{m[2]}.ls1.gamma"] = v[0]
            out[f"stages.{m[1]}.blocks.{m[2]}.ls2.gamma"] = v[1]
            continue
        if m := _HF_DOWN.match(k):
            out[f"stages.{int(m[1]) + 1}.downsample.{m[2]}"] = v
            continue
        if k.startswith("pooler"):
            continue
        for pat, rep in _HF_RULES:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    for (i, j, kind), parts in qkv.items():
        out[f"stages.{i}.blocks.{j}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _from_nat_repo(state_dict: dict, level_key: str = "levels") -> dict:
    """Original-repo layout (``levels.*`` NAT/DiNAT, ``layers.*`` DiNAT_s) -> visattn names."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(rf"^{level_key}\.(\d+)\.blocks\.(\d+)\.gamma([12])$", r"stages.\1.blocks.\2.ls\3.gamma", k)
        k = re.sub(rf"^{level_key}\.(\d+)\.blocks\.", r"stages.\1.blocks.", k)
        k = re.sub(rf"^{level_key}\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def finish_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """Resize RPB tables to the model's kernel; checkpoint keys are otherwise kept for a strict load."""
    target = model.state_dict()
    for k, v in list(state_dict.items()):
        if k.endswith(".rpb") and k in target and v.shape != target[k].shape:
            state_dict[k] = resize_rpb(v, target[k].shape)
    return state_dict


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Original NAT/DiNAT checkpoints, Hugging Face ``nat-*``/``dinat-*`` or visattn state dicts -> visattn.

    Mapping in specs/neighborhood.md §5.3. Learnable keys are never dropped (``pretrained_strict``);
    RPB tables are resized bicubically when the model's kernel differs from the checkpoint's.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(("nat.", "dinat.", "embeddings.", "encoder.")) for k in state_dict):
        state_dict = _from_hf(state_dict)
    elif any(k.startswith("levels.") for k in state_dict):
        state_dict = _from_nat_repo(state_dict, "levels")
    return finish_state_dict(dict(state_dict), model)


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(NAT_CFGS)


def _entry(name: str, pretrained: bool, kwargs: dict) -> NAT:
    return _create_nat(name, pretrained=pretrained, **dict(NAT_VARIANTS[name], **kwargs))


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("nat_mini", pretrained, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("nat_tiny", pretrained, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("nat_small", pretrained, kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("nat_base", pretrained, kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_mini", pretrained, kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_tiny", pretrained, kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_small", pretrained, kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_base", pretrained, kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_large", pretrained, kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_large_384", pretrained, kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_large_384_11x11", pretrained, kwargs)


@register_model
def dinat_large_21k(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_large_21k", pretrained, kwargs)


@register_model
def dinat_large_21k_11x11(pretrained: bool = False, **kwargs) -> NAT:
    return _entry("dinat_large_21k_11x11", pretrained, kwargs)
