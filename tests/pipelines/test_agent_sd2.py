"""AgentSD on an SD 2.x-like tiny UNet (``use_linear_projection=True``) with the ``agentsd_sd2`` preset.

SD 2.x projects tokens with ``nn.Linear`` inside ``Transformer2DModel`` (SD 1.x uses 1x1 convs), so the
tokens reach ``attn1`` after the projection and the block-input hook must still see the block input.

* float64: a whole UNet forward under ``apply`` against the same UNet with a reference processor on the
  same ``attn1`` modules, which runs the float64 reference of ``_agent_reference.py`` per call (the block
  input captured by a plain forward pre-hook, the dst offsets drawn from the processor's documented seed).
* float32: the preset's fp32 logits path, each ``attn1`` call of a UNet forward against the reference on
  that call's inputs.
* ``remove()`` restores the original processors: bit-identical outputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import visattn.pipelines as vp  # noqa: E402
from visattn.ops.agent_merge import dst_offsets  # noqa: E402
from visattn.pipelines.agent import AgentSDConfig, AgentUNetAttnProcessor, _stream_seed  # noqa: E402
from visattn.pipelines.tiny import tiny_model  # noqa: E402

from ._agent_reference import reference_agentsd  # noqa: E402

LATENT = (12, 16)  # not square: rows and columns cannot be swapped unnoticed
# the UNet's attn1 at ds = 1 (its mid block, at ds = 2, stays default under max_downsample = 1)
DS1_BLOCKS = (
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
)


def _sd2_unet(dtype):
    return tiny_model("unet", use_linear_projection=True, dtype=dtype)


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    return dict(
        sample=torch.randn(2, 4, *LATENT, generator=g, dtype=dtype),  # batch 2: random dst offsets
        timestep=torch.tensor([10]),  # a bare UNet's first timestep is step 0
        encoder_hidden_states=torch.randn(2, 8, 32, generator=g, dtype=dtype),
        return_dict=False,
    )


def _reference(attn, x, y, key, cfg):
    """The reference for one ``attn1`` call of step 0 at ds = 1 (grid = the latent)."""
    s = cfg.settings(0)  # step 0 of 50 (preset num_steps): before the phase at 0.4
    gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, 0, f"{key}.attn1.processor"))
    offs = dst_offsets(*LATENT, s.sx, s.sy, generator=gen, use_rand=cfg.use_rand)
    args = (s.sx, s.sy, offs, s.ratio, s.agent_ratio, cfg.k_scale2, cfg.k_shortcut)
    out, used_agents = reference_agentsd(attn, x.double(), y.double(), LATENT, *args)
    assert used_agents  # 192 tokens, sx = sy = 4: 12 agents against 116 features
    return out


class _ReferenceProcessor:
    """``attn1`` processor running :func:`reference_agentsd` (the block input comes from a pre-hook)."""

    def __init__(self, key, cfg):
        self.key, self.cfg, self.block_input = key, cfg, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        return _reference(attn, self.block_input, hidden_states, self.key, self.cfg)


def _run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs)[0]


def test_sd2_preset_float64_forward_matches_reference_and_remove_is_exact():
    cfg = AgentSDConfig.from_preset("agentsd_sd2")
    assert cfg.precision == "fp32" and cfg.use_rand
    unet = _sd2_unet(torch.float64)
    blocks = dict(unet.named_modules())
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)  # SD 2.x projection
    inputs = _inputs(torch.float64)
    default = _run(unet, inputs)
    keys = list(unet.state_dict())

    with vp.apply(unet, "agent", preset="agentsd_sd2", stats=True) as h:
        assert {k for _, k in h.processors} == {f"{b}.attn1.processor" for b in DS1_BLOCKS}
        assert list(unet.state_dict()) == keys
        out = _run(unet, inputs)
        st = h.stats()
    assert st["calls"] == {"agent": 3} and st["fallbacks"] == {}  # block inputs captured, agent path
    assert not torch.allclose(out, default)
    assert torch.equal(_run(unet, inputs), default)  # remove(): the original processors

    # the same UNet with the reference on the same attn1 modules
    originals, handles = {}, []
    try:
        for b in DS1_BLOCKS:
            block = blocks[b]
            ref_proc = _ReferenceProcessor(b, cfg)
            originals[b] = block.attn1.processor
            block.attn1.set_processor(ref_proc)

            def capture(module, args, kwargs, proc=ref_proc):
                proc.block_input = args[0] if args else kwargs["hidden_states"]

            handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
        ref = _run(unet, inputs)
    finally:
        for hk in handles:
            hk.remove()
        for b, p in originals.items():
            blocks[b].attn1.set_processor(p)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(_run(unet, inputs), default)


def test_sd2_preset_fp32_logits_match_reference_per_call():
    cfg = AgentSDConfig.from_preset("agentsd_sd2")
    unet = _sd2_unet(torch.float32)
    blocks = dict(unet.named_modules())
    calls, handles = [], []

    def record(b):
        def pre(module, args, kwargs):
            calls.append({"block": b, "x": args[0] if args else kwargs["hidden_states"]})

        def post(module, args, kwargs, output):
            calls[-1].update(y=args[0] if args else kwargs["hidden_states"], out=output)

        return pre, post

    with vp.apply(unet, "agent", preset="agentsd_sd2", stats=True) as h:
        for b in DS1_BLOCKS:
            pre, post = record(b)
            handles.append(blocks[b].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blocks[b].attn1.register_forward_hook(post, with_kwargs=True))
        try:
            _run(unet, _inputs(torch.float32))
        finally:
            for hk in handles:
                hk.remove()
        assert h.stats()["calls"] == {"agent": 3} and h.stats()["fallbacks"] == {}
    assert [c["block"] for c in calls] == list(DS1_BLOCKS)
    with torch.no_grad():
        for c in calls:
            attn = blocks[c["block"]].attn1
            assert c["out"].dtype == torch.float32
            ref = _reference(attn, c["x"], c["y"], c["block"], cfg)
            torch.testing.assert_close(c["out"].double(), ref, rtol=1e-5, atol=1e-5, msg=c["block"])
    assert not any(isinstance(p, AgentUNetAttnProcessor) for p in unet.attn_processors.values())
