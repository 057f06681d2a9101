"""Opt-in parity with upstream AgentSD (LeapLabTHU/Agent-Attention ``agentsd/``, read at 207ce3e).

Skipped unless ``VISATTN_AGENTSD_UPSTREAM`` names an upstream ``agentsd`` folder (visattn ships no
upstream code). Upstream's merge (``bipartite_soft_matching_random2d``) and its agent attention
(``make_agent_attn``) are driven with the same generator seed as the processor, on the tiny UNet's
attention weights in float64; the unmerged outputs must agree to 1e-12.

    VISATTN_AGENTSD_UPSTREAM=/path/to/Agent-Attention/agentsd \
        pytest tests/pipelines/test_agent_upstream_parity.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

UPSTREAM = os.environ.get("VISATTN_AGENTSD_UPSTREAM")
pytestmark = pytest.mark.skipif(
    not UPSTREAM, reason="set VISATTN_AGENTSD_UPSTREAM to upstream's agentsd folder"
)


def _einops_stand_in() -> types.ModuleType:
    """The two ``rearrange`` patterns upstream's attention uses (einops is not a visattn dependency)."""
    mod = types.ModuleType("einops")

    def rearrange(t, pattern, h):
        if pattern == "b n (h d) -> (b h) n d":
            b, n, hd = t.shape
            return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)
        if pattern == "(b h) n d -> b n (h d)":
            bh, n, d = t.shape
            return t.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
        raise NotImplementedError(pattern)

    def repeat(*args, **kwargs):
        raise NotImplementedError("repeat (masks are not used here)")

    mod.rearrange, mod.repeat = rearrange, repeat
    return mod


@pytest.fixture(scope="module")
def upstream():
    folder = Path(UPSTREAM)
    if importlib.util.find_spec("einops") is None:
        sys.modules.setdefault("einops", _einops_stand_in())
    spec = importlib.util.spec_from_file_location(
        "_agentsd_upstream", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_agentsd_upstream"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


@pytest.mark.parametrize("where", ["down", "mid"])
@pytest.mark.parametrize(
    "sx,ratio,agent_ratio,use_rand", [(4, 0.4, 0.95, True), (2, 0.4, 0.5, True), (2, 0.5, 0.8, False)]
)
def test_processor_equals_upstream_agentsd(upstream, where, sx, ratio, agent_ratio, use_rand):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from visattn.pipelines._context import AttnContext
    from visattn.pipelines.agent import AgentSDConfig, AgentUNetAttnProcessor, _stream_seed

    from .test_agent_pipeline import UNET_KWARGS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_KWARGS).eval().double()
    blk = (unet.down_blocks[0] if where == "down" else unet.mid_block).attentions[0].transformer_blocks[0]
    attn = blk.attn1

    class Host(torch.nn.Module):  # upstream's CrossAttention layout over the same weights
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = attn.to_q, attn.to_k, attn.to_v
            self.to_out = torch.nn.Sequential(*attn.to_out)
            self.heads, self.scale = attn.heads, attn.scale

    up_attn = upstream.patch.make_agent_attn(Host, k_scale2=0.3, k_shortcut=0.075)()
    up_attn.set_new_params()

    N = 1024 if where == "down" else 256
    h = w = int(N**0.5)
    key = f"{where}.attn1.processor"
    cfg = AgentSDConfig(
        sx=sx, sy=sx, ratio=ratio, agent_ratio=agent_ratio, seed=3, use_rand=use_rand, max_downsample=2
    )
    proc = AgentUNetAttnProcessor(
        cfg,
        original=AttnProcessor2_0(),
        key=key,
        context=AttnContext(latent_hw={"unet": (32, 32)}, step_index=7),
    )
    x = torch.randn(2, N, attn.to_q.in_features, dtype=torch.float64)
    with torch.no_grad():
        y = blk.norm1(x)
        proc.set_block_input(x)
        ours = proc(attn, y)
        gen = torch.Generator().manual_seed(_stream_seed(3, 7, key))
        m, u = upstream.merge.bipartite_soft_matching_random2d(
            x, w, h, sx, sx, int(N * ratio), int(N * agent_ratio), no_rand=not use_rand, generator=gen
        )
        feat, agent = m(y)
        theirs = u(up_attn(feat, agent=agent))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
