"""diffusers integration: processors, ``apply``/``remove``, hooks, schedules (specs/diffusers.md).

Needs ``pip install "visattn[diffusers]"``; ``import visattn`` never imports this package.

    import visattn.pipelines as vp
    handle = vp.apply(pipe, "neighborhood", preset="wan21_480p", stats=True)
    video = pipe(prompt, callback_on_step_end=handle.callback).frames
    print(handle.stats()); handle.remove()
"""

try:
    import diffusers  # noqa: F401
except ImportError as e:  # a clear message naming the extra, raised on use of visattn.pipelines
    raise ImportError('visattn.pipelines needs diffusers: pip install "visattn[diffusers]"') from e

from ._base import VisattnProcessor
from ._config import PipelineConfig, parse_assignment, resolve_config
from ._context import AttnContext, AttnStats
from ._registry import MethodSpec, get_method, list_methods, register_method
from .apply import ApplyHandle, apply, remove
from .schedule import Schedule
from .sdpa import sdpa_override
from .token_order import install_token_order

__all__ = [
    "apply",
    "remove",
    "ApplyHandle",
    "AttnContext",
    "AttnStats",
    "MethodSpec",
    "register_method",
    "get_method",
    "list_methods",
    "PipelineConfig",
    "resolve_config",
    "parse_assignment",
    "Schedule",
    "sdpa_override",
    "install_token_order",
    "VisattnProcessor",
]
