"""Agent-attention backbones (spec agent.md §2.5, §5.2-5.3): parameter counts, upstream checkpoint filters
on synthetic upstream-layout state dicts (checked numerically), bias resampling on load, other and
non-square resolutions, and the timm members on tiny configurations (the full timm contract runs in
``test_timm_contract.py`` over ``visattn.backbones.list_models()``)."""

from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the families)

FAMILIES = ["agent_deit", "agent_pvt", "agent_swin", "agent_cswin"]

# Published counts (ANCHORS.md / spec §5.2, in millions) and the exact counts of upstream's own model
# constructors (LeapLabTHU/Agent-Attention @ 207ce3e, agent_transformer/models, built with the released
# cfgs/*.yaml arguments): the published "21M" of Agent-CSwin-T is a rounding of 20.46M.
PARAMS = {
    "agent_deit_tiny": (6.0, 6015640), "agent_deit_small": (22.7, 22647112),
    "agent_deit_small_448": (23.1, 23070472), "agent_deit_base": (87.2, 87204904),
    "agent_pvt_tiny": (11.6, 11570352), "agent_pvt_small": (20.6, 20635066), "agent_pvt_medium": (35.9, 35921746),
    "agent_pvt_medium_256": (36.1, 36083682), "agent_pvt_large": (48.7, 48738180),
    "agent_swin_tiny": (29, 28902964), "agent_swin_small": (50, 49666684), "agent_swin_small_288": (50, 49707964),
    "agent_swin_base": (88, 88095096), "agent_swin_base_384": (88, 88305016),
    "agent_cswin_tiny": (21, 20458672), "agent_cswin_small": (33, 32814100), "agent_cswin_base": (73, 73249696),
    "agent_cswin_base_384": (73, 73328416),
}

TINY = {  # small configurations of each family for numerical checks on the CPU
    "agent_deit": dict(name="agent_deit_tiny", kw=dict(img_size=64, embed_dim=24, depth=2, num_heads=2, agent_num=4)),
    "agent_pvt": dict(name="agent_pvt_tiny", kw=dict(img_size=64, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                                                     num_heads=(1, 2, 2, 2), agent_num=(4, 4, 4, 1))),
    "agent_swin": dict(name="agent_swin_tiny", kw=dict(img_size=64, embed_dim=8, depths=(1, 2, 2, 1),
                                                       num_heads=(1, 2, 2, 2), window_size=56, attn_type="AMBB1",
                                                       agent_num=(4, 4, 4, 1))),
    "agent_cswin": dict(name="agent_cswin_tiny", kw=dict(img_size=64, embed_dim=8, depths=(1, 1, 2, 1),
                                                         num_heads=(2, 2, 2, 2), split_size=(1, 2, 2, 2),
                                                         agent_num=(4, 4, 4, 4))),
}

# keys an upstream checkpoint of each tiny config must contain (spec §5.3's table)
UPSTREAM_KEYS = {
    "agent_deit": ["pos_embed", "cls_token", "blocks.0.attn.ac_bias", "blocks.1.attn.dwc.weight", "head.weight"],
    "agent_pvt": ["patch_embed1.proj.weight", "pos_embed2", "block3.0.attn.q.weight", "block4.0.attn.kv.bias",
                  "block1.0.attn.ha_bias", "head.weight"],
    "agent_swin": ["layers.0.downsample.reduction.weight", "layers.2.blocks.1.attn.relative_position_bias_table",
                   "layers.0.blocks.0.attn.an_bias", "head.weight", "norm.weight"],
    "agent_cswin": ["stage1_conv_embed.0.weight", "stage1_conv_embed.2.bias", "merge1.conv.weight",
                    "stage1.0.attns.0.get_v.weight", "stage3.1.attns.1.get_v.weight", "stage4.0.qkv.weight"],
}


def _tiny(family, dtype=torch.float32, **over):
    # float32: float64 convolutions take CPU torch's slow path (seconds per forward)
    t = TINY[family]
    m = timm.create_model(t["name"], **{**t["kw"], **over}, backend="torch").to(dtype).eval()
    with torch.no_grad():  # random biases large enough to matter
        for n, p in m.named_parameters():
            if n.endswith("_bias") or n.endswith("pos_embed") or n.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return m


def _module(family):
    return importlib.import_module(f"visattn.backbones.{family}")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    m = timm.create_model(name, device="meta")
    n = sum(p.numel() for p in m.parameters())
    published, upstream = PARAMS[name]
    assert n == upstream
    assert abs(n / 1e6 - published) / published < 0.03


def test_registered_names():
    names = set(visattn.backbones.list_models("agent_*"))
    assert names == set(PARAMS)
    for n in names:
        assert timm.models.get_pretrained_cfg(n).paper_ids == "arXiv:2312.08874"


def _upstream_layout(family, model):
    mod = _module(family)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if family != "agent_deit":
        sd = mod.to_upstream_state_dict(sd)
    if family == "agent_swin":  # upstream stores index buffers; the filter drops them
        for k in list(sd):
            if k.endswith("relative_position_bias_table"):
                sd[k[: -len("relative_position_bias_table")] + "relative_position_index"] = torch.zeros(1)
    return sd


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_filter_round_trip(family):
    src = _tiny(family)
    sd = _upstream_layout(family, src)
    for k in UPSTREAM_KEYS[family]:
        assert k in sd, k
    dst = timm.create_model(TINY[family]["name"], **TINY[family]["kw"], backend="torch").eval()
    for wrapper in ({"model": sd}, {"state_dict_ema": sd}, sd):
        filtered = _module(family).checkpoint_filter_fn(dict(wrapper), dst, use_ema="state_dict_ema" in wrapper)
        dst.load_state_dict(filtered, strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def _agent_modules(model):
    from visattn.layers import AgentAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, AgentAttention)]


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_resampling_on_load(family):
    """A checkpoint trained at 64 px loaded into a 128 px model with more agents in its first stage."""
    src = _tiny(family)
    sd = _upstream_layout(family, src)
    kw = dict(TINY[family]["kw"], img_size=128)
    if family == "agent_deit":
        kw["agent_num"] = 9
    else:
        kw["agent_num"] = (9,) + tuple(kw["agent_num"][1:])
    dst = timm.create_model(TINY[family]["name"], **kw, backend="torch").eval()
    filtered = _module(family).checkpoint_filter_fn({"model": sd}, dst)
    dst.load_state_dict(filtered, strict=True)
    name, m_src = _agent_modules(src)[0]
    _, m_dst = _agent_modules(dst)[0]
    g0, n0 = m_src.agent_shape, m_src.agent_shape[0] * m_src.agent_shape[1]
    h = m_src.num_heads

    def agents_i2(t, axis):  # I2 along the agent grid (g0 -> 3x3), written out with F.interpolate
        t = t.movedim(axis, -1)
        lead = t.shape[:-1]
        r = F.interpolate(t.reshape(1, -1, *g0), size=(3, 3), mode="bilinear", align_corners=False)
        return r.reshape(*lead, 9).movedim(-1, axis)

    H0 = m_src.grid[0]
    H1 = m_dst.grid[0]
    ah = F.interpolate(m_src.ah_bias.reshape(1, h * n0, H0), size=H1, mode="linear", align_corners=False)
    ah = agents_i2(ah.reshape(h, n0, H1), 1).reshape(1, h, 9, H1, 1)
    torch.testing.assert_close(m_dst.ah_bias, ah)
    wa = F.interpolate(m_src.wa_bias.reshape(h, -1, n0).transpose(1, 2).reshape(1, h * n0, -1), size=m_dst.grid[1],
                       mode="linear", align_corners=False)
    wa = agents_i2(wa.reshape(h, n0, -1), 1).transpose(1, 2).reshape(m_dst.wa_bias.shape)
    torch.testing.assert_close(m_dst.wa_bias, wa)
    an = agents_i2(m_src.an_bias.reshape(h, n0, 49), 1).reshape(h, 9, 7, 7)  # block maps keep 7x7
    torch.testing.assert_close(m_dst.an_bias, an)
    if family == "agent_deit":
        torch.testing.assert_close(m_dst.ca_bias, agents_i2(m_src.ca_bias, 3))
        pe = filtered["pos_embed"]
        assert pe.shape == dst.pos_embed.shape
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 128, 128))).all()


def test_filter_rejects_head_mismatch():
    src = _tiny("agent_pvt")
    sd = _upstream_layout("agent_pvt", src)
    dst = timm.create_model("agent_pvt_tiny", **dict(TINY["agent_pvt"]["kw"], num_heads=(2, 2, 2, 2)))
    with pytest.raises(ValueError, match="heads in stages.0.blocks.0.attn.an_bias"):
        _module("agent_pvt").checkpoint_filter_fn({"model": sd}, dst)


def test_pvt_pos_embed_resampled_bilinearly_on_load():
    src = _tiny("agent_pvt")
    sd = _upstream_layout("agent_pvt", src)
    dst = timm.create_model("agent_pvt_tiny", **dict(TINY["agent_pvt"]["kw"], img_size=96))
    out = _module("agent_pvt").checkpoint_filter_fn({"model": sd}, dst)
    pe = sd["pos_embed1"].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(pe, size=(24, 24), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out["stages.0.pos_embed"], expect)


@pytest.mark.parametrize("family", FAMILIES)
def test_other_and_non_square_resolutions(family):
    m = _tiny(family)
    for size in [(64, 96), (96, 64), (80, 80)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            out = m(x)
            feats = m.forward_features(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        if family != "agent_deit":
            for got, n in zip(feats.shape[-2:], size):  # odd maps: floor (strided conv) or ceil (padding)
                assert n // 32 <= got <= -(-n // 32)
        else:
            assert feats.shape[1] == 1 + (size[0] // 16) * (size[1] // 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_members_on_tiny_config(family):
    m = _tiny(family)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m.set_grad_checkpointing(True)
        torch.testing.assert_close(m(x), ref)
        m.set_grad_checkpointing(False)
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        if family != "agent_deit":
            assert [t.shape[1] for t in inter] == [f["num_chs"] for f in m.feature_info]
    assert m.group_matcher() and m.group_matcher(coarse=True)
    for n in m.no_weight_decay():
        assert n in dict(m.named_parameters())
    m.reset_classifier(5)
    assert m(x).shape == (2, 5)
    m.reset_classifier(0)
    assert m(x).dim() == 2
    with pytest.raises(TypeError):
        timm.create_model(TINY[family]["name"], **TINY[family]["kw"], not_a_kwarg=1)


@pytest.mark.parametrize("family", ["agent_pvt", "agent_swin", "agent_cswin"])
def test_features_only(family):
    t = TINY[family]
    m = timm.create_model(t["name"], **t["kw"], features_only=True, out_indices=(1, 3))
    feats = m(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == m.feature_info.channels()
    assert [f.shape[-1] for f in feats] == [8, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_every_parameter_gets_a_gradient(family):
    t = TINY[family]
    m = timm.create_model(t["name"], **t["kw"], num_classes=7, backend="sdpa").train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_backend_matches_reference_backend(family):
    m = _tiny(family)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        for mod in m.modules():
            if hasattr(mod, "an_bias"):
                mod.backend = "sdpa"
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
