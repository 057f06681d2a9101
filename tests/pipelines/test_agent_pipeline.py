"""AgentSD processor tests (spec agent.md §2.6, §3.4, §5.1, §6; diffusers.md §4, §5.8) on the tiny UNet.

The float64 reference (``_agent_reference.py``) is written from agent.md §2.6 (steps 1-6) with explicit
loops and softmaxes; the tests call nothing from visattn besides it except to draw the dst offsets of
one call, which the op tests check against brute force.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from visattn.ops.agent_merge import dst_offsets  # noqa: E402
from visattn.pipelines._context import AttnContext  # noqa: E402
from visattn.pipelines.agent import (  # noqa: E402
    AgentSDConfig,
    AgentSDPhase,
    AgentUNetAttnProcessor,
    _stream_seed,
    unet_downsample_levels,
)

from ._agent_reference import reference_agentsd  # noqa: E402

UNET_KWARGS = dict(
    block_out_channels=(64, 128),
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(1, 2),
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    sample_size=32,
)


@pytest.fixture(scope="module")
def unet64():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_KWARGS).eval().double()


def _block(unet, where: str):
    return {
        "down": unet.down_blocks[0].attentions[0].transformer_blocks[0],
        "mid": unet.mid_block.attentions[0].transformer_blocks[0],
    }[where]


def _proc(cfg, latent_hw, key="down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", step=None):
    ctx = AttnContext(latent_hw={"unet": latent_hw}, step_index=step)
    ctx.stats.enabled = True
    return AgentUNetAttnProcessor(
        cfg, original=AttnProcessor2_0(), key=key, block_index=0, context=ctx, component="unet"
    )


# (where, latent size, grid at the block, config fields, expected path)
REF_CASES = [
    ("down", (12, 16), (12, 16), dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), "agent"),
    ("down", (12, 16), (12, 16), dict(sx=2, sy=2, ratio=0.5, agent_ratio=0.5), "agent: tome only"),
    ("down", (11, 13), (11, 13), dict(sx=2, sy=3, ratio=0.3, agent_ratio=0.9), "agent"),  # leftover rows/cols
    ("down", (12, 16), (12, 16), dict(sx=4, sy=4, ratio=0.0, agent_ratio=0.95), "agent"),  # agents, no merge
    (
        "mid",
        (24, 32),
        (12, 16),
        dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, max_downsample=2),
        "agent",
    ),  # 2 heads
]


@pytest.mark.parametrize("where,latent,grid,fields,path", REF_CASES)
@pytest.mark.parametrize("use_rand", [True, False])
def test_processor_matches_float64_reference(unet64, where, latent, grid, fields, path, use_rand):
    block = _block(unet64, where)
    attn = block.attn1
    cfg = AgentSDConfig(use_rand=use_rand, seed=5, **fields)
    proc = _proc(cfg, latent, step=3)
    B, N = 2, grid[0] * grid[1]
    x = torch.randn(B, N, attn.to_q.in_features, dtype=torch.float64)
    with torch.no_grad():
        y = block.norm1(x)
        proc.set_block_input(x)
        out = proc(attn, y)
    gen = torch.Generator().manual_seed(_stream_seed(5, 3, proc.key))
    offs = dst_offsets(*grid, cfg.sx, cfg.sy, generator=gen, use_rand=use_rand)
    ref, used_agents = reference_agentsd(
        attn, x, y, grid, cfg.sx, cfg.sy, offs, cfg.ratio, cfg.agent_ratio, cfg.k_scale2, cfg.k_shortcut
    )
    assert used_agents == (path == "agent")
    assert proc.context.stats.calls[path] == 1
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_metric_attn_input_and_missing_block_input(unet64):
    block = _block(unet64, "down")
    attn = block.attn1
    cfg = dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=False)
    x = torch.randn(2, 192, 64, dtype=torch.float64)
    with torch.no_grad():
        y = block.norm1(x)
        out_attn = _proc(AgentSDConfig(metric="attn_input", **cfg), (12, 16))(attn, y)
        p = _proc(AgentSDConfig(**cfg), (12, 16))
        out_missing = p(attn, y)  # no pre-hook ran: the attention input is the metric, counted
    ref, _ = reference_agentsd(
        attn, y, y, (12, 16), 4, 4, torch.zeros(3, 4, dtype=torch.int64), 0.4, 0.95, 0.3, 0.075
    )
    torch.testing.assert_close(out_attn, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_missing, ref, rtol=1e-10, atol=1e-10)
    assert sum(p.context.stats.fallbacks.values()) == 1


def test_fp32_precision_matches_reference():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_KWARGS).eval()
    block = _block(unet, "down")
    x = torch.randn(2, 192, 64)
    cfg = AgentSDConfig(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=False, precision="fp32")
    with torch.no_grad():
        y = block.norm1(x)
        p = _proc(cfg, (12, 16))
        p.set_block_input(x)
        out = p(block.attn1, y)
    ref, _ = reference_agentsd(
        block.attn1,
        x.double(),
        y.double(),
        (12, 16),
        4,
        4,
        torch.zeros(3, 4, dtype=torch.int64),
        0.4,
        0.95,
        0.3,
        0.075,
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp32_precision_is_not_undone_by_autocast():
    q, k, v = (torch.randn(2, 150, 2, 64) for _ in range(3))
    a = torch.randn(2, 12, 2, 64)
    p = _proc(AgentSDConfig(precision="fp32", backend="sdpa"), (10, 15))
    plain = p._agent_attention(q, k, v, a, 0.125)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = p._agent_attention(q, k, v, a, 0.125)
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fields", [dict(ratio=0.0, agent_ratio=0.0), dict(ratio=0.5, max_downsample=1)])
def test_degenerate_configs_equal_attn_processor(fields):
    """ratio 0 with agents off, and a block deeper than max_downsample, are AttnProcessor2_0 (fp32, 1e-5)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_KWARGS).eval()
    where, latent, n = ("down", (32, 32), 1024) if fields["ratio"] == 0 else ("mid", (32, 32), 256)
    attn = _block(unet, where).attn1
    y = torch.randn(2, n, attn.to_q.in_features)
    with torch.no_grad():
        out = _proc(AgentSDConfig(**fields), latent)(attn, y)
        ref = AttnProcessor2_0()(attn, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mask_or_encoder_states_raise_on_merging_calls(unet64):
    attn = _block(unet64, "down").attn1
    y = torch.randn(2, 192, 64, dtype=torch.float64)
    p = _proc(AgentSDConfig(), (12, 16))
    with pytest.raises(NotImplementedError, match="attention_mask"):
        p(attn, y, attention_mask=torch.zeros(2, 1, 192, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="encoder_hidden_states"):
        p(attn, y, encoder_hidden_states=torch.randn(2, 192, 64, dtype=torch.float64))


def test_unknown_latent_size_falls_back_counted(unet64):
    attn = _block(unet64, "down").attn1
    y = torch.randn(1, 192, 64, dtype=torch.float64)
    p = AgentUNetAttnProcessor(AgentSDConfig(), original=AttnProcessor2_0(), key="k")
    with torch.no_grad():
        torch.testing.assert_close(p(attn, y), AttnProcessor2_0()(attn, y), rtol=1e-12, atol=1e-12)
    assert sum(p.context.stats.fallbacks.values()) == 1


# ---------------------------------------------------------------------------------------------
# config, phases, structure


def test_config_phases_by_index_and_fraction():
    cfg = AgentSDConfig.from_preset("agentsd_sd15")
    assert (cfg.sx, cfg.ratio, cfg.agent_ratio) == (4, 0.4, 0.95)
    at = lambda i, n=None: cfg.settings(i, n)  # noqa: E731
    assert at(0, 50).sx == 4 and at(19, 50).sx == 4 and at(20, 50).sx == 2 and at(49, 50).agent_ratio == 0.5
    assert at(9, 25).sx == 4 and at(10, 25).sx == 2  # the fraction 0.4 of 25 steps
    assert at(19).sx == 4 and at(20).sx == 2  # no reported step count: the preset's num_steps=50
    assert at(None).sx == 4
    idx = AgentSDConfig(phases=(AgentSDPhase(start=2, ratio=0.1), {"start": 4, "sx": 4}))
    assert [(idx.settings(i).ratio, idx.settings(i).sx) for i in (0, 2, 4)] == [(0.5, 2), (0.1, 2), (0.1, 4)]
    assert AgentSDConfig.from_preset("agentsd_sd2").precision == "fp32"
    assert AgentSDConfig.from_preset("agentsd_sdxl").max_downsample == 2
    with pytest.raises(ValueError, match="step count"):
        AgentSDConfig(phases=({"start": 0.5},)).settings(3)
    with pytest.raises(ValueError, match="ratio"):
        AgentSDConfig(ratio=1.0)
    with pytest.raises(ValueError, match="precision"):
        AgentSDConfig(precision="fp16")


def test_downsample_levels_of_the_tiny_unet(unet64):
    assert unet_downsample_levels(unet64) == {
        "down_blocks.0.attentions.0.transformer_blocks.0": 1,
        "mid_block.attentions.0.transformer_blocks.0": 2,
        "up_blocks.1.attentions.0.transformer_blocks.0": 1,
        "up_blocks.1.attentions.1.transformer_blocks.0": 1,
    }


# ---------------------------------------------------------------------------------------------
# through visattn.pipelines.apply on the tiny UNet (diffusers.md §8: 1024 tokens at ds = 1, 256 at ds = 2)

from types import SimpleNamespace  # noqa: E402

from diffusers import DDIMScheduler  # noqa: E402

import visattn.pipelines as vp  # noqa: E402
from visattn.pipelines.tiny import tiny_inputs, tiny_model  # noqa: E402

DS1_ATTN1 = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
}
MID_ATTN1 = "mid_block.attentions.0.transformer_blocks.0.attn1.processor"


@pytest.fixture(scope="module")
def unet():
    return tiny_model("unet")


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("max_downsample,expected", [(1, DS1_ATTN1), (2, DS1_ATTN1 | {MID_ATTN1})])
def test_only_qualifying_attn1_replaced(unet, max_downsample, expected):
    before = dict(unet.attn_processors)
    keys = list(unet.state_dict())
    handle = vp.apply(unet, "agent", preset="agentsd_sd15", max_downsample=max_downsample)
    try:
        now = unet.attn_processors
        assert len(now) == len(before)
        replaced = {k for k in now if now[k] is not before[k]}
        assert replaced == expected
        assert all(isinstance(now[k], AgentUNetAttnProcessor) for k in replaced)
        assert {k for _, k in handle.processors} == expected
        assert list(unet.state_dict()) == keys
    finally:
        handle.remove()
    assert all(unet.attn_processors[k] is p for k, p in before.items())


def test_remove_restores_bit_identical_outputs(unet):
    inputs = tiny_inputs("unet", batch=2)
    ref = _run(unet, inputs)
    handle = vp.apply(unet, "agent", preset="agentsd_sd15", stats=True)
    out = _run(unet, inputs)
    stats = handle.stats()
    handle.remove()
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, ref)
    assert stats["calls"].get("agent") == 3 and not stats["fallbacks"]  # the block inputs were captured
    assert torch.equal(_run(unet, inputs), ref)
    assert not vp.remove(unet)


def test_dense_equivalent_config_matches_default(unet):
    inputs = tiny_inputs("unet", batch=2)
    ref = _run(unet, inputs)
    with vp.apply(unet, "agent", {"ratio": 0.0, "agent_ratio": 0.0}):
        out = _run(unet, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_block_input_metric_differs_from_attn_input(unet):
    inputs = tiny_inputs("unet", batch=2, size=16)
    outs = []
    for metric in ("block_input", "attn_input"):
        with vp.apply(unet, "agent", preset="agentsd_sd15", metric=metric):
            outs.append(_run(unet, inputs))
    assert not torch.equal(*outs)


def _phase_trace(unet, cfg, *, batched: bool, bare: bool, steps: int = 4):
    """Per step: (step index seen by the processors, calls counted per path) in a DDIM CFG loop.

    ``bare``: apply to the UNet alone (steps from the timestep argument), else to a pipeline-like
    object with the scheduler (steps matched in ``scheduler.timesteps``)."""
    pipe = SimpleNamespace(unet=unet, scheduler=DDIMScheduler())
    pipe.scheduler.set_timesteps(steps)
    inp = tiny_inputs("unet", batch=1, size=16)  # a 16x16 latent keeps the loop fast
    text = torch.cat([inp["encoder_hidden_states"], -inp["encoder_hidden_states"]])
    latents = inp["sample"]
    trace = []
    with vp.apply(unet if bare else pipe, "agent", cfg, stats=True) as handle, torch.no_grad():
        for t in pipe.scheduler.timesteps:
            before = dict(handle.context.stats.calls)
            if batched:
                noise = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text, return_dict=False)[0]
                unc, cond = noise.chunk(2)
            else:
                unc = unet(latents, t, encoder_hidden_states=text[:1], return_dict=False)[0]
                cond = unet(latents, t, encoder_hidden_states=text[1:], return_dict=False)[0]
            calls = {
                k: v - before.get(k, 0)
                for k, v in handle.context.stats.calls.items()
                if v != before.get(k, 0)
            }
            trace.append((handle.context.step_index, calls))
            latents = pipe.scheduler.step(unc + 3.0 * (cond - unc), t, latents, return_dict=False)[0]
    return trace


@pytest.mark.parametrize("batched,bare", [(True, False), (False, False), (False, True)])
def test_phases_follow_the_real_step_index(unet, batched, bare):
    # 16x16 latent, ds = 1 (256 tokens): sx = 4 -> 16 agents vs 154 features (agent path); from step 2
    # (the fraction 0.5 of 4 steps, or the index 2 without a scheduler) sx = 2, agent_ratio 0.5 -> 128
    # agents: ToMe only
    cfg = AgentSDConfig(
        sx=4,
        sy=4,
        ratio=0.4,
        agent_ratio=0.95,
        phases=(AgentSDPhase(start=2 if bare else 0.5, sx=2, sy=2, agent_ratio=0.5),),
    )
    calls = 3 * (1 if batched else 2)  # three qualifying attn1 per UNet call
    trace = _phase_trace(unet, cfg, batched=batched, bare=bare)
    assert trace == [
        (0, {"agent": calls}),
        (1, {"agent": calls}),
        (2, {"agent: tome only": calls}),
        (3, {"agent: tome only": calls}),
    ]


def test_dense_steps_of_the_schedule_run_the_original_attention(unet):
    inputs = tiny_inputs("unet", batch=2, size=16)
    ref = _run(unet, inputs)
    with vp.apply(unet, "agent", preset="agentsd_sd15", dense_steps=(0,), stats=True) as handle:
        out = _run(unet, inputs)  # a bare UNet's first timestep is step 0
        assert handle.context.step_index == 0
        assert handle.stats()["calls"] == {"dense_by_schedule": 3}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdxl_like_unet_needs_max_downsample_2():
    # SDXL-like: no transformer blocks at ds = 1
    unet = tiny_model(
        "unet",
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="max_downsample"):
        vp.apply(unet, "agent", preset="agentsd_sd15")
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    inputs = tiny_inputs("unet", batch=2, size=16)  # ds = 2 blocks see 8x8 tokens
    with vp.apply(unet, "agent", preset="agentsd_sdxl", stats=True) as handle:
        assert len(handle.processors) == 4  # down_blocks.1, mid_block, up_blocks.0 (x2) attn1 at ds = 2
        out = _run(unet, inputs)
        assert handle.stats()["calls"].get("agent") == 4 and bool(torch.isfinite(out).all())


def test_non_unet_models_are_refused_and_left_untouched():
    dit = tiny_model("dit")  # BasicTransformerBlocks with AttnProcessor2_0, but no UNet levels
    attn = dit.transformer_blocks[0].attn1
    before = attn.processor
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        vp.apply(dit, "agent")
    assert attn.processor is before


# ---------------------------------------------------------------------------------------------
# CUDA (run by the lead with -m cuda): low precision vs the float64 reference, no host sync

CUDA_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "where,latent,grid,fields",
    [
        ("down", (32, 32), (32, 32), dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95)),
        ("down", (32, 32), (32, 32), dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, precision="fp32")),
        ("down", (32, 32), (32, 32), dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)),
        ("mid", (30, 34), (15, 17), dict(sx=2, sy=3, ratio=0.3, agent_ratio=0.9, max_downsample=2)),
    ],
)
def test_cuda_processor_matches_reference(dtype, where, latent, grid, fields):
    torch.manual_seed(0)
    block = _block(UNet2DConditionModel(**UNET_KWARGS).eval(), where)
    cfg = AgentSDConfig(use_rand=False, **fields)
    # the reference sees the rounded inputs, so the (discrete) matching is the processor's; weights and
    # arithmetic stay float64
    x = torch.randn(2, grid[0] * grid[1], block.attn1.to_q.in_features).to(dtype).double()
    with torch.no_grad():
        y = block.double().norm1(x).to(dtype).double()
        ref, _ = reference_agentsd(
            block.attn1,
            x,
            y,
            grid,
            cfg.sx,
            cfg.sy,
            torch.zeros(grid[0] // cfg.sy, grid[1] // cfg.sx, dtype=torch.int64),
            cfg.ratio,
            cfg.agent_ratio,
            cfg.k_scale2,
            cfg.k_shortcut,
        )
        block = block.to("cuda", dtype)
        p = _proc(cfg, latent)
        p.set_block_input(x.to("cuda", dtype))
        out = p(block.attn1, y.to("cuda", dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=CUDA_TOL[dtype], atol=CUDA_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "fields", [dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)]
)
def test_cuda_processor_has_no_host_sync(fields):
    torch.manual_seed(0)
    block = _block(UNet2DConditionModel(**UNET_KWARGS).eval(), "down").to("cuda", torch.float16)
    x = torch.randn(2, 4096, 64, device="cuda", dtype=torch.float16)
    p = _proc(AgentSDConfig(**fields), (64, 64), step=3)
    p.context.stats.enabled = False
    with torch.no_grad():
        y = block.norm1(x)
        p.set_block_input(x)
        p(block.attn1, y)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            p.set_block_input(x)
            out = p(block.attn1, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == y.shape
