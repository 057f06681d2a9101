"""PSA on the shared block-sparse core: multi-level walk, general split/merge, segments, causal.

Every case compares the Triton kernel (interpreter on the CPU) with the expanded-key oracle of
``_pyramid_utils`` (float64, host loops, no visattn code).
"""

from __future__ import annotations

import pytest
import torch

from visattn.kernels import _configs
from visattn.kernels.block_sparse import Segments, block_sparse_fwd
from visattn.kernels.pyramid import pyramid_pool

from ._pyramid_utils import cdiv, expanded_oracle, lists_from_map, max_abs, random_level_map


def _run(device, q, k, v, lmap, bq, bk, seg=None, causal=False, gen=None, order=False):
    idx, lp = lists_from_map(lmap, gen, pad=2)
    segments = None
    if seg is not None:
        vs, nv, ts, tlen, valid = seg
        tv = None if valid is None else torch.tensor(valid, dtype=torch.int32, device=device)
        segments = Segments(vs, nv, ts, tlen, tv)
    kd, vd = k.to(device), v.to(device)
    pyr = pyramid_pool(kd, vd, bk, segments=segments)
    tile_order = None
    if order:  # heavy tiles first
        tile_order = (lp[..., 4]).argsort(dim=-1, descending=True, stable=True).to(torch.int32).to(device)
    out, lse = block_sparse_fwd(
        q.to(device),
        kd,
        vd,
        idx.to(device),
        lp[..., 4].to(device),
        bq,
        bk,
        q.shape[-1] ** -0.5,
        level_ptr=lp.to(device),
        pyramid=pyr,
        segments=segments,
        causal=causal,
        tile_order=tile_order,
    )
    return out.cpu(), lse.cpu()


def _check(out, lse, eo, el, tol=2e-5, rows_ok=None):
    assert torch.isfinite(out).all()
    if rows_ok is not None:
        out, eo = out[rows_ok], eo[rows_ok]
        lse, el = lse.transpose(1, 2)[rows_ok], el.transpose(1, 2)[rows_ok]
    assert max_abs(out, eo) < tol
    fin = torch.isfinite(el)
    assert torch.equal(torch.isfinite(lse), fin)
    assert max_abs(lse[fin], el[fin]) < tol


@pytest.mark.parametrize(
    "bk, factors, pool_n",
    [
        (16, (1,), 16),
        (32, (1, 2), 32),
        (64, (1, 2, 4, 8), 16),
        (32, (8,), 32),
        (64, (8,), 32),
        (32, (4, 8), 16),
        (16, (1, 2, 4, 8), 32),
    ],
)
def test_levels_match_expanded_oracle(device, bk, factors, pool_n, monkeypatch):
    # b_k = 64 with x8 and b_k = 32 with x4/x8 are upstream's merge-bug cases (P < T_n / 2)
    monkeypatch.setitem(
        _configs.OVERRIDES, "pyramid_fwd", _configs.TileConfig(32, 32, 4, 1, True, True, pool_n)
    )
    gen = torch.Generator().manual_seed(bk * 7 + len(factors) + pool_n)
    B, N, H, D, bq = 2, 181, 2, 16, 32
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    lmap = random_level_map(B, H, cdiv(N, bq), cdiv(N, bk), factors, gen=gen)
    out, lse = _run(device, q, k, v, lmap, bq, bk, gen=gen)
    _check(out, lse, *expanded_oracle(q, k, v, lmap, bq, bk))


@pytest.mark.parametrize("block_n", [16, 64])
def test_level1_tiles_wider_and_narrower_than_blocks(device, block_n, monkeypatch):
    monkeypatch.setitem(
        _configs.OVERRIDES, "pyramid_fwd", _configs.TileConfig(16, block_n, 4, 1, True, True, 16)
    )
    gen = torch.Generator().manual_seed(block_n)
    B, N, H, D, bq, bk = 1, 150, 1, 32, 32, 32
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    lmap = random_level_map(B, H, cdiv(N, bq), cdiv(N, bk), (1, 2), gen=gen)
    out, lse = _run(device, q, k, v, lmap, bq, bk, gen=gen, order=True)
    _check(out, lse, *expanded_oracle(q, k, v, lmap, bq, bk))


@pytest.mark.parametrize("pos, valid", [("end", [9, 23]), ("start", [23, 0]), ("end", None)])
def test_levels_with_text_segments(device, pos, valid):
    gen = torch.Generator().manual_seed(len(pos))
    B, H, D, bq, bk = 2, 1, 16, 16, 16
    nv, tlen = 70, 23
    N = nv + tlen
    vs, ts = (tlen, 0) if pos == "start" else (0, nv)
    seg = (vs, nv, ts, tlen, valid)
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    nq, nk = cdiv(nv, bq) + cdiv(tlen, bq), cdiv(nv, bk) + cdiv(tlen, bk)
    lmap = random_level_map(B, H, nq, nk, (1, 2, 4, 8), gen=gen)
    out, lse = _run(device, q, k, v, lmap, bq, bk, seg=seg, gen=gen)
    rows_ok = torch.ones(B, N, dtype=torch.bool)
    if valid is not None:
        for b in range(B):
            rows_ok[b, ts + valid[b] : ts + tlen] = False
    _check(out, lse, *expanded_oracle(q, k, v, lmap, bq, bk, seg=seg), rows_ok=rows_ok)


def test_causal_variant(device):
    gen = torch.Generator().manual_seed(5)
    B, N, H, D, bq, bk = 1, 100, 2, 16, 16, 32
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    nq, nk = cdiv(N, bq), cdiv(N, bk)
    lmap = random_level_map(B, H, nq, nk, (1, 2, 4, 8), p_skip=0.2, gen=gen)
    for i in range(nq):  # future blocks skipped, the diagonal block at m = 1 (the planner's rule)
        for j in range(nk):
            if j * bk > (i + 1) * bq - 1:
                lmap[:, :, i, j] = 0
            elif j * bk <= i * bq + bq - 1 and (j + 1) * bk > i * bq:
                lmap[:, :, i, j] = 1
    out, lse = _run(device, q, k, v, lmap, bq, bk, causal=True, gen=gen)
    _check(out, lse, *expanded_oracle(q, k, v, lmap, bq, bk, causal=True))


def test_pool_levels_are_exact_group_means(device):
    gen = torch.Generator().manual_seed(1)
    B, N, H, D, bk = 1, 45, 1, 16, 16
    k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(2))
    pyr = pyramid_pool(k.to(device), v.to(device), bk)
    nb = cdiv(N, bk)
    for m in (2, 4, 8):
        P = bk // m
        off = nb * (bk - 2 * P)
        for j in range(nb):
            toks = list(range(j * bk, min((j + 1) * bk, N)))
            for g in range(cdiv(len(toks), m)):
                grp = toks[g * m : (g + 1) * m]
                want = k[0, grp, 0].double().mean(0)
                assert max_abs(pyr.k[0, off + j * P + g, 0].cpu(), want) < 1e-6


@pytest.mark.parametrize("torch_path", [False, True])
def test_tile_order_is_the_stable_heavy_first_argsort(device, torch_path, monkeypatch):
    """``tile_order`` (one sort per (b, h), or torch beyond ``SORT_MAX_TILES``) against the argsort of the
    FLOP-equivalent work (entries / factor), with many ties and a broadcast head axis."""
    from visattn.kernels import pyramid as pk

    if torch_path:
        monkeypatch.setattr(pk, "SORT_MAX_TILES", 8)
    gen = torch.Generator().manual_seed(11)
    counts = torch.randint(0, 4, (2, 1, 37, 4), generator=gen)  # small counts: ties
    level_ptr = torch.cat([torch.zeros(2, 1, 37, 1, dtype=torch.long), counts.cumsum(-1)], -1).to(torch.int32)
    work = counts[..., 0] + counts[..., 1] / 2 + counts[..., 2] / 4 + counts[..., 3] / 8
    want = work.argsort(dim=-1, descending=True, stable=True)
    got = pk.tile_order(level_ptr.to(device))
    assert got.dtype == torch.int32 and got.shape == (2, 1, 37)
    assert torch.equal(got.cpu().long(), want)


def test_gather_rows_matches_torch_gather(device):
    from visattn.kernels._pyramid_planning import gather_rows

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 70, 3, 24, generator=gen).transpose(1, 2)  # [B, H, N, D] view of BNHD, D padded to 32
    rows = torch.randint(0, 70, (2, 3, 75), generator=gen)
    want = torch.gather(x, 2, rows[..., None].expand(-1, -1, -1, 24))
    assert torch.equal(gather_rows(x.to(device), rows.to(device)).cpu(), want)
