"""Isotropic NAT / DiNAT specifics (specs/neighborhood.md §5.1): zoo, layout, checkpoint mapping, forward.

The generic timm contract runs in test_timm_contract.py (``nat_isotropic_small`` gets all of it on
CPU). Here: parameter counts and dilation patterns of the four variants, the original ``layers.{i}``
checkpoint layout loaded strictly, and the model's forward against the architecture written out with
float64 functional ops and the reference neighborhood attention.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the families)
from visattn.backbones import nat_isotropic as iso_mod
from visattn.ops.neighborhood import neighborhood_attention_ref

from ._upstream_nat_isotropic import to_upstream_state_dict

# upstream parameter counts in millions (specs/neighborhood.md §5.1)
PARAMS_M = {"nat_isotropic_small": 22, "dinat_isotropic_small": 22, "nat_isotropic_base": 86,
            "dinat_isotropic_base": 86}

TINY = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, kernel_size=3, dilation=2, num_classes=5)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_counts_and_dilations(name):
    m = timm.create_model(name, device="meta")
    got = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(got - PARAMS_M[name]) <= 0.5, f"{name}: {got:.2f}M vs {PARAMS_M[name]}M"
    dil = [b.attn.dilation for b in m.blocks]
    want = [(1, 1) if i % 2 == 0 or name.startswith("nat_") else (2, 2) for i in range(12)]
    assert dil == want
    assert all(b.attn.kernel_size == (7, 7) for b in m.blocks)
    assert m.pretrained_cfg["url"].endswith(f"isotropic/{name}_in1k_224.pth")


def _random_like(model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.5 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("container", [None, "model"])
def test_filter_original_layout_strict(container):
    model = iso_mod.NATIsotropic(**TINY)
    sd = _random_like(model)
    upstream = to_upstream_state_dict(sd)
    for k in ("patch_embed.proj.weight", "patch_embed.norm.bias", "layers.0.attn.rpb", "layers.1.attn.qkv.weight",
              "layers.1.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert k in upstream, k
    ckpt = upstream if container is None else {container: upstream, "epoch": 1}
    model.load_state_dict(iso_mod.checkpoint_filter_fn(ckpt, model), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    stray = dict(upstream, **{"layers.0.attn.extra": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="extra"):
        model.load_state_dict(iso_mod.checkpoint_filter_fn(stray, model), strict=True)


def test_filter_resizes_rpb():
    src = iso_mod.NATIsotropic(**TINY)
    dst = iso_mod.NATIsotropic(**dict(TINY, kernel_size=5))
    sd = to_upstream_state_dict(_random_like(src))
    sd = {k: torch.full_like(v, 0.5) if k.endswith(".rpb") else v for k, v in sd.items()}
    dst.load_state_dict(iso_mod.checkpoint_filter_fn(sd, dst), strict=True)
    assert dst.blocks[0].attn.rpb.shape == (2, 9, 9)
    torch.testing.assert_close(dst.blocks[1].attn.rpb, torch.full((2, 9, 9), 0.5))


def _upstream_forward(sd: dict, img: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The upstream isotropic model written out with functional ops on upstream-named weights."""
    C, heads, p = cfg["embed_dim"], cfg["num_heads"], cfg["patch_size"]
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).permute(0, 2, 3, 1)
    x = F.layer_norm(x, (C,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], 1e-5)
    B, H, W, _ = x.shape
    for i in range(cfg["depth"]):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        h = F.layer_norm(x, (C,), w["norm1.weight"], w["norm1.bias"], 1e-5)
        q, k, v = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(B, H, W, 3, heads, C // heads).unbind(3)
        o = neighborhood_attention_ref(q, k, v, cfg["kernel_size"], dilation=1 if i % 2 == 0 else cfg["dilation"],
                                       rpb=w["attn.rpb"])
        x = x + F.linear(o.reshape(B, H, W, C), w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (C,), w["norm2.weight"], w["norm2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                         w["mlp.fc2.bias"])
    x = F.layer_norm(x.flatten(1, 2), (C,), sd["norm.weight"], sd["norm.bias"], 1e-5).mean(1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_forward_matches_upstream_architecture():
    model = iso_mod.NATIsotropic(**TINY).double().eval()
    upstream = to_upstream_state_dict({k: v.double() for k, v in _random_like(model).items()})
    model.load_state_dict(iso_mod.checkpoint_filter_fn(dict(upstream), model), strict=True)
    img = torch.randn(2, 3, 32, 40, dtype=torch.float64)  # 8x10 tokens: windows 3 x dilation 2 fit
    with visattn.use_backend("torch"), torch.no_grad():
        got = model(img)
    torch.testing.assert_close(got, _upstream_forward(upstream, img, TINY), rtol=1e-10, atol=1e-10)


def test_intermediates_layouts_and_odd_inputs():
    model = iso_mod.NATIsotropic(**dict(TINY, depth=4)).eval()
    img = torch.randn(1, 3, 50, 70)  # patch embedding pads to 52x72: 13x18 tokens
    with visattn.use_backend("torch"), torch.no_grad():
        final, nchw = model.forward_intermediates(img, indices=[1, 3])
        nlc = model.forward_intermediates(img, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(img, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(img), rtol=0, atol=0)
    assert final.shape == (1, 13 * 18, 16)
    assert [f.shape for f in nchw] == [torch.Size([1, 16, 13, 18])] * 2
    for a, b in zip(nchw, nlc):
        torch.testing.assert_close(a.flatten(2).transpose(1, 2), b, rtol=0, atol=0)
    torch.testing.assert_close(normed[0], model.norm(nchw[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(img, output_fmt="NHWC")


def test_pooling_and_bad_kwargs():
    model = iso_mod.NATIsotropic(**dict(TINY, global_pool="max")).eval()
    feats = torch.randn(2, 7, 16)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(1))
    model.reset_classifier(0, "")
    assert model.forward_head(feats).shape == (2, 7, 16)
    with pytest.raises(ValueError, match="global_pool"):
        iso_mod.NATIsotropic(**dict(TINY, global_pool="token"))
    with pytest.raises(TypeError, match="embed_dim"):
        timm.create_model("nat_isotropic_small", embed_dim="384")
    with pytest.raises(TypeError):
        timm.create_model("dinat_isotropic_small", unknown_arg=1)
