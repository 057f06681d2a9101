"""``PyramidPlan``: PSA's multi-level block lists (``specs/pyramid.md`` §3.1) and block geometry.

For batch ``b``, head ``h`` and query tile ``i``, ``kv_index[b, h, i]`` lists the kept KV blocks
grouped by pool factor 1, 2, 4, 8 (by rank within a group); entries
``[level_ptr[..., l], level_ptr[..., l + 1])`` use factor ``2**l`` and ``level_ptr[..., 4]`` is the
kept count. Query tiles and KV blocks are cut per segment of the ``SequenceLayout`` (video tiles
first, then text tiles; see ``kernels.block_sparse.Segments``), or from 0 over the whole sequence
without one. Every method works on device tensors without reading their values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._layout import SequenceLayout
from ._pyramid_config import FACTORS, PyramidConfig

_CODE = {0: 4, 1: 0, 2: 1, 4: 2, 8: 3}  # pool factor -> level slot (skip last)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_ranges(
    seq_len: int, block: int, seq_layout: SequenceLayout | None, batch: int, device, valid_text: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ranges ``(start, length)`` int64 ``[B, n_blocks]`` of the blocks a plan indexes.

    With a layout: video blocks, then text blocks (text lengths limited to the valid text when
    ``valid_text``); without: blocks cut from 0 over ``seq_len``.
    """
    if seq_layout is None:
        n = _cdiv(seq_len, block)
        start = torch.arange(n, device=device) * block
        length = (seq_len - start).clamp(max=block)
        return start.expand(batch, n), length.expand(batch, n)
    L = seq_layout
    nv, nt = _cdiv(L.num_video, block), _cdiv(L.text_len, block)
    vstart = L.video_start + torch.arange(nv, device=device) * block
    vlen = (L.video_start + L.num_video - vstart).clamp(max=block)
    tstart = L.text_start + torch.arange(nt, device=device) * block
    tend = (
        L.valid_text(batch, device).long() if valid_text else torch.full((batch,), L.text_len, device=device)
    )
    tlen = (L.text_start + tend[:, None] - tstart[None]).clamp(0, block)
    start = torch.cat([vstart, tstart]).expand(batch, nv + nt)
    length = torch.cat([vlen.expand(batch, nv), tlen], 1)
    return start, length


@dataclass(eq=False)
class PyramidPlan:
    """Multi-level block lists of PSA (device tensors).

    Args:
        kv_index: int32 ``[B, H, n_q_tiles, n_kv_blocks]`` (B, H may be 1 to broadcast).
        level_ptr: int32 ``[B, H, n_q_tiles, 5]``.
        block_q, block_k: tile and block sizes.
        seq_len: sequence length the plan was made for.
        seq_layout: the :class:`SequenceLayout` (None: one segment).
        config: the :class:`PyramidConfig` it came from (None for hand-made plans).
        scores: the importance scores ``[B, H, n_q, n_k]`` when planned with ``keep_scores``.
    """

    kv_index: torch.Tensor
    level_ptr: torch.Tensor
    block_q: int
    block_k: int
    seq_len: int
    seq_layout: SequenceLayout | None = None
    config: PyramidConfig | None = None
    scores: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        idx, lp = self.kv_index, self.level_ptr
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32 or idx.dim() != 4:
            raise ValueError(
                f"expected plan.kv_index int32 [B, H, n_q_tiles, n_kv_blocks], got "
                f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}"
            )
        if (
            not isinstance(lp, torch.Tensor)
            or lp.dtype != torch.int32
            or tuple(lp.shape) != (*idx.shape[:3], 5)
        ):
            raise ValueError(
                f"expected plan.level_ptr int32 of shape {(*idx.shape[:3], 5)}, got "
                f"{getattr(lp, 'dtype', type(lp))} {tuple(getattr(lp, 'shape', ()))}"
            )
        nq, nk = self.num_q_tiles_expected, self.num_kv_blocks
        if idx.shape[2] != nq or idx.shape[3] < 1:
            raise ValueError(
                f"expected plan.kv_index.shape[2] == {nq} query tiles for seq_len={self.seq_len}, "
                f"got plan.kv_index.shape={tuple(idx.shape)}"
            )
        if idx.stride(-1) != 1:
            self.kv_index = idx.contiguous()
        if lp.stride(-1) != 1:
            self.level_ptr = lp.contiguous()
        del nk

    # ------------------------------------------------------------------ geometry
    @property
    def num_q_tiles_expected(self) -> int:
        L = self.seq_layout
        if L is None:
            return _cdiv(self.seq_len, self.block_q)
        return _cdiv(L.num_video, self.block_q) + _cdiv(L.text_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        L = self.seq_layout
        if L is None:
            return _cdiv(self.seq_len, self.block_k)
        return _cdiv(L.num_video, self.block_k) + _cdiv(L.text_len, self.block_k)

    @property
    def num_video_blocks(self) -> tuple[int, int]:
        """(n_q, n_k): video query tiles and video KV blocks (all blocks without a layout)."""
        L = self.seq_layout
        if L is None:
            return _cdiv(self.seq_len, self.block_q), _cdiv(self.seq_len, self.block_k)
        return _cdiv(L.num_video, self.block_q), _cdiv(L.num_video, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_index.device

    @property
    def causal(self) -> bool:
        return bool(self.config is not None and self.config.causal)

    def check_against(
        self, batch: int, heads: int, seq_len: int, seq_layout: SequenceLayout | None, name: str = "plan"
    ) -> None:
        bp, hp = self.kv_index.shape[:2]
        if bp not in (1, batch) or hp not in (1, heads):
            raise ValueError(
                f"expected {name} for B={batch}, H={heads}, got {name}.kv_index.shape="
                f"{tuple(self.kv_index.shape)}"
            )
        if seq_len != self.seq_len:
            raise ValueError(f"expected {name} made for N={seq_len}, got {name}.seq_len={self.seq_len}")
        if seq_layout is None:
            return  # the plan's own segments (or one segment) apply
        if self.seq_layout is None:
            # a one-segment plan is right for a layout only when made so on purpose (text_keys="as_video")
            if self.config is None or self.config.text_keys != "as_video":
                raise ValueError(
                    f"expected {name} made for seq_layout={seq_layout!r} (or with config.text_keys="
                    f"'as_video'), got {name}.seq_layout=None (a one-segment plan)"
                )
        elif seq_layout != self.seq_layout:
            raise ValueError(
                f"expected {name}.seq_layout == seq_layout, got {self.seq_layout!r} and {seq_layout!r}"
            )

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """int8 pool-factor map ``[B, H, n_q_tiles, n_kv_blocks]`` (0 = skipped)."""
        idx, lp = self.kv_index.long(), self.level_ptr.long()
        nk = self.num_kv_blocks
        e = torch.arange(idx.shape[-1], device=idx.device)
        lo = lp[..., :1].clamp(0, idx.shape[-1])
        lvl = (e >= lp[..., 1:4, None]).sum(-2)  # [B, H, nq, max_kv]: boundaries passed
        used = (e >= lo) & (e < lp[..., 4:5]) & (idx >= 0) & (idx < nk)
        fac = torch.where(used, 1 << lvl, 0).to(torch.int8)
        target = torch.where(used, idx, nk)
        out = torch.zeros((*idx.shape[:3], nk + 1), dtype=torch.int8, device=idx.device)
        out.scatter_(-1, target, fac)
        return out[..., :nk]

    @classmethod
    def from_dense(
        cls,
        levels: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        seq_len: int | None = None,
        seq_layout: SequenceLayout | None = None,
        config: PyramidConfig | None = None,
        rank: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> PyramidPlan:
        """Plan from a pool-factor map ``[B, H, n_q_tiles, n_kv_blocks]`` (values 0, 1, 2, 4, 8).

        Entries are grouped by factor, ordered by ``rank`` (default: block index) within a group.
        """
        if not isinstance(levels, torch.Tensor) or levels.dim() != 4:
            raise ValueError(
                f"expected levels as a [B, H, n_q_tiles, n_kv_blocks] tensor, got "
                f"{tuple(getattr(levels, 'shape', ()))}"
            )
        if seq_len is None:
            seq_len = seq_layout.seq_len if seq_layout is not None else levels.shape[2] * block_q
        lv = levels.long()
        code = torch.full_like(lv, 4)
        for m in FACTORS:
            code = torch.where(lv == m, _CODE[m], code)
        nk = lv.shape[-1]
        if rank is None:
            rank = torch.arange(nk, device=lv.device).expand_as(lv)
        key = code * (nk + 1) + rank
        index = key.argsort(dim=-1, stable=True).to(torch.int32)
        counts = torch.stack([(code == c).sum(-1) for c in range(4)], -1)
        level_ptr = torch.cat([torch.zeros_like(counts[..., :1]), counts.cumsum(-1)], -1).to(torch.int32)
        return cls(
            index.contiguous(), level_ptr.contiguous(), block_q, block_k, seq_len, seq_layout, config, scores
        )

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (KV block, level): the query tiles that attend it. ``(q_index, q_count)``:
        int32 ``[B, H, 4, n_kv_blocks, n_q_tiles]`` and ``[B, H, 4, n_kv_blocks]`` (backward's walk)."""
        hit = self._cache.get("transpose")
        if hit is not None:
            return hit
        dense = self.to_dense().long()
        mask = torch.stack([dense == m for m in FACTORS], 2).transpose(-1, -2)  # [B, H, 4, nk, nq]
        q_count = mask.sum(-1, dtype=torch.int32).contiguous()
        q_index = (
            torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        )
        self._cache["transpose"] = (q_index, q_count)
        return q_index, q_count

    def density(self) -> torch.Tensor:
        """FLOP-equivalent density over video blocks, ``mean([m > 0] / m)``, float32 ``[B, H]``."""
        nq, nk = self.num_video_blocks
        d = self.to_dense()[:, :, :nq, :nk].float()
        return torch.where(d > 0, 1.0 / d.clamp_min(1), 0.0).mean((-1, -2))

    def exact_density(self, batch: int | None = None) -> torch.Tensor:
        """Useful FLOPs (true rows, true group counts, text) / dense FLOPs, float64 ``[B, H]``."""
        B = self.kv_index.shape[0] if batch is None else batch
        dev = self.device
        _, qlen = block_ranges(self.seq_len, self.block_q, self.seq_layout, B, dev, valid_text=False)
        _, klen = block_ranges(self.seq_len, self.block_k, self.seq_layout, B, dev)
        d = self.to_dense().long()
        groups = torch.where(d > 0, (klen[:, None, None, :] + d - 1) // d.clamp_min(1), 0)
        flops = (qlen[:, None, :, None].double() * groups.double()).sum((-1, -2))
        return flops / float(self.seq_len) ** 2

    def to(self, device) -> PyramidPlan:
        lay = self.seq_layout  # its per-sample text lengths move too
        if lay is not None and isinstance(lay.text_valid_len, torch.Tensor):
            lay = lay.replace(text_valid_len=lay.text_valid_len.to(device))
        return PyramidPlan(
            self.kv_index.to(device),
            self.level_ptr.to(device),
            self.block_q,
            self.block_k,
            self.seq_len,
            lay,
            self.config,
            None if self.scores is None else self.scores.to(device),
        )

    # ------------------------------------------------------------------ upstream's separator format
    def to_upstream(self) -> torch.Tensor:
        """Upstream's new mask format ``[B, H, n_q, n_k + 5]`` int32 (parity tests only): per row the
        block ids ranked for factor 1, 2, 4, 8 and skip in turn, each group closed by a -1 separator.
        Needs a full-width plan (``kv_index.shape[-1] == n_kv_blocks``, as the planner makes)."""
        idx, lp = self.kv_index.long(), self.level_ptr.long()
        nk = idx.shape[-1]
        e = torch.arange(nk, device=idx.device)
        ends = torch.cat([lp[..., 1:5], torch.full_like(lp[..., :1], nk)], -1)  # [B, H, nq, 5]
        lvl = (e >= ends[..., :4, None]).sum(-2)
        out = torch.zeros((*idx.shape[:3], nk + 5), dtype=torch.int64, device=idx.device)
        out.scatter_(-1, e + lvl, idx)
        out.scatter_(-1, ends + torch.arange(5, device=idx.device), torch.full_like(ends, -1))
        return out.to(torch.int32)

    @classmethod
    def from_upstream(
        cls,
        mask: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        seq_len: int,
        seq_layout: SequenceLayout | None = None,
        config: PyramidConfig | None = None,
    ) -> PyramidPlan:
        """Inverse of :meth:`to_upstream`."""
        m = mask.long()
        nk = m.shape[-1] - 5
        sep = (m < 0).long().cumsum(-1) - (m < 0).long()  # separators before each slot
        dense = torch.zeros((*m.shape[:3], nk + 1), dtype=torch.int8, device=m.device)
        ok = (m >= 0) & (sep < 4)
        fac = torch.where(ok, 1 << sep.clamp(max=3), 0).to(torch.int8)
        dense.scatter_(-1, torch.where(ok, m, nk), fac)
        return cls.from_dense(
            dense[..., :nk],
            block_q=block_q,
            block_k=block_k,
            seq_len=seq_len,
            seq_layout=seq_layout,
            config=config,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the plan (tensors on the CPU) with ``torch.save``."""
        L = self.seq_layout
        lay = (
            None
            if L is None
            else dict(
                video_grid=L.video_grid,
                text_len=L.text_len,
                text_position=L.text_position,
                text_valid_len=L.text_valid_len
                if not isinstance(L.text_valid_len, torch.Tensor)
                else L.text_valid_len.cpu(),
                token_order=L.token_order,
            )
        )
        cfg = (
            None
            if self.config is None
            else {k: getattr(self.config, k) for k in PyramidConfig.__dataclass_fields__}
        )
        torch.save(
            dict(
                kv_index=self.kv_index.cpu(),
                level_ptr=self.level_ptr.cpu(),
                block_q=self.block_q,
                block_k=self.block_k,
                seq_len=self.seq_len,
                seq_layout=lay,
                config=cfg,
                scores=None if self.scores is None else self.scores.cpu(),
            ),
            path,
        )

    @classmethod
    def load(cls, path, map_location=None) -> PyramidPlan:
        d = torch.load(path, map_location=map_location, weights_only=True)
        lay = None if d["seq_layout"] is None else SequenceLayout(**d["seq_layout"])
        c = d["config"]
        # a saved test-only block size (tests' tiny plans) comes back as it was, as RectifiedPlan.load
        cfg = None if c is None else PyramidConfig(**{**c, "block_q": 128, "block_k": 64})._with_blocks(
            c["block_q"], c["block_k"]
        )
        return cls(
            d["kv_index"], d["level_ptr"], d["block_q"], d["block_k"], d["seq_len"], lay, cfg, d["scores"]
        )

    def __repr__(self) -> str:
        return (
            f"PyramidPlan(kv_index={tuple(self.kv_index.shape)}, "
            f"block_q={self.block_q}, block_k={self.block_k}, "
            f"seq_len={self.seq_len}, seq_layout={self.seq_layout!r}, device={self.device})"
        )


__all__ = ["PyramidPlan", "block_ranges"]
