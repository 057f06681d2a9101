"""Dense-step and dense-block schedules, keyed by the real denoising step (never by call counts).

``Schedule(dense_steps=..., dense_blocks=...)``:

* ``dense_steps``: ``None`` (no dense steps), a tuple of step indices (negative ones count from the
  end and need the step count), or a float ``f`` in ``[0, 1]``: the first ``ceil(f * num_steps)``
  steps run dense.
* ``dense_blocks``: ``None``, or a tuple whose entries are block indices (ints) or glob patterns over
  processor keys (``"transformer_blocks.0.*"``, ``"*single*"``).

The step hook (``pipelines/hooks.py``) resolves :meth:`Schedule.is_dense_step` once per denoiser
call and stores the answer in the context; blocks are resolved once when processors are built.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass


def _check_steps(dense_steps):
    if dense_steps is None:
        return None
    if isinstance(dense_steps, bool):
        raise ValueError(
            f"dense_steps must be indices or a fraction in [0, 1], got dense_steps={dense_steps!r}"
        )
    if isinstance(dense_steps, float):
        if not 0.0 <= dense_steps <= 1.0:
            raise ValueError(f"dense_steps as a fraction must lie in [0, 1], got dense_steps={dense_steps}")
        return dense_steps
    if isinstance(dense_steps, int):
        dense_steps = (dense_steps,)
    if not isinstance(dense_steps, (tuple, list)) or any(
        not isinstance(s, int) or isinstance(s, bool) for s in dense_steps
    ):
        raise ValueError(
            f"dense_steps must be a tuple of step indices or a fraction, got dense_steps={dense_steps!r}"
        )
    return tuple(dense_steps)


def _check_blocks(dense_blocks):
    if dense_blocks is None:
        return None
    if isinstance(dense_blocks, (int, str)) and not isinstance(dense_blocks, bool):
        dense_blocks = (dense_blocks,)
    if not isinstance(dense_blocks, (tuple, list)) or any(
        isinstance(b, bool) or not isinstance(b, (int, str)) for b in dense_blocks
    ):
        raise ValueError(
            f"dense_blocks must be a tuple of block indices or key globs, got dense_blocks={dense_blocks!r}"
        )
    if any(isinstance(b, int) and b < 0 for b in dense_blocks):
        raise ValueError(f"dense_blocks indices must be >= 0, got dense_blocks={dense_blocks!r}")
    return tuple(dense_blocks)


@dataclass(frozen=True)
class Schedule:
    """Which denoising steps and which blocks run dense attention (see the module docstring)."""

    dense_steps: tuple[int, ...] | float | None = None
    dense_blocks: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_steps", _check_steps(self.dense_steps))
        object.__setattr__(self, "dense_blocks", _check_blocks(self.dense_blocks))

    @classmethod
    def from_config(cls, config) -> Schedule:
        """The schedule carried by a method config's ``dense_steps``/``dense_blocks`` fields (if any)."""
        return cls(getattr(config, "dense_steps", None), getattr(config, "dense_blocks", None))

    @property
    def empty(self) -> bool:
        return not self.dense_steps and not self.dense_blocks

    def is_dense_step(self, step_index: int | None, num_steps: int | None) -> bool:
        """Whether step ``step_index`` (0-based) of ``num_steps`` runs dense; unknown steps do not."""
        ds = self.dense_steps
        if ds is None or step_index is None:
            return False
        if isinstance(ds, float):
            if num_steps is None:
                return False
            return step_index < math.ceil(ds * num_steps)
        for s in ds:
            if s < 0:
                if num_steps is not None and step_index == num_steps + s:
                    return True
            elif s == step_index:
                return True
        return False

    def is_dense_block(self, block_index: int | None, key: str) -> bool:
        """Whether the processor at ``key`` (block ``block_index``) always runs dense."""
        for b in self.dense_blocks or ():
            if isinstance(b, int):
                if block_index == b:
                    return True
            elif fnmatch.fnmatchcase(key, b):
                return True
        return False


__all__ = ["Schedule"]
