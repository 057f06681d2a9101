"""Method registry of the diffusers integration (INTERFACES.md §D).

A method (``"dense"``, ``"neighborhood"``, ``"agent"``, ...) registers a :class:`MethodSpec`: its frozen
config dataclass, a table of processor factories keyed by ``(module class name, current processor class
name)``, optional default targets and an optional ``install`` callback for extra hooks. Method modules
register themselves when imported; :func:`get_method` imports the known ones on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# Modules of visattn.pipelines that register methods; imported lazily on the first lookup. A module
# that is not present (its method has not landed on this branch) is skipped; an import error inside a
# present module propagates.
_METHOD_MODULES = ("dense", "neighborhood", "agent", "pyramid", "rectified")


@dataclass(frozen=True)
class MethodSpec:
    """One attention method's diffusers integration.

    Attributes:
        slug: method name, e.g. ``"neighborhood"`` (the same slug as the op and config folder).
        config_cls: frozen dataclass with a ``from_preset(name)`` classmethod; presets live in
            ``configs/pipelines/<slug>/<name>.yaml``.
        processors: ``{(module class name, processor class name): factory}``, where
            ``factory(config, *, original, key, block_index, context, component, module)`` returns the
            processor that replaces ``original``.
        default_targets: ``(key, module) -> bool``, whether a supported key is targeted when
            ``targets=`` is not given; ``None`` uses :func:`default_self_attention_targets`.
        install: ``install(model, handle)`` for extra hooks (use ``handle.add_hook`` so ``remove()``
            undoes them).
    """

    slug: str
    config_cls: type
    processors: Mapping[tuple[str, str], Callable[..., object]]
    default_targets: Callable[[str, object], bool] | None = None
    install: Callable[[torch.nn.Module, object], None] | None = None
    description: str = field(default="", compare=False)


_METHODS: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register (or re-register, e.g. after a reload) a method under ``spec.slug``."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"expected a MethodSpec, got {type(spec).__name__}")
    _METHODS[spec.slug] = spec
    return spec


def _load_methods() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in _METHOD_MODULES:
        mod = f"{__package__}.{name}"
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def list_methods() -> list[str]:
    """Slugs of every registered method, sorted."""
    _load_methods()
    return sorted(_METHODS)


def get_method(slug: str) -> MethodSpec:
    """The registered :class:`MethodSpec` of ``slug``.

    Raises:
        ValueError: unknown slug (the message lists the registered ones).
    """
    _load_methods()
    if not isinstance(slug, str) or slug not in _METHODS:
        raise ValueError(f"unknown method {slug!r}; supported methods: {sorted(_METHODS)}")
    return _METHODS[slug]


__all__ = ["MethodSpec", "register_method", "get_method", "list_methods"]
