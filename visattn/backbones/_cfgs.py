"""Variant and pretrained-cfg tables of the neighborhood-attention families (``nat``, ``dinat_s``,
``nat_isotropic``).

Kept out of the model files because the NAT/DiNAT zoo has more than 12 entries (STYLE.md §2).
Architectures and checkpoints: ``SHI-Labs/Neighborhood-Attention-Transformer``
(``classification/{nat,dinat,dinats,isotropic}.py``, ``classification/{NAT,DiNAT}.md``); specs/neighborhood.md §5.2.
Drop-path rates are upstream's training values; builders default to 0 (timm convention) and the
recipes in ``configs/`` set them.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

_ORIGIN = "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"
_NAT_CKPT = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_CKPT = "https://shi-labs.com/projects/dinat/checkpoints/"
NAT_PAPER = "arXiv:2204.07143"
DINAT_PAPER = "arXiv:2209.15001"
IN22K_CLASSES = 21841


def dilations_a(depths: tuple[int, ...], big: tuple[int, ...] = (8, 4, 2, 1)) -> tuple[tuple[int, ...], ...]:
    """Per-block dilations alternating 1 and the level's dilation, starting with 1 (DiNAT patterns A/B)."""
    return tuple(tuple(1 if j % 2 == 0 else d for j in range(n)) for n, d in zip(depths, big))


_MINI = dict(depths=(3, 4, 6, 5), embed_dim=64, num_heads=(2, 4, 8, 16), mlp_ratio=3.0)
_TINY = dict(depths=(3, 4, 18, 5), embed_dim=64, num_heads=(2, 4, 8, 16), mlp_ratio=3.0)
_SMALL = dict(depths=(3, 4, 18, 5), embed_dim=96, num_heads=(3, 6, 12, 24), mlp_ratio=2.0)
_BASE = dict(depths=(3, 4, 18, 5), embed_dim=128, num_heads=(4, 8, 16, 32), mlp_ratio=2.0)
_LARGE = dict(depths=(3, 4, 18, 5), embed_dim=192, num_heads=(6, 12, 24, 48), mlp_ratio=2.0)
_A = dilations_a((3, 4, 18, 5))
_B = dilations_a((3, 4, 18, 5), (13, 6, 3, 1))

# constructor kwargs of every NAT / DiNAT variant (kernel_size defaults to 7)
NAT_VARIANTS: dict[str, dict] = {
    "nat_mini": dict(_MINI),
    "nat_tiny": dict(_TINY),
    "nat_small": dict(_SMALL, layer_scale=1e-5),
    "nat_base": dict(_BASE, layer_scale=1e-5),
    "dinat_mini": dict(_MINI, dilations=dilations_a((3, 4, 6, 5))),
    "dinat_tiny": dict(_TINY, dilations=_A),
    "dinat_small": dict(_SMALL, dilations=_A),  # no layer scale, unlike nat_small (upstream)
    "dinat_base": dict(_BASE, dilations=_A, layer_scale=1e-5),
    "dinat_large": dict(_LARGE, dilations=_A),
    "dinat_large_384": dict(_LARGE, dilations=_B),
    "dinat_large_384_11x11": dict(_LARGE, dilations=_A, kernel_size=11),
    "dinat_large_21k": dict(_LARGE, dilations=_A, num_classes=IN22K_CLASSES),
    "dinat_large_21k_11x11": dict(_LARGE, dilations=_A, kernel_size=11, num_classes=IN22K_CLASSES),
}

_S_DEPTHS_T = (2, 2, 6, 2)
_S_DEPTHS = (2, 2, 18, 2)
DINAT_S_VARIANTS: dict[str, dict] = {
    "dinat_s_tiny": dict(depths=_S_DEPTHS_T, embed_dim=96, num_heads=(3, 6, 12, 24), dilations=dilations_a(_S_DEPTHS_T)),
    "dinat_s_small": dict(depths=_S_DEPTHS, embed_dim=96, num_heads=(3, 6, 12, 24), dilations=dilations_a(_S_DEPTHS)),
    "dinat_s_base": dict(depths=_S_DEPTHS, embed_dim=128, num_heads=(4, 8, 16, 32), dilations=dilations_a(_S_DEPTHS)),
    "dinat_s_large": dict(depths=_S_DEPTHS, embed_dim=192, num_heads=(6, 12, 24, 48), dilations=dilations_a(_S_DEPTHS)),
    "dinat_s_large_384": dict(depths=_S_DEPTHS, embed_dim=192, num_heads=(6, 12, 24, 48),
                              dilations=dilations_a(_S_DEPTHS, (13, 6, 3, 1))),
    "dinat_s_large_21k": dict(depths=_S_DEPTHS, embed_dim=192, num_heads=(6, 12, 24, 48),
                              dilations=dilations_a(_S_DEPTHS), num_classes=IN22K_CLASSES),
}


def _cfg(url: str = "", paper: str = NAT_PAPER, size: int = 224, **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": (size // 32, size // 32),
        "crop_pct": 0.875 if size == 224 else 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "mit",
        "paper_ids": paper,
        "paper_name": "Neighborhood Attention Transformer" if paper == NAT_PAPER
        else "Dilated Neighborhood Attention Transformer",
        "origin_url": _ORIGIN,
        **kwargs,
    }


def _dinat(file: str, size: int = 224, **kwargs) -> dict:
    return _cfg(_DINAT_CKPT + file, DINAT_PAPER, size, **kwargs)


NAT_CFGS: dict[str, dict] = {
    "nat_mini.in1k": _cfg(_NAT_CKPT + "nat_mini.pth"),
    "nat_tiny.in1k": _cfg(_NAT_CKPT + "nat_tiny.pth"),
    "nat_small.in1k": _cfg(_NAT_CKPT + "nat_small.pth"),
    "nat_base.in1k": _cfg(_NAT_CKPT + "nat_base.pth"),
    "dinat_mini.in1k": _dinat("imagenet1k/dinat_mini_in1k_224.pth"),
    "dinat_tiny.in1k": _dinat("imagenet1k/dinat_tiny_in1k_224.pth"),
    "dinat_small.in1k": _dinat("imagenet1k/dinat_small_in1k_224.pth"),
    "dinat_base.in1k": _dinat("imagenet1k/dinat_base_in1k_224.pth"),
    "dinat_large.in22k_ft_in1k": _dinat("imagenet1k/dinat_large_in22k_in1k_224.pth"),
    "dinat_large_384.in22k_ft_in1k": _dinat("imagenet1k/dinat_large_in22k_in1k_384.pth", 384),
    "dinat_large_384_11x11.in22k_ft_in1k": _dinat("imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", 384),
    "dinat_large_21k.in22k": _dinat("imagenet22k/dinat_large_in22k_224.pth", num_classes=IN22K_CLASSES),
    # same weights as dinat_large_21k with the RPB bicubically resized to 11x11 (upstream)
    "dinat_large_21k_11x11.in22k": _dinat("imagenet22k/dinat_large_in22k_224_11x11interp.pth",
                                          num_classes=IN22K_CLASSES),
}

DINAT_S_CFGS: dict[str, dict] = {
    "dinat_s_tiny.in1k": _dinat("imagenet1k/dinat_s_tiny_in1k_224.pth", first_conv="patch_embed.proj"),
    "dinat_s_small.in1k": _dinat("imagenet1k/dinat_s_small_in1k_224.pth", first_conv="patch_embed.proj"),
    "dinat_s_base.in1k": _dinat("imagenet1k/dinat_s_base_in1k_224.pth", first_conv="patch_embed.proj"),
    "dinat_s_large.in22k_ft_in1k": _dinat("imagenet1k/dinat_s_large_in1k_224.pth", first_conv="patch_embed.proj"),
    "dinat_s_large_384.in22k_ft_in1k": _dinat("imagenet1k/dinat_s_large_in1k_384.pth", 384,
                                              first_conv="patch_embed.proj"),
    "dinat_s_large_21k.in22k": _dinat("imagenet22k/dinat_s_large_in22k_224.pth", num_classes=IN22K_CLASSES,
                                      first_conv="patch_embed.proj"),
}
for _c in NAT_CFGS.values():
    _c.setdefault("first_conv", "patch_embed.proj.0")
for _c in (*NAT_CFGS.values(), *DINAT_S_CFGS.values()):
    _c["classifier"] = "head.fc"

# isotropic (``classification/isotropic.py``): patch 16, depth 12, kernel 7; DiNAT alternates dilation 1 / 2
_ISO_S = dict(embed_dim=384, depth=12, num_heads=12)
_ISO_B = dict(embed_dim=768, depth=12, num_heads=24)
ISO_VARIANTS: dict[str, dict] = {
    "nat_isotropic_small": dict(_ISO_S),
    "nat_isotropic_base": dict(_ISO_B),
    "dinat_isotropic_small": dict(_ISO_S, dilation=2),
    "dinat_isotropic_base": dict(_ISO_B, dilation=2),
}
_ISO = dict(first_conv="patch_embed.proj", classifier="head", pool_size=(14, 14))
ISO_CFGS: dict[str, dict] = {
    f"{name}.in1k": _dinat(f"isotropic/{name}_in1k_224.pth", **_ISO) for name in ISO_VARIANTS
}
