"""AgentSD processor tests (spec agent.md §2.6, §3.4, §5.1, §6; diffusers.md §4, §5.8) on the tiny UNet.

The float64 reference below is written from agent.md §2.6 (steps 1-6) with explicit loops and softmaxes;
it calls nothing from visattn except to draw the dst offsets of one call, which the op tests check
against brute force.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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

UNET_KWARGS = dict(block_out_channels=(64, 128), norm_num_groups=32,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=(1, 2), in_channels=4, out_channels=4, layers_per_block=1, sample_size=32)


@pytest.fixture(scope="module")
def unet64():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_KWARGS).eval().double()


def _block(unet, where: str):
    return {"down": unet.down_blocks[0].attentions[0].transformer_blocks[0],
            "mid": unet.mid_block.attentions[0].transformer_blocks[0]}[where]


# ---------------------------------------------------------------------------------------------
# independent float64 reference of agent.md §2.6


def _softmax(z):
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def reference_agentsd(attn, x, y, hw, sx, sy, offs, ratio, agent_ratio, k_scale2, k_shortcut):
    """Spec §2.6 steps 1-6 for one attention call; x the metric, y the attention input, [B, N, C] float64."""
    B, N, C = y.shape
    h, w = hw
    dsts = sorted((i * sy + int(offs[i, j]) // sx) * w + j * sx + int(offs[i, j]) % sx
                  for i in range(h // sy) for j in range(w // sx))
    dset = set(dsts)
    srcs = [t for t in range(N) if t not in dset]
    ns = len(srcs)
    r, ra = min(int(N * ratio), ns), min(int(N * agent_ratio), ns)
    use_agents = 2 * (N - ra) < N - r
    H = attn.heads
    D = C // H
    lin = lambda t, m: t @ m.weight.double().T + (m.bias.double() if m.bias is not None else 0)  # noqa: E731
    outs = []
    for b in range(B):
        m = torch.stack([x[b, t] / x[b, t].norm() for t in range(N)])
        S = m[srcs] @ m[dsts].T
        score, best = S.max(dim=1)
        ranked = sorted(range(ns), key=lambda i: (-float(score[i]), i))

        def merged(rr):
            rows = [y[b, srcs[i]] for i in ranked[rr:]]
            for j, t in enumerate(dsts):
                group = [y[b, t]] + [y[b, srcs[i]] for i in ranked[:rr] if int(best[i]) == j]
                rows.append(torch.stack(group).mean(0))
            return torch.stack(rows)

        feats = merged(r)
        q, k, v = (lin(feats, p).reshape(-1, H, D).transpose(0, 1) for p in (attn.to_q, attn.to_k, attn.to_v))
        if use_agents:
            a = lin(merged(ra), attn.to_q).reshape(-1, H, D).transpose(0, 1)
            s = D ** -0.5
            va = _softmax(a @ k.transpose(1, 2) * s) @ v
            o = _softmax(q @ a.transpose(1, 2) * s ** k_scale2) @ va + k_shortcut * v
        else:
            o = _softmax(q @ k.transpose(1, 2) * D ** -0.5) @ v
        o = lin(o.transpose(0, 1).reshape(-1, C), attn.to_out[0])
        full = torch.empty(N, C, dtype=torch.float64)
        for p, i in enumerate(ranked):
            full[srcs[i]] = o[p - r] if p >= r else o[ns - r + int(best[i])]
        for j, t in enumerate(dsts):
            full[t] = o[ns - r + j]
        outs.append(full)
    return torch.stack(outs), use_agents


def _proc(cfg, latent_hw, key="down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", step=None):
    ctx = AttnContext(latent_hw={"unet": latent_hw}, step_index=step)
    ctx.stats.enabled = True
    return AgentUNetAttnProcessor(cfg, original=AttnProcessor2_0(), key=key, block_index=0, context=ctx,
                                  component="unet")


# (where, latent size, grid at the block, config fields, expected path)
REF_CASES = [
    ("down", (12, 16), (12, 16), dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), "agent"),
    ("down", (12, 16), (12, 16), dict(sx=2, sy=2, ratio=0.5, agent_ratio=0.5), "agent: tome only"),
    ("down", (11, 13), (11, 13), dict(sx=2, sy=3, ratio=0.3, agent_ratio=0.9), "agent"),   # leftover rows/cols
    ("down", (12, 16), (12, 16), dict(sx=4, sy=4, ratio=0.0, agent_ratio=0.95), "agent"),  # agents, no merge
    ("mid", (24, 32), (12, 16), dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, max_downsample=2), "agent"),  # 2 heads
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
    ref, used_agents = reference_agentsd(attn, x, y, grid, cfg.sx, cfg.sy, offs, cfg.ratio, cfg.agent_ratio,
                                         cfg.k_scale2, cfg.k_shortcut)
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
    ref, _ = reference_agentsd(attn, y, y, (12, 16), 4, 4, torch.zeros(3, 4, dtype=torch.int64), 0.4, 0.95, 0.3, 0.075)
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
    ref, _ = reference_agentsd(block.attn1, x.double(), y.double(), (12, 16), 4, 4,
                               torch.zeros(3, 4, dtype=torch.int64), 0.4, 0.95, 0.3, 0.075)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


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
