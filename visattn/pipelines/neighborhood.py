"""Neighborhood attention (NA / GNA) processors for diffusers' video and image transformers.

"Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
(https://arxiv.org/abs/2504.16922). Image/video tokens attend their neighborhood over the token grid
``(T, H, W)`` or ``(H, W)`` through :func:`visattn.ops.neighborhood_attention` (heads-last views
``[B, *grid, heads, D]``), with the valid text tokens as ``extra_kv`` in the same softmax (the GNA FLUX
recipe); text queries attend densely to every valid key. QK-norm and RoPE stay where the default
processors apply them (``pipelines/_families.py``).

Processors: ``NeighborhoodFluxAttnProcessor``, ``NeighborhoodWanAttnProcessor`` and
``NeighborhoodHunyuanVideoAttnProcessor`` (the design targets), plus the same attention for LTX,
CogVideoX, SD3 joint attention and legacy self-attention (UNet, DiT), which reuse the host bases.
Config: :class:`NeighborhoodConfig`; presets in ``configs/pipelines/neighborhood/``.

Fallbacks (dispatcher, counted by reason): unknown token grid, a permuted token order, an attention
mask that is not text padding, sequences below ``min_seq_len``, windows larger than the grid with
``clamp=False``, and context parallelism.

HunyuanVideo's padded text: the op has no mask for extra tokens, so the valid text lengths are read
on the host once per denoiser call by this method's hook (``"visattn_neighborhood_text"``) and the
text keys are sliced to them (per batch element when they differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..ops import SequenceLayout, clamp_neighborhood, neighborhood_attention
from ..ops._dispatch import current_backend
from ._base import VisattnProcessor, dispatch_dense
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
from .hooks import bind_forward
from .schedule import Schedule

_TEXT_VALID = "neighborhood.text_valid"
_BACKENDS = ("auto", "triton", "torch", "flex", "natten")


def _per_axis(value, name: str) -> tuple[int, ...]:
    t = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(t) <= 3:
        raise ValueError(
            f"{name} must be an int or 1 to 3 per-axis ints over (T, H, W) / (H, W), got {name}={value!r}"
        )
    return t


@dataclass(frozen=True)
class NeighborhoodConfig(PipelineConfig):
    """Config of the ``neighborhood`` method (GNA over the token grid).

    Args:
        kernel_size: window per axis of ``(T, H, W)`` (3 values) or ``(H, W)`` (2 values; on video
            grids the time window is 1); an int applies to every axis.
        stride: GNA stride per axis (``1 <= stride <= kernel_size``), default 1 (sliding window).
        dilation: dilation per axis, default 1.
        dense_steps: steps run dense (indices or a fraction of the step count; ``Schedule``).
        dense_blocks: blocks run dense (indices or key globs).
        backend: visattn op backend (``"auto"``, ``"triton"``, ``"torch"``, ...); ``None`` follows
            ``visattn.use_backend``.
        clamp: shrink windows larger than the grid (``clamp_neighborhood``); ``False`` falls back.
        min_seq_len: sequences shorter than this run dense through the dispatcher.
        dispatch_backend: diffusers backend for dense parts and fallbacks (``None``: global).
    """

    slug = "neighborhood"
    kernel_size: tuple[int, ...] | int = (3, 15, 15)
    stride: tuple[int, ...] | int = 1
    dilation: tuple[int, ...] | int = 1
    dense_steps: tuple[int, ...] | float | None = None
    dense_blocks: tuple[int | str, ...] | None = None
    backend: str | None = None
    clamp: bool = True
    min_seq_len: int = 0
    dispatch_backend: str | None = None

    def __post_init__(self) -> None:
        ks = _per_axis(self.kernel_size, "kernel_size")
        st = _per_axis(self.stride, "stride")
        dl = _per_axis(self.dilation, "dilation")
        for name, t in (("kernel_size", ks), ("stride", st), ("dilation", dl)):
            if any(x < 1 for x in t):
                raise ValueError(f"{name} must be >= 1 on every axis, got {name}={t}")
        n = len(ks)
        for name, t in (("stride", st), ("dilation", dl)):
            if len(t) not in (1, n):
                raise ValueError(f"{name} must have 1 or len(kernel_size)={n} entries, got {name}={t}")
        st = st * n if len(st) == 1 else st
        for a, (s, k) in enumerate(zip(st, ks * (n if len(ks) == 1 else 1), strict=False)):
            if s > k:
                raise ValueError(f"stride[{a}]={s} must be <= kernel_size[{a}]={k}")
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got backend={self.backend!r}")
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be >= 0, got min_seq_len={self.min_seq_len}")
        if self.dispatch_backend is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = [b.value for b in AttentionBackendName]
            if self.dispatch_backend not in names:
                raise ValueError(f"dispatch_backend must be one of {names}, got {self.dispatch_backend!r}")
        Schedule(self.dense_steps, self.dense_blocks)  # validates both

    def geometry(self, grid: tuple[int, int, int]):
        """``(op grid, kernel, stride, dilation)`` for a ``(T, H, W)`` grid (2-D when ``T == 1``),
        or ``None`` when the window exceeds the grid and ``clamp`` is off."""

        def full(v, fill):
            t = _per_axis(v, "")
            if len(t) == 1:
                return t * 3
            return (fill,) * (3 - len(t)) + t

        ks, st, dl = full(self.kernel_size, 1), full(self.stride, 1), full(self.dilation, 1)
        if grid[0] == 1:
            grid, ks, st, dl = grid[1:], ks[1:], st[1:], dl[1:]
        if any(k * d > x for k, d, x in zip(ks, dl, grid, strict=True)):
            if not self.clamp:
                return None
            ks, st, dl = clamp_neighborhood(grid, ks, st, dl)
        return tuple(grid), tuple(ks), tuple(st), tuple(dl)

    def density(self, grid: tuple[int, int, int]) -> float:
        """Fraction of video-video query/key pairs computed on a ``(T, H, W)`` grid (non-causal GNA)."""
        import math

        geom = self.geometry(tuple(grid))
        if not geom:
            return 1.0
        return math.prod(geom[1]) / math.prod(geom[0])


class _Neighborhood(VisattnProcessor):
    """The GNA core shared by every host family (see the module docstring)."""

    method = "neighborhood"

    def __init__(self, config, **kw) -> None:
        super().__init__(config, **kw)
        self._geom: dict[tuple, object] = {}

    def _geometry(self, grid):
        g = self._geom.get(grid)
        if g is None:
            g = self._geom[grid] = self.config.geometry(grid) or False
        return g

    def _na(self, q, k, v, geom, extra):
        grid, ks, st, dl = geom
        return neighborhood_attention(
            q, k, v, ks, stride=st, dilation=dl, extra_kv=extra, backend=self.config.backend
        )

    def attend(self, q, k, v, *, attn_mask=None, seq: SequenceLayout | None = None):
        if seq is None:
            return self.fallback(
                "neighborhood: no token grid for this call (layout unknown)", q, k, v, attn_mask
            )
        if seq.token_order is not None:
            return self.fallback(
                "neighborhood: video tokens are permuted (token_order set)", q, k, v, attn_mask
            )
        if q.shape[1] < self.config.min_seq_len:
            return self.fallback("neighborhood: sequence shorter than min_seq_len", q, k, v, attn_mask)
        if attn_mask is not None and seq.text_valid_len is None:
            return self.fallback("neighborhood: attention mask is not text padding", q, k, v, attn_mask)
        geom = self._geometry(seq.video_grid)
        if not geom:
            return self.fallback(
                "neighborhood: window larger than the grid (clamp=False)", q, k, v, attn_mask
            )
        try:
            return self._sparse(q, k, v, attn_mask, seq, geom)
        except NotImplementedError as e:  # no op backend can run these inputs
            if self.config.backend not in (None, "auto") or current_backend() != "auto":
                raise  # a backend asked for by name raises with its reasons
            reasons = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip().startswith("- ")]
            why = reasons[0] if reasons else str(e).splitlines()[0]
            return self.fallback(f"neighborhood: the op cannot run these inputs ({why})", q, k, v, attn_mask)

    def _sparse(self, q, k, v, attn_mask, seq: SequenceLayout, geom):
        grid = geom[0]
        vs = seq.video_slice
        qv, kv, vv = (t[:, vs].unflatten(1, grid) for t in (q, k, v))  # [B, *grid, H, D] views
        with self.timed(q.device):
            if seq.text_len == 0:
                out_v = self._na(qv, kv, vv, geom, None)
                return out_v.flatten(1, len(grid))
            ts = seq.text_slice
            kt, vt = k[:, ts], v[:, ts]
            valid = None
            if seq.text_valid_len is not None:
                valid = self.context.extras.get(_TEXT_VALID, {}).get(self.component)
                if valid is None and isinstance(seq.text_valid_len, int):
                    valid = (seq.text_valid_len,) * q.shape[0]
                if valid is None:
                    return self._unlocked_fallback(q, k, v, attn_mask)
            if valid is None or all(n == seq.text_len for n in valid):
                out_v = self._na(qv, kv, vv, geom, (kt, vt))
            elif len(set(valid)) == 1:
                n = valid[0]
                out_v = self._na(qv, kv, vv, geom, (kt[:, :n], vt[:, :n]))
            else:  # different valid lengths per batch element: one call each (B is small)
                out_v = torch.cat(
                    [
                        self._na(
                            qv[b : b + 1],
                            kv[b : b + 1],
                            vv[b : b + 1],
                            geom,
                            (kt[b : b + 1, :n], vt[b : b + 1, :n]),
                        )
                        for b, n in enumerate(valid)
                    ]
                )
            # text queries attend densely to every valid key, as in the default processor
            out_t = dispatch_dense(
                q[:, ts], k, v, attn_mask, backend=self._attention_backend, parallel_config=None
            )
        out_v = out_v.flatten(1, len(grid)).to(out_t.dtype)
        parts = [out_t, out_v] if seq.text_position == "start" else [out_v, out_t]
        return torch.cat(parts, dim=1)

    def _unlocked_fallback(self, q, k, v, attn_mask):
        # runs inside timed(): count and dispatch without a second timer
        self.context.stats.add_fallback("neighborhood: valid text lengths unknown (no text hook)")
        return dispatch_dense(
            q, k, v, attn_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )


class NeighborhoodFluxAttnProcessor(_Neighborhood, FluxAttnBase):
    """GNA for Flux: image tokens over the ``(H, W)`` grid from ``img_ids``, text as extra keys."""


class NeighborhoodWanAttnProcessor(_Neighborhood, WanAttnBase):
    """GNA for Wan ``attn1`` over the ``(T, H, W)`` latent-patch grid (cross-attention stays dense)."""


class NeighborhoodHunyuanVideoAttnProcessor(_Neighborhood, HunyuanVideoAttnBase):
    """GNA for HunyuanVideo: video over ``(T, H, W)``, the valid (unpadded) text as extra keys."""


class NeighborhoodLTXAttnProcessor(_Neighborhood, LTXAttnBase):
    """GNA for LTX-Video ``attn1``."""


class NeighborhoodCogVideoXAttnProcessor(_Neighborhood, CogVideoXAttnBase):
    """GNA for CogVideoX: video over ``(T, H, W)``, text (first) as extra keys."""


class NeighborhoodJointAttnProcessor(_Neighborhood, JointAttnBase):
    """GNA for SD3 joint attention: image over ``(H, W)``, text as extra keys."""


class NeighborhoodAttnProcessor(_Neighborhood, LegacyAttnBase):
    """GNA for legacy self-attention (UNet ``attn1`` per resolution level, DiT)."""


class _TextValidHook(ModelHook):
    """Reads HunyuanVideo's ``encoder_attention_mask`` on the host once per denoiser call."""

    def __init__(self, context, component: str) -> None:
        super().__init__()
        self.context, self.component = context, component

    def pre_forward(self, module, *args, **kwargs):
        mask = bind_forward(module, args, kwargs).get("encoder_attention_mask")
        store = self.context.extras.setdefault(_TEXT_VALID, {})
        if isinstance(mask, torch.Tensor):
            store[self.component] = tuple(int(n) for n in mask.sum(dim=1).tolist())  # the one host read
        else:
            store.pop(self.component, None)
        return args, kwargs


def _install(model, handle) -> None:
    if "encoder_attention_mask" in _forward_params(model):
        comp = next(c for c, m in handle.components.items() if m is model)
        handle.add_hook(model, _TextValidHook(handle.context, comp), "visattn_neighborhood_text")


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).forward).parameters)


SPEC = register_method(
    MethodSpec(
        slug="neighborhood",
        config_cls=NeighborhoodConfig,
        processors=processor_table(
            {
                FluxAttnBase: NeighborhoodFluxAttnProcessor,
                WanAttnBase: NeighborhoodWanAttnProcessor,
                HunyuanVideoAttnBase: NeighborhoodHunyuanVideoAttnProcessor,
                LTXAttnBase: NeighborhoodLTXAttnProcessor,
                CogVideoXAttnBase: NeighborhoodCogVideoXAttnProcessor,
                JointAttnBase: NeighborhoodJointAttnProcessor,
                LegacyAttnBase: NeighborhoodAttnProcessor,
            }
        ),
        install=_install,
        description="GNA over the token grid, text as extra keys",
    )
)

__all__ = [
    "NeighborhoodConfig",
    "NeighborhoodFluxAttnProcessor",
    "NeighborhoodWanAttnProcessor",
    "NeighborhoodHunyuanVideoAttnProcessor",
    "NeighborhoodLTXAttnProcessor",
    "NeighborhoodCogVideoXAttnProcessor",
    "NeighborhoodJointAttnProcessor",
    "NeighborhoodAttnProcessor",
]
