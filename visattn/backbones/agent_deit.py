"""Agent-DeiT: DeiT (timm's VisionTransformer) with agent attention in its first blocks (timm backbones).

"Agent Attention: On the Integration of Softmax and Linear Attention" (https://arxiv.org/abs/2312.08874),
on "Training data-efficient image transformers" (https://arxiv.org/abs/2012.12877). The model is timm's
``VisionTransformer`` (cls token, qkv bias, LayerNorm eps 1e-6, final norm, cls head) whose first
``agent_layers`` blocks are replaced by agent blocks: agents pooled from the patch queries, cls-token
biases ``ac_bias``/``ca_bias``, DWC on the patch tokens. It keeps timm ViT's parameter names, so
upstream checkpoints load with only ``pos_embed`` and agent-bias resampling. Isotropic: features are
NLC with the cls token first. Contents: ``AgentDeitBlock``, ``AgentDeit``, ``checkpoint_filter_fn`` and
the registered ``agent_deit_*`` variants.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..layers.agent import AgentAttention
from ._agent_common import agent_cfg, agent_shape_of, resample_agent_biases, unwrap_state_dict

__all__ = ["AgentDeit", "AgentDeitBlock"]


class AgentDeitBlock(nn.Module):
    """Pre-norm block with agent attention over ``[cls] + grid`` tokens ``[B, 1 + H*W, C]``.

    The token grid is set by :class:`AgentDeit` before the blocks run (``self.grid``), so the block keeps
    timm's ``block(x)`` call convention.
    """

    def __init__(self, dim, num_heads, grid, agent_shape, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0,
                 attn_drop=0.0, drop_path=0.0, norm_layer=None, act_layer=nn.GELU, backend=None,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grid = tuple(grid)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(dim, num_heads, grid=grid, agent_shape=agent_shape, num_prefix_tokens=1,
                                   qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, backend=backend, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("agent attention blocks take no attn_mask / is_causal")
        x = x + self.drop_path(self.attn(self.norm1(x), self.grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentDeit(VisionTransformer):
    """Agent-DeiT (spec agent.md §2.5, §5.2): timm's ViT with agent blocks ``0 .. agent_layers - 1``.

    Args:
        agent_num: agents of the agent blocks (a square).
        agent_layers: how many leading blocks are agent blocks (``-1``: all).
        backend: agent-attention backend (``None``: ``"auto"``).
        Other arguments as timm's ``VisionTransformer`` (``dynamic_img_size`` is on: any input size).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token", embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, agent_num=49, agent_layers=-1,
                 drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 backend=None, device=None, dtype=None):
        if not isinstance(agent_num, int) or not isinstance(agent_layers, int):
            raise TypeError(f"expected int agent_num and agent_layers, got {agent_num=}, {agent_layers=}")
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, dynamic_img_size=True, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            device=device, dtype=dtype,
        )
        n_agent = depth if agent_layers < 0 else min(agent_layers, depth)
        grid = tuple(self.patch_embed.grid_size)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        norm_layer = type(self.norm)
        eps = self.norm.eps
        for i in range(n_agent):
            blk = AgentDeitBlock(embed_dim, num_heads, grid, agent_shape_of(agent_num), mlp_ratio, qkv_bias,
                                 proj_drop_rate, attn_drop_rate, dpr[i],
                                 norm_layer=lambda d, **kw: norm_layer(d, eps=eps, **kw), backend=backend,
                                 device=device, dtype=dtype)
            blk.apply(self._init_agent_weights)
            self.blocks[i] = blk

    @staticmethod
    def _init_agent_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x arrives as [B, H, W, C] (dynamic_img_size): tell the agent blocks the token grid
        grid = (x.shape[1], x.shape[2])
        for blk in self.blocks:
            if isinstance(blk, AgentDeitBlock):
                blk.grid = grid
        return super()._pos_embed(x)


def checkpoint_filter_fn(state_dict: dict, model: AgentDeit, use_ema: bool = False) -> dict:
    """Upstream Agent-DeiT checkpoint -> this model (spec §5.3): names are timm ViT's; ``pos_embed`` is
    resampled (1 prefix token) and the agent biases follow the model's grid and agent count."""
    state_dict = unwrap_state_dict(state_dict, use_ema)
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            g0 = int(round((v.shape[1] - 1) ** 0.5))
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, old_size=(g0, g0),
                                       num_prefix_tokens=1, verbose=False)
        out[k] = v
    return resample_agent_biases(out, model)


def _create_agent_deit(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(AgentDeit, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)


_C = dict(first_conv="patch_embed.proj", classifier="head", pool_size=(14, 14))
default_cfgs = generate_default_cfgs({
    "agent_deit_tiny": agent_cfg(**_C),
    "agent_deit_small": agent_cfg(**_C),
    "agent_deit_small_448": agent_cfg(**{**_C, "pool_size": (28, 28)}, input_size=(3, 448, 448), crop_pct=1.0),
    "agent_deit_base": agent_cfg(**_C),
})


def _build(name, pretrained, kwargs, **model_args):
    return _create_agent_deit(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_tiny(pretrained=False, **kwargs) -> AgentDeit:
    return _build("agent_deit_tiny", pretrained, kwargs, embed_dim=192, num_heads=3)


@register_model
def agent_deit_small(pretrained=False, **kwargs) -> AgentDeit:
    return _build("agent_deit_small", pretrained, kwargs, embed_dim=384, num_heads=6)


@register_model
def agent_deit_small_448(pretrained=False, **kwargs) -> AgentDeit:
    return _build("agent_deit_small_448", pretrained, kwargs, img_size=448, embed_dim=384, num_heads=6)


@register_model
def agent_deit_base(pretrained=False, **kwargs) -> AgentDeit:
    return _build("agent_deit_base", pretrained, kwargs, embed_dim=768, num_heads=12, agent_num=81, agent_layers=4)
