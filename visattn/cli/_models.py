"""Model construction for the training CLIs: names checked against timm's registry, kwargs type-checked.

``timm.create_model`` splats ``--model-kwargs`` into the constructor, where a value of the wrong type
(``use_kernel='false'``, a truthy string) can pass silently (specs/timm.md §8.1). Here every extra kwarg
must be a parameter of the model class and match the type of its default.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any


class ModelError(ValueError):
    """Unknown model name or unusable constructor kwargs; the message names the closest valid ones."""


def check_model_name(name: str) -> None:
    import timm

    import visattn  # noqa: F401  (registers visattn's backbones with timm)

    if timm.is_model(name):
        return
    base = name.split(".")[0]
    if ":" in name or timm.is_model(base):  # hub/local-dir names and pretrained tags resolve in timm
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = (
        f" Did you mean: {', '.join(close)}?"
        if close
        else " `timm.list_models('*pattern*')` lists the names."
    )
    raise ModelError(f"unknown model {name!r}: not registered with timm (visattn imported).{hint}")


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or default is inspect.Parameter.empty:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list, int, float))
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def check_model_kwargs(model_cls: type, kwargs: dict[str, Any]) -> None:
    """Every kwarg names a parameter of ``model_cls.__init__`` with a value of its default's type."""
    sig = inspect.signature(model_cls.__init__)
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key not in params:
            if takes_var_kw:
                continue  # passed on to a sub-module we cannot see; the constructor decides
            valid = [p for p in params if p not in ("self",)]
            close = difflib.get_close_matches(key, valid, n=3)
            raise TypeError(
                f"model_kwargs: {model_cls.__name__} has no parameter {key!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Parameters: {', '.join(valid)}"
            )
        default = params[key].default
        if not _type_ok(value, default):
            raise TypeError(
                f"model_kwargs: expected {key} of type {type(default).__name__} like its default "
                f"{default!r}, got {key}={value!r} ({type(value).__name__}); write True/False, "
                f"numbers and tuples as Python literals"
            )


def create_model(name: str, *, model_kwargs: dict[str, Any] | None = None, **kwargs):
    """``timm.create_model(name, **kwargs, **model_kwargs)`` with a clear error for a bad name or kwargs.

    ``kwargs`` whose value is None are dropped (as timm does), so unset recipe keys keep the model's
    defaults.
    """
    import timm

    check_model_name(name)
    model_kwargs = dict(model_kwargs or {})
    clash = sorted(set(model_kwargs) & set(kwargs))
    if clash:
        raise ModelError(f"model_kwargs repeats keys the trainer passes itself: {clash}")
    try:
        model = timm.create_model(name, **{k: v for k, v in kwargs.items() if v is not None}, **model_kwargs)
    except TypeError as e:
        raise TypeError(f"cannot build {name!r} with model_kwargs={model_kwargs}: {e}") from None
    check_model_kwargs(type(model), model_kwargs)
    return model
