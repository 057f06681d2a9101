"""``BlockSparsePlan``: which key blocks each query tile attends, as device index lists.

The plan is the input of the shared block-sparse core (``ops/block_sparse.py``): for batch ``b``,
head ``h`` and query tile ``i`` (rows ``i*block_q`` to ``(i+1)*block_q``), the key blocks
``kv_index[b, h, i, :kv_count[b, h, i]]`` (keys ``j*block_k`` to ``(j+1)*block_k``) are attended.
Axes 0 and 1 of both tensors may have size 1 to broadcast over batch or heads. PSA and Rectified
SpaAttn build their plans on this class.

Every method here works on device tensors without reading their values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._checks import check_power_of_two


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class BlockSparsePlan:
    """Per-query-tile lists of key blocks.

    Args:
        kv_index: int32 ``[B or 1, H or 1, num_q_tiles, max_kv]``; entries past ``kv_count`` are
            ignored. Entries of one row must be distinct; out-of-range entries attend nothing.
        kv_count: int32 ``[B or 1, H or 1, num_q_tiles]``, how many entries of each row are used.
        block_q: query rows per tile, a power of two >= 16.
        block_k: keys per block, a power of two >= 16.

    Raises:
        ValueError: wrong dtypes, ranks, shapes or block sizes (checked on construction).
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    block_q: int
    block_k: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_power_of_two("block_q", self.block_q, minimum=16)
        check_power_of_two("block_k", self.block_k, minimum=16)
        idx, cnt = self.kv_index, self.kv_count
        if not isinstance(idx, torch.Tensor) or not isinstance(cnt, torch.Tensor):
            raise ValueError(
                f"expected kv_index and kv_count to be tensors, got kv_index={type(idx).__name__}, "
                f"kv_count={type(cnt).__name__}"
            )
        if idx.dtype != torch.int32:
            raise ValueError(f"expected kv_index.dtype=torch.int32, got kv_index.dtype={idx.dtype}")
        if cnt.dtype != torch.int32:
            raise ValueError(f"expected kv_count.dtype=torch.int32, got kv_count.dtype={cnt.dtype}")
        if idx.dim() != 4:
            raise ValueError(
                f"expected kv_index of rank 4 [B, H, num_q_tiles, max_kv], got kv_index.shape={tuple(idx.shape)}"
            )
        if cnt.dim() != 3:
            raise ValueError(
                f"expected kv_count of rank 3 [B, H, num_q_tiles], got kv_count.shape={tuple(cnt.shape)}"
            )
        if tuple(cnt.shape) != tuple(idx.shape[:3]):
            raise ValueError(
                f"expected kv_count.shape == kv_index.shape[:3], got kv_count.shape={tuple(cnt.shape)}, "
                f"kv_index.shape={tuple(idx.shape)}"
            )
        if idx.device != cnt.device:
            raise ValueError(
                f"expected kv_index and kv_count on one device, got {idx.device} and {cnt.device}"
            )
        if idx.stride(-1) != 1:
            self.kv_index = idx.contiguous()

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_q_tiles(self) -> int:
        return self.kv_index.shape[2]

    @property
    def max_kv(self) -> int:
        return self.kv_index.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_index.device

    def check_against(self, batch: int, heads: int, seq_q: int, name: str = "plan") -> None:
        """Raise ``ValueError`` unless the plan fits q of ``batch`` x ``seq_q`` tokens x ``heads``."""
        bp, hp, nq = self.kv_index.shape[:3]
        if bp not in (1, batch):
            raise ValueError(
                f"expected {name}.kv_index.shape[0] in (1, B={batch}), got {name}.kv_index.shape[0]={bp}"
            )
        if hp not in (1, heads):
            raise ValueError(
                f"expected {name}.kv_index.shape[1] in (1, H={heads}), got {name}.kv_index.shape[1]={hp}"
            )
        want = _cdiv(seq_q, self.block_q)
        if nq != want:
            raise ValueError(
                f"expected {name}.kv_index.shape[2] == ceil(N_q / block_q) = ceil({seq_q} / {self.block_q}) "
                f"= {want}, got {name}.kv_index.shape[2]={nq}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_q: int, block_k: int) -> BlockSparsePlan:
        """Plan from a boolean block mask ``[B or 1, H or 1, num_q_tiles, num_kv_blocks]`` (or 2-D).

        Kept blocks are listed in increasing order; ``max_kv`` is ``num_kv_blocks`` (no host sync).
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"expected a torch.bool block mask, got mask={getattr(mask, 'dtype', mask)!r}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(
                f"expected mask of rank 2 or 4 [B, H, num_q_tiles, num_kv_blocks], got mask.shape={tuple(mask.shape)}"
            )
        count = mask.sum(-1, dtype=torch.int32)
        # stable sort of "not kept" puts kept block ids first, in increasing order
        index = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return cls(index.contiguous(), count.contiguous(), block_q, block_k)

    @classmethod
    def dense(cls, seq_q: int, seq_k: int, block_q: int = 128, block_k: int = 128,
              device: torch.device | str | None = None) -> BlockSparsePlan:
        """The plan that keeps every key block for every query tile (dense attention)."""
        check_power_of_two("block_q", block_q, minimum=16)
        check_power_of_two("block_k", block_k, minimum=16)
        nq, nk = _cdiv(seq_q, block_q), _cdiv(seq_k, block_k)
        index = torch.arange(nk, device=device, dtype=torch.int32).expand(1, 1, nq, nk).contiguous()
        count = torch.full((1, 1, nq), nk, device=device, dtype=torch.int32)
        return cls(index, count, block_q, block_k)

    @classmethod
    def random(cls, seq_q: int, seq_k: int, density: float, *, block_q: int = 128, block_k: int = 128,
               batch: int = 1, heads: int = 1, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> BlockSparsePlan:
        """A random plan keeping ``max(1, round(density * num_kv_blocks))`` blocks in every row.

        Every row holds the same number of blocks (uniform work), as in benchmark protocols.
        """
        if not 0.0 < density <= 1.0:
            raise ValueError(f"expected 0 < density <= 1, got density={density!r}")
        nq, nk = _cdiv(seq_q, block_q), _cdiv(seq_k, block_k)
        keep = max(1, round(density * nk))
        scores = torch.rand((batch, heads, nq, nk), generator=generator, device=generator.device if generator else None)
        chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
        count = torch.full((batch, heads, nq), keep, dtype=torch.int32)
        return cls(chosen.contiguous().to(device), count.to(device), block_q, block_k)

    # ------------------------------------------------------------------ conversions
    def to_mask(self, num_kv_blocks: int) -> torch.Tensor:
        """Boolean block mask ``[B or 1, H or 1, num_q_tiles, num_kv_blocks]``; out-of-range entries dropped."""
        return lists_to_mask(self.kv_index, self.kv_count, num_kv_blocks)

    def transpose(self, num_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every key block, the query tiles that attend it: ``(q_index, q_count)``.

        ``q_index``: int32 ``[B or 1, H or 1, num_kv_blocks, num_q_tiles]``; ``q_count``: int32
        ``[B or 1, H or 1, num_kv_blocks]``. This is the backward's dK/dV walk.
        """
        return transpose_lists(self.kv_index, self.kv_count, num_kv_blocks)

    def density(self, seq_q: int, seq_k: int) -> torch.Tensor:
        """Fraction of (query, key) pairs attended, counting partial last blocks exactly (a 0-d tensor)."""
        nq, nk = _cdiv(seq_q, self.block_q), _cdiv(seq_k, self.block_k)
        mask = self.to_mask(nk).to(torch.float64)
        rows = torch.full((nq,), float(self.block_q), dtype=torch.float64, device=mask.device)
        rows[-1] = seq_q - (nq - 1) * self.block_q
        cols = torch.full((nk,), float(self.block_k), dtype=torch.float64, device=mask.device)
        cols[-1] = seq_k - (nk - 1) * self.block_k
        pairs = torch.einsum("bhij,i,j->bh", mask, rows, cols)
        return pairs.mean() / (seq_q * seq_k)

    def to(self, device: torch.device | str) -> BlockSparsePlan:
        return BlockSparsePlan(self.kv_index.to(device), self.kv_count.to(device), self.block_q, self.block_k)

    def __repr__(self) -> str:
        return (
            f"BlockSparsePlan(kv_index={tuple(self.kv_index.shape)}, block_q={self.block_q}, "
            f"block_k={self.block_k}, device={self.device})"
        )


def lists_to_mask(kv_index: torch.Tensor, kv_count: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Boolean block mask from index lists; unused, negative and out-of-range entries are dropped."""
    idx = kv_index.long()
    max_kv = idx.shape[-1]
    used = torch.arange(max_kv, device=idx.device) < kv_count[..., None].clamp(max=max_kv)
    ok = used & (idx >= 0) & (idx < num_kv_blocks)
    target = torch.where(ok, idx, torch.full_like(idx, num_kv_blocks))  # sentinel column
    mask = torch.zeros((*idx.shape[:3], num_kv_blocks + 1), dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_kv_blocks]


def transpose_lists(kv_index: torch.Tensor, kv_count: torch.Tensor, num_kv_blocks: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed lists ``(q_index, q_count)``: for each key block, the query tiles listing it.

    Pure tensor ops on the device (no host sync), so it traces under ``torch.compile``.
    """
    mask_t = lists_to_mask(kv_index, kv_count, num_kv_blocks).transpose(-1, -2)
    q_count = mask_t.sum(-1, dtype=torch.int32).contiguous()
    # stable sort of "not listed" puts the listing query tiles first, in increasing order
    q_index = torch.sort((~mask_t).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return q_index, q_count
