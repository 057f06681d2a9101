"""``SequenceLayout``: where video and text tokens sit in a joint attention sequence.

Shared by the sparse video methods (pyramid, rectified), the neighborhood processors and the
diffusers integration's context (``specs/rectified.md`` §2.1). No diffusers import: ops use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TextPosition = Literal["start", "end"]


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """A joint sequence of ``prod(video_grid)`` video tokens and ``text_len`` text tokens.

    ``video_grid`` is ``(T, H, W)`` (a 2-D ``(H, W)`` grid is read as ``T = 1``). The video segment
    starts at 0 when ``text_position="end"`` and at ``text_len`` when ``"start"``. ``text_valid_len``
    is ``None`` (all text valid), an int in ``[0, text_len]``, or an int tensor ``[B]`` on the
    device (values are clamped on the device, never read on the host). Padding sits at the end of
    the text segment. ``token_order`` names the permutation already applied to the video tokens
    (``None`` = raster order, ``w`` fastest).

    Frozen and hashable, so it can key caches; two layouts holding different tensors compare unequal
    unless they are the same tensor object.
    """

    video_grid: tuple[int, ...]
    text_len: int = 0
    text_position: TextPosition = "end"
    text_valid_len: int | torch.Tensor | None = None
    token_order: str | None = None

    def __post_init__(self) -> None:
        grid = self.video_grid
        if isinstance(grid, int) or not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
            raise ValueError(f"expected video_grid as (T, H, W) or (H, W) of positive ints, got video_grid={grid!r}")
        grid = tuple(grid)
        if any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in grid):
            raise ValueError(f"expected video_grid of positive ints, got video_grid={grid!r}")
        grid = (1,) * (3 - len(grid)) + grid
        object.__setattr__(self, "video_grid", grid)
        if not isinstance(self.text_len, int) or isinstance(self.text_len, bool) or self.text_len < 0:
            raise ValueError(f"expected a non-negative int text_len, got text_len={self.text_len!r}")
        if self.text_position not in ("start", "end"):
            raise ValueError(f"expected text_position 'start' or 'end', got text_position={self.text_position!r}")
        tv = self.text_valid_len
        if isinstance(tv, torch.Tensor):
            if tv.dim() != 1 or tv.dtype.is_floating_point or tv.dtype == torch.bool:
                raise ValueError(
                    "expected text_valid_len as an int tensor of shape [B], "
                    f"got text_valid_len with shape {tuple(tv.shape)} and dtype {tv.dtype}"
                )
        elif tv is not None:
            if not isinstance(tv, int) or isinstance(tv, bool) or not 0 <= tv <= self.text_len:
                raise ValueError(
                    f"expected text_valid_len in [0, text_len={self.text_len}], got text_valid_len={tv!r}"
                )

    # ------------------------------------------------------------------ sizes and slices
    @property
    def num_video(self) -> int:
        return math.prod(self.video_grid)

    @property
    def seq_len(self) -> int:
        return self.num_video + self.text_len

    @property
    def video_start(self) -> int:
        return self.text_len if self.text_position == "start" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "start" else self.num_video

    @property
    def video_slice(self) -> slice:
        return slice(self.video_start, self.video_start + self.num_video)

    @property
    def text_slice(self) -> slice:
        return slice(self.text_start, self.text_start + self.text_len)

    def num_video_blocks(self, block: int) -> int:
        return -(-self.num_video // block)

    def num_text_blocks(self, block: int) -> int:
        return -(-self.text_len // block)

    def valid_text(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Valid text lengths as an int32 tensor ``[batch]`` on ``device`` (clamped to ``[0, text_len]``)."""
        tv = self.text_valid_len
        if isinstance(tv, torch.Tensor):
            if tv.shape[0] != batch:
                raise ValueError(f"expected text_valid_len of shape [{batch}], got {tuple(tv.shape)}")
            return tv.to(device=device or tv.device, dtype=torch.int32).clamp(0, self.text_len)
        n = self.text_len if tv is None else tv
        return torch.full((batch,), n, dtype=torch.int32, device=device)

    def check_length(self, seq_len: int, name: str = "seq_layout") -> None:
        if seq_len != self.seq_len:
            raise ValueError(
                f"expected {name} to describe {seq_len} tokens, got {name} with "
                f"video_grid={self.video_grid} (= {self.num_video}) + text_len={self.text_len} = {self.seq_len}"
            )

    # ------------------------------------------------------------------ hashing
    def _key(self) -> tuple:
        tv = self.text_valid_len
        tv_key = ("tensor", id(tv)) if isinstance(tv, torch.Tensor) else tv
        return (self.video_grid, self.text_len, self.text_position, tv_key, self.token_order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def replace(self, **changes) -> SequenceLayout:
        fields = dict(video_grid=self.video_grid, text_len=self.text_len, text_position=self.text_position,
                      text_valid_len=self.text_valid_len, token_order=self.token_order)
        fields.update(changes)
        return SequenceLayout(**fields)


__all__ = ["SequenceLayout", "TextPosition"]
