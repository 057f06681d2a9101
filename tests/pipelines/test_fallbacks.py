"""Visible fallbacks (specs/diffusers.md §4.4): inputs a method cannot run go through diffusers'
dispatcher and are counted with their reason in ``handle.stats()``, never silently.

* Context parallelism: a ``_parallel_config`` set on the processor being replaced is kept by the visattn
  processor, which then runs every call dense through the dispatcher *with* that config (a sparse pattern
  on sequence shards is wrong). A real ``ParallelConfig`` needs one process per rank; here a stand-in
  object is passed and diffusers' dispatcher is wrapped to record it and run single-process SDPA.
* A neighborhood call with an attention mask that is not text padding (Flux ``joint_attention_kwargs``).

Oracle: the same model with its default processors (the fallbacks are the default math).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import visattn
import visattn.pipelines as vp
import visattn.pipelines._base as base
from visattn.pipelines.tiny import tiny_inputs

from ._method_checks import run as _run

CP_REASON = "context parallelism (_parallel_config is set)"


class _StandInParallelConfig:
    """Stands in for ``diffusers.ParallelConfig``; only its identity is checked."""


@pytest.fixture(autouse=True)
def _torch_backend():
    with visattn.use_backend("torch"):
        yield


@pytest.fixture
def dispatched(monkeypatch):
    """The ``parallel_config`` of every dispatcher call made by visattn processors."""
    seen = []
    real = base.dispatch_attention_fn

    def recording(*args, parallel_config=None, **kwargs):
        seen.append(parallel_config)
        return real(*args, parallel_config=None, **kwargs)  # one process: plain SDPA

    monkeypatch.setattr(base, "dispatch_attention_fn", recording)
    return seen


@pytest.fixture
def parallel_originals():
    """``set_cp(model, keys)`` sets ``_parallel_config`` on those original processors (undone after)."""
    touched = []

    def set_cp(model, keys):
        cfg = _StandInParallelConfig()
        for k in keys:
            p = model.attn_processors[k]
            assert "_parallel_config" not in vars(p)
            p._parallel_config = cfg
            touched.append(p)
        return cfg

    yield set_cp
    for p in touched:
        del p._parallel_config


@pytest.mark.parametrize(
    "name,method,config,n_calls",
    [
        ("wan", "neighborhood", {"kernel_size": (1, 3, 3)}, 2),  # 2 blocks: VisattnProcessor._core
        ("unet", "agent", {"preset": "agentsd_sd15"}, 3),  # 3 attn1 at ds = 1: AgentSD's own planner
    ],
)
def test_context_parallel_config_falls_back_counted(
    tiny, dispatched, parallel_originals, name, method, config, n_calls
):
    model = tiny(name)
    inputs = tiny_inputs(name, size=8 if name == "wan" else 16, batch=2)
    ref = _run(model, inputs)  # before any _parallel_config: the defaults would shard for real
    keys = [k for k in model.attn_processors if k.endswith("attn1.processor")]
    cp = parallel_originals(model, keys)
    cfg = dict(config)
    with vp.apply(model, method, preset=cfg.pop("preset", None), stats=True, **cfg) as h:
        replaced = [p for (_, k), p in h.processors.items()]
        assert len(replaced) == n_calls and all(p._parallel_config is cp for p in replaced)
        out = _run(model, inputs)
        st = h.stats()
    assert st["fallbacks"] == {CP_REASON: n_calls}
    assert dispatched == [cp] * n_calls  # the config reached diffusers' dispatcher, once per call
    assert not any(k.startswith(method) for k in st["calls"]), st["calls"]  # the method never ran
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_neighborhood_mask_that_is_not_text_padding_falls_back_counted(tiny, dispatched):
    model = tiny("flux")
    inputs = tiny_inputs("flux", size=8)  # 16 text + 64 image tokens, one double and one single block
    n = inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1]
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, 16::3] = False  # masks image keys: not expressible as text padding
    masked = dict(inputs, joint_attention_kwargs={"attention_mask": mask})
    ref = _run(model, masked)
    assert not torch.allclose(ref, _run(model, inputs))  # the mask matters
    with vp.apply(model, "neighborhood", kernel_size=(3, 3), stats=True) as h:
        out = _run(model, masked)
        st = h.stats()
        assert st["fallbacks"] == {"neighborhood: attention mask is not text padding": 2}
        assert st["calls"] == {"NeighborhoodFluxAttnProcessor": 2}
        _run(model, inputs)  # without the mask the same handle runs the method, no new fallback
        assert h.stats()["fallbacks"] == st["fallbacks"]
    assert dispatched[:2] == [None, None]  # the two fallbacks went through the dispatcher
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
