"""CPU tests of ``visattn.ops.block_sparse_plan.BlockSparsePlan``: mask semantics, transpose, density.

``to_mask`` and ``transpose`` are checked against ``plan_block_mask``, which reads the index lists
entry by entry on the host; densities are counted by hand, partial blocks included.
"""

from __future__ import annotations

import re

import pytest
import torch

from visattn import BlockSparsePlan

from ._block_sparse_utils import plan_block_mask, plan_from_random_mask


def _random_raw_plan(Bp, Hp, nq, max_kv, nk, bq=16, bk=16):
    """A plan with arbitrary entries: negative, out-of-range, and counts outside [0, max_kv]."""
    kv_index = torch.randint(-3, nk + 3, (Bp, Hp, nq, max_kv), dtype=torch.int32)
    kv_count = torch.randint(-2, max_kv + 3, (Bp, Hp, nq), dtype=torch.int32)
    return BlockSparsePlan(kv_index, kv_count, bq, bk)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 6, 1), (1, 2, 3, 8)])
def test_to_mask_semantics(shape):
    nk = 6
    plan = _random_raw_plan(*shape, nk=nk)
    got = plan.to_mask(nk)
    assert got.dtype == torch.bool and got.shape == (*shape[:3], nk)
    assert torch.equal(got, plan_block_mask(plan, nk))


def test_to_mask_by_hand():
    kv_index = torch.tensor([[[[2, 0, 9], [-1, 1, 1], [3, 2, 0], [0, 1, 2]]]], dtype=torch.int32)
    kv_count = torch.tensor([[[2, 2, 7, -1]]], dtype=torch.int32)
    plan = BlockSparsePlan(kv_index, kv_count, 16, 16)
    want = torch.tensor(
        [[True, False, True, False],  # entries 2, 0 (the 9 is past the count)
         [False, True, False, False],  # -1 attends nothing
         [True, False, True, True],  # count 7 > max_kv 3: all three entries
         [False, False, False, False]],  # negative count: nothing
    )
    assert torch.equal(plan.to_mask(4)[0, 0], want)
    assert torch.equal(plan.to_mask(3)[0, 0], want[:, :3])  # block 3 is now out of range


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 3, 7), (2, 1, 6, 6)])
def test_transpose_is_the_transposed_mask(shape):
    Bp, Hp, nq, max_kv = shape
    nk = 5
    plan = _random_raw_plan(Bp, Hp, nq, max_kv, nk)
    q_index, q_count = plan.transpose(nk)
    assert q_index.dtype == torch.int32 and q_count.dtype == torch.int32
    assert q_index.shape == (Bp, Hp, nk, nq) and q_count.shape == (Bp, Hp, nk)
    want = plan_block_mask(plan, nk).transpose(-1, -2)  # [Bp, Hp, nk, nq]
    got = torch.zeros_like(want)
    for b in range(Bp):
        for h in range(Hp):
            for j in range(nk):
                listed = q_index[b, h, j, : q_count[b, h, j]].tolist()
                assert listed == sorted(set(listed)), f"q_index[{b},{h},{j}] not increasing: {listed}"
                assert all(0 <= i < nq for i in listed)
                got[b, h, j, listed] = True
    assert torch.equal(got, want)


def test_transpose_follows_in_place_edits_of_the_plan():
    plan = BlockSparsePlan.from_mask(torch.tensor([[True, False], [False, False]]), 16, 16)
    q_index, q_count = plan.transpose(2)
    assert q_count.flatten().tolist() == [1, 0]
    plan.kv_index[0, 0, 1, 0] = 1
    plan.kv_count[0, 0, 1] = 1  # tile 1 now attends block 1
    q_index, q_count = plan.transpose(2)
    assert q_count.flatten().tolist() == [1, 1]
    assert q_index[0, 0, 1, 0].item() == 1
    assert plan.transpose(3)[1].shape == (1, 1, 3)  # another num_kv_blocks is not served from the cache


def test_density_by_hand_with_partial_blocks():
    # seq_q=40 -> tiles of 16, 16, 8 rows; seq_k=50 -> blocks of 16, 16, 16, 2 keys
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[1, 3] = mask[2, 3] = True
    plan = BlockSparsePlan.from_mask(mask, 16, 16)
    pairs = 16 * 16 + 16 * 16 + 16 * 2 + 8 * 2
    d = plan.density(40, 50)
    assert d.dim() == 0
    assert d.item() == pytest.approx(pairs / (40 * 50), abs=1e-15)
    assert BlockSparsePlan.dense(40, 50, 16, 16).density(40, 50).item() == pytest.approx(1.0, abs=1e-15)
    assert BlockSparsePlan.dense(40, 50, 64, 32).density(40, 50).item() == pytest.approx(1.0, abs=1e-15)


def test_density_averages_over_batch_and_heads():
    B, H, Nq, Nk, bq, bk = 2, 3, 70, 45, 32, 16
    plan, mask = plan_from_random_mask(B, H, Nq, Nk, bq, bk, "BH")
    tok = mask[:, :, torch.arange(Nq) // bq][:, :, :, torch.arange(Nk) // bk]
    want = tok.double().sum().item() / (B * H * Nq * Nk)
    assert plan.density(Nq, Nk).item() == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 6), (1, 1, 1, 1), (1, 2, 3, 1)])
def test_from_mask_round_trips_through_to_mask(shape):
    mask = torch.rand(shape) < 0.5
    plan = BlockSparsePlan.from_mask(mask, 32, 16)
    mask4 = mask if mask.dim() == 4 else mask[None, None]
    assert plan.kv_index.dtype == torch.int32 and plan.kv_count.dtype == torch.int32
    assert plan.max_kv == mask4.shape[-1] and plan.num_q_tiles == mask4.shape[-2]
    assert torch.equal(plan.to_mask(mask4.shape[-1]), mask4)
    assert torch.equal(plan.kv_count, mask4.sum(-1).to(torch.int32))
    flat_idx = plan.kv_index.reshape(-1, plan.max_kv)
    for r, row in enumerate(mask4.reshape(-1, mask4.shape[-1])):
        n = int(row.sum())
        assert flat_idx[r, :n].tolist() == row.nonzero().flatten().tolist()  # kept blocks, increasing


def test_dense_plan():
    plan = BlockSparsePlan.dense(100, 33, 32, 16)
    assert plan.kv_index.shape == (1, 1, 4, 3)
    assert plan.to_mask(3).all()
    assert plan.kv_count.flatten().tolist() == [3, 3, 3, 3]


def test_random_plan_rows():
    g = torch.Generator().manual_seed(1)
    plan = BlockSparsePlan.random(100, 100, 0.3, block_q=16, block_k=16, batch=2, heads=3, generator=g)
    # nk = 7, round(0.3 * 7) = 2 blocks per row
    assert plan.kv_index.shape == (2, 3, 7, 2)
    assert (plan.kv_count == 2).all()
    rows = plan.kv_index.reshape(-1, 2)
    assert (rows[:, 0] < rows[:, 1]).all() and (rows >= 0).all() and (rows < 7).all()
    g2 = torch.Generator().manual_seed(1)
    again = BlockSparsePlan.random(100, 100, 0.3, block_q=16, block_k=16, batch=2, heads=3, generator=g2)
    assert torch.equal(again.kv_index, plan.kv_index)
    tiny = BlockSparsePlan.random(100, 100, 0.01, block_q=16, block_k=16)
    assert (tiny.kv_count == 1).all()  # at least one block per row
    full = BlockSparsePlan.random(100, 100, 1.0, block_q=16, block_k=16)
    assert full.to_mask(7).all()


# =============================================================================================
# construction errors


def _idx(*shape, dtype=torch.int32):
    return torch.zeros(shape, dtype=dtype)


PLAN_ERROR_CASES = [
    ("kv_index int64", lambda: BlockSparsePlan(_idx(1, 1, 3, 3, dtype=torch.int64), _idx(1, 1, 3), 16, 16),
     "expected kv_index.dtype=torch.int32, got kv_index.dtype=torch.int64"),
    ("kv_count int64", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 3, dtype=torch.int64), 16, 16),
     "expected kv_count.dtype=torch.int32, got kv_count.dtype=torch.int64"),
    ("kv_index rank", lambda: BlockSparsePlan(_idx(1, 3, 3), _idx(1, 1, 3), 16, 16),
     "expected kv_index of rank 4 [B, H, num_q_tiles, max_kv], got kv_index.shape=(1, 3, 3)"),
    ("kv_count rank", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 3), 16, 16),
     "expected kv_count of rank 3 [B, H, num_q_tiles], got kv_count.shape=(1, 3)"),
    ("kv_count shape", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 2), 16, 16),
     "expected kv_count.shape == kv_index.shape[:3], got kv_count.shape=(1, 1, 2), kv_index.shape=(1, 1, 3, 3)"),
    ("not tensors", lambda: BlockSparsePlan([[[[0]]]], _idx(1, 1, 1), 16, 16),
     "expected kv_index and kv_count to be tensors, got kv_index=list, kv_count=Tensor"),
    ("devices", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 3).to("meta"), 16, 16),
     "expected kv_index and kv_count on one device, got cpu and meta"),
    ("block_q not pow2", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 3), 24, 16),
     "expected block_q to be a power of two >= 16, got block_q=24"),
    ("block_k too small", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 3), 16, 8),
     "expected block_k to be a power of two >= 16, got block_k=8"),
    ("block_q float", lambda: BlockSparsePlan(_idx(1, 1, 3, 3), _idx(1, 1, 3), 16.0, 16),
     "expected block_q to be a power of two >= 16, got block_q=16.0"),
    ("dense block", lambda: BlockSparsePlan.dense(40, 40, 16, 48),
     "expected block_k to be a power of two >= 16, got block_k=48"),
    ("from_mask dtype", lambda: BlockSparsePlan.from_mask(torch.ones(3, 3), 16, 16), "expected a torch.bool block mask"),
    ("from_mask rank", lambda: BlockSparsePlan.from_mask(torch.ones(2, 3, 3) > 0, 16, 16),
     "expected mask of rank 2 or 4 [B, H, num_q_tiles, num_kv_blocks], got mask.shape=(2, 3, 3)"),
    ("random density 0", lambda: BlockSparsePlan.random(40, 40, 0.0), "expected 0 < density <= 1, got density=0.0"),
    ("random density >1", lambda: BlockSparsePlan.random(40, 40, 1.5), "expected 0 < density <= 1, got density=1.5"),
]


@pytest.mark.parametrize("case, fn, message", PLAN_ERROR_CASES, ids=[c[0] for c in PLAN_ERROR_CASES])
def test_plan_errors(case, fn, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn()
