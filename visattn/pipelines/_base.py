"""``VisattnProcessor``: the base of every visattn diffusers processor (INTERFACES.md §D).

A processor is a plain object (not an ``nn.Module``, so ``state_dict`` keys never change). It knows
its key, block index, component and the handle's :class:`AttnContext`. The host-family classes in
``pipelines/_families.py`` reproduce each default processor's projections, QK-norm, RoPE and output
projections and hand post-RoPE ``q, k, v`` ``[B, S, H, D]`` with the call's ``SequenceLayout`` to
:meth:`VisattnProcessor.attend`, which a method overrides. Anything a method cannot run goes through
:meth:`VisattnProcessor.fallback`: diffusers' ``dispatch_attention_fn`` with this processor's
``_attention_backend`` / ``_parallel_config``, counted with its reason.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..ops import SequenceLayout
from ._context import AttnContext
from .schedule import Schedule

_HAS_PARALLEL_CONFIG = "parallel_config" in inspect.signature(dispatch_attention_fn).parameters


def dispatch_dense(q, k, v, attn_mask=None, scale=None, *, backend=None, parallel_config=None):
    """diffusers' dispatcher on ``[B, S, H, D]`` (``parallel_config`` only where diffusers has it)."""
    kwargs = {"backend": backend}
    if _HAS_PARALLEL_CONFIG:
        kwargs["parallel_config"] = parallel_config
    return dispatch_attention_fn(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale, **kwargs
    )


class VisattnProcessor:
    """Base class of visattn's processors (see the module docstring).

    Args:
        config: the method's frozen config.
        original: the processor this one replaces (restored by ``remove()``).
        key: the processor key, e.g. ``"transformer_blocks.0.attn.processor"``.
        block_index: the block index parsed from the key (``None`` if none).
        context: the handle's :class:`AttnContext`.
        component: the pipeline component name (``"transformer"``, ``"unet"``, ...).
        module: the attention module this processor is installed on.
        schedule: dense-step / dense-block schedule (default: from ``config``).
    """

    _attention_backend = None
    _parallel_config = None
    #: the method slug, set by subclasses
    method: str = ""

    def __init__(
        self,
        config,
        *,
        original,
        key: str,
        block_index: int | None,
        context: AttnContext,
        component: str,
        module=None,
        schedule: Schedule | None = None,
    ) -> None:
        self.config = config
        self.original = original
        self.key = key
        self.block_index = block_index
        self.context = context
        self.component = component
        # keep the user's per-module dispatcher choices of the processor being replaced
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        backend = getattr(config, "dispatch_backend", None)
        if backend is not None:
            self._attention_backend = backend
        self.schedule = schedule if schedule is not None else Schedule.from_config(config)
        self._dense_block = self.schedule.is_dense_block(block_index, key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, block_index={self.block_index})"

    # ------------------------------------------------------------------ helpers (INTERFACES.md §D)
    def dense_now(self) -> bool:
        """Whether the schedule makes this call dense (dense block, or dense step per the hooks)."""
        return self._dense_block or self.context.dense_step

    def layout(self) -> SequenceLayout | None:
        """The component's layout recorded by the layout hook for the current call."""
        return self.context.layouts.get(self.component)

    def timed(self, device: torch.device | None = None):
        """Context manager adding the enclosed time to the handle's attention time (``stats=True``)."""
        return self.context.stats.timer(device if device is not None else torch.device("cpu"))

    def dispatch(self, q, k, v, attn_mask=None, scale=None):
        """Timed dense attention through diffusers' dispatcher; ``[B, S, H, D]`` in and out."""
        with self.timed(q.device):
            return dispatch_dense(
                q,
                k,
                v,
                attn_mask,
                scale,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

    def fallback(self, reason: str, q, k, v, attn_mask=None, scale=None):
        """Dense attention through the dispatcher for inputs the method cannot run, counted by reason."""
        self.context.stats.add_fallback(reason)
        return self.dispatch(q, k, v, attn_mask, scale)

    # ------------------------------------------------------------------ the attention core
    def attend(self, q, k, v, *, attn_mask=None, seq: SequenceLayout | None = None):
        """The method's attention on post-RoPE ``q, k, v`` ``[B, S, H, D]``; returns ``[B, S, H, D]``.

        ``seq`` describes this call's sequence (``None`` when it is unknown). The default is dense.
        """
        return self.dispatch(q, k, v, attn_mask)

    def _core(self, q, k, v, attn_mask=None, seq: SequenceLayout | None = None):
        self.context.stats.add_call(type(self).__name__)
        if self._parallel_config is not None:
            # context parallelism shards the sequence: a global sparse pattern on local shards is wrong
            return self.fallback("context parallelism (_parallel_config is set)", q, k, v, attn_mask)
        if self.dense_now():
            self.context.stats.add_dense_by_schedule()
            return self.dispatch(q, k, v, attn_mask)
        return self.attend(q, k, v, attn_mask=attn_mask, seq=seq)


__all__ = ["VisattnProcessor", "dispatch_dense"]
