"""Agent-PVT: Pyramid Vision Transformer (v1) with agent attention in every block (timm backbones).

"Agent Attention: On the Integration of Softmax and Linear Attention" (https://arxiv.org/abs/2312.08874),
on "Pyramid Vision Transformer" (https://arxiv.org/abs/2102.12122). Per stage: patch embedding (4, then
2) with LayerNorm, a learned ``pos_embed`` (bilinearly resampled for other sizes), agent blocks with
separate ``q``/``kv`` projections (``agent_sr_ratios`` 1 as released). No cls token and no final norm:
the head averages the stage-4 tokens. Stages take and return NCHW. Contents: ``AgentPvtBlock``,
``AgentPvtStage``, ``AgentPvt``, ``checkpoint_filter_fn`` and the registered ``agent_pvt_*`` variants.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers.agent import AgentAttention
from ._agent_common import agent_cfg, agent_shape_of, resample_agent_biases, unwrap_state_dict

__all__ = ["AgentPvt", "AgentPvtStage", "AgentPvtBlock"]


class AgentPvtBlock(nn.Module):
    """Pre-norm block: agent attention (``q`` + ``kv`` naming) and an MLP; tokens ``[B, H*W, C]``."""

    def __init__(self, dim, num_heads, grid, agent_shape, sr_ratio=1, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0,
                 attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(dim, num_heads, grid=grid, agent_shape=agent_shape, kv_reduction=sr_ratio,
                                   qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, backend=backend,
                                   qkv_mode="q_kv", **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentPvtStage(nn.Module):
    """Patch embedding + ``pos_embed`` + agent blocks; NCHW in and out."""

    def __init__(self, in_chs, dim, patch_size, grid, depth, num_heads, agent_shape, sr_ratio, mlp_ratio, qkv_bias,
                 proj_drop, attn_drop, drop_path, pos_drop, norm_layer, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.grid = grid
        # upstream's patch-embed norm is a plain LayerNorm (eps 1e-5), unlike the blocks' (1e-6)
        self.patch_embed = PatchEmbed(None, patch_size, in_chs, dim, norm_layer=nn.LayerNorm, output_fmt="NHWC",
                                      strict_img_size=False, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim, **dd))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.Sequential(*[
            AgentPvtBlock(dim, num_heads, grid, agent_shape, sr_ratio, mlp_ratio, qkv_bias, proj_drop, attn_drop,
                          drop_path[j], norm_layer, backend, **dd) for j in range(depth)])

    def _pos(self, H: int, W: int) -> torch.Tensor:
        if (H, W) == tuple(self.grid):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, self.grid[0], self.grid[1], -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(H, W), mode="bilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, H, W, C]
        B, H, W, C = x.shape
        x = self.pos_drop(x.reshape(B, H * W, C) + self._pos(H, W))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (H, W), use_reentrant=False)
            else:
                x = blk(x, (H, W))
        return x.transpose(1, 2).reshape(B, C, H, W)


class AgentPvt(nn.Module):
    """Agent-PVT (spec agent.md §2.5, §5.2). Input NCHW; ``forward_features`` returns the NCHW stage-4 map
    (no final norm, as upstream); the head averages it."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, global_pool="avg", embed_dims=(64, 128, 320, 512),
                 num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3), agent_num=(9, 16, 49, 49),
                 agent_sr_ratios=(1, 1, 1, 1), qkv_bias=True, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, val in (("depths", depths), ("embed_dims", embed_dims), ("num_heads", num_heads),
                          ("agent_num", agent_num), ("agent_sr_ratios", agent_sr_ratios)):
            if not isinstance(val, (tuple, list)) or not all(isinstance(v, int) for v in val):
                raise TypeError(f"expected {name} to be a tuple of ints, got {name}={val!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"expected global_pool in ('avg', ''), got {global_pool=}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        grid, in_chs, reduction = img_size, in_chans, 1
        for i in range(len(depths)):
            p = 4 if i == 0 else 2
            grid, reduction = (grid[0] // p, grid[1] // p), reduction * p
            stages.append(AgentPvtStage(in_chs, embed_dims[i], p, grid, depths[i], num_heads[i],
                                        agent_shape_of(agent_num[i]), agent_sr_ratios[i], mlp_ratios[i], qkv_bias,
                                        proj_drop_rate, attn_drop_rate, dpr[i], drop_rate, norm_layer, backend, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            in_chs = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f"stages.{i}.pos_embed" for i in range(len(self.stages))}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^stages\.0\.(?:patch_embed|pos_embed)", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"expected global_pool in ('avg', ''), got {global_pool=}")
            self.global_pool = global_pool
        dev = self.stages[0].patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        if output_fmt != "NCHW":
            raise ValueError(f"expected output_fmt='NCHW', got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_UPSTREAM = [(re.compile(r"^patch_embed(\d)\."), "stages.{}.patch_embed."), (re.compile(r"^pos_embed(\d)$"),
             "stages.{}.pos_embed"), (re.compile(r"^block(\d)\."), "stages.{}.blocks.")]


def checkpoint_filter_fn(state_dict: dict, model: AgentPvt, use_ema: bool = False) -> dict:
    """Upstream Agent-PVT checkpoint -> this model (spec §5.3): per-stage names move under ``stages``,
    ``pos_embed`` is bilinearly resampled and the agent biases follow the model's grids."""
    state_dict = unwrap_state_dict(state_dict, use_ema)
    out = {}
    for k, v in state_dict.items():
        for pat, repl in _UPSTREAM:
            m = pat.match(k)
            if m:
                k = pat.sub(repl.format(int(m.group(1)) - 1), k, count=1)
                break
        if k.endswith("pos_embed") and k.startswith("stages."):
            stage = model.stages[int(k.split(".")[1])]
            if v.shape != stage.pos_embed.shape:
                g0 = int(round(v.shape[1] ** 0.5))
                v = F.interpolate(v.reshape(1, g0, g0, -1).permute(0, 3, 1, 2), size=tuple(stage.grid),
                                  mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        out[k] = v
    return resample_agent_biases(out, model)


def to_upstream_state_dict(state_dict: dict) -> dict:
    """Inverse of :func:`checkpoint_filter_fn`'s renaming (parity tests only)."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^stages\.(\d)\.(patch_embed\.|pos_embed$|blocks\.)", k)
        if m:
            s, what = int(m.group(1)) + 1, m.group(2)
            new = {"patch_embed.": f"patch_embed{s}.", "pos_embed": f"pos_embed{s}", "blocks.": f"block{s}."}[what]
            k = new + k[m.end():]
        out[k] = v
    return out


def _create_agent_pvt(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(AgentPvt, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


_C = dict(first_conv="stages.0.patch_embed.proj", classifier="head")
default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny": agent_cfg(**_C),
    "agent_pvt_small": agent_cfg(**_C),
    "agent_pvt_medium": agent_cfg(**_C),
    "agent_pvt_medium_256": agent_cfg(**_C, input_size=(3, 256, 256), pool_size=(8, 8)),
    "agent_pvt_large": agent_cfg(**_C),
})


def _build(name, pretrained, kwargs, **model_args):
    return _create_agent_pvt(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_tiny(pretrained=False, **kwargs) -> AgentPvt:
    return _build("agent_pvt_tiny", pretrained, kwargs, depths=(2, 2, 2, 2))


@register_model
def agent_pvt_small(pretrained=False, **kwargs) -> AgentPvt:
    return _build("agent_pvt_small", pretrained, kwargs, depths=(3, 4, 6, 3))


@register_model
def agent_pvt_medium(pretrained=False, **kwargs) -> AgentPvt:
    return _build("agent_pvt_medium", pretrained, kwargs, depths=(3, 4, 18, 3))


@register_model
def agent_pvt_medium_256(pretrained=False, **kwargs) -> AgentPvt:
    return _build("agent_pvt_medium_256", pretrained, kwargs, img_size=256, depths=(3, 4, 18, 3))


@register_model
def agent_pvt_large(pretrained=False, **kwargs) -> AgentPvt:
    return _build("agent_pvt_large", pretrained, kwargs, depths=(3, 8, 27, 3))
