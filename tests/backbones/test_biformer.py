"""BiFormer family tests: parameter counts, checkpoint filters on synthetic upstream state dicts
(legacy NHWC and nchw 1x1-conv layouts, written here from specs/routing.md §5.3), any input size."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.backbones.biformer import BiFormer, checkpoint_filter_fn, to_upstream_state_dict

TINY = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), head_dim=32, n_win=2, topks=(1, 2, 3, -1))


@pytest.mark.parametrize(
    "name, millions",
    [
        ("biformer_tiny", 13.1),
        ("biformer_small", 25.5),
        ("biformer_base", 56.8),
        ("biformer_stl", 28.4),
        ("biformer_stl_nchw", 28.4),
    ],
)
def test_parameter_counts(name, millions):
    model = timm.create_model(name, device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_registered_names_and_cfgs():
    names = visattn.backbones.list_models("biformer*")
    assert names == ["biformer_base", "biformer_small", "biformer_stl", "biformer_stl_nchw", "biformer_tiny"]
    cfg = timm.create_model("biformer_tiny", device="meta").pretrained_cfg
    assert cfg["pool_size"] == (7, 7) and cfg["crop_pct"] == 0.875 and cfg["paper_ids"] == "arXiv:2303.08810"


def _tiny(arch: str, lepe_source: str = "x", **kw) -> BiFormer:
    torch.manual_seed(0)
    model = (
        BiFormer(
            **dict(
                TINY,
                arch=arch,
                lepe_source=lepe_source,
                mlp_ratio=3.0 if arch == "biformer" else 4.0,
                num_classes=10,
                **kw,
            )
        )
        .double()
        .eval()
    )
    with torch.no_grad():  # random BN statistics too, so a misplaced tensor cannot hide
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_()
    return model


# upstream names from the spec's table, applied to visattn names (the inverse direction, written out)
_TSB_RULES = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.fc\.", "head."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
]


def _legacy_names(sd: dict, arch: str, bra_stages=(0, 1, 2)) -> dict:
    out = {}
    for k, v in sd.items():
        stage = re.match(r"^stages\.(\d)\.blocks", k)
        bra = stage is not None and int(stage[1]) in bra_stages
        if bra:
            k = k.replace(".attn.qkv.", ".attn.qkv.qkv.").replace(".attn.proj.", ".attn.wo.")
        for pat, rep in _TSB_RULES:
            if arch == "stl" and pat.startswith(r"^stages\.(\d)\.blocks"):
                continue  # STL keeps stages.{i}.blocks.{j}
            if arch == "stl" and pat == r"\.mlp\.fc2\.":
                rep = ".mlp.2."
            k = re.sub(pat, rep, k)
        out[k] = v.clone()
    return out


def _nchw_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if re.match(r"^stages\.[012]\.blocks", k):
            k = k.replace(".attn.qkv.", ".attn.qkv_linear.").replace(".attn.proj.", ".attn.output_linear.")
        k = k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        if v.dim() == 2 and k.startswith("stages.") and (".attn." in k or ".mlp." in k):
            v = v[:, :, None, None]  # 1x1 convs
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("arch", ["biformer", "stl"])
@pytest.mark.parametrize("container", [None, "state_dict_ema"])
def test_legacy_checkpoint_loads_exactly(arch, container):
    src = _tiny(arch)
    up = _legacy_names(src.state_dict(), arch)
    assert (
        "stages.0.blocks.0.attn.qkv.qkv.weight" in up
        if arch == "stl"
        else "stages.0.0.attn.qkv.qkv.weight" in up
    )
    assert not any(".fc1." in k or ".proj." in k and ".attn.wo" not in k and "stages.3" not in k for k in up)
    dst = _tiny(arch)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    ckpt = up if container is None else {container: up}
    dst.load_state_dict(checkpoint_filter_fn(ckpt, dst), strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(dst(x), src(x))


def test_nchw_checkpoint_is_numerically_the_1x1_conv_model():
    src = _tiny("stl", "v")
    up = _nchw_names(src.state_dict())
    assert up["stages.0.blocks.0.attn.qkv_linear.weight"].shape == (96, 32, 1, 1)
    dst = _tiny("stl", "v")
    dst.load_state_dict(checkpoint_filter_fn(up, dst), strict=True)
    blk = dst.stages[1].blocks[0]
    # the upstream nchw MLP: conv1x1 -> GELU -> conv1x1 on an NCHW map
    x = torch.randn(2, 64, 5, 6, dtype=torch.float64)
    pre = "stages.1.blocks.0.mlp"
    ref = F.conv2d(
        F.gelu(F.conv2d(x, up[f"{pre}.0.weight"], up[f"{pre}.0.bias"])),
        up[f"{pre}.2.weight"],
        up[f"{pre}.2.bias"],
    )
    torch.testing.assert_close(blk.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ref)
    # the upstream qkv_linear: q, k, v = conv1x1(x).chunk(3, dim=1)
    qkv = F.conv2d(
        x, up["stages.1.blocks.0.attn.qkv_linear.weight"], up["stages.1.blocks.0.attn.qkv_linear.bias"]
    )
    torch.testing.assert_close(blk.attn.qkv(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), qkv)


def test_legacy_and_nchw_layouts_of_one_model_agree():
    src = _tiny("stl", "v")
    a, b = _tiny("stl", "v"), _tiny("stl", "v")
    a.load_state_dict(checkpoint_filter_fn(_legacy_names(src.state_dict(), "stl"), a), strict=True)
    b.load_state_dict(checkpoint_filter_fn(_nchw_names(src.state_dict()), b), strict=True)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("arch, layout", [("biformer", "legacy"), ("stl", "legacy"), ("stl", "nchw")])
def test_export_matches_the_spec_names(arch, layout):
    model = _tiny(arch, "v" if layout == "nchw" else "x")
    expect = _nchw_names(model.state_dict()) if layout == "nchw" else _legacy_names(model.state_dict(), arch)
    got = to_upstream_state_dict(model, layout=layout)
    assert sorted(got) == sorted(expect)
    assert all(torch.equal(got[k], expect[k]) for k in got)


def test_detection_prefix_is_stripped():
    src = _tiny("biformer")
    up = {f"backbone.{k}": v for k, v in _legacy_names(src.state_dict(), "biformer").items()}
    dst = _tiny("biformer")
    dst.load_state_dict(checkpoint_filter_fn(up, dst), strict=True)


@pytest.mark.parametrize(
    "kw, size",
    [
        ({}, (97, 131)),
        ({"bra_padding": "legacy"}, (97, 131)),
        ({"region_sizes": (4, 2, 1)}, (80, 112)),
        ({"n_win": (3, 2, 2, 1)}, (64, 96)),
        ({}, (16, 16)),  # stage 3 is 1x1: topk 3 is clamped to its one region
    ],
)
def test_any_input_size(kw, size):
    model = _tiny("biformer", **kw).float()
    x = torch.randn(1, 3, *size)
    with visattn.use_backend("torch"):
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    assert [f.shape[-2:] for f in feats][0] == torch.Size([-(-size[0] // 4), -(-size[1] // 4)])


def test_topk_clamp_can_be_disabled():
    model = _tiny("biformer", clamp_topk=False).float()
    with (
        visattn.use_backend("torch"),
        pytest.raises(ValueError, match="topk=3 must be <= the number of regions P=1"),
    ):
        model(torch.randn(1, 3, 16, 16))


def test_create_model_kwargs():
    m = timm.create_model(
        "biformer_tiny",
        bra_padding="legacy",
        n_win=8,
        drop_path_rate=0.1,
        num_classes=3,
        in_chans=1,
        device="meta",
    )
    assert m.stages[0].blocks[0].attn.padding == "legacy" and m.stages[0].blocks[0].attn.n_win == 8
    with pytest.raises(TypeError):
        timm.create_model("biformer_tiny", not_a_kwarg=1, device="meta")
