"""``PyramidConfig``: the settings of PSA (``specs/pyramid.md`` §3.1) and its presets.

Presets are YAML files ``configs/pipelines/pyramid/<name>.yaml`` (spec §2.7). Op fields configure
estimation, level assignment and the kernel; ``token_order``, ``axis_order``, ``dense_steps`` and
``dense_blocks`` are read by the diffusers processors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._checks import allow_test_block_sizes, block_sizes_for_tests_allowed

FACTORS = (1, 2, 4, 8)
_MODES = ("topk", "thresholdbound", "energybound")
_ESTIMATORS = ("sampled_max", "sampled_softmax_max", "antidiagonal")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "pipelines" / "pyramid"
_BLOCKS = {"block_q": (64, 128), "block_k": (32, 64, 128)}  # spec §2.1, §3.2
# interpreter tests only (PyramidConfig._with_blocks, _checks.allow_test_block_sizes), as RectifiedConfig's
_TEST_BLOCKS = {"block_q": (16, 32), "block_k": (16,)}


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"expected config.{name} in {allowed}, got config.{name}={value!r}")


def _thresholds(value) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        t = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or any(math.isnan(x) for x in t):
        raise ValueError(
            f"expected config.sim_thresholds as three floats (x2, x4, x8) or None, "
            f"got config.sim_thresholds={value!r}"
        )
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class PyramidConfig:
    """PSA settings; defaults are upstream's ``PSAConfig`` (the ``default`` preset).

    Args:
        block_q: query tile, 64 or 128.
        block_k: KV block, 32, 64 or 128.
        levels: ``{pool factor: end of its interval}`` with factors in (1, 2, 4, 8) and ends
            non-decreasing in [0, 1]; a missing factor is an empty level; after the x8 end: skip.
        mode: ``"topk"`` (quantiles), ``"thresholdbound"`` (cumulative mass, default of the
            generation presets) or ``"energybound"`` (understanding example).
        min_full_fraction: thresholdbound's floor on level-1 blocks (``floor(f * n_k) + 1``).
        estimator: ``"sampled_max"`` (upstream), ``"sampled_softmax_max"`` (paper) or
            ``"antidiagonal"`` (XAttention); ``reduce``: ``"max"`` or ``"mean"`` over sampled rows.
        sample_fraction: sampled rows/keys per block as a fraction of the block (0.25).
        antidiagonal_stride: antidiagonal group size S.
        sim_thresholds: similarity cap thresholds (x2, x4, x8) or None (off).
        align: ``"upstream"`` (round level lengths to multiples of ``ceil(m * align_tile / block_k)``)
            or ``"none"``.
        text_keys: ``"full"`` (text KV blocks always at m = 1) or ``"as_video"`` (one segment, parity).
        text_queries: ``"dense"`` (text query tiles attend every valid key).
        tail: ``"exact"`` (true counts) or ``"replicate"`` (upstream's padding; reference only).
        causal: the causal variant (future groups masked, diagonal at m = 1).
    """

    block_q: int = 128
    block_k: int = 64
    levels: Any = field(default_factory=lambda: {1: 0.10, 2: 0.15, 4: 0.15, 8: 0.35})
    mode: str = "topk"
    min_full_fraction: float = 0.06
    estimator: str = "sampled_max"
    reduce: str = "max"
    sample_fraction: float = 0.25
    antidiagonal_stride: int = 8
    sim_thresholds: Any = None
    align: str = "upstream"
    align_tile: int = 32
    text_keys: str = "full"
    text_queries: str = "dense"
    tail: str = "exact"
    causal: bool = False
    # read by the diffusers processors only
    token_order: str | None = None
    axis_order: str = "largest"
    dense_steps: Any = ()
    dense_blocks: Any = ()

    def __post_init__(self) -> None:
        for name, allowed in _BLOCKS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or v not in allowed + (_TEST_BLOCKS[name] if block_sizes_for_tests_allowed() else ()):
                raise ValueError(f"expected config.{name} in {allowed}, got config.{name}={v!r}")
        lv = self.levels
        if isinstance(lv, (tuple, list)) and all(isinstance(x, (tuple, list)) for x in lv):
            lv = dict(lv)
        if not isinstance(lv, dict) or not lv or any(isinstance(m, bool) or m not in FACTORS for m in lv):
            raise ValueError(
                f"expected config.levels as {{factor: end}} with factors in {FACTORS}, "
                f"got config.levels={self.levels!r}"
            )
        ends, prev = [], 0.0
        for m in FACTORS:
            e = float(lv.get(m, prev))
            if not (0.0 <= e <= 1.0) or e < prev:
                raise ValueError(
                    f"expected config.levels ends non-decreasing in [0, 1], got config.levels={lv!r}"
                )
            ends.append(e)
            prev = e
        object.__setattr__(self, "levels", tuple((m, float(lv[m])) for m in FACTORS if m in lv))
        _choice("mode", self.mode, _MODES)
        _choice("estimator", self.estimator, _ESTIMATORS)
        _choice("reduce", self.reduce, ("max", "mean"))
        _choice("align", self.align, ("upstream", "none"))
        _choice("text_keys", self.text_keys, ("full", "as_video"))
        _choice("text_queries", self.text_queries, ("dense",))
        _choice("tail", self.tail, ("exact", "replicate"))
        _choice("token_order", self.token_order, (None, "gilbert"))
        if not isinstance(self.sample_fraction, (int, float)) or not 0 < self.sample_fraction <= 1:
            raise ValueError(f"expected config.sample_fraction in (0, 1], got {self.sample_fraction!r}")
        for name in ("block_q", "block_k"):
            if int(getattr(self, name) * self.sample_fraction) < 1:
                raise ValueError(
                    f"expected at least one sample per block, got config.sample_fraction="
                    f"{self.sample_fraction} with config.{name}={getattr(self, name)}"
                )
        if isinstance(self.antidiagonal_stride, bool) or self.antidiagonal_stride not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                f"expected config.antidiagonal_stride a power of two <= 32, got {self.antidiagonal_stride!r}"
            )
        if not 0 <= self.min_full_fraction <= 1:
            raise ValueError(f"expected config.min_full_fraction in [0, 1], got {self.min_full_fraction!r}")
        if isinstance(self.align_tile, bool) or not isinstance(self.align_tile, int) or self.align_tile < 1:
            raise ValueError(f"expected a positive int config.align_tile, got {self.align_tile!r}")
        object.__setattr__(self, "sim_thresholds", _thresholds(self.sim_thresholds))
        object.__setattr__(self, "causal", bool(self.causal))
        for name in ("dense_steps", "dense_blocks"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))

    @property
    def level_ends(self) -> tuple[float, float, float, float]:
        """Interval ends of factors 1, 2, 4, 8 (a missing factor ends where the previous one does)."""
        lv, out, prev = dict(self.levels), [], 0.0
        for m in FACTORS:
            prev = lv.get(m, prev)
            out.append(prev)
        return tuple(out)  # type: ignore[return-value]

    def replace(self, **changes) -> PyramidConfig:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        # keep a test-only block size this config was made with (changing it is checked as usual)
        if any(n not in changes and getattr(self, n) not in _BLOCKS[n] for n in _BLOCKS):
            with allow_test_block_sizes():
                return type(self)(**kw)
        return type(self)(**kw)

    def _with_blocks(self, block_q: int, block_k: int) -> PyramidConfig:
        """Tests only: a copy with block sizes that may be test-only (block_q 16/32, block_k 16), so
        interpreter tests stay tiny; every other check still runs."""
        with allow_test_block_sizes():
            return self.replace(block_q=block_q, block_k=block_k)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> PyramidConfig:
        """The preset ``configs/pipelines/pyramid/<name>.yaml`` (spec §2.7), with ``overrides``."""
        import yaml

        path = PRESET_DIR / f"{name}.yaml"
        if not isinstance(name, str) or not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"expected a preset name in {known}, got name={name!r}")
        data = yaml.safe_load(path.read_text()) or {}
        data = {k: v for k, v in data.items() if k != "description"}
        if "levels" in data:
            data["levels"] = {int(k): float(v) for k, v in data["levels"].items()}
        data.update(overrides)
        known_fields = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known_fields)
        if extra:
            raise ValueError(f"unknown keys {extra} in preset {name!r} ({path})")
        return cls(**data)


__all__ = ["PyramidConfig", "FACTORS", "allow_test_block_sizes"]
