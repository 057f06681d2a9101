"""PyramidAttention layer: the Triton path matches the reference backend; plans are reused."""

from __future__ import annotations

import pytest
import torch

from visattn.layers.pyramid import PyramidAttention
from visattn.ops import PyramidConfig


def test_layer_triton_matches_torch_and_reuses_plan(device):
    torch.manual_seed(0)
    cfg = PyramidConfig()._with_blocks(32, 32)  # test-only block_q
    layer = PyramidAttention(64, 4, config=cfg, qk_norm="rms", backend="triton").to(device)
    x = torch.randn(1, 100, 64, device=device, requires_grad=True)
    out, plan = layer(x, return_plan=True)
    layer.backend = "torch"
    ref = layer(x, plan=plan)
    assert (out - ref).abs().max() < 1e-4
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_layer_errors():
    with pytest.raises(ValueError, match="num_heads"):
        PyramidAttention(30, 4)
    with pytest.raises(ValueError, match="qk_norm"):
        PyramidAttention(32, 4, qk_norm="batch")
