"""Agent-CSwin: CSWin Transformer with agent attention in its first two stages (timm backbones).

"Agent Attention: On the Integration of Softmax and Linear Attention" (https://arxiv.org/abs/2312.08874),
on "CSWin Transformer" (https://arxiv.org/abs/2107.00652). Conv stem (7x7, stride 4) + LayerNorm; agent
blocks are single-branch over the whole map with CSwin's LePE conv (``get_v``) as their DWC; standard
blocks keep CSwin's two cross-shaped stripe branches (single full-map branch in the last stage); stages
are joined by 3x3 stride-2 conv merges. Stages take and return NCHW. Maps not divisible by the stripe
width are zero-padded with the padded keys masked. Contents: ``LePEAttention``, ``AgentCSwinBlock``,
``AgentCSwinStage``, ``AgentCSwin``, ``checkpoint_filter_fn`` and the ``agent_cswin_*`` variants.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers.agent import AgentAttention
from ._agent_common import agent_cfg, agent_shape_of, resample_agent_biases, stage_attn_types, unwrap_state_dict

__all__ = ["AgentCSwin", "AgentCSwinStage", "AgentCSwinBlock", "LePEAttention"]


class LePEAttention(nn.Module):
    """CSwin's stripe attention with a locally-enhanced positional encoding (depthwise conv on V per stripe).

    ``idx=-1``: one window covering the map; ``0``: vertical stripes ``split`` wide; ``1``: horizontal
    stripes ``split`` high. Inputs ``q, k, v [B, H*W, C]`` (already projected); output ``[B, H*W, C]``.
    """

    def __init__(self, dim, num_heads, idx, split_size, attn_drop=0.0, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.idx, self.split_size, self.attn_drop = num_heads, idx, split_size, attn_drop
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)

    def _window(self, H: int, W: int) -> tuple[int, int]:
        if self.idx == -1:
            return H, W
        return (H, self.split_size) if self.idx == 0 else (self.split_size, W)

    def forward(self, q, k, v, H: int, W: int) -> torch.Tensor:
        B, N, C = q.shape
        hs, ws = self._window(H, W)
        Hp, Wp = -(-H // hs) * hs, -(-W // ws) * ws
        h = self.num_heads

        def windows(t):  # [B, N, C] -> [B * nW, hs * ws, C], zero-padded to (Hp, Wp)
            t = t.transpose(1, 2).reshape(B, C, H, W)
            t = F.pad(t, (0, Wp - W, 0, Hp - H))
            t = t.reshape(B, C, Hp // hs, hs, Wp // ws, ws).permute(0, 2, 4, 3, 5, 1)
            return t.reshape(-1, hs * ws, C)

        qw, kw, vw = windows(q), windows(k), windows(v)
        lepe = self.get_v(vw.transpose(1, 2).reshape(-1, C, hs, ws)).flatten(2).transpose(1, 2)
        mask = None
        if (Hp, Wp) != (H, W):  # padded keys are masked out (every window keeps at least one real key)
            valid = F.pad(torch.ones(1, 1, H, W, dtype=torch.bool, device=q.device), (0, Wp - W, 0, Hp - H))
            valid = valid.reshape(1, Hp // hs, hs, Wp // ws, ws).permute(1, 3, 0, 2, 4).reshape(-1, 1, 1, hs * ws)
            mask = valid.repeat(B, 1, 1, 1)
        heads = lambda t: t.reshape(t.shape[0], -1, h, C // h).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(qw), heads(kw), heads(vw), attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        o = o.transpose(1, 2).reshape(-1, hs * ws, C) + lepe
        o = o.reshape(B, Hp // hs, Wp // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return o[:, :H, :W].reshape(B, H * W, C)


class AgentCSwinBlock(nn.Module):
    """CSwin block: shared ``qkv`` and ``proj``, attention in ``attns`` (agent, one or two LePE branches)."""

    def __init__(self, dim, num_heads, reso, split_size, agent_shape=None, last_stage=False, mlp_ratio=4.0,
                 qkv_bias=True, proj_drop=0.0, attn_drop=0.0, drop_path=0.0, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.is_agent = agent_shape is not None
        single = last_stage or reso == split_size
        if self.is_agent:
            self.attns = nn.ModuleList([AgentAttention(dim, num_heads, grid=reso, agent_shape=agent_shape,
                                                       qkv_mode="none", lepe=True, attn_drop=attn_drop,
                                                       backend=backend, **dd)])
        elif single:
            self.attns = nn.ModuleList([LePEAttention(dim, num_heads, -1, split_size, attn_drop, **dd)])
        else:
            self.attns = nn.ModuleList([LePEAttention(dim // 2, num_heads // 2, i, split_size, attn_drop, **dd)
                                        for i in range(2)])
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        if self.is_agent:
            a = self.attns[0].forward_qkv(q, k, v, (H, W))
        elif len(self.attns) == 1:
            a = self.attns[0](q, k, v, H, W)
        else:
            c = C // 2
            a = torch.cat([self.attns[0](q[..., :c], k[..., :c], v[..., :c], H, W),
                           self.attns[1](q[..., c:], k[..., c:], v[..., c:], H, W)], dim=-1)
        x = x + self.drop_path(self.proj_drop(self.proj(a)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class _ConvNorm(nn.Module):
    """Conv + LayerNorm over channels (CSwin's stem and merge blocks); NCHW in and out."""

    def __init__(self, in_chs, out_chs, kernel, stride, padding, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, padding, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(out_chs, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class AgentCSwinStage(nn.Module):
    def __init__(self, dim, out_dim, reso, depth, num_agent, num_heads, split_size, agent_shape, last_stage,
                 mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = _ConvNorm(dim, out_dim, 3, 2, 1, **dd) if dim != out_dim else nn.Identity()
        self.blocks = nn.Sequential(*[
            AgentCSwinBlock(out_dim, num_heads, reso, reso if i < num_agent else split_size,
                            agent_shape if i < num_agent else None, last_stage, mlp_ratio, qkv_bias, proj_drop,
                            attn_drop, drop_path[i], backend, **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class AgentCSwin(nn.Module):
    """Agent-CSwin (spec agent.md §2.5, §5.2). NCHW input; ``forward_features`` returns the normed NCHW map."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=64,
                 depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), attn_type="AABB",
                 agent_num=(9, 16, 49, 49), mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, proj_drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, backend=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, val in (("depths", depths), ("num_heads", num_heads), ("split_size", split_size),
                          ("agent_num", agent_num)):
            if not isinstance(val, (tuple, list)) or not all(isinstance(v, int) for v in val):
                raise TypeError(f"expected {name} to be a tuple of ints, got {name}={val!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"expected global_pool in ('avg', ''), got {global_pool=}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.stem = _ConvNorm(in_chans, embed_dim, 7, 4, 2, **dd)
        agents = stage_attn_types(attn_type, depths)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        dim = embed_dim
        n = len(depths)
        for i in range(n):
            out_dim = embed_dim * 2**i
            reso = img_size // (4 * 2**i)
            stages.append(AgentCSwinStage(dim, out_dim, reso, depths[i], agents[i], num_heads[i], split_size[i],
                                          agent_shape_of(agent_num[i]), i == n - 1, mlp_ratio, qkv_bias,
                                          proj_drop_rate, attn_drop_rate, dpr[i], backend, **dd))
            self.feature_info.append(dict(num_chs=out_dim, reduction=4 * 2**i, module=f"stages.{i}"))
            dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

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
        dev = self.stem.conv.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    def _norm(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        if output_fmt != "NCHW":
            raise ValueError(f"expected output_fmt='NCHW', got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self._norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return (self._norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _rename(k: str) -> str:
    k = re.sub(r"^stage1_conv_embed\.0\.", "stem.conv.", k)
    k = re.sub(r"^stage1_conv_embed\.2\.", "stem.norm.", k)
    k = re.sub(r"^stage(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
    return re.sub(r"^merge(\d)\.", lambda m: f"stages.{m.group(1)}.downsample.", k)


def checkpoint_filter_fn(state_dict: dict, model: AgentCSwin, use_ema: bool = False) -> dict:
    """Upstream Agent-CSwin checkpoint -> this model (spec §5.3): stem/stage/merge renames, agent biases
    resampled to the model's grids and agent counts."""
    state_dict = unwrap_state_dict(state_dict, use_ema)
    return resample_agent_biases({_rename(k): v for k, v in state_dict.items()}, model)


def to_upstream_state_dict(state_dict: dict) -> dict:
    """Inverse of :func:`checkpoint_filter_fn`'s renaming (parity tests only)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^stem\.conv\.", "stage1_conv_embed.0.", k)
        k = re.sub(r"^stem\.norm\.", "stage1_conv_embed.2.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"merge{m.group(1)}.", k)
        out[re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"stage{int(m.group(1)) + 1}.", k)] = v
    return out


def _create_agent_cswin(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(AgentCSwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


_C = dict(first_conv="stem.conv", classifier="head")
default_cfgs = generate_default_cfgs({
    "agent_cswin_tiny": agent_cfg(**_C),
    "agent_cswin_small": agent_cfg(**_C),
    "agent_cswin_base": agent_cfg(**_C),
    "agent_cswin_base_384": agent_cfg(**_C, input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


def _build(name, pretrained, kwargs, **model_args):
    return _create_agent_cswin(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_tiny(pretrained=False, **kwargs) -> AgentCSwin:
    return _build("agent_cswin_tiny", pretrained, kwargs, embed_dim=64, depths=(2, 4, 18, 1))


@register_model
def agent_cswin_small(pretrained=False, **kwargs) -> AgentCSwin:
    return _build("agent_cswin_small", pretrained, kwargs, embed_dim=64, depths=(3, 6, 29, 2))


@register_model
def agent_cswin_base(pretrained=False, **kwargs) -> AgentCSwin:
    return _build("agent_cswin_base", pretrained, kwargs, embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))


@register_model
def agent_cswin_base_384(pretrained=False, **kwargs) -> AgentCSwin:
    return _build("agent_cswin_base_384", pretrained, kwargs, img_size=384, embed_dim=96, depths=(3, 6, 29, 2),
                  num_heads=(4, 8, 16, 32), split_size=(1, 2, 12, 12))
