"""NAT / DiNAT / DiNAT_s specifics: parameter counts, architecture details and checkpoint filters.

The generic timm contract runs in test_timm_contract.py; here: §5.2 parameter counts (built on the
meta device), the §5.3 checkpoint mappings on synthetic state dicts in the original-repo and Hugging
Face layouts (strict loads, q/k/v order checked numerically), RPB resizing, and layout details.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the families)
from visattn.backbones import dinat_s as dinat_s_mod
from visattn.backbones import nat as nat_mod
from visattn.ops.neighborhood import neighborhood_attention_ref

from ._upstream_nat import to_hf_state_dict, to_upstream_state_dict

# upstream parameter counts in millions (specs/neighborhood.md §5.2; 22K heads add 21841 classes)
PARAMS_M = {
    "nat_mini": 20, "nat_tiny": 28, "nat_small": 51, "nat_base": 90,
    "dinat_mini": 20, "dinat_tiny": 28, "dinat_small": 51, "dinat_base": 90,
    "dinat_large": 200, "dinat_large_384": 200, "dinat_large_384_11x11": 200,
    "dinat_s_tiny": 28, "dinat_s_small": 50, "dinat_s_base": 88, "dinat_s_large": 197, "dinat_s_large_384": 197,
}

# small configurations for the mapping tests (same module structure as the zoo, few blocks)
TINY_NAT = dict(depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), embed_dim=16, mlp_ratio=2.0,
                dilations=((1,), (1, 2), (1,), (1,)))


def _params(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device="meta", **kwargs).parameters())


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_counts_match_upstream(name):
    got = _params(name) / 1e6
    # upstream rounds to whole millions (200.9M and, with 11x11 RPB tables, 201.1M are both "200M")
    assert abs(got - PARAMS_M[name]) <= max(0.5, 0.006 * PARAMS_M[name]), f"{name}: {got:.2f}M vs {PARAMS_M[name]}M"


def test_22k_variants_have_22k_heads():
    for name in ("dinat_large_21k", "dinat_large_21k_11x11", "dinat_s_large_21k"):
        m = timm.create_model(name, device="meta")
        assert m.num_classes == 21841 == m.pretrained_cfg["num_classes"]


def test_registered_names_and_dilation_patterns():
    names = set(visattn.backbones.list_models())
    assert set(PARAMS_M) | {"dinat_large_21k", "dinat_large_21k_11x11", "dinat_s_large_21k"} <= names
    m = timm.create_model("dinat_tiny", device="meta")
    dil = [[b.attn.dilation[0] for b in s.blocks] for s in m.stages]
    assert dil == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    m = timm.create_model("dinat_large_384", device="meta")
    assert [s.blocks[1].attn.dilation[0] for s in m.stages] == [13, 6, 3, 1]
    m = timm.create_model("dinat_s_large_384", device="meta")
    assert [[b.attn.dilation[0] for b in s.blocks] for s in m.stages][:2] == [[1, 13], [1, 6]]
    assert timm.create_model("dinat_large_384_11x11", device="meta").stages[0].blocks[0].attn.kernel_size == (11, 11)
    # layer scale: nat_small yes, dinat_small no (upstream), dinat_base yes
    assert hasattr(timm.create_model("nat_small", device="meta").stages[0].blocks[0].ls1, "gamma")
    assert not hasattr(timm.create_model("dinat_small", device="meta").stages[0].blocks[0].ls1, "gamma")
    assert hasattr(timm.create_model("dinat_base", device="meta").stages[0].blocks[0].ls1, "gamma")


def test_bad_kwargs_raise_type_error():
    with pytest.raises(TypeError, match="depths"):
        timm.create_model("nat_mini", depths="(1, 1, 1, 1)")
    with pytest.raises(TypeError, match="layer_scale"):
        timm.create_model("nat_mini", layer_scale="1e-5")
    with pytest.raises(TypeError, match="kernel_size"):
        timm.create_model("dinat_s_tiny", kernel_size="7")
    with pytest.raises(TypeError):
        timm.create_model("dinat_mini", unknown_arg=1)


def _random_like(model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _upstream_literal_keys(sd: dict) -> None:
    """A few literal §5.3 names, so the renamer and the filter cannot agree on a wrong table."""
    for k in ("patch_embed.proj.0.weight", "patch_embed.norm.weight", "levels.0.blocks.0.attn.rpb",
              "levels.0.blocks.0.attn.qkv.weight", "levels.0.blocks.0.mlp.fc1.weight",
              "levels.0.downsample.reduction.weight", "levels.2.downsample.norm.bias",
              "levels.3.blocks.0.norm2.weight", "norm.weight", "head.weight", "head.bias"):
        assert k in sd, k
    assert not any(k.startswith("stages.") for k in sd)


@pytest.mark.parametrize("layer_scale", [None, 1e-5])
@pytest.mark.parametrize("container", [None, "model", "state_dict_ema"])
def test_filter_original_layout_strict(layer_scale, container):
    model = nat_mod.NAT(**TINY_NAT, layer_scale=layer_scale)
    sd = _random_like(model)
    upstream = to_upstream_state_dict(sd)
    _upstream_literal_keys(upstream)
    if layer_scale:
        assert "levels.1.blocks.1.gamma1" in upstream and "levels.1.blocks.1.gamma2" in upstream
    ckpt = upstream if container is None else {container: upstream, "epoch": 3}
    loaded = nat_mod.checkpoint_filter_fn(ckpt, model)
    model.load_state_dict(loaded, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_filter_hf_layout_strict_and_qkv_order():
    model = nat_mod.NAT(**TINY_NAT, layer_scale=1e-5).eval()
    sd = _random_like(model)
    hf = to_hf_state_dict(sd, prefix="dinat")
    for k in ("dinat.embeddings.patch_embeddings.projection.0.weight", "dinat.embeddings.norm.weight",
              "dinat.encoder.levels.0.layers.0.attention.self.query.weight",
              "dinat.encoder.levels.0.layers.0.attention.self.rpb",
              "dinat.encoder.levels.0.layers.0.attention.output.dense.weight",
              "dinat.encoder.levels.1.layers.1.layer_scale_parameters",
              "dinat.encoder.levels.0.downsample.reduction.weight", "dinat.layernorm.weight", "classifier.weight"):
        assert k in hf, k
    model.load_state_dict(nat_mod.checkpoint_filter_fn(hf, model), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_filter_hf_qkv_concat_order_full_kernel():
    """HF query/key/value land in the qkv rows [0:C], [C:2C], [2C:3C] and the layer uses them as q, k, v."""
    model = nat_mod.NAT(**TINY_NAT).eval()
    sd = _random_like(model)
    hf = to_hf_state_dict(sd, prefix="nat")
    model.load_state_dict(nat_mod.checkpoint_filter_fn(hf, model), strict=True)
    attn = model.stages[0].blocks[0].attn  # C=16, 1 head, k=7, d=1
    base = "nat.encoder.levels.0.layers.0.attention."
    x = torch.randn(1, 7, 8, 16)

    def lin(name):
        return F.linear(x, hf[base + f"self.{name}.weight"], hf[base + f"self.{name}.bias"]).reshape(1, 7, 8, 1, 16)

    with torch.no_grad():
        o = neighborhood_attention_ref(lin("query"), lin("key"), lin("value"), 7, rpb=hf[base + "self.rpb"],
                                       upcast=False)
        expected = F.linear(o.reshape(1, 7, 8, 16), hf[base + "output.dense.weight"], hf[base + "output.dense.bias"])
        with visattn.use_backend("torch"):
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
        # the check can tell the order apart: q and k swapped gives another result
        swapped = neighborhood_attention_ref(lin("key"), lin("query"), lin("value"), 7, rpb=hf[base + "self.rpb"],
                                             upcast=False)
        assert not torch.allclose(swapped, o, atol=1e-3)


def test_filter_resizes_rpb_bicubically():
    src = nat_mod.NAT(**TINY_NAT)
    dst = nat_mod.NAT(**dict(TINY_NAT, kernel_size=11))
    sd = to_upstream_state_dict(_random_like(src))
    for k in sd:
        if k.endswith(".rpb"):
            sd[k] = torch.full_like(sd[k], 0.25)
    out = nat_mod.checkpoint_filter_fn(sd, dst)
    dst.load_state_dict(out, strict=True)
    rpb = dst.stages[0].blocks[0].attn.rpb
    assert rpb.shape == (1, 21, 21)
    torch.testing.assert_close(rpb, torch.full_like(rpb, 0.25))


def test_filter_keeps_unknown_learnable_keys():
    """Nothing learnable is dropped silently: a stray key makes the strict load fail."""
    model = nat_mod.NAT(**TINY_NAT)
    sd = to_upstream_state_dict(_random_like(model))
    sd["levels.0.blocks.0.attn.extra_table"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="extra_table"):
        model.load_state_dict(nat_mod.checkpoint_filter_fn(sd, model), strict=True)


def test_dinat_s_filter_original_layout_strict():
    model = dinat_s_mod.DiNATs(depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), embed_dim=16,
                               dilations=((1,), (1,), (1, 2), (1,)))
    sd = _random_like(model)
    upstream = to_upstream_state_dict(sd, level_key="layers")
    for k in ("patch_embed.proj.weight", "layers.0.blocks.0.attn.rpb", "layers.0.downsample.reduction.weight",
              "layers.0.downsample.norm.weight", "head.weight"):
        assert k in upstream, k
    assert upstream["layers.0.downsample.reduction.weight"].shape == (32, 64)
    model.load_state_dict(dinat_s_mod.checkpoint_filter_fn({"model": upstream}, model), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_patch_merging_matches_upstream_order_and_pads_odd():
    pm = dinat_s_mod.PatchMerging(3, 6)
    x = torch.randn(2, 5, 7, 3)
    xp = F.pad(x, (0, 0, 0, 1, 0, 1))
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(cat)))


def test_stage_layout_nchw_and_odd_inputs():
    with visattn.use_backend("torch"), torch.no_grad():
        m = timm.create_model("dinat_s_tiny", depths=(1, 1, 2, 1), dilations=((1,), (1,), (1, 2), (1,))).eval()
        feats = m.forward_intermediates(torch.randn(1, 3, 70, 90), intermediates_only=True)
        assert [tuple(f.shape[1:]) for f in feats] == [(96, 18, 23), (192, 9, 12), (384, 5, 6), (768, 3, 3)]
        m = timm.create_model("nat_mini", depths=(1, 1, 1, 1), num_heads=(2, 4, 8, 16)).eval()
        feats = m.forward_intermediates(torch.randn(1, 3, 50, 66), intermediates_only=True)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 13, 17), (128, 7, 9), (256, 4, 5), (512, 2, 3)]


def test_no_weight_decay_names_rpb_tables():
    m = timm.create_model("dinat_mini", device="meta")
    nwd = m.no_weight_decay()
    assert nwd == {n for n, _ in m.named_parameters() if n.endswith("attn.rpb")}
    assert len(nwd) == sum(len(s.blocks) for s in m.stages)


def test_backend_equivalence_tiny():
    """§7.2: the "triton" model matches the "torch" model in forward and every parameter gradient.

    Tiny sizes so the kernels run under TRITON_INTERPRET=1 in CPU CI (one family: DiNAT_s shares the
    blocks); the cuda job covers real sizes. Includes a dilated block, legacy padding and the RPB gradient.
    """
    if "triton" not in visattn.list_backends("neighborhood")["neighborhood"]:
        pytest.skip("no triton neighborhood backend")
    cfg = dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), embed_dim=8, kernel_size=3,
               dilations=((1,), (2,), (1,), (1,)), num_classes=5)
    with visattn.use_backend("auto"):
        model = nat_mod.NAT(**cfg).train()  # built outside the "torch" context: the layers dispatch per call
    assert all(m.use_kernel for m in model.modules() if hasattr(m, "use_kernel"))
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "rpb", None) is not None:
                m.rpb.normal_()
    x = torch.randn(1, 3, 32, 32)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with visattn.use_backend(backend):
            out = model(x)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (o0, g0), (o1, g1) = results["torch"], results["triton"]
    torch.testing.assert_close(o1, o0, rtol=1e-3, atol=1e-4)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=2e-4, msg=lambda m, n=n: f"grad {n}: {m}")
