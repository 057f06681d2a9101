"""Agent-Swin: Swin Transformer with agent attention in its early stages (timm backbones).

"Agent Attention: On the Integration of Softmax and Linear Attention" (https://arxiv.org/abs/2312.08874),
on "Swin Transformer" (https://arxiv.org/abs/2103.14030). Agent blocks attend over one window covering
the whole map (no shift); standard blocks are timm's shifted-window ``SwinTransformerBlock`` with
window ``max(7, window_size // 8)``. Stages take and return NCHW (views of NHWC memory: no copies).
Contents: ``AgentSwinBlock``, ``AgentSwinStage``, ``AgentSwinTransformer``, ``checkpoint_filter_fn``
(upstream checkpoints, §5.3) and the registered ``agent_swin_*`` variants.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, resize_rel_pos_bias_table, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

from ..layers.agent import AgentAttention
from ._agent_common import agent_cfg, agent_shape_of, resample_agent_biases, stage_attn_types, unwrap_state_dict

__all__ = ["AgentSwinTransformer", "AgentSwinStage", "AgentSwinBlock"]


class _PatchEmbed(PatchEmbed):
    """timm's PatchEmbed (norm over channels) returning an NCHW view of its NHWC output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 3, 1, 2)


class AgentSwinBlock(nn.Module):
    """Pre-norm block with global agent attention; input and output ``[B, H, W, C]``."""

    def __init__(self, dim, input_resolution, num_heads, agent_shape, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, backend=None,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(dim, num_heads, grid=input_resolution, agent_shape=agent_shape, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop, backend=backend, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x), (H, W)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class AgentSwinStage(nn.Module):
    """Patch merging (all but the first stage), then ``num_agent`` agent blocks and Swin blocks; NCHW in/out."""

    def __init__(self, dim, out_dim, input_resolution, depth, num_agent, downsample, num_heads, window_size,
                 agent_shape, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd)
            input_resolution = (input_resolution[0] // 2, input_resolution[1] // 2)
        else:
            self.downsample = nn.Identity()
        self.output_resolution = input_resolution
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        win = max(7, window_size // 8)
        blocks = []
        for i in range(depth):
            if i < num_agent:
                blocks.append(AgentSwinBlock(out_dim, input_resolution, num_heads, agent_shape, mlp_ratio, qkv_bias,
                                             proj_drop, attn_drop, dpr[i], norm_layer=norm_layer, backend=backend, **dd))
            else:
                blocks.append(SwinTransformerBlock(
                    out_dim, input_resolution, num_heads, window_size=win, shift_size=0 if i % 2 == 0 else win // 2,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                    drop_path=dpr[i], norm_layer=norm_layer, **dd))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x.permute(0, 2, 3, 1))  # NHWC inside the stage
        size = (x.shape[1], x.shape[2])
        for blk in self.blocks:
            if isinstance(blk, SwinTransformerBlock):
                # the stored shift mask serves the constructed size; other sizes build theirs per call
                blk.dynamic_mask = tuple(blk.input_resolution) != size
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class AgentSwinTransformer(nn.Module):
    """Agent-Swin (spec agent.md §2.5, §5.2). Input NCHW images; ``forward_features`` returns NCHW.

    Args:
        window_size: upstream's cfg window (56 / 72 / 96); agent blocks cover the whole map, standard
            blocks use ``max(7, window_size // 8)``.
        attn_type: upstream's ``ATTN_TYPE``: per stage ``A`` (agent), ``B`` (Swin) or ``M`` with the
            agent-block count appended (``"AAMB2"``).
        agent_num: agents per stage (squares).
        backend: agent-attention backend (``None``: ``"auto"``).
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56, attn_type="AAAB",
                 agent_num=(9, 16, 49, 49), mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, proj_drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.1, norm_layer=nn.LayerNorm, backend=None,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, val in (("depths", depths), ("num_heads", num_heads), ("agent_num", agent_num)):
            if not isinstance(val, (tuple, list)) or not all(isinstance(v, int) for v in val):
                raise TypeError(f"expected {name} to be a tuple of ints, got {name}={val!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.global_pool = num_classes, global_pool
        n = len(depths)
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (n - 1))
        self.patch_embed = _PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer,
                                      output_fmt="NHWC", strict_img_size=False, **dd)
        res = (img_size[0] // patch_size, img_size[1] // patch_size)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        agents = stage_attn_types(attn_type, depths)
        stages, self.feature_info = [], []
        dim = embed_dim
        for i in range(n):
            out_dim = int(embed_dim * 2**i)
            stage = AgentSwinStage(dim, out_dim, res, depths[i], agents[i], i > 0, num_heads[i], window_size,
                                   agent_shape_of(agent_num[i]), mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate,
                                   dpr[i], norm_layer=norm_layer, backend=backend, **dd)
            stages.append(stage)
            res, dim = stage.output_resolution, out_dim
            self.feature_info.append(dict(num_chs=out_dim, reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NCHW", **dd)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        for s in self.layers:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        if output_fmt != "NCHW":
            raise ValueError(f"expected output_fmt='NCHW', got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        stages = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[: max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self._norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self._norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.patch_embed(x))
        return self._norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: AgentSwinTransformer, use_ema: bool = False) -> dict:
    """Upstream Agent-Swin checkpoint -> this model (spec §5.3): downsample moves to the next stage,
    ``head.*`` -> ``head.fc.*``, index/mask buffers dropped, RPB tables and agent biases resampled."""
    state_dict = unwrap_state_dict(state_dict, use_ema)
    upstream = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        if upstream:
            k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.", "head.fc.", k)
        if k.endswith("relative_position_bias_table"):
            m = model.get_submodule(k[: -len(".relative_position_bias_table")])
            if v.shape != m.relative_position_bias_table.shape:
                v = resize_rel_pos_bias_table(v, new_window_size=m.window_size,
                                              new_bias_shape=m.relative_position_bias_table.shape)
        out[k] = v
    return resample_agent_biases(out, model)


def to_upstream_state_dict(state_dict: dict) -> dict:
    """Inverse of :func:`checkpoint_filter_fn`'s renaming (parity tests only)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[re.sub(r"^head\.fc\.", "head.", k)] = v
    return out


def _create_agent_swin(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(AgentSwinTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


_C = dict(first_conv="patch_embed.proj", classifier="head.fc")
default_cfgs = generate_default_cfgs({
    "agent_swin_tiny": agent_cfg(**_C),
    "agent_swin_small": agent_cfg(**_C),
    "agent_swin_small_288": agent_cfg(**_C, input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0),
    "agent_swin_base": agent_cfg(**_C),
    "agent_swin_base_384": agent_cfg(**_C, input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


def _build(name, pretrained, kwargs, **model_args):
    return _create_agent_swin(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_tiny(pretrained=False, **kwargs) -> AgentSwinTransformer:
    return _build("agent_swin_tiny", pretrained, kwargs, depths=(2, 2, 6, 2), attn_type="AAAB")


@register_model
def agent_swin_small(pretrained=False, **kwargs) -> AgentSwinTransformer:
    return _build("agent_swin_small", pretrained, kwargs, depths=(2, 2, 18, 2), attn_type="AABB")


@register_model
def agent_swin_small_288(pretrained=False, **kwargs) -> AgentSwinTransformer:
    return _build("agent_swin_small_288", pretrained, kwargs, img_size=288, depths=(2, 2, 18, 2), window_size=72,
                  attn_type="AABB")


@register_model
def agent_swin_base(pretrained=False, **kwargs) -> AgentSwinTransformer:
    return _build("agent_swin_base", pretrained, kwargs, embed_dim=128, depths=(2, 2, 18, 2),
                  num_heads=(4, 8, 16, 32), attn_type="AAMB2")


@register_model
def agent_swin_base_384(pretrained=False, **kwargs) -> AgentSwinTransformer:
    return _build("agent_swin_base_384", pretrained, kwargs, img_size=384, embed_dim=128, depths=(2, 2, 18, 2),
                  num_heads=(4, 8, 16, 32), window_size=96, attn_type="AAMB2")
