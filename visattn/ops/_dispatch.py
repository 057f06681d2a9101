"""Backend registry and selection shared by every visattn op.

Each op registers its backends in priority order with ``@register_backend(op, name, can_run=...)``.
``can_run(*args, **kwargs) -> list[str]`` returns the reasons a backend cannot run the given inputs
(an empty list means it can), in the style of xformers' capability checks. Selection:

* ``backend="auto"`` (or ``None`` with no ``use_backend`` in force) tries the backends marked
  ``auto=True`` in order and takes the first that can run, passing over one whose ``auto_if`` gives
  reasons (a measured speed rule: it runs these inputs, but a later backend is faster there). The
  ``"torch"`` reference is eligible only for CPU tensors, and picking it is logged: a CUDA tensor never
  falls back to it silently.
* A backend asked for by name runs or raises ``NotImplementedError`` with its reasons.
* When nothing can run, the error lists every backend tried with its reasons, independent of the
  log level, and ends with the action most likely to fix it.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("visattn")


class BackendName(str, enum.Enum):
    """Backend names (a ``str`` enum, like diffusers' ``AttentionBackendName``)."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    FLEX = "flex"
    NATTEN = "natten"
    SDPA = "sdpa"
    UPSTREAM = "upstream"


@dataclass
class _Backend:
    op: str
    name: str
    fn: Callable
    can_run: Callable[..., list[str]]
    auto: bool
    auto_devices: tuple[str, ...] | None
    doc: str = ""
    extra: dict = field(default_factory=dict)
    auto_if: Callable[..., list[str]] | None = None


_REGISTRY: dict[str, dict[str, _Backend]] = {}
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("visattn_backend", default="auto")
# The same choice as a plain global, read while torch.compile traces (Dynamo in torch 2.11 cannot
# trace ContextVar.get; it guards on module globals instead, so a new use_backend recompiles).
_CURRENT_NAME: str = "auto"
_LOGGED_REFERENCE: set[str] = set()


def register_backend(
    op: str,
    name: str,
    *,
    can_run: Callable[..., list[str]],
    auto: bool = True,
    auto_devices: tuple[str, ...] | None = None,
    doc: str = "",
    auto_if: Callable[..., list[str]] | None = None,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as backend ``name`` of ``op``; registration order is the ``"auto"`` priority.

    Args:
        op: the op slug, e.g. ``"block_sparse"``.
        name: the backend name, one of :class:`BackendName`'s values.
        can_run: ``can_run(*args, **kwargs) -> list[str]`` of reasons it cannot run these inputs.
        auto: whether ``"auto"`` may pick it (comparison backends such as ``"flex"`` set False).
        auto_devices: device types on which ``"auto"`` may pick it (``("cpu",)`` for references).
        auto_if: ``auto_if(*args, **kwargs) -> list[str]`` of reasons why ``"auto"`` passes over it for
            inputs it can run (a measured speed rule, e.g. a later backend is faster there); by name it
            still runs them. ``"auto"`` asks it before ``can_run`` (a cheap rule spares the capability
            check), so it must not assume the inputs are runnable.
    """
    BackendName(name)  # unknown names are a programming error caught at import

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = _Backend(op, name, fn, can_run, auto, auto_devices, doc,
                                                      auto_if=auto_if)
        return fn

    return deco


def list_backends(op: str | None = None) -> dict[str, list[str]]:
    """The registered backends of every op (or of ``op``), in ``"auto"`` priority order."""
    _load_ops()
    ops = [op] if op is not None else sorted(_REGISTRY)
    return {o: list(_REGISTRY.get(o, {})) for o in ops}


def current_backend() -> str:
    """The backend name that ``backend=None`` resolves to (set by :func:`use_backend`)."""
    return _CURRENT_NAME if torch.compiler.is_compiling() else _CURRENT.get()


@contextlib.contextmanager
def use_backend(name: str | BackendName) -> Iterator[None]:
    """Context manager: ops called with ``backend=None`` use ``name``; restores the previous choice.

    Example::

        with visattn.use_backend("torch"):
            out = visattn.ops.block_sparse_attention(q, k, v, plan)
    """
    value = name.value if isinstance(name, BackendName) else name
    try:
        BackendName(value)
    except ValueError:
        names = [b.value for b in BackendName]
        raise ValueError(f"expected a backend name in {names}, got name={name!r}") from None
    global _CURRENT_NAME
    token = _CURRENT.set(value)
    previous, _CURRENT_NAME = _CURRENT_NAME, value
    try:
        yield
    finally:
        _CURRENT.reset(token)
        _CURRENT_NAME = previous


def _format_failure(op: str, summary, tried: list[tuple[str, list[str]]], hint: str) -> str:
    summary = summary() if callable(summary) else summary
    lines = [f"No visattn backend can run {op.replace('_', ' ')} attention for these inputs.", f"  inputs: {summary}"]
    for name, reasons in tried:
        lines.append(f"  backend {name!r}:")
        lines.extend(f"    - {r}" for r in reasons)
    lines.append(hint)
    return "\n".join(lines)


def select(op: str, backend: str | None, device: torch.device, summary, *args, **kwargs) -> _Backend:
    """Pick the backend of ``op`` that runs these inputs (see the module docstring).

    ``summary`` describes the inputs in error messages: a string, or a zero-argument callable that
    builds it only when an error is raised (formatting tensor descriptions costs host time per call).

    Raises:
        ValueError: ``backend`` is not a backend name.
        NotImplementedError: the named backend cannot run the inputs, or none can.
    """
    _load_ops()
    if backend is not None:
        name = backend
    else:
        name = _CURRENT_NAME if torch.compiler.is_compiling() else _CURRENT.get()
    if isinstance(name, BackendName):
        name = name.value
    registry = _REGISTRY.get(op, {})
    if name == "auto":
        tried: list[tuple[str, list[str]]] = []
        for b in registry.values():
            if not b.auto:
                continue
            # the speed rule first: it is cheaper than the capability check it spares
            reasons = list(b.auto_if(*args, **kwargs)) if b.auto_if is not None else []
            if not reasons:
                reasons = list(b.can_run(*args, **kwargs))
            if not reasons and b.auto_devices is not None and device.type not in b.auto_devices:
                reasons = [
                    f"'auto' picks the {b.name!r} backend only for {'/'.join(b.auto_devices)} tensors, "
                    f"got device={device}; pass backend={b.name!r} to run it there on purpose"
                ]
            if not reasons:
                if b.auto_devices is not None and op not in _LOGGED_REFERENCE:
                    _LOGGED_REFERENCE.add(op)
                    logger.info("visattn: %s runs on the %r backend for %s tensors", op, b.name, device.type)
                return b
            tried.append((b.name, reasons))
        hint = (
            "Most likely fix: run on a CUDA GPU with Triton installed, or set TRITON_INTERPRET=1 before "
            "importing visattn to run the Triton kernels on CPU tensors."
        )
        raise NotImplementedError(_format_failure(op, summary, tried, hint))
    try:
        BackendName(name)
    except ValueError:
        raise ValueError(
            f"expected backend to be 'auto' or one of {list(registry)}, got backend={name!r}"
        ) from None
    if name not in registry:
        raise NotImplementedError(
            f"backend {name!r} is not implemented for {op}; available: {list(registry)}"
        )
    b = registry[name]
    reasons = list(b.can_run(*args, **kwargs))
    if reasons:
        raise NotImplementedError(
            _format_failure(op, summary, [(name, reasons)], f"Pick another backend: {list(registry)}.")
        )
    return b


# ---------------------------------------------------------------------------------------------
# Environment-level availability, shared by the per-op ``can_run`` checks and ``visattn info``.


_HAS_TRITON = importlib.util.find_spec("triton") is not None


_ENV_REASONS: dict[tuple, tuple[str, ...]] = {}


def triton_reasons(device: torch.device | None = None) -> list[str]:
    """Why the Triton backend cannot run at all on ``device`` (empty if it can).

    These are facts of the process (installed packages, GPU capability, ``TRITON_INTERPRET``), so
    they are computed once per device eagerly and only looked up while ``torch.compile`` traces
    (dynamo cannot trace importlib or CUDA queries). A device first seen inside a traced region is
    not checked here; an unusable environment then fails at kernel launch.
    """
    key = (None if device is None else device.type, None if device is None else device.index,
           os.environ.get("TRITON_INTERPRET", "0"))
    if torch.compiler.is_compiling():
        return list(_ENV_REASONS.get(key, ()))
    hit = _ENV_REASONS.get(key)
    if hit is None:
        hit = _ENV_REASONS[key] = _triton_env_reasons(key[0], -1 if key[1] is None else key[1])
    return list(hit)


def _triton_env_reasons(device_type: str | None, index: int) -> tuple[str, ...]:
    reasons = []
    if not _HAS_TRITON:
        reasons.append("triton is not installed (pip install triton; it ships with torch on Linux)")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type is None:
        if not torch.cuda.is_available() and not interpret:
            reasons.append("no CUDA device and TRITON_INTERPRET is not set to 1")
    elif device_type == "cpu":
        if not interpret:
            reasons.append("tensors are on the CPU; set TRITON_INTERPRET=1 to run the kernels in the interpreter")
        elif not _kernels_match_interpret():
            reasons.append(
                "TRITON_INTERPRET=1 was set after visattn's Triton kernels were compiled; set it before "
                "the first kernel call (e.g. at the top of conftest.py)"
            )
    elif device_type == "cuda":
        if interpret:
            reasons.append("TRITON_INTERPRET=1 is set, which runs kernels on the CPU only")
        elif not torch.cuda.is_available():
            reasons.append("CUDA is not available in this process")
        elif (cap := torch.cuda.get_device_capability(index if index >= 0 else None)) < (8, 0):
            reasons.append(f"needs a GPU of compute capability >= 8.0, got {cap}")
    else:
        reasons.append(f"device type {device_type!r} is not supported by the Triton kernels")
    return tuple(reasons)


def _kernels_match_interpret() -> bool:
    import sys

    mod = sys.modules.get("visattn.kernels._common")
    if mod is None:
        return True  # kernels not defined yet: they will pick up the current setting
    return bool(getattr(mod, "INTERPRET", False))


def flex_reasons() -> list[str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the torch build
        return [f"torch.nn.attention.flex_attention is unavailable: {e}"]
    return []


def natten_reasons() -> list[str]:
    if importlib.util.find_spec("natten") is None:  # not on a traced path: natten is a comparison backend
        return ["natten is not installed (pip install --no-build-isolation natten)"]
    return []


def environment_reasons() -> dict[str, list[str]]:
    """Backend name -> reasons it is unavailable in this environment (for ``visattn info``)."""
    return {
        "triton": triton_reasons(),
        "torch": [],
        "flex": flex_reasons(),
        "natten": natten_reasons(),
    }


_OPS_LOADED = False


def _load_ops() -> None:
    """Import every op module so that their backends are registered (once: every op call asks)."""
    global _OPS_LOADED
    if _OPS_LOADED:
        return
    from . import block_sparse  # noqa: F401
    from . import neighborhood  # noqa: F401
    from . import agent  # noqa: F401
    from . import bilevel_routing  # noqa: F401
    from . import pyramid  # noqa: F401

    _OPS_LOADED = True
