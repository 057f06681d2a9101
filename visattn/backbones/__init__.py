"""timm-registered backbone families; importing this package registers them with timm.

Each family lives in one module named after it (``nat``, ``dinat_s``, ``nat_isotropic``, ``biformer``,
``agent_*``); the module's ``@register_model`` entrypoints run on import, so ``import visattn`` is all
a user needs before ``timm.create_model("nat_tiny")``. Family modules import only torch, timm and visattn's layers
and ops: no Triton, no diffusers, no CUDA initialisation (specs/timm.md §2).
"""

from __future__ import annotations

import importlib

import timm

# Family modules, in registration order. A family adds its module name here and nowhere else.
FAMILY_MODULES: tuple[str, ...] = (
    "nat", "dinat_s", "nat_isotropic", "biformer", "agent_deit", "agent_pvt", "agent_swin", "agent_cswin",
)

for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")


def list_models(filter: str | list[str] = "", pretrained: bool = False, exclude_filters: str | list[str] = "") -> list[str]:
    """Names of visattn's registered backbones, like ``timm.list_models`` restricted to visattn's families."""
    if not FAMILY_MODULES:
        return []
    return timm.list_models(filter=filter, module=list(FAMILY_MODULES), pretrained=pretrained,
                            exclude_filters=exclude_filters)


__all__ = ["FAMILY_MODULES", "list_models"]
