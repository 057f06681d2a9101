"""Pyramid Sparse Attention (PSA) processors for Wan, HunyuanVideo and CogVideoX.

"PSA: Pyramid Sparse Attention" (https://arxiv.org/abs/2512.04025; spec pyramid.md §5). The host
families (``pipelines/_families.py``) compute projections, QK-norm and RoPE exactly as the default
processors; the attention core calls :func:`visattn.ops.pyramid_attention` on ``[B, S, H, D]`` with
the call's :class:`SequenceLayout` (video segment, then text: text keys at full resolution, text
queries dense, padded text keys never attended). Dense warm-up steps and dense blocks come from the
preset and are keyed by the real denoising step (``Schedule``), never by counting calls.

Fallbacks (dispatcher, counted by reason): an attention mask that is not text padding, sequences
shorter than ``min_seq_len``, context parallelism. Calls with an unknown layout run PSA over the
whole sequence as one segment (upstream's plug-and-play semantics). Presets that name the Gilbert
token order (``token_order="gilbert"``, ``axis_order="largest"`` as upstream) install the shared
token-order adapter (``pipelines/token_order.py``): tokens are permuted once per transformer forward,
never inside an attention call. Models without an adapter, or a tree without the token-order module
(``visattn.ops._token_order``), run in raster order, counted as ``"pyramid: raster order"``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..ops import SequenceLayout
from ..ops.pyramid import PyramidConfig, pyramid_attention
from ._base import VisattnProcessor
from ._config import PipelineConfig
from ._families import CogVideoXAttnBase, HunyuanVideoAttnBase, WanAttnBase, processor_table
from ._registry import MethodSpec, register_method
from .schedule import Schedule
from .token_order import SUPPORTED as _ORDER_MODELS
from .token_order import install_token_order

_BACKENDS = (None, "auto", "triton", "torch")


@dataclass(frozen=True)
class PyramidPipelineConfig(PyramidConfig, PipelineConfig):
    """:class:`PyramidConfig` plus the pipeline fields (presets: ``configs/pipelines/pyramid/``).

    Args (beyond :class:`PyramidConfig`):
        backend: visattn op backend (``None`` follows ``visattn.use_backend``).
        min_seq_len: shorter sequences run dense through the dispatcher.
        dispatch_backend: diffusers backend for dense steps/blocks and fallbacks (``None``: global).
    """

    slug = "pyramid"
    backend: str | None = None
    min_seq_len: int = 0
    dispatch_backend: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got backend={self.backend!r}")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be an int >= 0, got min_seq_len={self.min_seq_len!r}")
        ds = self.dense_steps if self.dense_steps != () else None
        db = self.dense_blocks if self.dense_blocks != () else None
        object.__setattr__(self, "dense_steps", ds)
        object.__setattr__(self, "dense_blocks", db)
        Schedule(ds, db)  # validates both


class _Pyramid(VisattnProcessor):
    """PSA core shared by the host families (see the module docstring)."""

    method = "pyramid"

    def attend(self, q, k, v, *, attn_mask=None, seq: SequenceLayout | None = None):
        cfg = self.config
        if attn_mask is not None and (seq is None or seq.text_valid_len is None):
            return self.fallback("pyramid: attention mask is not text padding", q, k, v, attn_mask)
        if q.shape[1] < cfg.min_seq_len:
            return self.fallback("pyramid: sequence shorter than min_seq_len", q, k, v, attn_mask)
        if cfg.token_order == "gilbert" and (seq is None or seq.token_order is None):
            self.context.stats.add_call("pyramid: raster order")
        with self.timed(q.device):
            return pyramid_attention(q, k, v, config=cfg, seq_layout=seq, backend=cfg.backend)


class PyramidWanAttnProcessor(_Pyramid, WanAttnBase):
    """PSA for Wan ``attn1`` (video only); ``attn2`` cross-attention stays dense."""


class PyramidHunyuanVideoAttnProcessor(_Pyramid, HunyuanVideoAttnBase):
    """PSA for HunyuanVideo double- and single-stream blocks: ``[video, text]``, padded text masked."""


class PyramidCogVideoXAttnProcessor(_Pyramid, CogVideoXAttnBase):
    """PSA for CogVideoX 1.0/1.5: ``[text (226), video]``."""


def _gilbert(axis_order: str):
    from ..ops._token_order import gilbert_order  # shared token order (specs/rectified.md §2.2)

    axes = "largest" if axis_order == "largest" else tuple(axis_order)
    return lambda grid: gilbert_order(tuple(grid), axis_order=axes)


def _install(model, handle) -> None:
    cfg = handle.config
    if getattr(cfg, "token_order", None) != "gilbert" or type(model).__name__ not in _ORDER_MODELS:
        return
    if importlib.util.find_spec("visattn.ops._token_order") is None:
        return  # counted per call as "pyramid: raster order"
    install_token_order(model, handle, _gilbert(cfg.axis_order))


SPEC = register_method(
    MethodSpec(
        slug="pyramid",
        config_cls=PyramidPipelineConfig,
        processors=processor_table(
            {
                WanAttnBase: PyramidWanAttnProcessor,
                HunyuanVideoAttnBase: PyramidHunyuanVideoAttnProcessor,
                CogVideoXAttnBase: PyramidCogVideoXAttnProcessor,
            }
        ),
        install=_install,
        description="multi-level (raw / 2x / 4x / 8x pooled) block-sparse attention",
    )
)

__all__ = [
    "PyramidPipelineConfig",
    "PyramidWanAttnProcessor",
    "PyramidHunyuanVideoAttnProcessor",
    "PyramidCogVideoXAttnProcessor",
]
