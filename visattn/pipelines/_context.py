"""``AttnContext``: what the hooks know about the current denoiser call, shared by a handle's processors.

Filled only by diffusers ``ModelHook``s (``pipelines/hooks.py``) and the handle's callback, never by
counting processor calls. Processors read it; they never write anything but statistics.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..ops import SequenceLayout


class AttnStats:
    """Per-handle counters: processor calls, fallbacks with their reasons, attention time.

    Counting is on only with ``enabled=True`` (``apply(..., stats=True)``) and never while
    ``torch.compile`` traces. CUDA time is measured with events recorded around each attention core
    and synchronised once, in :meth:`summary`; CPU time uses ``time.perf_counter``.
    """

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.dense_by_schedule = 0  # calls the dense-step / dense-block schedule ran dense
        self.cpu_time_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _active(self) -> bool:
        return self.enabled and not torch.compiler.is_compiling()

    def add_call(self, name: str) -> None:
        if self._active():
            self.calls[name] += 1

    def add_dense_by_schedule(self) -> None:
        if self._active():
            self.dense_by_schedule += 1

    def add_fallback(self, reason: str) -> None:
        # fallbacks are counted even with stats off: they are never silent (DESIGN.md §3)
        if not torch.compiler.is_compiling():
            self.fallbacks[reason] += 1

    @contextlib.contextmanager
    def timer(self, device: torch.device):
        if not self._active():
            yield
            return
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.cpu_time_s += time.perf_counter() - t0

    @property
    def attention_time_s(self) -> float:
        """Total attention time in seconds (synchronises CUDA once if events are pending)."""
        if self._events:
            torch.cuda.synchronize()
            self.cpu_time_s += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        return self.cpu_time_s

    def summary(self) -> dict:
        return {
            "calls": dict(self.calls),
            "total_calls": sum(self.calls.values()),
            "dense_by_schedule": self.dense_by_schedule,
            "fallbacks": dict(self.fallbacks),
            "total_fallbacks": sum(self.fallbacks.values()),
            "attention_time_s": self.attention_time_s,
        }


@dataclass
class AttnContext:
    """One per handle. Components of a pipeline (e.g. Wan 2.2's two experts) share it.

    Attributes:
        step_index: 0-based denoising step of the current call (``None`` before any is known).
        num_steps: number of denoising steps, when the source knows it.
        cfg_branch: ``"cond"``/``"uncond"`` when the pipeline names it (``cache_context``), else None.
        expert: the component name of the current call (``"transformer"`` / ``"transformer_2"``).
        layouts: ``{component: SequenceLayout}`` of the current call of that component.
        latent_hw: ``{component: (H0, W0)}`` of a UNet's ``sample``.
        dense_step: the schedule's decision for the current step (set by the step hook).
        step_source: which source gave ``step_index`` (``"cache_context"``, ``"scheduler"``,
            ``"timestep"``, ``"callback"``).
        stats: :class:`AttnStats`.
        extras: method-specific data that a method's own hooks fill (keyed ``"<slug>.<name>"``).
    """

    step_index: int | None = None
    num_steps: int | None = None
    cfg_branch: str | None = None
    expert: str | None = None
    layouts: dict[str, SequenceLayout] = field(default_factory=dict)
    latent_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_step: bool = False
    step_source: str | None = None
    timestep: float | None = None
    callback_step: int | None = None
    stats: AttnStats = field(default_factory=AttnStats)
    extras: dict = field(default_factory=dict)
    # step tracking state (the timestep source): last timestep seen and its running index
    _last_t: float | None = None
    _t_index: int = -1

    def reset(self) -> None:
        """Forget the step state (a new generation starts); statistics are kept."""
        self.step_index = None
        self.num_steps = None
        self.cfg_branch = None
        self.dense_step = False
        self.step_source = None
        self.timestep = None
        self.callback_step = None
        self._last_t = None
        self._t_index = -1


__all__ = ["AttnContext", "AttnStats"]
