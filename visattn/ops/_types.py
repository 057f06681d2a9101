"""Type aliases shared by the public ops."""

from __future__ import annotations

from typing import Literal

Layout = Literal["BNHD", "BHND"]
BackendLike = Literal["auto", "triton", "torch", "flex", "natten"] | str | None

__all__ = ["Layout", "BackendLike"]
