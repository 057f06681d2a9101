"""diffusers ``ModelHook``s that fill a handle's :class:`AttnContext` (specs/diffusers.md §6).

* :class:`LayoutHook` (``"visattn_layout"``): binds the component's forward arguments by name (never
  ``args[0]``) and records the token grid, text length/position and valid text length as a
  :class:`SequenceLayout`, plus a UNet's latent ``(H0, W0)``.
* :class:`StepHook` (``"visattn_step"``): the real denoising step of every denoiser call, from the
  first available source: ``CacheContext.step_index`` (``model.cache_context(..., step_index=)``),
  ``pipe.scheduler.step_index`` (second-order schedulers such as Heun: ``(step_index + 1) // 2``),
  the ``timestep`` argument (matched in ``pipe.scheduler.timesteps``,
  otherwise counted as distinct values; a rising timestep starts a new generation), and last the
  handle's ``callback``. It then resolves the dense-step schedule once for the call.

Both do at most one host read per denoiser call (Flux ``img_ids``, the timestep), in the hook, never
in an op. They are registered with ``HookRegistry.check_if_exists_or_initialize(model)`` through
``ApplyHandle.add_hook`` so that ``remove()`` takes them off.
"""

from __future__ import annotations

import inspect
import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..ops import SequenceLayout
from ._context import AttnContext

try:  # CacheContext / StateManager.set_context appeared after diffusers 0.40 (optional, private)
    from diffusers.hooks.hooks import CacheContext as _CacheContext  # noqa: F401
    from diffusers.hooks.hooks import StateManager as _StateManager

    _HAS_CACHE_CONTEXT = hasattr(_StateManager, "set_context")
except ImportError:
    _StateManager = None
    _HAS_CACHE_CONTEXT = False

logger = logging.getLogger("visattn")

_SIGNATURES: dict[type, inspect.Signature] = {}


def bind_forward(module: torch.nn.Module, args, kwargs) -> dict:
    """The forward's arguments by name (``inspect.signature(type(module).forward)``, cached per class)."""
    cls = type(module)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError:
        return dict(kwargs)
    out = dict(bound.arguments)
    out.pop("self", None)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def _text_len(a: dict) -> int:
    e = a.get("encoder_hidden_states")
    return int(e.shape[1]) if isinstance(e, torch.Tensor) and e.dim() >= 2 else 0


class LayoutHook(ModelHook):
    """Records the component's :class:`SequenceLayout` (and UNet latent size) before each forward."""

    _is_stateful = False

    def __init__(self, context: AttnContext, component: str) -> None:
        super().__init__()
        self.context = context
        self.component = component
        self._ids_cache: tuple | None = None
        self._layouts: dict[tuple, SequenceLayout] = {}

    def _layout(self, grid, text_len=0, position="end", valid=None) -> SequenceLayout:
        if valid is not None:  # tensors never key the cache
            return SequenceLayout(
                video_grid=tuple(grid), text_len=text_len, text_position=position, text_valid_len=valid
            )
        k = (tuple(grid), text_len, position)
        lay = self._layouts.get(k)
        if lay is None:
            lay = self._layouts[k] = SequenceLayout(
                video_grid=tuple(grid), text_len=text_len, text_position=position
            )
        return lay

    def _flux_grid(self, img_ids: torch.Tensor, n: int):
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        key = (ids.data_ptr(), tuple(ids.shape), ids.device)
        if self._ids_cache is not None and self._ids_cache[0] == key:
            return self._ids_cache[1]
        hw = ids[:, 1:3].amax(0).tolist()  # one host read per new img_ids tensor
        grid = (int(hw[0]) + 1, int(hw[1]) + 1)
        grid = grid if grid[0] * grid[1] == n else None
        self._ids_cache = (key, grid)
        return grid

    def compute(self, module, a: dict) -> SequenceLayout | None:
        name = type(module).__name__
        cfg = getattr(module, "config", None)
        x = a.get("hidden_states", a.get("sample"))
        if not isinstance(x, torch.Tensor):
            return None
        if name.startswith("Flux"):
            ids = a.get("img_ids")
            grid = self._flux_grid(ids, x.shape[1]) if isinstance(ids, torch.Tensor) else None
            return self._layout(grid, _text_len(a), "start") if grid else None
        if name.startswith("Wan") and x.dim() == 5:
            pt, ph, pw = cfg.patch_size
            return self._layout((x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw))
        if name.startswith("HunyuanVideo") and x.dim() == 5:
            p, pt = cfg.patch_size, cfg.patch_size_t
            mask = a.get("encoder_attention_mask")
            valid = mask.sum(dim=1, dtype=torch.int32) if isinstance(mask, torch.Tensor) else None
            return self._layout(
                (x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p), _text_len(a), "end", valid
            )
        if name.startswith("CogVideoX") and x.dim() == 5:  # (B, F, C, H, W)
            p, pt = cfg.patch_size, cfg.patch_size_t or 1
            frames = -(-x.shape[1] // pt)
            return self._layout((frames, x.shape[3] // p, x.shape[4] // p), _text_len(a), "start")
        if name.startswith("LTX"):
            f, h, w = a.get("num_frames"), a.get("height"), a.get("width")
            if f is None or h is None or w is None:
                return None
            return self._layout((int(f), int(h), int(w)))
        if name.startswith("UNet2DCondition") and x.dim() == 4:
            self.context.latent_hw[self.component] = (int(x.shape[2]), int(x.shape[3]))
            return self._layout((x.shape[2], x.shape[3]))
        if x.dim() == 4 and cfg is not None and getattr(cfg, "patch_size", None):  # SD3, DiT, PixArt
            ph, pw = _pair(cfg.patch_size)
            return self._layout((x.shape[2] // ph, x.shape[3] // pw), _text_len(a), "end")
        return None

    def pre_forward(self, module, *args, **kwargs):
        a = bind_forward(module, args, kwargs)
        layout = self.compute(module, a)
        if layout is None:
            self.context.layouts.pop(self.component, None)
        else:
            self.context.layouts[self.component] = layout
        return args, kwargs


if _StateManager is not None:

    class _ContextProbe(_StateManager):
        """Receives ``cache_context(...)`` through diffusers' stateful-hook plumbing; holds no state."""

        def __init__(self) -> None:
            super().__init__(object)

        def reset(self, *args, **kwargs) -> None:
            self._context = None
else:  # pragma: no cover - diffusers without StateManager
    _ContextProbe = None


class StepHook(ModelHook):
    """Tracks the real denoising step (see the module docstring) and the schedule's dense-step decision."""

    # stateful so that diffusers passes cache_context(...) to our probe (hooks without state get none)
    _is_stateful = _HAS_CACHE_CONTEXT

    def __init__(self, handle, component: str) -> None:
        super().__init__()
        self.handle = handle
        self.component = component
        if _HAS_CACHE_CONTEXT:
            self.probe = _ContextProbe()
        self._ts_cache: tuple | None = None

    def reset_state(self, module):
        if _HAS_CACHE_CONTEXT:
            self.probe.reset()
        return module

    def _match_timesteps(self, sched, t: float) -> int | None:
        ts = getattr(sched, "timesteps", None)
        if not isinstance(ts, torch.Tensor) or ts.numel() == 0:
            return None
        if self._ts_cache is None or self._ts_cache[0] is not ts:
            self._ts_cache = (ts, [float(v) for v in ts.float().cpu().tolist()])
        values = self._ts_cache[1]
        best = min(range(len(values)), key=lambda i: abs(values[i] - t))
        tol = 1e-4 * max(1.0, abs(t))
        return best if abs(values[best] - t) <= tol else None

    def pre_forward(self, module, *args, **kwargs):
        ctx: AttnContext = self.handle.context
        ctx.expert = self.component
        step = num = source = None
        cc = getattr(self.probe, "_context", None) if _HAS_CACHE_CONTEXT else None
        if cc is not None:
            ctx.cfg_branch = cc.name
            if cc.step_index is not None:
                step, num, source = int(cc.step_index), cc.num_inference_steps, "cache_context"
        sched = self.handle.scheduler
        if num is None and sched is not None:
            num = getattr(sched, "num_inference_steps", None)
        if step is None and sched is not None and "step_index" in dir(type(sched)):
            si = sched.step_index  # a Python int: None before the first scheduler.step()
            si = 0 if si is None else int(si)
            if getattr(sched, "order", 1) == 2:  # Heun-like: two model calls per step after the first
                si = (si + 1) // 2
            step, source = si, "scheduler"
        if step is None:
            t = bind_forward(module, args, kwargs).get("timestep")
            if t is not None:
                tf = float(t.max()) if isinstance(t, torch.Tensor) else float(t)  # the one host read
                ctx.timestep = tf
                idx = self._match_timesteps(sched, tf) if sched is not None else None
                if idx is None:
                    if ctx._last_t is None or tf > ctx._last_t:
                        ctx._t_index = 0  # first call or a rising timestep: a new generation
                    elif tf != ctx._last_t:
                        ctx._t_index += 1
                    idx = ctx._t_index
                ctx._last_t = tf
                step, source = idx, "timestep"
        if step is None:
            step, source = (ctx.callback_step or 0), "callback"
        ctx.step_index, ctx.num_steps, ctx.step_source = step, num, source
        ctx.dense_step = self.handle.schedule.is_dense_step(step, num)
        return args, kwargs


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def remove_hook(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(name, recurse=False)
        if hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()


__all__ = ["LayoutHook", "StepHook", "bind_forward", "register_hook", "remove_hook"]
