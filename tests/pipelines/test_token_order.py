"""Token-order adapters: a permuted run of the blocks gives the model's output (dense attention)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn
import visattn.pipelines as vp
from visattn.pipelines.tiny import tiny_inputs
from visattn.pipelines.token_order import install_token_order


class _Order(NamedTuple):
    perm: torch.Tensor
    inverse: torch.Tensor
    name: str


def _random_order(grid):
    n = grid[0] * grid[1] * grid[2]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    return _Order(perm, torch.argsort(perm), "random")


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name,size", [("wan", 8), ("hunyuanvideo", 8), ("flux", 8), ("cogvideox", 8)])
def test_permuted_blocks_give_the_same_output(name, size, tiny):
    model = tiny(name)
    inputs = tiny_inputs(name, size=size)
    ref = _run(model, inputs)
    seen = []
    with vp.apply(model, "dense") as h:
        install_token_order(model, h, _random_order)
        blocks = getattr(model, "blocks", None) or model.transformer_blocks
        probe = blocks[0].register_forward_hook(
            lambda *a: seen.append(h.context.layouts["transformer"].token_order)
        )
        out = _run(model, inputs)
        probe.remove()
    assert seen == ["random"]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(_run(model, inputs), ref)  # hooks gone
    with vp.apply(model, "neighborhood", kernel_size=3, stats=True) as h, visattn.use_backend("torch"):
        install_token_order(model, h, _random_order)
        _run(model, inputs)
        assert set(h.stats()["fallbacks"]) == {"neighborhood: video tokens are permuted (token_order set)"}


def test_unsupported_model(tiny):
    model = tiny("dit")
    with vp.apply(model, "dense") as h:
        with pytest.raises(ValueError, match="no token-order adapter for DiTTransformer2DModel"):
            install_token_order(model, h, _random_order)


def test_wan_per_token_timesteps(tiny):
    """Wan 2.2 TI2V: per-token timestep projections follow the permutation in every block."""
    model = tiny("wan")
    inputs = tiny_inputs("wan", size=8)  # 2 x 4 x 4 tokens
    inputs["timestep"] = torch.linspace(100, 900, 32).view(1, 32)
    ref = _run(model, inputs)
    with vp.apply(model, "dense") as h:
        install_token_order(model, h, _random_order)
        out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
