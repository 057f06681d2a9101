"""Layout hooks and step tracking (specs/diffusers.md §6): the real step, never processor-call counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn.pipelines as vp
from visattn.pipelines._tiny_pipes import TinyDiT, TinyWan
from visattn.pipelines.hooks import StepHook
from visattn.pipelines.schedule import Schedule


def _record(model, handle):
    seen = []
    hook = model.register_forward_hook(
        lambda m, a, o: seen.append(
            (handle.context.step_index, handle.context.step_source, handle.context.cfg_branch)
        )
    )
    return seen, hook


def _wan():
    p = TinyWan()
    return p, dict(steps=3, height=32, width=32, frames=1, progress=False)


def test_wan_separate_cfg_scheduler_step_index():
    p, kw = _wan()
    h = vp.apply(p, "dense")
    seen, hook = _record(p.transformer, h)
    p.generate(**kw)
    hook.remove()
    h.remove()
    assert [s for s, _, _ in seen] == [0, 0, 1, 1, 2, 2]
    assert {src for _, src, _ in seen} == {"scheduler"}


def test_wan_bare_model_counts_distinct_timesteps_and_restarts():
    p, kw = _wan()
    h = vp.apply(p.transformer, "dense")  # no pipeline: the timestep argument is the source
    seen, hook = _record(p.transformer, h)
    p.generate(**kw)
    p.generate(**kw)  # the rising timestep starts a new generation
    hook.remove()
    h.remove()
    assert [s for s, _, _ in seen] == [0, 0, 1, 1, 2, 2] * 2
    assert {src for _, src, _ in seen} == {"timestep"}


def test_cache_context_step_index_wins():
    p = TinyWan(pass_step_index=True)
    h = vp.apply(p.transformer, "dense")
    seen, hook = _record(p.transformer, h)
    p.generate(steps=2, height=32, width=32, frames=1, progress=False)
    hook.remove()
    h.remove()
    assert seen == [
        (0, "cache_context", "cond"),
        (0, "cache_context", "uncond"),
        (1, "cache_context", "cond"),
        (1, "cache_context", "uncond"),
    ]
    assert h.context.num_steps == 2


def test_dit_pipeline_batched_cfg_without_step_index():
    pipe = TinyDiT(sample_size=8)
    assert not hasattr(pipe.scheduler, "step_index")
    h = vp.apply(pipe.pipe, "dense", stats=True)
    seen, hook = _record(pipe.transformer, h)
    pipe.generate(steps=3, guidance=4.0, progress=False)
    hook.remove()
    h.remove()
    assert seen == [(0, "timestep", None), (1, "timestep", None), (2, "timestep", None)]
    assert h.stats()["calls"] == {"DenseAttnProcessor": 3 * 2}  # 2 layers, one batched call per step


def test_callback_is_the_last_source():
    ctx_handle = SimpleNamespace(
        context=vp.AttnContext(), scheduler=None, schedule=Schedule(dense_steps=(1,))
    )
    hook = StepHook(ctx_handle, "transformer")
    module = torch.nn.Identity()  # no timestep argument
    hook.pre_forward(module, torch.zeros(1))
    assert (ctx_handle.context.step_index, ctx_handle.context.step_source) == (0, "callback")
    assert ctx_handle.context.dense_step is False
    vp.ApplyHandle.callback(SimpleNamespace(context=ctx_handle.context), None, 0, 999, {})
    hook.pre_forward(module, torch.zeros(1))
    assert ctx_handle.context.step_index == 1 and ctx_handle.context.dense_step is True


def test_schedule():
    s = Schedule(dense_steps=0.25, dense_blocks=(0, "single_*"))
    assert [s.is_dense_step(i, 8) for i in range(4)] == [True, True, False, False]
    assert not s.is_dense_step(0, None) and not s.is_dense_step(None, 8)
    assert Schedule(dense_steps=(0, -1)).is_dense_step(9, 10)
    assert s.is_dense_block(0, "x") and s.is_dense_block(5, "single_transformer_blocks.0.attn.processor")
    assert not s.is_dense_block(1, "transformer_blocks.1.attn.processor")
    with pytest.raises(ValueError, match="dense_steps as a fraction"):
        Schedule(dense_steps=1.5)
    with pytest.raises(ValueError, match="dense_blocks"):
        Schedule(dense_blocks=(-1,))


def test_layouts_recorded(tiny):
    from visattn.pipelines.tiny import tiny_inputs

    model = tiny("hunyuanvideo")
    with vp.apply(model, "dense") as h, torch.no_grad():
        model(**tiny_inputs("hunyuanvideo", size=8))
        lay = h.context.layouts["transformer"]
    assert lay.video_grid == (2, 8, 8) and lay.text_len == 12 and lay.text_position == "end"
    assert lay.text_valid_len.tolist() == [8]  # a device tensor from encoder_attention_mask, no host read
    model = tiny("unet")
    with vp.apply(model, "dense") as h, torch.no_grad():
        model(**tiny_inputs("unet", size=16))
        assert h.context.latent_hw["unet"] == (16, 16)


def test_two_experts_share_one_context():
    """Wan 2.2: ``transformer`` and ``transformer_2`` share the step index (the scheduler's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from visattn.pipelines.tiny import tiny_inputs, tiny_model

    pipe = SimpleNamespace(
        transformer=tiny_model("wan"),
        transformer_2=tiny_model("wan", seed=1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.scheduler.set_timesteps(4)
    x = tiny_inputs("wan", size=8)
    seen = []
    with vp.apply(pipe, "dense") as h, torch.no_grad():
        assert set(h.components) == {"transformer", "transformer_2"}
        assert len({id(p.context) for p in h.processors.values()}) == 1
        for i, t in enumerate(pipe.scheduler.timesteps):
            expert = pipe.transformer if i < 2 else pipe.transformer_2
            out = expert(**{**x, "timestep": t.expand(1)})[0]
            seen.append((h.context.step_index, h.context.expert))
            pipe.scheduler.step(out, t, x["hidden_states"])
    assert seen == [(0, "transformer"), (1, "transformer"), (2, "transformer_2"), (3, "transformer_2")]


def test_compile_fullgraph_flux_neighborhood_schedule():
    """``torch.compile(fullgraph=True)`` of the tiny Flux's blocks with visattn processors after an eager
    warm-up: dense step 0, then sparse; one graph per block class and branch (a recompile each)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import visattn
    from visattn.pipelines.tiny import tiny_inputs, tiny_model

    torch._dynamo.reset()
    model = tiny_model("flux")
    inputs = tiny_inputs("flux", size=8)
    ts = [torch.tensor([t]) for t in (1.0, 0.5, 0.25)]
    with torch.no_grad():
        ref = model(**{**inputs, "timestep": ts[0]})[0]  # diffusers' default processors
    h = vp.apply(model, "neighborhood", kernel_size=(3, 5), backend="torch", dense_steps=(0,), stats=True)
    try:
        with torch.no_grad(), visattn.use_backend("torch"):
            eager = [model(**{**inputs, "timestep": t})[0] for t in ts[:2]]  # warm-up: dense, then sparse
            counters.clear()
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            outs = [model(**{**inputs, "timestep": t})[0] for t in ts]  # a new generation (rising t)
        graphs = counters["stats"]["unique_graphs"]
        assert 2 <= graphs <= 4, f"{graphs} graphs: expected one per block class and dense/sparse branch"
        assert [h.context.step_index, h.context.dense_step] == [2, False]
        torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)  # the dense step
        torch.testing.assert_close(outs[0], eager[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[1], eager[1], atol=1e-5, rtol=1e-5)
    finally:
        h.remove()
        torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= in diffusers' Heun
def test_second_order_scheduler_steps():
    """Heun calls the model twice per step (after the first); its step_index counts calls."""
    from diffusers import HeunDiscreteScheduler

    from visattn.pipelines.tiny import tiny_inputs, tiny_model

    sched = HeunDiscreteScheduler()
    pipe = SimpleNamespace(transformer=tiny_model("dit"), scheduler=sched)
    x = tiny_inputs("dit", size=8)
    seen = []
    with vp.apply(pipe, "dense") as h, torch.no_grad():
        sched.set_timesteps(3)
        sample = x["hidden_states"]
        for t in sched.timesteps:
            out = pipe.transformer(**{**x, "hidden_states": sample, "timestep": t.expand(1)})[0][:, :4]
            seen.append(h.context.step_index)
            sample = sched.step(out, t, sample).prev_sample
    assert seen == [0, 1, 1, 2, 2]
