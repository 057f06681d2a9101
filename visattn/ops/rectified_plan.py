"""``RectifiedConfig`` and ``RectifiedPlan``: the settings and the device plan of Rectified SpaAttn.

Spec: ``specs/rectified.md`` §2-3. Presets are YAML files ``configs/pipelines/rectified/<name>.yaml``
(§2.8). Op fields configure selection, GAPR and the kernel; ``token_order``, ``axis_order``,
``dense_steps`` and ``dense_blocks`` are read by the diffusers processors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ._checks import allow_test_block_sizes, block_sizes_for_tests_allowed
from ._layout import SequenceLayout

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "pipelines" / "rectified"
_FIRST_FRAME = (None, "curve_prefix", "frame")
_TEST_BLOCKS = (16, 32)  # interpreter tests only (RectifiedConfig._with_block, allow_test_block_sizes)


@dataclass(frozen=True)
class RectifiedConfig:
    """Settings of Rectified SpaAttn (spec §3).

    Args:
        block_size: query and key block size b, 64 or 128 (default 128, as upstream).
        cum_threshold: τ, the cumulative pooled-probability mass selected per query block (0.3).
        drop_rate: floor on kept blocks, k_min = ⌊(1 - drop_rate)·n_v⌋ (0.75); not a sparsity.
        neighbours: OR the 26-neighbour blocks of each query block (True).
        first_frame: None, ``"curve_prefix"`` (upstream's first ⌊n_v/T⌋ blocks) or ``"frame"``
            (blocks holding a frame-0 token).
        ipar: Isolated-Pooling Attention Reallocation (text columns unpooled, ``+ln w`` bias; True).
        gapr: Gain-Aware Pooling Rectification (True). ``ipar=False, gapr=False`` is Jenga.
        tail: ``"exact"`` (means over valid tokens) or ``"upstream"`` (zero-padded tail, parity only).
    """

    block_size: int = 128
    cum_threshold: float = 0.3
    drop_rate: float = 0.75
    neighbours: bool = True
    first_frame: str | None = None
    ipar: bool = True
    gapr: bool = True
    tail: str = "exact"
    # read by the diffusers processors only
    token_order: str | None = "gilbert"
    axis_order: tuple[str, ...] = ("w", "h", "t")
    dense_steps: Any = ()
    dense_blocks: Any = ()

    def __post_init__(self) -> None:
        b = self.block_size
        if isinstance(b, bool) or b not in (64, 128) + (_TEST_BLOCKS if block_sizes_for_tests_allowed() else ()):
            raise ValueError(f"expected config.block_size in (64, 128), got config.block_size={b!r}")
        t = self.cum_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"expected config.cum_threshold in [0, 1], got config.cum_threshold={t!r}")
        d = self.drop_rate
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"expected config.drop_rate in [0, 1), got config.drop_rate={d!r}")
        if self.first_frame not in _FIRST_FRAME:
            raise ValueError(
                f"expected config.first_frame in {_FIRST_FRAME}, got config.first_frame={self.first_frame!r}"
            )
        if self.tail not in ("exact", "upstream"):
            raise ValueError(f"expected config.tail in ('exact', 'upstream'), got config.tail={self.tail!r}")
        if self.token_order not in (None, "gilbert"):
            raise ValueError(f"expected config.token_order in (None, 'gilbert'), got {self.token_order!r}")
        for name in ("neighbours", "ipar", "gapr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"expected a bool config.{name}, got config.{name}={getattr(self, name)!r}")
        object.__setattr__(
            self,
            "axis_order",
            tuple(self.axis_order) if not isinstance(self.axis_order, str) else self.axis_order,
        )
        for name in ("dense_steps", "dense_blocks"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))

    def replace(self, **changes) -> RectifiedConfig:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        if kw["block_size"] in _TEST_BLOCKS and "block_size" not in changes:  # keep a test-only size
            return type(self)(**{**kw, "block_size": 128})._with_block(kw["block_size"])
        return type(self)(**kw)

    def _with_block(self, block_size: int) -> RectifiedConfig:
        """A copy with a test-only block size (16 or 32) so interpreter tests stay tiny."""
        if block_size not in _TEST_BLOCKS + (64, 128):
            raise ValueError(f"expected a test block size in {_TEST_BLOCKS + (64, 128)}, got {block_size}")
        cfg = self.replace(block_size=128)
        object.__setattr__(cfg, "block_size", block_size)
        return cfg

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RectifiedConfig:
        """The preset ``configs/pipelines/rectified/<name>.yaml`` (spec §2.8), with ``overrides``."""
        import yaml

        path = PRESET_DIR / f"{name}.yaml"
        if not isinstance(name, str) or not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"expected a preset name in {known}, got name={name!r}")
        data = yaml.safe_load(path.read_text()) or {}
        data = {k: v for k, v in data.items() if k != "description"}
        data.update(overrides)
        extra = sorted(set(data) - {f.name for f in fields(cls)})
        if extra:
            raise ValueError(f"unknown keys {extra} in preset {name!r} ({path})")
        return cls(**data)


@dataclass(eq=False)
class RectifiedPlan:
    """Kept block lists and rectification terms of one Rectified SpaAttn call (device tensors).

    Query tiles are the ``n_v`` visual blocks, then the ``ceil(text_len / b)`` text blocks. KV block
    ids ``< n_v`` are visual blocks, ``n_v + t`` text block t (``kernels.block_sparse.Segments``).

    Args:
        kv_index: int32 ``[B, H, n_tiles, n_v + n_t]``, ascending block ids, first ``kv_count`` used.
        kv_count: int32 ``[B, H, n_tiles]``.
        rect_scale: fp32 ``[B, H, n_tiles]``: R (1 for text tiles); fp64 when planned in float64.
        rect_bias: fp32 ``[B, H, n_tiles, D]``: C (0 for text tiles).
        rect_map: bool ``[B, H, n_v, n_v]``: 𝒢, the rectified dropped pairs.
        density: fp32 ``[B, H]``: kept visual pairs / n_v².
        rect_fraction: fp32 ``[B, H]``: rectified / dropped visual pairs.
        rect_prob: fp32 ``[B, H, n_v, n_v]`` P restricted to 𝒢 (``keep_probs=True``) or None.
        block_size, seq_layout, config: what the plan was made for.
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    rect_scale: torch.Tensor
    rect_bias: torch.Tensor
    rect_map: torch.Tensor
    density: torch.Tensor
    rect_fraction: torch.Tensor
    block_size: int
    seq_layout: SequenceLayout
    config: RectifiedConfig | None = None
    rect_prob: torch.Tensor | None = None
    _v_key: tuple | None = field(default=None, repr=False)
    _tile_order: torch.Tensor | None = field(default=None, repr=False)

    def tile_order(self) -> torch.Tensor:
        """int32 ``[B, H, n_tiles]``: tiles by decreasing ``kv_count`` (the kernel's schedule), cached."""
        if self._tile_order is None:
            self._tile_order = self.kv_count.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return self._tile_order

    @property
    def num_video_blocks(self) -> int:
        return -(-self.seq_layout.num_video // self.block_size)

    @property
    def num_tiles(self) -> int:
        return self.num_video_blocks + self.seq_layout.num_text_blocks(self.block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_index.device

    def check_against(
        self, batch: int, heads: int, seq_len: int, head_dim: int, seq_layout: SequenceLayout | None
    ) -> None:
        """Raise ``ValueError`` (naming ``plan``) when the plan does not fit these inputs."""
        # the tile count alone misses lengths that round to the same blocks (N=122 vs a plan for 125)
        if seq_len != self.seq_layout.seq_len:
            raise ValueError(
                f"expected plan made for N={seq_len} tokens (the length of q, k, v), got plan for "
                f"plan.seq_layout.seq_len={self.seq_layout.seq_len}"
            )
        want = (batch, heads, self.num_tiles)
        if tuple(self.kv_count.shape) != want or tuple(self.rect_bias.shape) != want + (head_dim,):
            raise ValueError(
                f"expected plan for [B, H, n_tiles, D] = {want + (head_dim,)}, got plan with kv_count.shape="
                f"{tuple(self.kv_count.shape)}, rect_bias.shape={tuple(self.rect_bias.shape)}"
            )
        if seq_layout is not None and (
            seq_layout.video_grid,
            seq_layout.text_len,
            seq_layout.text_position,
        ) != (self.seq_layout.video_grid, self.seq_layout.text_len, self.seq_layout.text_position):
            raise ValueError(
                f"expected plan made for seq_layout={seq_layout}, got plan for {self.seq_layout}"
            )

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool kept map ``[B, H, n_tiles, n_v + n_t]``, int8 𝒢 map ``[B, H, n_v, n_v]``)."""
        nb = self.kv_index.shape[-1]
        used = torch.arange(nb, device=self.device) < self.kv_count[..., None]
        idx = torch.where(used, self.kv_index.long(), nb)
        kept = torch.zeros(*self.kv_index.shape[:3], nb + 1, dtype=torch.bool, device=self.device)
        kept.scatter_(-1, idx, True)
        return kept[..., :nb], self.rect_map.to(torch.int8)

    def kept_visual(self) -> torch.Tensor:
        """bool ``[B, H, n_v, n_v]``: the kept visual pairs 𝒦."""
        nv = self.num_video_blocks
        return self.to_dense()[0][:, :, :nv, :nv]

    def to(self, device) -> RectifiedPlan:
        def mv(t):
            return None if t is None else t.to(device)

        return RectifiedPlan(
            mv(self.kv_index),
            mv(self.kv_count),
            mv(self.rect_scale),
            mv(self.rect_bias),
            mv(self.rect_map),
            mv(self.density),
            mv(self.rect_fraction),
            self.block_size,
            self.seq_layout,
            self.config,
            mv(self.rect_prob),
            None,
        )

    def save(self, path) -> None:
        lay = self.seq_layout
        tv = lay.text_valid_len
        torch.save(
            {
                "tensors": {
                    n: getattr(self, n)
                    for n in (
                        "kv_index",
                        "kv_count",
                        "rect_scale",
                        "rect_bias",
                        "rect_map",
                        "density",
                        "rect_fraction",
                        "rect_prob",
                    )
                },
                "block_size": self.block_size,
                "layout": dict(
                    video_grid=lay.video_grid,
                    text_len=lay.text_len,
                    text_position=lay.text_position,
                    text_valid_len=tv,
                    token_order=lay.token_order,
                ),
                "config": None
                if self.config is None
                else {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            },
            path,
        )

    @classmethod
    def load(cls, path, map_location=None) -> RectifiedPlan:
        # only tensors and plain containers were saved, so the safe unpickler reads it (no code runs)
        data = torch.load(path, map_location=map_location, weights_only=True)
        t = data["tensors"]
        cfg = data["config"]
        if cfg is not None:
            b = cfg["block_size"]
            cfg = RectifiedConfig(**{**cfg, "block_size": 128})._with_block(b)
        return cls(
            t["kv_index"],
            t["kv_count"],
            t["rect_scale"],
            t["rect_bias"],
            t["rect_map"],
            t["density"],
            t["rect_fraction"],
            data["block_size"],
            SequenceLayout(**data["layout"]),
            cfg,
            t["rect_prob"],
        )

    def __repr__(self) -> str:
        return (
            f"RectifiedPlan(B,H,tiles={tuple(self.kv_count.shape)}, block_size={self.block_size}, "
            f"layout={self.seq_layout.video_grid}+{self.seq_layout.text_len} text "
            f"({self.seq_layout.text_position}), keep_probs={self.rect_prob is not None})"
        )


__all__ = ["RectifiedConfig", "RectifiedPlan"]
