"""Core extensions of the block-sparse kernel (interface C): segments and the rectification epilogue.

The oracle reads the index lists on the host and builds a token mask from the segment rules of
``INTERFACES.md`` C independently of the kernel's arithmetic, then runs a float64 dense softmax.
"""

from __future__ import annotations

import pytest
import torch

from visattn.kernels.block_sparse import Segments, block_sparse_fwd

from ._block_sparse_utils import assert_close, cdiv


def _segment_ranges(seg: Segments, b: int, bq: int, bk: int):
    """(query tile rows, kv block token ranges) of sample b, from the interface text."""
    vs, nv, ts, tl_, tv = seg
    valid = tl_ if tv is None else int(tv[b])
    q_tiles = [range(vs + i * bq, min(vs + (i + 1) * bq, vs + nv)) for i in range(cdiv(nv, bq))]
    q_tiles += [range(ts + i * bq, min(ts + (i + 1) * bq, ts + tl_)) for i in range(cdiv(tl_, bq))]
    kv = [range(vs + j * bk, min(vs + (j + 1) * bk, vs + nv)) for j in range(cdiv(nv, bk))]
    kv += [range(ts + j * bk, min(ts + (j + 1) * bk, ts + valid)) for j in range(cdiv(tl_, bk))]
    return q_tiles, kv


def _oracle(q, k, v, kv_index, kv_count, bq, bk, seg, rect_scale=None, rect_bias=None):
    B, N, H, D = q.shape
    qd, kd, vd = (t.double() for t in (q, k, v))
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    lse = torch.full((B, H, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        q_tiles, kv = _segment_ranges(seg, b, bq, bk)
        for h in range(H):
            for i, rows in enumerate(q_tiles):
                ib, ih = min(b, kv_index.shape[0] - 1), min(h, kv_index.shape[1] - 1)
                keys = []
                for e in range(int(kv_count[ib, ih, i])):
                    j = int(kv_index[ib, ih, i, e])
                    if 0 <= j < len(kv):
                        keys += list(kv[j])
                if not rows:
                    continue
                r = torch.tensor(list(rows))
                if keys:
                    kk = torch.tensor(keys)
                    s = qd[b, r, h] @ kd[b, kk, h].T * D**-0.5
                    lse[b, h, r] = torch.logsumexp(s, -1)
                    out[b, r, h] = torch.softmax(s, -1) @ vd[b, kk, h]
                if rect_scale is not None:
                    out[b, r, h] = (
                        out[b, r, h] * rect_scale[ib, ih, i].double() + rect_bias[ib, ih, i].double()
                    )
    return out, lse


def _random_lists(Bp, Hp, nq, nk, gen, bad=False):
    mask = torch.rand(Bp, Hp, nq, nk, generator=gen) < 0.5
    mask[0, 0, 0] = False  # one empty row
    order = torch.rand(Bp, Hp, nq, nk, generator=gen).argsort(-1)  # unsorted lists
    keep = torch.gather(mask, -1, order)
    key = (~keep).to(torch.int8) * 2
    idx = torch.gather(order, -1, key.argsort(dim=-1, stable=True)).to(torch.int32)
    cnt = mask.sum(-1, dtype=torch.int32)
    if bad:  # out-of-range ids attend nothing
        idx[..., -1] = nk + 3
        cnt = torch.full_like(cnt, nk)
    return idx.contiguous(), cnt.contiguous()


CASES = [
    # (grid tokens, text_len, position, valid (None/int/list), bq, bk, B, H)
    (45, 0, "end", None, 16, 16, 1, 2),
    (70, 23, "end", [23, 5], 16, 16, 2, 1),
    (70, 23, "start", [0, 17], 32, 16, 2, 2),
    (33, 40, "start", None, 16, 32, 1, 1),
    (64, 16, "end", [16], 16, 16, 1, 1),
    (100, 30, "end", [30], 64, 32, 1, 1),
]


@pytest.mark.parametrize("nv, tlen, pos, valid, bq, bk, B, H", CASES)
@pytest.mark.parametrize("rect", [False, True])
def test_segments_match_oracle(device, nv, tlen, pos, valid, bq, bk, B, H, rect):
    gen = torch.Generator().manual_seed(nv + tlen + bq)
    D = 16
    N = nv + tlen
    q, k, v = (torch.randn(B, N, H, D, generator=gen).to(torch.float32) for _ in range(3))
    tv = (
        None
        if valid is None
        else torch.tensor(valid if isinstance(valid, list) else [valid] * B, dtype=torch.int32)
    )
    vs, ts = (tlen, 0) if pos == "start" else (0, nv)
    seg = Segments(vs, nv, ts, tlen, tv)
    nq, nk = seg.num_q_tiles(bq), seg.num_kv_blocks(bk)
    idx, cnt = _random_lists(B, 1, nq, nk, gen, bad=(nv == 33))
    rs = rb = None
    if rect:
        rs = torch.rand(B, 1, nq, generator=gen) + 0.5
        rb = torch.randn(B, 1, nq, D, generator=gen)
    out, lse = block_sparse_fwd(
        q.to(device),
        k.to(device),
        v.to(device),
        idx.to(device),
        cnt.to(device),
        bq,
        bk,
        D**-0.5,
        segments=seg._replace(text_valid=None if tv is None else tv.to(device)),
        rect_scale=None if rs is None else rs.to(device),
        rect_bias=None if rb is None else rb.to(device),
    )
    eo, el = _oracle(q, k, v, idx, cnt, bq, bk, seg, rs, rb)
    # padded text query rows: finite, ignored
    rows_ok = torch.ones(B, N, dtype=torch.bool)
    if tv is not None:
        for b in range(B):
            rows_ok[b, ts + int(tv[b]) : ts + tlen] = False
    assert torch.isfinite(out).all()
    assert_close("out", out.cpu()[rows_ok], eo[rows_ok], dtype=torch.float32)
    assert_close("lse", lse.cpu().transpose(1, 2)[rows_ok], el.transpose(1, 2)[rows_ok], dtype=torch.float32)


def test_segments_from_layout():
    from visattn.ops import SequenceLayout

    lay = SequenceLayout((2, 3, 5), text_len=7, text_position="start", text_valid_len=torch.tensor([3, 9]))
    seg = Segments.from_layout(lay, 2, "cpu")
    assert seg[:4] == (7, 30, 0, 7)
    assert seg.text_valid.tolist() == [3, 7]
    assert seg.num_q_tiles(16) == 2 + 1 and seg.num_kv_blocks(4) == 8 + 2


def test_segments_covers():
    assert Segments(0, 30, 30, 7).covers(37) and Segments(7, 30, 0, 7).covers(37)
    assert Segments(0, 30, 30, 0).covers(30) and Segments(0, 30, 0, 0).covers(30)
    assert not Segments(0, 30, 30, 7).covers(40)  # rows after the text
    assert not Segments(0, 30, 32, 7).covers(39)  # a gap between the segments
    assert not Segments(2, 30, 32, 0).covers(32)  # rows before the video


def test_rows_outside_the_segments_are_zero(device):
    """Rows no segment covers (here 5 after the text) belong to no tile: zero output, LSE -inf."""
    gen = torch.Generator().manual_seed(5)
    B, H, D, nv, tlen, bq, bk = 1, 2, 16, 40, 9, 16, 16
    N = nv + tlen + 5
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    seg = Segments(0, nv, nv, tlen, None)
    idx, cnt = _random_lists(B, H, seg.num_q_tiles(bq), seg.num_kv_blocks(bk), gen)
    out, lse = block_sparse_fwd(
        *(t.to(device) for t in (q, k, v, idx, cnt)), bq, bk, D**-0.5, segments=seg
    )
    eo, el = _oracle(q[:, : nv + tlen], k[:, : nv + tlen], v[:, : nv + tlen], idx, cnt, bq, bk, seg, None, None)
    assert torch.equal(out[:, nv + tlen :].cpu(), torch.zeros(B, 5, H, D))
    assert torch.isneginf(lse[:, :, nv + tlen :]).all()
    assert_close("out", out[:, : nv + tlen].cpu(), eo, dtype=torch.float32)


def test_rect_epilogue_without_segments(device):
    gen = torch.Generator().manual_seed(3)
    B, N, H, D, bq, bk = 1, 50, 2, 16, 16, 16
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    nq, nk = cdiv(N, bq), cdiv(N, bk)
    idx, cnt = _random_lists(1, H, nq, nk, gen)
    rs = torch.rand(1, H, nq, generator=gen)
    rb = torch.randn(1, H, nq, D, generator=gen)
    out, _ = block_sparse_fwd(
        q.to(device),
        k.to(device),
        v.to(device),
        idx.to(device),
        cnt.to(device),
        bq,
        bk,
        D**-0.5,
        rect_scale=rs.to(device),
        rect_bias=rb.to(device),
    )
    eo, _ = _oracle(q, k, v, idx, cnt, bq, bk, Segments(0, N, N, 0, None), rs, rb)
    assert_close("out", out.cpu(), eo, dtype=torch.float32)
