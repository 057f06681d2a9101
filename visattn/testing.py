"""Testing helpers shared by visattn's tests and benchmarks (no pytest import at module scope)."""

from __future__ import annotations

from .ops._synthetic import local_qkv, neighbourhood_mass

__all__ = ["local_qkv", "neighbourhood_mass"]
