"""PSA processors on tiny random-weight Wan, HunyuanVideo and CogVideoX (torch backend, fp32).

Oracles: the models' default processors (all blocks at level 1 is dense attention, text included)
and the same processors run with the Triton kernels in the interpreter (Wan only, for time).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import visattn
import visattn.pipelines as vp
from visattn.ops._pyramid_config import allow_test_block_sizes
from visattn.pipelines.pyramid import PyramidPipelineConfig
from visattn.pipelines.tiny import tiny_inputs

from ._method_checks import check_dense_equivalent_and_exact_remove, check_sparse_differs, run

_MODELS = ("wan", "hunyuanvideo", "cogvideox")
_DENSE = dict(block_q=16, block_k=16, levels={1: 1.0}, mode="topk", align="none")
_SPARSE = dict(block_q=16, block_k=16, levels={1: 0.25, 2: 0.4, 4: 0.5, 8: 0.75}, mode="topk", align="none")


@pytest.fixture(autouse=True)
def _torch_backend():
    with visattn.use_backend("torch"), allow_test_block_sizes():  # tiny models: 16-token blocks
        yield


_run = run


@pytest.mark.parametrize("name", _MODELS)
def test_all_level1_matches_default_and_remove_is_exact(name, tiny):
    model = tiny(name)
    inputs = tiny_inputs(name, size=8, batch=2)
    if name == "hunyuanvideo":  # different valid text lengths per sample
        inputs["encoder_attention_mask"] = torch.tensor([[1] * 8 + [0] * 4, [1] * 11 + [0]])
    check_dense_equivalent_and_exact_remove(model, inputs, "pyramid", _DENSE)


@pytest.mark.parametrize("name", _MODELS)
def test_sparse_levels_run_and_differ_from_dense(name, tiny):
    check_sparse_differs(tiny(name), tiny_inputs(name, size=16), "pyramid", _SPARSE)


def test_wan_triton_matches_torch(tiny):
    model = tiny("wan")
    inputs = tiny_inputs("wan", size=16)
    with vp.apply(model, "pyramid", dict(_SPARSE, backend="torch")):
        ref = _run(model, inputs)
    with vp.apply(model, "pyramid", dict(_SPARSE, backend="triton")):
        out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_presets_and_config_errors():
    for name in PyramidPipelineConfig.presets():
        PyramidPipelineConfig.from_preset(name)
    c = PyramidPipelineConfig.from_preset("wan21_14b")
    assert c.dense_steps == tuple(range(15)) and c.token_order == "gilbert" and c.block_k == 128
    assert PyramidPipelineConfig.from_preset("wan22_a14b").dense_steps == tuple(range(12))
    with pytest.raises(ValueError, match="backend"):
        PyramidPipelineConfig(backend="cuda")
    with pytest.raises(ValueError, match="block_k"):
        PyramidPipelineConfig(block_k=48)


def test_gilbert_preset_installs_the_token_order_or_counts_raster(tiny):
    import importlib.util

    model = tiny("wan")
    inputs = tiny_inputs("wan", size=16)
    with vp.apply(model, "pyramid", dict(_SPARSE, token_order="gilbert"), stats=True) as h:
        out = _run(model, inputs)
        calls = h.stats()["calls"]
    assert torch.isfinite(out).all()
    has_order = importlib.util.find_spec("visattn.ops._token_order") is not None
    assert ("pyramid: raster order" in calls) != has_order, calls
