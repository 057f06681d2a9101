"""Rectified SpaAttn processors for Wan, HunyuanVideo, CogVideoX and Flux.

"Rectified SpaAttn" (https://arxiv.org/abs/2511.19835; spec rectified.md §5). The host families
(``pipelines/_families.py``) compute projections, QK-norm and RoPE exactly as the default processors;
the attention core calls :func:`visattn.ops.rectified_attention` on ``[B, S, H, D]`` with the call's
:class:`SequenceLayout`: no model needs its text moved (HunyuanVideo: text after the video, padded per
sample from the mask; CogVideoX and Flux: text first). Wan's ``attn2`` (text and I2V image
cross-attention) stays dense. Dense blocks and steps come from the preset and are keyed by the real
denoising step (``Schedule``).

Token order: with ``token_order="gilbert"`` the op wants the video tokens on the 3-D Gilbert curve
(``axis_order``, default ``("w", "h", "t")`` as upstream). Wan, HunyuanVideo, Flux and CogVideoX get
the shared model-level adapter (``pipelines/token_order.py``, ``adapter=True``): the tokens are
permuted once per transformer forward and the layout names the order, so the calls use them as they
are. Other models (or ``adapter=False``) permute q/k/v per call (one gather each, and the inverse on
the output), counted as ``"rectified: per-call token order"``.

Fallbacks (dispatcher, counted by reason): unknown layout, an attention mask that is not text
padding, sequences shorter than ``min_seq_len``, context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import SequenceLayout
from ..ops._token_order import gilbert_order
from ..ops.rectified import rectified_attention
from ..ops.rectified_plan import RectifiedConfig
from ._base import VisattnProcessor
from ._config import PipelineConfig
from ._families import CogVideoXAttnBase, FluxAttnBase, HunyuanVideoAttnBase, WanAttnBase, processor_table
from ._registry import MethodSpec, register_method
from .schedule import Schedule
from .token_order import SUPPORTED as _ORDER_MODELS
from .token_order import install_token_order

_BACKENDS = (None, "auto", "triton", "torch")
_PERMS: dict = {}


@dataclass(frozen=True)
class RectifiedPipelineConfig(RectifiedConfig, PipelineConfig):
    """:class:`RectifiedConfig` plus the pipeline fields (presets: ``configs/pipelines/rectified/``).

    Args (beyond :class:`RectifiedConfig`):
        backend: visattn op backend (``None`` follows ``visattn.use_backend``).
        min_seq_len: shorter sequences run dense through the dispatcher.
        dispatch_backend: diffusers backend for dense steps/blocks and fallbacks (``None``: global).
        adapter: permute the video tokens once per forward where a model adapter exists.
    """

    slug = "rectified"
    backend: str | None = None
    min_seq_len: int = 0
    dispatch_backend: str | None = None
    adapter: bool = True

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


def _permutation(seq: SequenceLayout, axis_order, device):
    """(full-sequence gather index, its inverse, order name) moving the video tokens onto the curve."""
    key = (seq.video_grid, seq.video_start, seq.seq_len, tuple(axis_order), str(device))
    hit = _PERMS.get(key)
    if hit is None:
        order = gilbert_order(seq.video_grid, axis_order)
        idx = torch.arange(seq.seq_len)
        idx[seq.video_slice] = seq.video_start + order.perm
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(seq.seq_len)
        hit = (idx.to(device), inv.to(device), order.name)
        _PERMS[key] = hit
    return hit


class _Rectified(VisattnProcessor):
    """Rectified SpaAttn core shared by the host families (see the module docstring)."""

    method = "rectified"

    def attend(self, q, k, v, *, attn_mask=None, seq: SequenceLayout | None = None):
        cfg = self.config
        if seq is None:
            return self.fallback("rectified: unknown sequence layout", q, k, v, attn_mask)
        if attn_mask is not None and seq.text_valid_len is None:
            return self.fallback("rectified: attention mask is not text padding", q, k, v, attn_mask)
        if q.shape[1] < cfg.min_seq_len:
            return self.fallback("rectified: sequence shorter than min_seq_len", q, k, v, attn_mask)
        with self.timed(q.device):
            if cfg.token_order == "gilbert" and seq.token_order is None:  # no model-level adapter ran
                self.context.stats.add_call("rectified: per-call token order")
                idx, inv, name = _permutation(seq, cfg.axis_order, q.device)
                q, k, v = q[:, idx], k[:, idx], v[:, idx]
                out = rectified_attention(q, k, v, seq_layout=seq.replace(token_order=name), config=cfg,
                                          backend=cfg.backend)
                return out[:, inv]
            return rectified_attention(q, k, v, seq_layout=seq, config=cfg, backend=cfg.backend)


class RectifiedWanAttnProcessor(_Rectified, WanAttnBase):
    """Rectified SpaAttn for Wan ``attn1`` (video only); ``attn2`` cross-attention stays dense."""


class RectifiedHunyuanVideoAttnProcessor(_Rectified, HunyuanVideoAttnBase):
    """Rectified SpaAttn for HunyuanVideo double- and single-stream blocks: ``[video, text]``, padded text."""


class RectifiedCogVideoXAttnProcessor(_Rectified, CogVideoXAttnBase):
    """Rectified SpaAttn for CogVideoX 1.x: ``[text (226), video]``."""


class RectifiedFluxAttnProcessor(_Rectified, FluxAttnBase):
    """Rectified SpaAttn for Flux.1: ``[text (512), image]`` with a T = 1 grid."""


def _install(model, handle) -> None:
    cfg = handle.config
    if cfg.token_order == "gilbert" and cfg.adapter and type(model).__name__ in _ORDER_MODELS:
        axis_order = cfg.axis_order
        install_token_order(model, handle, lambda grid: gilbert_order(grid, axis_order))


SPEC = register_method(
    MethodSpec(
        slug="rectified",
        config_cls=RectifiedPipelineConfig,
        processors=processor_table(
            {
                WanAttnBase: RectifiedWanAttnProcessor,
                HunyuanVideoAttnBase: RectifiedHunyuanVideoAttnProcessor,
                CogVideoXAttnBase: RectifiedCogVideoXAttnProcessor,
                FluxAttnBase: RectifiedFluxAttnProcessor,
            }
        ),
        install=_install,
        description="Jenga-style block-sparse attention with IPAR reweighting and GAPR pooled compensation",
    )
)

__all__ = [
    "RectifiedPipelineConfig",
    "RectifiedWanAttnProcessor",
    "RectifiedHunyuanVideoAttnProcessor",
    "RectifiedCogVideoXAttnProcessor",
    "RectifiedFluxAttnProcessor",
]
