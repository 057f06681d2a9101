"""The ``dense`` method: visattn's processors with the default math, timing the dispatcher call.

Used as the baseline of ``visattn generate --method dense`` (and ``--compare-dense``): it reproduces
each family's default processor (``pipelines/_families.py``) and times only the attention core, so
its attention time compares with the sparse methods'. ``dispatch_backend`` picks a diffusers backend
for these processors only (``None``: the process-global one).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import PipelineConfig
from ._families import (
    CogVideoXAttnBase,
    FluxAttnBase,
    HunyuanVideoAttnBase,
    JointAttnBase,
    LegacyAttnBase,
    LTXAttnBase,
    WanAttnBase,
    processor_table,
)
from ._registry import MethodSpec, register_method


@dataclass(frozen=True)
class DenseConfig(PipelineConfig):
    """Config of the ``dense`` method.

    Args:
        dispatch_backend: diffusers attention backend name for these processors (e.g. ``"native"``,
            ``"_native_math"``, ``"flash"``); ``None`` uses the global backend.
    """

    slug = "dense"
    dispatch_backend: str | None = None

    def __post_init__(self) -> None:
        if self.dispatch_backend is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = [b.value for b in AttentionBackendName]
            if self.dispatch_backend not in names:
                raise ValueError(
                    f"dispatch_backend must be one of {names}, got dispatch_backend={self.dispatch_backend!r}"
                )


class _Dense:
    method = "dense"


class DenseFluxAttnProcessor(_Dense, FluxAttnBase):
    """Dense Flux attention (``FluxAttnProcessor``'s math), timed."""


class DenseWanAttnProcessor(_Dense, WanAttnBase):
    """Dense Wan attention (``WanAttnProcessor``'s math), timed."""


class DenseLTXAttnProcessor(_Dense, LTXAttnBase):
    """Dense LTX attention (``LTXVideoAttnProcessor``'s math), timed."""


class DenseHunyuanVideoAttnProcessor(_Dense, HunyuanVideoAttnBase):
    """Dense HunyuanVideo attention (``HunyuanVideoAttnProcessor2_0``'s math), timed."""


class DenseCogVideoXAttnProcessor(_Dense, CogVideoXAttnBase):
    """Dense CogVideoX attention through the dispatcher, timed."""


class DenseJointAttnProcessor(_Dense, JointAttnBase):
    """Dense SD3 joint attention through the dispatcher, timed."""


class DenseAttnProcessor(_Dense, LegacyAttnBase):
    """Dense legacy ``Attention`` (UNet, DiT, PixArt) through the dispatcher, timed."""


SPEC = register_method(
    MethodSpec(
        slug="dense",
        config_cls=DenseConfig,
        processors=processor_table(
            {
                FluxAttnBase: DenseFluxAttnProcessor,
                WanAttnBase: DenseWanAttnProcessor,
                LTXAttnBase: DenseLTXAttnProcessor,
                HunyuanVideoAttnBase: DenseHunyuanVideoAttnProcessor,
                CogVideoXAttnBase: DenseCogVideoXAttnProcessor,
                JointAttnBase: DenseJointAttnProcessor,
                LegacyAttnBase: DenseAttnProcessor,
            }
        ),
        description="the models' own attention math, timed (baseline)",
    )
)

__all__ = [
    "DenseConfig",
    "DenseFluxAttnProcessor",
    "DenseWanAttnProcessor",
    "DenseLTXAttnProcessor",
    "DenseHunyuanVideoAttnProcessor",
    "DenseCogVideoXAttnProcessor",
    "DenseJointAttnProcessor",
    "DenseAttnProcessor",
]
