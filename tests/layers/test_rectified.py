"""RectifiedAttention layer: same weights, torch reference vs Triton (interpreter), plan reuse, errors."""

from __future__ import annotations

import pytest
import torch

from visattn.layers import RectifiedAttention
from visattn.ops import RectifiedConfig, SequenceLayout, rectified_attention_ref

CFG = RectifiedConfig(drop_rate=0.8, neighbours=False)._with_block(16)


def test_layer_matches_reference_and_reuses_plan():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lay = SequenceLayout((2, 6, 8), text_len=9, text_position="start")
    layer = RectifiedAttention(64, 4, config=CFG, qk_norm="rms", backend="triton").to(dev)
    x = torch.randn(2, lay.seq_len, 64, device=dev)
    with torch.no_grad():  # the Triton path has no backward (spec §3)
        out, plan = layer(x, seq_layout=lay, return_plan=True)
        again = layer(x, plan=plan)  # same v: the plan's C applies
        B, N, C = x.shape
        q, k, v = layer.qkv(x).view(B, N, 3, 4, 16).unbind(2)
        ref = rectified_attention_ref(layer.q_norm(q), layer.k_norm(k), v, seq_layout=lay, config=CFG)
        want = layer.proj(ref.reshape(B, N, C).float())
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(again, out)
    assert "block_size=16" in repr(layer)


def test_layer_torch_backend_backward():
    lay = SequenceLayout((2, 5, 7))
    layer = RectifiedAttention(32, 2, config=CFG, backend="torch")
    layer(torch.randn(1, lay.seq_len, 32), seq_layout=lay).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_layer_errors():
    with pytest.raises(ValueError, match="num_heads"):
        RectifiedAttention(60, 8)
    with pytest.raises(ValueError, match="qk_norm"):
        RectifiedAttention(64, 4, qk_norm="batch")
    with pytest.raises(ValueError, match="config"):
        RectifiedAttention(64, 4, config={"block_size": 64})
