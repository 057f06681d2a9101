"""``apply`` / ``remove``: install a method's processors on a pipeline or model, and undo it (spec §5).

``apply`` builds a **full** per-key processor dict (untargeted keys keep their current objects), sets
it with one ``set_attn_processor`` call (``set_processor`` per module on models without
``attn_processors``, e.g. DiT), registers the layout and step hooks, and returns an
:class:`ApplyHandle`. ``handle.remove()`` reinstates the original processor objects and takes every
hook off; parameters and ``state_dict`` keys are never touched (processors are plain objects).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable

import torch

from ._config import resolve_config
from ._context import AttnContext, AttnStats
from ._registry import MethodSpec, get_method
from .hooks import LayoutHook, StepHook, register_hook, remove_hook
from .schedule import Schedule

logger = logging.getLogger("visattn")

DEFAULT_COMPONENTS = ("transformer", "transformer_2", "unet")
_HANDLE_ATTR = "_visattn_handle"
_NEVER_DEFAULT = ("attn2", "token_refiner", "refiner_blocks")


def default_self_attention_targets(key: str, module) -> bool:
    """Self-attention only: never ``attn2`` cross-attention or HunyuanVideo's token refiner."""
    parts = key.split(".")
    return not any(p in _NEVER_DEFAULT for p in parts)


def _is_model(obj) -> bool:
    return isinstance(obj, torch.nn.Module)


def _components(pipe_or_model, components) -> dict[str, torch.nn.Module]:
    if _is_model(pipe_or_model):
        if components is not None:
            raise ValueError(
                f"components={components!r} applies to pipelines; got a model "
                f"({type(pipe_or_model).__name__})"
            )
        name = "unet" if type(pipe_or_model).__name__.startswith("UNet") else "transformer"
        return {name: pipe_or_model}
    names = (
        DEFAULT_COMPONENTS
        if components is None
        else tuple([components] if isinstance(components, str) else components)
    )
    found = {}
    for n in names:
        m = getattr(pipe_or_model, n, None)
        if _is_model(m):
            found[n] = m
        elif components is not None:
            raise ValueError(
                f"pipeline {type(pipe_or_model).__name__} has no model component {n!r}; "
                f"components given: {list(names)}"
            )
    if not found:
        raise ValueError(
            f"found no denoiser in {type(pipe_or_model).__name__}: looked for components "
            f"{list(names)}; pass a model or components=[...]"
        )
    return found


def enumerate_processors(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, object]]:
    """``{key: (attention module, processor)}``, keys as in ``model.attn_processors``."""
    out: dict[str, tuple[torch.nn.Module, object]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_processor") and hasattr(module, "set_processor"):
            out[f"{name}.processor"] = (module, module.get_processor())
    if hasattr(model, "attn_processors"):
        keys = list(model.attn_processors)
        if set(keys) != set(out):  # a model that lists processors its own way: trust it
            mods = dict(model.named_modules())
            out = {k: (mods[k[: -len(".processor")]], p) for k, p in model.attn_processors.items()}
    return out


_UNET_SECTIONS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def block_indices(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, int | None]:
    """Block index per key: ``blocks.N`` / ``transformer_blocks.N`` / ``single_transformer_blocks.N``
    (offset by the number of double blocks); UNet blocks numbered in execution order."""
    keys = list(keys)
    out: dict[str, int | None] = {}
    n_double = len(getattr(model, "transformer_blocks", ()) or ())
    unet = [k for k in keys if k.split(".")[0] in _UNET_SECTIONS]
    if unet:
        prefixes = sorted(
            {k.rsplit(".", 2)[0] for k in unet}, key=lambda p: (_UNET_SECTIONS[p.split(".")[0]], _natural(p))
        )
        rank = {p: i for i, p in enumerate(prefixes)}
        for k in unet:
            out[k] = rank[k.rsplit(".", 2)[0]]
    for k in keys:
        if k in out:
            continue
        m = re.match(r"single_transformer_blocks\.(\d+)\.", k)
        if m:
            out[k] = n_double + int(m.group(1))
            continue
        m = re.match(r"(?:transformer_blocks|blocks)\.(\d+)\.", k)
        out[k] = int(m.group(1)) if m else None
    return out


def _matches(key: str, block: int | None, targets) -> bool:
    for t in targets:
        if isinstance(t, int) and not isinstance(t, bool):
            if block == t:
                return True
        elif isinstance(t, str):
            if fnmatch.fnmatchcase(key, t) or fnmatch.fnmatchcase(key, t + ".processor") or key == t:
                return True
        else:
            raise ValueError(f"targets entries must be key globs (str) or block indices (int), got {t!r}")
    return False


class ApplyHandle:
    """What ``apply`` installed: undo with :meth:`remove` (or use as a context manager).

    Attributes:
        method: the method slug; ``config``: the resolved config; ``context``: the :class:`AttnContext`;
        ``processors``: ``{(component, key): processor}`` installed; ``originals``: the replaced ones.
    """

    def __init__(self, target, spec: MethodSpec, config, context: AttnContext, components: dict) -> None:
        self.target = target
        self.spec = spec
        self.method = spec.slug
        self.config = config
        self.context = context
        self.components = components
        self.schedule = Schedule.from_config(config)
        self.pipe = None if _is_model(target) else target
        self.originals: dict[str, dict[str, object]] = {}
        self.processors: dict[tuple[str, str], object] = {}
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self._installed: list[str] = []
        self.active = False

    # ------------------------------------------------------------------ public API
    @property
    def scheduler(self):
        return getattr(self.pipe, "scheduler", None) if self.pipe is not None else None

    def add_hook(self, module: torch.nn.Module, hook, name: str) -> None:
        """Register a diffusers ``ModelHook`` on ``module`` that :meth:`remove` takes off again."""
        register_hook(module, hook, name)
        self._hooks.append((module, name))

    def callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """Pass as ``callback_on_step_end=handle.callback``: the last step source (runs after step i)."""
        self.context.callback_step = int(step_index) + 1
        return callback_kwargs

    def reset(self) -> None:
        """Start a new generation (step state only; statistics are kept)."""
        self.context.reset()

    def stats(self) -> dict:
        """Calls, fallbacks with reasons and attention time (synchronises CUDA once)."""
        return self.context.stats.summary()

    def remove(self) -> None:
        """Reinstate the original processor objects and remove every hook added. Idempotent."""
        if not self.active:
            return
        errors = []
        for module, name in reversed(self._hooks):
            try:
                remove_hook(module, name)
            except Exception as e:  # keep restoring the rest; re-raised below
                errors.append(e)
        self._hooks.clear()
        for comp in self._installed:
            _install(self.components[comp], self.originals[comp])
        self._installed.clear()
        for obj in [self.target, *self.components.values()]:
            if getattr(obj, _HANDLE_ATTR, None) is self:
                delattr(obj, _HANDLE_ATTR)
        self.active = False
        if errors:
            raise errors[0]

    def __enter__(self) -> ApplyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"ApplyHandle(method={self.method!r}, components={list(self.components)}, "
            f"processors={len(self.processors)}, active={self.active})"
        )


def _install(model: torch.nn.Module, procs: dict[str, object]) -> None:
    if hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors"):
        model.set_attn_processor(dict(procs))  # a full dict: set_attn_processor pops from it
        return
    mods = dict(model.named_modules())
    for key, p in procs.items():
        mods[key[: -len(".processor")]].set_processor(p)


def apply(
    pipe_or_model,
    method: str,
    config=None,
    *,
    preset: str | None = None,
    components=None,
    targets=None,
    stats: bool = False,
    strict: bool = False,
    replace: bool = False,
    **overrides,
) -> ApplyHandle:
    """Install ``method``'s processors on a diffusers pipeline or model.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` (or any object with ``transformer``/``unet`` attributes
            and optionally a ``scheduler``), or a diffusers model.
        method: a registered slug (``"dense"``, ``"neighborhood"``, ...).
        config: the method's config object or a dict of its fields.
        preset: a preset name in ``configs/pipelines/<method>/`` (or a YAML path), applied first.
        components: pipeline components to patch (default ``transformer``, ``transformer_2``, ``unet``).
        targets: key globs or block indices to replace (default: the method's self-attention keys).
        stats: count calls and time attention (read with ``handle.stats()``).
        strict: raise instead of skipping targeted keys whose processor the method does not support.
        replace: remove a previous ``apply`` on the same object first instead of raising.
        **overrides: single config fields.

    Returns:
        An :class:`ApplyHandle`.

    Raises:
        ValueError: unknown method/preset, out-of-range config values, no supported attention, or
            visattn already applied (without ``replace=True``).
        TypeError: unknown config fields or wrongly typed values (the message lists the fields).
    """
    spec = get_method(method)
    cfg = resolve_config(spec.config_cls, config, preset=preset, overrides=overrides)
    comps = _components(pipe_or_model, components)
    for obj in [pipe_or_model, *comps.values()]:
        prev = getattr(obj, _HANDLE_ATTR, None)
        if prev is not None and prev.active:
            if not replace:
                raise ValueError(
                    f"visattn method {prev.method!r} is already applied to {type(obj).__name__}; "
                    "call handle.remove() / visattn.pipelines.remove(...) first or pass replace=True"
                )
            prev.remove()
    if targets is not None and (isinstance(targets, (str, int)) and not isinstance(targets, bool)):
        targets = [targets]

    handle = ApplyHandle(pipe_or_model, spec, cfg, AttnContext(stats=AttnStats(stats)), comps)
    select = spec.default_targets or default_self_attention_targets
    plans: dict[str, dict[str, object]] = {}
    seen_pairs, skipped = set(), []
    for comp, model in comps.items():
        procs = enumerate_processors(model)
        blocks = block_indices(model, procs)
        full: dict[str, object] = {}
        for key, (module, proc) in procs.items():
            full[key] = proc
            pair = (type(module).__name__, type(proc).__name__)
            seen_pairs.add(pair)
            wanted = _matches(key, blocks[key], targets) if targets is not None else select(key, module)
            if not wanted:
                continue
            factory = spec.processors.get(pair)
            if factory is None:
                if strict:
                    raise ValueError(
                        f"method {spec.slug!r} does not support {pair} at {comp}.{key}; "
                        f"supported (module, processor) pairs: {sorted(spec.processors)}"
                    )
                skipped.append(f"{comp}.{key} {pair}")
                continue
            new = factory(
                cfg,
                original=proc,
                key=key,
                block_index=blocks[key],
                context=handle.context,
                component=comp,
                module=module,
            )
            full[key] = new
            handle.processors[(comp, key)] = new
        handle.originals[comp] = {k: p for k, (_, p) in procs.items()}
        plans[comp] = full
    if skipped:
        logger.info(
            "visattn %s: skipped %d processor(s) it does not support: %s",
            spec.slug,
            len(skipped),
            "; ".join(skipped[:8]),
        )
    if not handle.processors:
        names = {c: type(m).__name__ for c, m in comps.items()}
        raise ValueError(
            f"method {spec.slug!r} found no supported attention to replace in {names} "
            f"(targets={targets!r}); attention found (module, processor): {sorted(seen_pairs)}; "
            f"supported: {sorted(spec.processors)}"
        )

    try:
        for comp, model in comps.items():
            if not any(c == comp for c, _ in handle.processors):
                continue
            _install(model, plans[comp])
            handle._installed.append(comp)
            handle.active = True
            handle.add_hook(model, LayoutHook(handle.context, comp), "visattn_layout")
            handle.add_hook(model, StepHook(handle, comp), "visattn_step")
            setattr(model, _HANDLE_ATTR, handle)
            if spec.install is not None:
                spec.install(model, handle)
        if not _is_model(pipe_or_model):
            setattr(pipe_or_model, _HANDLE_ATTR, handle)
    except BaseException:
        handle.active = True
        handle.remove()
        raise
    return handle


def remove(pipe_or_model) -> bool:
    """Undo ``apply`` on ``pipe_or_model`` or one of its components; returns whether anything was removed."""
    objs = [pipe_or_model]
    if not _is_model(pipe_or_model):
        objs += [getattr(pipe_or_model, n, None) for n in DEFAULT_COMPONENTS]
    removed = False
    for obj in objs:
        h = getattr(obj, _HANDLE_ATTR, None) if obj is not None else None
        if h is not None and h.active:
            h.remove()
            removed = True
    return removed


__all__ = [
    "apply",
    "remove",
    "ApplyHandle",
    "enumerate_processors",
    "block_indices",
    "default_self_attention_targets",
    "DEFAULT_COMPONENTS",
]
