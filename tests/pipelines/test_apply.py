"""apply/remove guarantees on every tiny model (specs/diffusers.md §5.8, §8), with the dense method.

The oracle is the model's own default processors: the dense method re-implements each family's math
around diffusers' dispatcher, so outputs must match, and removing must restore them bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn.pipelines as vp
from visattn.pipelines.apply import enumerate_processors
from visattn.pipelines.tiny import TINY_MODELS, tiny_inputs, tiny_model

# small grids keep the suite fast; the sizes of spec §8 are exercised by the neighborhood tests
_SIZES = {
    "unet": 16,
    "wan": 16,
    "flux": 16,
    "sd3": 32,
    "hunyuanvideo": 16,
    "cogvideox": 16,
    "ltx": 8,
    "dit": 16,
}


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("name", TINY_MODELS)
def test_dense_matches_default_and_remove_is_exact(name, tiny):
    model = tiny(name)
    inputs = tiny_inputs(name, size=_SIZES[name])
    keys_before = list(model.state_dict().keys())
    before = enumerate_processors(model)
    ref = _run(model, inputs)

    handle = vp.apply(model, "dense", stats=True)
    after = enumerate_processors(model)
    assert list(after) == list(before)  # same keys, same count
    for key, (_, proc) in after.items():
        if (handle.components and ("transformer" if name != "unet" else "unet"), key) in handle.processors:
            assert isinstance(proc, vp.VisattnProcessor)
        else:
            assert proc is before[key][1], f"untargeted {key} was replaced"
    assert all(".attn2." not in k and "refiner" not in k for _, k in handle.processors)
    assert list(model.state_dict().keys()) == keys_before
    out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    stats = handle.stats()
    assert stats["total_calls"] >= len(handle.processors) and stats["attention_time_s"] > 0

    handle.remove()
    restored = enumerate_processors(model)
    assert all(restored[k][1] is before[k][1] for k in before)
    assert torch.equal(_run(model, inputs), ref)
    assert list(model.state_dict().keys()) == keys_before
    assert not hasattr(model, "_visattn_handle")
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks


@pytest.mark.parametrize("name", ["flux", "wan", "sd3"])
def test_fused_qkv(name):
    # diffusers' FusedJointAttnProcessor2_0 skips QK-norm (the unfused one applies it); visattn keeps the
    # model's math, so SD3 is compared without QK-norm, where both agree
    model = tiny_model(name, **({"qk_norm": None} if name == "sd3" else {}))
    inputs = tiny_inputs(name, size=_SIZES[name])
    model.fuse_qkv_projections()
    ref = _run(model, inputs)
    with vp.apply(model, "dense"):
        out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_targets_and_block_indices(tiny):
    model = tiny("flux")
    h = vp.apply(model, "dense", targets=["single_transformer_blocks.*"])
    try:
        assert [k for _, k in h.processors] == ["single_transformer_blocks.0.attn.processor"]
        assert next(iter(h.processors.values())).block_index == 1  # offset by the one double block
    finally:
        h.remove()
    model = tiny("unet")
    h = vp.apply(model, "dense", targets=[0, 1, 2])  # execution order: down, mid, up (keys list up first)
    try:
        by_block = {p.block_index: k for (_, k), p in h.processors.items()}
        assert by_block[0].startswith("down_blocks.0") and by_block[1].startswith("mid_block")
        assert (
            by_block[2].startswith("up_blocks.1") and len(h.processors) == 6
        )  # explicit targets: attn1 + attn2
    finally:
        h.remove()


def test_pipeline_components_and_remove_function():
    from visattn.pipelines._tiny_pipes import TinyDiT

    pipe = TinyDiT(sample_size=8)
    before = enumerate_processors(pipe.transformer)
    h = vp.apply(pipe, "dense")
    assert list(h.components) == ["transformer"]
    with pytest.raises(ValueError, match="already applied.*replace=True"):
        vp.apply(pipe, "dense")
    with pytest.raises(ValueError, match="already applied"):
        vp.apply(pipe.transformer, "dense")
    h2 = vp.apply(pipe, "dense", replace=True)
    assert not h.active and h2.active
    assert vp.remove(pipe) is True
    assert vp.remove(pipe) is False
    after = enumerate_processors(pipe.transformer)
    assert all(after[k][1] is before[k][1] for k in before)


def test_bad_input(tiny):
    model = tiny("dit")
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*dense"):
        vp.apply(model, "nope")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'"):
        vp.apply(model, "dense", preset="nope")
    with pytest.raises(
        TypeError, match=r"unknown DenseConfig field.*\['bogus'\].*valid fields: \['dispatch_backend'\]"
    ):
        vp.apply(model, "dense", {"bogus": 1})
    with pytest.raises(TypeError, match="unknown DenseConfig field"):
        vp.apply(model, "dense", bogus=1)
    with pytest.raises(TypeError, match="dispatch_backend=3 does not match"):
        vp.apply(model, "dense", dispatch_backend=3)
    with pytest.raises(ValueError, match="dispatch_backend must be one of"):
        vp.apply(model, "dense", dispatch_backend="warp_drive")
    with pytest.raises(TypeError, match="config must be a DenseConfig or a dict"):
        vp.apply(model, "dense", config=[1])
    with pytest.raises(ValueError, match=r"found no supported attention.*Linear"):
        vp.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match="found no supported attention"):
        vp.apply(model, "dense", targets=["no_such_key*"])
    assert enumerate_processors(model)  # nothing half-installed
    assert not hasattr(model, "_visattn_handle")


def test_strict_and_user_processors_untouched(tiny):
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny("dit")
    key = next(iter(enumerate_processors(model)))
    mod = enumerate_processors(model)[key][0]
    orig = mod.get_processor()
    custom = AttnProcessor()  # a processor the user chose: never targeted
    mod.set_processor(custom)
    try:
        with pytest.raises(ValueError, match="found no supported attention"):
            vp.apply(model, "dense")
        with pytest.raises(ValueError, match="does not support"):
            vp.apply(model, "dense", strict=True)
        assert mod.get_processor() is custom
    finally:
        mod.set_processor(orig)


def test_native_math_backend_reaches_fallback(tiny, monkeypatch):
    """Cross-attention falls back to the dispatcher, which honours ``attention_backend(...)``."""
    from diffusers import attention_backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    calls = []
    real = _AttentionBackendRegistry._backends[name]

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counting)
    model = tiny("wan")
    inputs = tiny_inputs("wan", size=8)
    ref = _run(model, inputs)
    with vp.apply(model, "dense", targets=["blocks.*"], stats=True) as h:
        with attention_backend("_native_math"):
            out = _run(model, inputs)
        assert h.stats()["fallbacks"] == {"cross-attention runs dense": 2}
    assert len(calls) == 4  # 2 self + 2 cross attentions, all through the dispatcher
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_save_pretrained_restores_defaults(tmp_path, tiny):
    model = tiny("dit")
    with vp.apply(model, "dense"):
        model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(not isinstance(p, vp.VisattnProcessor) for _, p in enumerate_processors(loaded).values())


@pytest.mark.parametrize("name", ["unet", "wan"])  # direct SDPA (legacy) and the native dispatcher
def test_sdpa_override(name, tiny):
    import torch.nn.functional as F

    model = tiny(name)
    inputs = tiny_inputs(name, size=8)
    ref = _run(model, inputs)
    seen = []

    def my_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append(q.shape)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )

    with vp.sdpa_override(my_sdpa) as mode:
        out = _run(model, inputs)
    assert mode.calls == len(seen) == len(enumerate_processors(model)) and torch.equal(out, ref)
    _run(model, inputs)
    assert mode.calls == len(seen)  # nothing rerouted after the block
    with pytest.raises(ValueError, match="expects a callable"):
        with vp.sdpa_override(None):
            pass
