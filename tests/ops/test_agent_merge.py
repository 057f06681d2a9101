"""CPU tests of AgentSD token merging (spec agent.md §2.6, §6 AgentSD bullets) against brute force."""

from __future__ import annotations

import pytest
import torch

from visattn.ops.agent_merge import (
    agentsd_counts,
    agentsd_grid,
    bipartite_soft_matching,
    dst_offsets,
    dst_partition,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matching(x, h, w, sx, sy, ratio, agent_ratio, *, seed=0, use_rand=True):
    offs = dst_offsets(h, w, sx, sy, generator=_gen(seed), use_rand=use_rand)
    src, dst = dst_partition(h, w, sx, sy, offs)
    r, ra, _ = agentsd_counts(h * w, src.numel(), ratio, agent_ratio)
    return bipartite_soft_matching(x, src, dst, r, ra), offs


# ---------------------------------------------------------------------------------------------
# brute force, written from the spec with Python loops


def _brute(metric, y, h, w, sx, sy, offs, r, ra):
    """Returns (features, agents, unmerge(features)) per spec §2.6 steps 1-4 and 6, float64 loops."""
    B, N, C = y.shape
    dst = set()
    for i in range(h // sy):
        for j in range(w // sx):
            o = int(offs[i, j])
            dst.add((i * sy + o // sx) * w + j * sx + o % sx)
    dsts = sorted(dst)
    srcs = [t for t in range(N) if t not in dst]
    feats, agents, unm = [], [], []
    for b in range(B):
        m = metric[b].double()
        m = [m[t] / m[t].norm() for t in range(N)]
        best, score = {}, {}
        for s in srcs:
            vals = [float(m[s] @ m[t]) for t in dsts]
            k = max(range(len(dsts)), key=lambda i: (vals[i], -i))  # first index among the maxima
            best[s], score[s] = k, vals[k]
        ranked = sorted(srcs, key=lambda s: (-score[s], s))

        def merged(rr, b=b, ranked=ranked, best=best):
            rows = [y[b, s].double() for s in ranked[rr:]]
            for j, t in enumerate(dsts):
                group = [y[b, t].double()] + [y[b, s].double() for s in ranked[:rr] if best[s] == j]
                rows.append(sum(group) / len(group))
            return torch.stack(rows)

        f = merged(r)
        feats.append(f)
        agents.append(merged(ra))
        out = torch.empty(N, C, dtype=torch.float64)
        for p, s in enumerate(ranked):
            out[s] = f[p - r] if p >= r else f[len(ranked) - r + best[s]]
        for j, t in enumerate(dsts):
            out[t] = f[len(ranked) - r + j]
        unm.append(out)
    return torch.stack(feats), torch.stack(agents), torch.stack(unm)


@pytest.mark.parametrize(
    "h,w,sx,sy,ratio,agent_ratio",
    [
        (6, 6, 2, 2, 0.5, 0.7),  # divisible grid
        (5, 7, 2, 2, 0.3, 0.6),  # leftover row and column are src
        (7, 9, 3, 2, 0.4, 0.95),  # rectangular cells, agent_r capped at the src count
        (4, 5, 4, 4, 0.2, 0.0),  # one cell
    ],
)
@pytest.mark.parametrize("use_rand", [True, False])
def test_merge_matches_brute_force(h, w, sx, sy, ratio, agent_ratio, use_rand):
    B, C = 2, 5
    metric = torch.randn(B, h * w, C, dtype=torch.float64)
    y = torch.randn(B, h * w, C, dtype=torch.float64)
    tm, offs = _matching(metric, h, w, sx, sy, ratio, agent_ratio, seed=3, use_rand=use_rand)
    f, a, u = _brute(metric, y, h, w, sx, sy, offs, tm.r, tm.agent_r)
    torch.testing.assert_close(tm.merge(y), f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tm.merge_agents(y), a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tm.unmerge(tm.merge(y)), u, rtol=1e-12, atol=1e-12)
    both = tm.merge_both(y)
    assert torch.equal(both[0], tm.merge(y)) and torch.equal(both[1], tm.merge_agents(y))


def test_ratio_zero_is_identity():
    h, w = 6, 10
    x = torch.randn(3, h * w, 4)
    tm, _ = _matching(x, h, w, 2, 2, 0.0, 0.0)
    assert tm.r == 0 and tm.agent_r == 0
    feats = tm.merge(x)
    assert feats.shape == x.shape
    assert torch.equal(tm.unmerge(feats), x)
    # the features are the tokens themselves, permuted
    assert torch.equal(feats.sort(dim=1).values, x.sort(dim=1).values)


def test_unmerge_restores_unmerged_tokens_exactly():
    h, w = 8, 8
    x = torch.randn(2, h * w, 6)
    y = torch.randn(2, h * w, 6)
    tm, _ = _matching(x, h, w, 2, 2, 0.5, 0.6)
    out = tm.unmerge(tm.merge(y))
    ranked_tokens = tm.src_idx[tm.rank]  # [B, n_s]
    for b in range(2):
        unmerged = ranked_tokens[b, tm.r :]
        assert torch.equal(out[b, unmerged], y[b, unmerged])
        # a merged src reads its dst's (merged) row
        merged, to = ranked_tokens[b, : tm.r], tm.dst_idx[tm.best[b, : tm.r]]
        assert torch.equal(out[b, merged], out[b, to])


def test_dst_choice_deterministic_under_seed():
    a = dst_offsets(64, 64, 2, 2, generator=_gen(7))
    b = dst_offsets(64, 64, 2, 2, generator=_gen(7))
    c = dst_offsets(64, 64, 2, 2, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 4
    assert torch.equal(dst_partition(64, 64, 2, 2, a)[1], dst_partition(64, 64, 2, 2, b)[1])
    assert torch.equal(dst_offsets(6, 6, 2, 2, use_rand=False), torch.zeros(3, 3, dtype=torch.int64))


def test_partition_is_sorted_and_complete():
    offs = dst_offsets(9, 11, 2, 3, generator=_gen(1))
    src, dst = dst_partition(9, 11, 2, 3, offs)
    assert dst.numel() == (9 // 3) * (11 // 2)
    assert torch.equal(torch.cat([src, dst]).sort().values, torch.arange(99))
    assert bool((src.diff() > 0).all()) and bool((dst.diff() > 0).all())


@pytest.mark.parametrize(
    "sx,ratio,agent_ratio,features,agents,use_agents",
    [
        (4, 0.4, 0.95, 2458, 256, True),  # steps 0-19 of the published schedule
        (2, 0.4, 0.5, 2458, 2048, False),  # steps 20-49: ToMe only
    ],
)
def test_published_schedule_table_at_64x64(sx, ratio, agent_ratio, features, agents, use_agents):
    N = 64 * 64
    offs = dst_offsets(64, 64, sx, sx, generator=_gen(0))
    src, dst = dst_partition(64, 64, sx, sx, offs)
    r, ra, on = agentsd_counts(N, src.numel(), ratio, agent_ratio)
    assert (N - r, N - ra, on) == (features, agents, use_agents)
    x = torch.randn(1, N, 8)
    tm = bipartite_soft_matching(x, src, dst, r, ra)
    assert tm.merge(x).shape == (1, features, 8) and tm.merge_agents(x).shape == (1, agents, 8)


@pytest.mark.parametrize(
    "hw,N,expected",
    [
        ((64, 64), 4096, (1, 64, 64)),
        ((64, 64), 1024, (2, 32, 32)),
        ((64, 64), 64, (8, 8, 8)),
        ((96, 64), 1536, (2, 48, 32)),
        ((65, 65), 1089, (2, 33, 33)),
        ((128, 128), 4096, (2, 64, 64)),
    ],
)
def test_grid(hw, N, expected):
    assert agentsd_grid(hw, N) == expected


def test_errors():
    with pytest.raises(ValueError, match="num_tokens"):
        agentsd_grid((64, 64), 1000)
    with pytest.raises(ValueError, match="offsets"):
        dst_partition(8, 8, 2, 2, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="sx"):
        dst_partition(8, 8, 0, 2, torch.zeros(3, 4, dtype=torch.int64))
    src, dst = dst_partition(4, 4, 2, 2, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="agent_r"):
        bipartite_soft_matching(torch.randn(1, 16, 3), src, dst, 2, 13)
    tm = bipartite_soft_matching(torch.randn(1, 16, 3), src, dst, 2, 3)
    with pytest.raises(ValueError, match="N - r"):
        tm.unmerge(torch.randn(1, 16, 3))


def test_zero_metric_tokens_are_finite_and_half_precision_runs():
    x = torch.randn(2, 64, 8, dtype=torch.bfloat16)
    x[:, :5] = 0
    tm, _ = _matching(x, 8, 8, 2, 2, 0.5, 0.7)
    out = tm.unmerge(tm.merge(x))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())


@pytest.mark.cuda
def test_no_host_sync_on_cuda():
    h = w = 64
    x = torch.randn(2, h * w, 320, device="cuda", dtype=torch.float16)
    offs = dst_offsets(h, w, 4, 4, generator=torch.Generator(device="cuda").manual_seed(0))
    src, dst = dst_partition(h, w, 4, 4, offs)
    r, ra, _ = agentsd_counts(h * w, src.numel(), 0.4, 0.95)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        offs = dst_offsets(h, w, 4, 4, generator=torch.Generator(device="cuda").manual_seed(1))
        src, dst = dst_partition(h, w, 4, 4, offs)
        tm = bipartite_soft_matching(x, src, dst, r, ra)
        out = tm.unmerge(tm.merge(x))
        tm.merge_agents(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape
