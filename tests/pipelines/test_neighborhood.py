"""Neighborhood (GNA) processors on tiny random-weight models, torch backend, fp32 (specs/diffusers.md §8).

Oracles: the models' default processors (a window covering the whole grid is dense attention) and,
for real windows, the family's own math with SDPA under an explicit boolean mask built from
``neighborhood_mask`` plus the text columns (an independent attention path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn
import visattn.pipelines as vp
from visattn.ops import neighborhood_mask
from visattn.pipelines._families import FluxAttnBase, HunyuanVideoAttnBase, WanAttnBase
from visattn.pipelines.apply import enumerate_processors
from visattn.pipelines.neighborhood import NeighborhoodConfig
from visattn.pipelines.tiny import tiny_inputs, tiny_model

# (model, input size, whole-grid kernel)
_CASES = {
    "flux": (16, (16, 16)),
    "wan": (8, (2, 4, 4)),
    "hunyuanvideo": (8, (2, 8, 8)),
    "cogvideox": (8, (2, 4, 4)),
    "sd3": (16, (8, 8)),
    "unet": (8, (8, 8)),
    "ltx": (4, (2, 4, 4)),
    "dit": (8, (4, 4)),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with visattn.use_backend("torch"):
        yield


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("name", list(_CASES))
def test_full_window_matches_default_and_remove_is_exact(name, tiny):
    size, full = _CASES[name]
    model = tiny(name)
    inputs = tiny_inputs(name, size=size)
    keys = list(model.state_dict().keys())
    before = enumerate_processors(model)
    ref = _run(model, inputs)
    with vp.apply(model, "neighborhood", {"kernel_size": full}, stats=True) as h:
        after = enumerate_processors(model)
        assert len(after) == len(before) and list(model.state_dict().keys()) == keys
        for k, (_, p) in after.items():
            assert (p is before[k][1]) != isinstance(p, vp.VisattnProcessor), k
        out = _run(model, inputs)
        assert h.stats()["fallbacks"] == {} and h.stats()["total_calls"] > 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    restored = enumerate_processors(model)
    assert all(restored[k][1] is before[k][1] for k in before)
    assert torch.equal(_run(model, inputs), ref)


def _oracle(base):
    """The family's math around SDPA with an explicit GNA + text mask."""

    class Oracle(base):
        def attend(self, q, k, v, *, attn_mask=None, seq=None):
            B, N = q.shape[:2]
            grid, ks, st, dl = self.config.geometry(seq.video_grid)
            m = torch.zeros(B, N, N, dtype=torch.bool)
            vs, ts = seq.video_slice, seq.text_slice
            m[:, vs, vs] = neighborhood_mask(grid, ks, st, dl)
            valid = seq.valid_text(B).tolist()
            for b, n in enumerate(valid):
                m[b, vs, ts.start : ts.start + n] = True  # video queries: valid text as extra keys
                m[b, ts, vs] = True  # text queries: dense over valid keys
                m[b, ts, ts.start : ts.start + n] = True
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m[:, None]
            )
            return out.transpose(1, 2)

    return Oracle


def _with_oracle(model, cfg, base):
    """Install the oracle on the same keys (shares the context so the layout hook feeds it)."""
    h = vp.apply(model, "dense", replace=True)  # installs hooks + dense processors we then swap
    procs = {}
    for (comp, key), p in h.processors.items():
        procs[key] = _oracle(base)(
            cfg, original=p.original, key=key, block_index=p.block_index, context=h.context, component=comp
        )
    full = {k: procs.get(k, p) for k, (_, p) in enumerate_processors(model).items()}
    model.set_attn_processor(full)
    return h


@pytest.mark.parametrize(
    "name,base,size,cfg",
    [
        ("flux", FluxAttnBase, 16, dict(kernel_size=(5, 7), stride=(2, 3), dilation=(2, 1))),
        ("wan", WanAttnBase, 8, dict(kernel_size=(1, 3, 2), stride=(1, 1, 2))),
        (
            "hunyuanvideo",
            HunyuanVideoAttnBase,
            8,
            dict(kernel_size=(2, 3, 5), stride=(1, 3, 1), dilation=(1, 2, 1)),
        ),
    ],
)
def test_window_matches_masked_sdpa(name, base, size, cfg):
    model = tiny_model(name)
    inputs = tiny_inputs(name, size=size, batch=2)
    if name == "hunyuanvideo":  # different valid text lengths per batch element
        inputs["encoder_attention_mask"] = torch.tensor([[1] * 8 + [0] * 4, [1] * 11 + [0]])
    config = NeighborhoodConfig(**cfg)
    dense = _run(model, inputs)
    h = _with_oracle(model, config, base)
    ref = _run(model, inputs)
    h.remove()
    with vp.apply(model, "neighborhood", config, stats=True) as h:
        out = _run(model, inputs)
        assert h.stats()["fallbacks"] == {}
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # the window really is sparse


def test_config_and_presets():
    c = NeighborhoodConfig.from_preset("wan21_480p")
    assert len(c.kernel_size) == 3 and c.dense_steps is not None
    for name in NeighborhoodConfig.presets():
        NeighborhoodConfig.from_preset(name)
    assert set(NeighborhoodConfig.presets()) >= {"flux_1024", "wan21_480p", "wan21_720p", "hunyuanvideo_720p"}
    c = NeighborhoodConfig.from_preset("flux_1024", stride=(4, 4))
    assert c.stride == (4, 4)
    assert vp.parse_assignment(NeighborhoodConfig, "kernel_size=[3, 9, 9]") == ("kernel_size", (3, 9, 9))
    assert vp.parse_assignment(NeighborhoodConfig, "dense-steps=0.25") == ("dense_steps", 0.25)
    with pytest.raises(ValueError, match=r"stride\[1\]=8 must be <= kernel_size\[1\]=7"):
        NeighborhoodConfig(kernel_size=(3, 7), stride=(1, 8))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        NeighborhoodConfig(kernel_size=(0, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        NeighborhoodConfig(backend="cuda")
    with pytest.raises(ValueError, match="dense_steps as a fraction"):
        NeighborhoodConfig(dense_steps=2.0)
    with pytest.raises(
        TypeError, match=r"unknown NeighborhoodConfig field.*window.*valid fields: \['kernel_size'"
    ):
        vp.parse_assignment(NeighborhoodConfig, "window=3")
    with pytest.raises(TypeError, match="kernel_size='big' does not match"):
        vp.parse_assignment(NeighborhoodConfig, "kernel_size=big")
    with pytest.raises(
        ValueError, match=r"unknown preset 'nope' for method 'neighborhood'; supported presets: \["
    ):
        NeighborhoodConfig.from_preset("nope")


def test_fallbacks_reach_the_dispatcher_backend(tiny, monkeypatch):
    from diffusers import attention_backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    calls = []
    real = _AttentionBackendRegistry._backends[name]
    monkeypatch.setitem(
        _AttentionBackendRegistry._backends, name, lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    model = tiny("flux")
    inputs = tiny_inputs("flux", size=8)
    ref = _run(model, inputs)
    with vp.apply(model, "neighborhood", kernel_size=(3, 3), min_seq_len=10_000, stats=True) as h:
        with attention_backend("_native_math"):
            out = _run(model, inputs)
        assert h.stats()["fallbacks"] == {"neighborhood: sequence shorter than min_seq_len": 2}
    assert len(calls) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # no grid known (Flux without matching img_ids): counted, never silent
    bad = dict(inputs, img_ids=torch.zeros_like(inputs["img_ids"]))
    with vp.apply(model, "neighborhood", kernel_size=(3, 3), stats=True) as h:
        _run(model, bad)
        assert h.stats()["fallbacks"] == {"neighborhood: no token grid for this call (layout unknown)": 2}
    with vp.apply(model, "neighborhood", kernel_size=(32, 32), clamp=False, stats=True) as h:
        _run(model, inputs)
        assert list(h.stats()["fallbacks"]) == ["neighborhood: window larger than the grid (clamp=False)"]


def test_dense_steps_and_blocks_follow_the_real_step():
    from visattn.pipelines._tiny_pipes import TinyWan

    p = TinyWan()
    kw = dict(steps=3, height=32, width=32, frames=1, progress=False)
    with vp.apply(p, "neighborhood", kernel_size=(1, 3, 3), dense_steps=(0, -1), stats=True) as h:
        p.generate(**kw)
        stats = h.stats()
    # 3 steps x (cond + uncond) x 2 layers; steps 0 and 2 dense
    assert stats["calls"] == {"NeighborhoodWanAttnProcessor": 12} and stats["dense_by_schedule"] == 8
    with vp.apply(p, "neighborhood", kernel_size=(1, 3, 3), dense_blocks=(1,), stats=True) as h:
        p.generate(**kw)
        assert h.stats()["dense_by_schedule"] == 6


def test_bad_targets_and_double_apply(tiny):
    model = tiny("wan")
    with pytest.raises(ValueError, match="kernel_size must be an int or 1 to 3"):
        vp.apply(model, "neighborhood", kernel_size=(1, 2, 3, 4))
    h = vp.apply(model, "neighborhood")
    try:
        with pytest.raises(ValueError, match="'neighborhood' is already applied"):
            vp.apply(model, "neighborhood")
    finally:
        h.remove()


def test_op_that_cannot_run_falls_back_unless_a_backend_was_named(tiny, monkeypatch):
    import visattn.pipelines.neighborhood as nb

    def cannot_run(*args, backend=None, **kwargs):
        raise NotImplementedError(
            "No visattn backend can run neighborhood attention for these inputs.\n"
            "  backend 'triton':\n    - head dims up to 256 are supported"
        )

    monkeypatch.setattr(nb, "neighborhood_attention", cannot_run)
    model = tiny("wan")
    inputs = tiny_inputs("wan", size=8)
    ref = _run(model, inputs)
    with visattn.use_backend("auto"), vp.apply(model, "neighborhood", kernel_size=(1, 3, 3), stats=True) as h:
        out = _run(model, inputs)
        reason = "neighborhood: the op cannot run these inputs (head dims up to 256 are supported)"
        assert h.stats()["fallbacks"] == {reason: 2}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with vp.apply(model, "neighborhood", kernel_size=(1, 3, 3), backend="triton"):
        with pytest.raises(NotImplementedError, match="head dims up to 256"):
            _run(model, inputs)
