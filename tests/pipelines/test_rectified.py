"""Rectified SpaAttn processors on tiny random-weight Wan, HunyuanVideo, CogVideoX and Flux (torch
backend, fp32). Oracles: the models' default processors (an all-kept configuration is dense
attention, text included) and the same processors with the Triton kernels in the interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import visattn
import visattn.pipelines as vp
from visattn.ops.rectified_plan import allow_test_block_sizes
from visattn.pipelines.rectified import RectifiedPipelineConfig
from visattn.pipelines.tiny import tiny_inputs

from ._method_checks import check_dense_equivalent_and_exact_remove, check_sparse_differs, run

_MODELS = ("wan", "hunyuanvideo", "cogvideox", "flux")
_ALL_KEPT = RectifiedPipelineConfig(cum_threshold=1.0, dense_steps=(), dense_blocks=())._with_block(16)
_SPARSE = RectifiedPipelineConfig(drop_rate=0.9, cum_threshold=0.1, neighbours=False)._with_block(16)


@pytest.fixture(autouse=True)
def _torch_backend():
    with visattn.use_backend("torch"), allow_test_block_sizes():  # tiny models: 16-token blocks
        yield


_run = run


@pytest.mark.parametrize("name", _MODELS)
def test_all_kept_matches_default_and_remove_is_exact(name, tiny):
    model = tiny(name)
    inputs = tiny_inputs(name, size=8, batch=2)
    if name == "hunyuanvideo":  # different valid text lengths per sample
        inputs["encoder_attention_mask"] = torch.tensor([[1] * 8 + [0] * 4, [1] * 11 + [0]])
    check_dense_equivalent_and_exact_remove(model, inputs, "rectified", _ALL_KEPT)


@pytest.mark.parametrize("name", _MODELS)
def test_sparse_runs_and_differs_from_dense(name, tiny):
    check_sparse_differs(tiny(name), tiny_inputs(name, size=16), "rectified", _SPARSE)


def test_wan_triton_matches_torch(tiny):
    model = tiny("wan")
    inputs = tiny_inputs("wan", size=16)
    with vp.apply(model, "rectified", _SPARSE.replace(backend="torch")):
        ref = _run(model, inputs)
    with vp.apply(model, "rectified", _SPARSE.replace(backend="triton")):
        out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", _MODELS)
def test_adapter_equals_per_call_permutation(name, tiny):
    model = tiny(name)
    inputs = tiny_inputs(name, size=16)
    before = _run(model, inputs)
    with vp.apply(model, "rectified", _SPARSE.replace(adapter=False), stats=True) as h:
        per_call = _run(model, inputs)
        assert h.stats()["calls"].get("rectified: per-call token order", 0) > 0
    with vp.apply(model, "rectified", _SPARSE, stats=True) as h:
        adapted = _run(model, inputs)
        assert h.stats()["calls"].get("rectified: per-call token order", 0) == 0
    torch.testing.assert_close(adapted, per_call, atol=1e-5, rtol=1e-5)
    assert (adapted - before).abs().max() > 1e-4
    assert torch.equal(_run(model, inputs), before)  # hooks removed with the processors


def test_presets_and_config_errors():
    names = RectifiedPipelineConfig.presets()
    assert "wan21_t2v_14b_720p" in names and "flux_dev_4096" in names
    for name in names:
        cfg = RectifiedPipelineConfig.from_preset(name)
        assert cfg.block_size == 128
    wan = RectifiedPipelineConfig.from_preset("wan21_t2v_14b_720p")
    assert wan.first_frame == "curve_prefix" and wan.dense_blocks == (0, 1)
    assert wan.dense_steps == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="backend"):
        RectifiedPipelineConfig(backend="cuda")
    with pytest.raises(ValueError, match="drop_rate"):
        RectifiedPipelineConfig(drop_rate=1.5)
