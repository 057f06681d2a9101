"""Error vs density on the synthetic generator (spec §6), small CPU version (the benchmark runs
N = 16384): the relative L2 error to dense attention falls with density, and multi-level PSA is
below a binary block mask at matched FLOP density."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn.ops import PyramidConfig, pyramid_attention_ref, pyramid_plan
from visattn.testing import local_qkv, neighbourhood_mass


@pytest.fixture(scope="module")
def qkv():
    return local_qkv((4, 16, 16), heads=2, head_dim=32, order="raster", gain=6.0, kinds=("temporal", "broad"))


def _err(q, k, v, dense, cfg):
    plan = pyramid_plan(q, k, config=cfg)
    out = pyramid_attention_ref(q, k, v, plan, upcast=False)
    return plan.density().mean().item(), ((out - dense).norm() / dense.norm()).item()


def test_error_falls_with_density_and_multilevel_beats_binary(qkv):
    q, k, v = qkv
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    ml_err, bin_err = [], []
    for rho in (0.1, 0.25, 0.4):
        a = rho / 1.5  # quotas a at x1, a/2 at x2, 2a at x8: rho = a + a/4 + a/4
        ml = PyramidConfig(
            block_q=64, block_k=32, levels={1: a, 2: 1.5 * a, 4: 1.5 * a, 8: 3.5 * a}, align="none"
        )
        bi = PyramidConfig(block_q=64, block_k=32, levels={1: rho}, align="none")
        d_ml, e_ml = _err(q, k, v, dense, ml)
        d_bi, e_bi = _err(q, k, v, dense, bi)
        assert abs(d_ml - rho) < 0.035 and abs(d_bi - rho) < 0.035  # 32 blocks per row
        ml_err.append(e_ml)
        bin_err.append(e_bi)
    assert ml_err == sorted(ml_err, reverse=True), ml_err
    assert bin_err == sorted(bin_err, reverse=True), bin_err
    assert all(a < b for a, b in zip(ml_err, bin_err, strict=False)), (ml_err, bin_err)


def test_generator_is_seeded_and_local():
    a = local_qkv((2, 8, 8), heads=1, head_dim=16, order="raster", seed=3)
    b = local_qkv((2, 8, 8), heads=1, head_dim=16, order="raster", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    q, k, _ = local_qkv((4, 12, 12), heads=1, head_dim=64, order="raster", kinds=("local",))
    assert neighbourhood_mass(q, k, (4, 12, 12), rows=64) > 27 / (4 * 144) * 5  # far above uniform
