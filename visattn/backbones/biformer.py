"""BiFormer: hierarchical bi-level-routing-attention backbones, registered with timm.

"BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al., CVPR 2023,
https://arxiv.org/abs/2303.08810); architecture and checkpoints from ``rayleizhu/BiFormer``
(``models/biformer.py``, ``biformer_stl.py``, ``biformer_stl_nchw.py``).

visattn layout (specs/routing.md §5): ``stem``, ``stages.{i}`` (stages 1-3 start with a ``downsample``),
``stages.{i}.blocks.{j}`` (``pos_embed`` depthwise 3x3 for T/S/B, ``norm1``, ``attn``, ``norm2``,
``mlp.fc1/fc2``), ``norm`` (BatchNorm2d), ``head.fc``. Stages take and return NCHW and run blocks
channels-last. Stages 1-3 use :class:`~visattn.layers.BilevelRoutingAttention`, stage 4
:class:`~visattn.layers.AttentionLePE`. Any input size works: ``bra_padding="mask"`` (partial regions)
or ``"legacy"`` (BiFormer's ``auto_pad``), per-stage ``n_win``, or ``region_sizes`` that keep the 224
region geometry at every resolution. :func:`checkpoint_filter_fn` loads both upstream layouts (legacy
NHWC ``qkv.qkv``/``wo``, and the nchw refactor's 1x1 convs); :func:`to_upstream_state_dict` exports.
"""

from __future__ import annotations

import re

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn

from ..layers.bilevel_routing import AttentionLePE, BilevelRoutingAttention

__all__ = ["BiFormer", "BiFormerBlock", "BiFormerStage"]

register_notrace_module(BilevelRoutingAttention)


class BiFormerBlock(nn.Module):
    """``x + pos_embed(x)`` (NCHW, optional), then channels-last ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win,
        topk: int,
        *,
        mlp_ratio: float,
        pos_embed: bool,
        lepe_kernel: int,
        lepe_source: str,
        region_size,
        bra_padding: str,
        clamp_topk: bool,
        drop_path: float,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd) if pos_embed else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if topk > 0:
            self.attn = BilevelRoutingAttention(
                dim,
                num_heads,
                None if region_size is not None else n_win,
                topk,
                region_size=region_size,
                lepe_kernel=lepe_kernel,
                padding=bra_padding,
                clamp_topk=clamp_topk,
                **dd,
            )
        else:  # stage 4: full attention, 8 heads whatever the width (BiFormer's AttentionLePE default)
            self.attn = AttentionLePE(dim, 8, lepe_kernel=lepe_kernel, lepe_source=lepe_source, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (returned in channels-last memory)."""
        # channels-last memory (a no-op after the first block of a stage): the depthwise pos_embed
        # then runs cuDNN's NHWC kernels instead of torch's generic depthwise ones, and the NHWC view
        # below is contiguous, so LayerNorm and the residual adds need no layout copies
        x = x.contiguous(memory_format=torch.channels_last)
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(
            self.attn(self.norm1(x), False)
        )  # positional: TorchScript calls an ignored forward
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Module):
    """Optional downsample (T/S/B: conv3x3/2 + BN; STL: BN + conv2x2/2), then blocks; NCHW in and out."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: str,
        block_kwargs: dict,
        drop_path: list[float],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample == "conv":
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, 2, 1, **dd), nn.BatchNorm2d(dim, **dd))
        elif downsample == "patch":
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_dim, **dd), nn.Conv2d(in_dim, dim, 2, 2, **dd))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[BiFormerBlock(dim, drop_path=drop_path[j], **block_kwargs, **dd) for j in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value, n: int, name: str, kinds=(int,)) -> tuple:
    if isinstance(value, (tuple, list)) and len(value) == n:
        out = tuple(value)
    elif isinstance(value, kinds) and not isinstance(value, bool):
        out = (value,) * n
    else:
        raise TypeError(f"expected {name} to be a value or a tuple of {n} per stage, got {name}={value!r}")
    return out


class BiFormer(nn.Module):
    """BiFormer (timm model API; see the module docstring).

    Args:
        in_chans, num_classes, global_pool, drop_rate (head dropout), drop_path_rate (linear schedule):
            timm's meanings.
        depths, embed_dims: blocks and channels per stage.
        head_dim: channels per head in the BRA stages (heads = dim // head_dim; stage 4 uses 8 heads).
        mlp_ratio: MLP expansion (3 for T/S/B, 4 for STL).
        n_win: regions per axis (int or one per BRA stage); ignored where ``region_sizes`` is given.
        topks: routed regions per stage; ``-1`` marks the full-attention stage.
        lepe_kernel: LCE / LePE depthwise kernel (5).
        arch: ``"biformer"`` (conv stem, ``pos_embed``) or ``"stl"`` (4x4 patch stem, no ``pos_embed``).
        lepe_source: stage-4 LePE input, ``"x"`` (legacy models) or ``"v"`` (the nchw STL).
        bra_padding: ``"mask"``, ``"legacy"`` (BiFormer ``auto_pad``) or ``"legacy_nchw"``.
        region_sizes: tokens per region side in stages 1-3, e.g. ``(8, 4, 2)`` (224 geometry at any size).
        clamp_topk: clamp ``topk`` to the region count on small maps (default True).
        device, dtype: factory kwargs.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (4, 4, 18, 4),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        head_dim: int = 32,
        mlp_ratio: float = 3.0,
        n_win=7,
        topks: tuple[int, ...] = (1, 4, 16, -1),
        lepe_kernel: int = 5,
        arch: str = "biformer",
        lepe_source: str = "x",
        bra_padding: str = "mask",
        region_sizes=None,
        clamp_topk: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, v in (("in_chans", in_chans), ("num_classes", num_classes), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"expected {name} to be an int, got {name}={v!r}")
        for name, v in (
            ("mlp_ratio", mlp_ratio),
            ("drop_rate", drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"expected {name} to be a float, got {name}={v!r}")
        if not isinstance(clamp_topk, bool):
            raise TypeError(f"expected clamp_topk to be a bool, got {clamp_topk=!r}")
        if arch not in ("biformer", "stl"):
            raise ValueError(f"expected arch in ('biformer', 'stl'), got {arch=}")
        depths = _per_stage(depths, len(depths) if isinstance(depths, (tuple, list)) else 4, "depths")
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, "embed_dims")
        topks = _per_stage(topks, n, "topks")
        n_wins = (
            _per_stage(n_win, n, "n_win", (int, tuple, list))
            if not (
                isinstance(n_win, (tuple, list)) and len(n_win) == 2 and n != 2 and isinstance(n_win[0], int)
            )
            else (tuple(n_win),) * n
        )
        if isinstance(region_sizes, (tuple, list)) and len(region_sizes) == n - 1:
            region_sizes = tuple(region_sizes) + (
                None,
            )  # one per BRA stage; the last stage is full attention
        rsz = (
            (None,) * n if region_sizes is None else _per_stage(region_sizes, n, "region_sizes", (int, tuple))
        )
        self.arch, self.lepe_source = arch, lepe_source
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        c0 = embed_dims[0]
        if arch == "biformer":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, c0 // 2, 3, 2, 1, **dd),
                nn.BatchNorm2d(c0 // 2, **dd),
                nn.GELU(),
                nn.Conv2d(c0 // 2, c0, 3, 2, 1, **dd),
                nn.BatchNorm2d(c0, **dd),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, c0, 4, 4, **dd), nn.BatchNorm2d(c0, **dd))
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages = []
        for i in range(n):
            kw = dict(
                num_heads=embed_dims[i] // head_dim,
                n_win=n_wins[i],
                topk=topks[i],
                mlp_ratio=mlp_ratio,
                pos_embed=arch == "biformer",
                lepe_kernel=lepe_kernel,
                lepe_source=lepe_source,
                region_size=rsz[i],
                bra_padding=bra_padding,
                clamp_topk=clamp_topk,
            )
            down = "none" if i == 0 else ("conv" if arch == "biformer" else "patch")
            stages.append(
                BiFormerStage(embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], down, kw, dpr[i], **dd)
            )
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(n)
        ]
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NCHW", **dd
        )
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # no position tables or learned tokens; 1-D parameters are excluded by timm

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
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

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (NCHW) at ``indices``, and ``forward_features(x)`` unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"expected output_fmt='NCHW' (BiFormer stages are NCHW), got {output_fmt=}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
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

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """Upstream init: Linear trunc-normal std 0.02, zero bias."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------ checkpoints

_LEGACY_RULES = [  # (pattern, replacement) on upstream keys, first match wins
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(?:blocks\.)?(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
_BLOCK_RULES = [
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.qkv_linear\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.attn\.output_linear\.", ".attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.(?:2|3)\.", ".mlp.fc2."),
]


def unwrap_state_dict(state_dict: dict) -> dict:
    """The bare state dict inside ``model`` / ``state_dict`` / ``state_dict_ema`` containers."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return state_dict


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """BiFormer checkpoints (legacy NHWC or nchw 1x1-conv layout, specs/routing.md §5.3) -> visattn names.

    1x1-conv weights ``[out, in, 1, 1]`` are squeezed to Linear ``[out, in]``; ``backbone.`` prefixes
    (detection/segmentation) are stripped. Learnable keys are never dropped; visattn state dicts
    pass through unchanged.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^backbone\.", "", k)
        if k not in target:
            for pat, rep in _LEGACY_RULES:
                if re.match(pat, k):
                    k = re.sub(pat, rep, k)
                    break
            if k.startswith("stages."):
                for pat, rep in _BLOCK_RULES:
                    k = re.sub(pat, rep, k)
        t = target.get(k)
        if t is not None and v.dim() == 4 and t.dim() == 2 and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def to_upstream_state_dict(model_or_state_dict, layout: str = "legacy", arch: str | None = None) -> dict:
    """Export visattn weights in BiFormer's key names: ``layout="legacy"`` (NHWC ``qkv.qkv``/``wo``;
    T/S/B or STL by ``arch``) or ``"nchw"`` (the STL-nchw refactor: 1x1 convs)."""
    if isinstance(model_or_state_dict, nn.Module):
        arch = arch or getattr(model_or_state_dict, "arch", "biformer")
        sd = model_or_state_dict.state_dict()
    else:
        sd, arch = model_or_state_dict, arch or "biformer"
    if layout not in ("legacy", "nchw"):
        raise ValueError(f"expected layout in ('legacy', 'nchw'), got {layout=}")
    stl = arch == "stl"
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k2 = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k2)
        k2 = re.sub(r"^head\.fc\.", "head.", k2)
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k2)
        if m:
            rest = m[3]
            is_bra = (
                rest.startswith("attn.")
                and f"stages.{m[1]}.blocks.{m[2]}.attn.lepe.weight" in sd
                and f"stages.{m[1]}.blocks.{m[2]}.attn.qkv.bias" in sd
            )
            if layout == "legacy":
                rest = re.sub(r"^attn\.qkv\.", "attn.qkv.qkv.", rest) if is_bra else rest
                rest = re.sub(r"^attn\.proj\.", "attn.wo.", rest) if is_bra else rest
            else:
                rest = re.sub(r"^attn\.qkv\.", "attn.qkv_linear.", rest) if is_bra else rest
                rest = re.sub(r"^attn\.proj\.", "attn.output_linear.", rest) if is_bra else rest
                if v.dim() == 2 and (rest.startswith(("attn.", "mlp."))):
                    v = v[:, :, None, None]
            rest = re.sub(r"^mlp\.fc1\.", "mlp.0.", rest)
            rest = re.sub(r"^mlp\.fc2\.", "mlp.2." if stl else "mlp.3.", rest)
            k2 = f"stages.{m[1]}.blocks.{m[2]}.{rest}" if stl else f"stages.{m[1]}.{m[2]}.{rest}"
        out[k2] = v
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.0",
        classifier="head.fc",
        license="mit",
        paper_ids="arXiv:2303.08810",
        origin_url="https://github.com/rayleizhu/BiFormer",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(),
        "biformer_small.in1k": _cfg(),
        "biformer_base.in1k": _cfg(),
        "biformer_stl.in1k": _cfg(),
        "biformer_stl_nchw.in1k": _cfg(),
    }
)

_TSB = dict(topks=(1, 4, 16, -1), mlp_ratio=3.0, head_dim=32, n_win=7, lepe_kernel=5)
_STL = dict(_TSB, depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratio=4.0, arch="stl")


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(_TSB, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(_TSB, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(_TSB, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    return _create_biformer("biformer_stl", pretrained, **dict(_STL, **kwargs))


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormer:
    return _create_biformer("biformer_stl_nchw", pretrained, **dict(_STL, lepe_source="v", **kwargs))
