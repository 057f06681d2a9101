"""Method configs for the diffusers integration: base class, presets, typed overrides.

A method config is a frozen dataclass deriving :class:`PipelineConfig`. ``apply`` accepts the config
object, a plain dict of its fields, a preset name (``configs/pipelines/<slug>/<preset>.yaml``) and
single-field overrides; :func:`resolve_config` merges them in that order (preset, then config, then
overrides) and types every value against the dataclass annotations. Unknown field names and values
of the wrong type raise ``TypeError`` listing the valid fields; values out of range raise
``ValueError`` from the config's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml

# presets ship in the repository's configs/ (not inside the wheel); VISATTN_PRESET_ROOT points elsewhere
PRESET_ROOT = Path(
    os.environ.get("VISATTN_PRESET_ROOT") or Path(__file__).resolve().parents[2] / "configs" / "pipelines"
)


class PipelineConfig:
    """Mixin for frozen method-config dataclasses (``slug`` names the preset folder)."""

    slug: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def presets(cls) -> list[str]:
        """Names of the presets shipped in ``configs/pipelines/<slug>/``."""
        folder = PRESET_ROOT / cls.slug
        return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """Build the config from a preset name (or a path to a YAML file), then apply ``overrides``.

        Raises:
            ValueError: unknown preset (the message lists the shipped ones).
            TypeError: unknown fields or wrongly typed values in the preset or overrides.
        """
        return resolve_config(cls, None, preset=name, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def load_preset(cls: type, name: str) -> dict[str, Any]:
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_ROOT / cls.slug / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {name!r} for method {cls.slug!r}; supported presets: {cls.presets()} "
            f"(files in {PRESET_ROOT / cls.slug}) or a path to a .yaml file"
        )
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise TypeError(f"preset {path} must be a mapping of config fields, got {type(data).__name__}")
    data.pop("description", None)  # free text for humans
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, name: str):
    """``value`` converted to annotation ``tp`` (YAML lists become tuples), or TypeError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # try exact-kind matches first, so "3" stays a str for str | int and 2 stays an int for int | float
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is float):
            try:
                return _coerce(value, arg, name)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(f"{name}={value!r} does not match {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{name}={value!r} must be a {origin.__name__} ({_type_name(tp)})")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            out = [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(args) != len(value):
                raise TypeError(f"{name}={value!r} must have {len(args)} entries ({_type_name(tp)})")
            out = [_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            out = list(value)
        return tuple(out) if origin is tuple else out
    if tp is type(None):
        if value is not None:
            raise TypeError(f"{name}={value!r} must be None")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{name}={value!r} must be a bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{name}={value!r} must be an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{name}={value!r} must be a float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{name}={value!r} must be a str")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(f"{name}={value!r} must be one of {typing.get_args(tp)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"{name}={value!r} must be {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    valid = cls.field_names()
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown} in {source}; valid fields: {valid}")
    hints = _hints(cls)
    return {k: _coerce(v, hints[k], k) for k, v in data.items()}


def resolve_config(cls: type, config=None, *, preset: str | None = None, overrides: dict | None = None):
    """Merge preset, ``config`` (object or dict) and ``overrides`` into one ``cls`` instance.

    Raises:
        TypeError: ``config`` of another type, unknown fields or wrongly typed values.
        ValueError: unknown preset or values out of range (from the config's checks).
    """
    fields: dict[str, Any] = {}
    if preset is not None:
        fields.update(_check_fields(cls, load_preset(cls, preset), f"preset {preset!r}"))
    if config is not None:
        if isinstance(config, cls):
            fields.update(config.to_dict())
        elif isinstance(config, dict):
            fields.update(_check_fields(cls, config, "config"))
        else:
            raise TypeError(
                f"config must be a {cls.__name__} or a dict of its fields {cls.field_names()}, "
                f"got {type(config).__name__}"
            )
    if overrides:
        fields.update(_check_fields(cls, dict(overrides), "overrides"))
    return cls(**fields)


def parse_assignment(cls: type, text: str) -> tuple[str, Any]:
    """``"key=value"`` (value in YAML syntax, lists become tuples) typed against ``cls``'s fields.

    Raises:
        TypeError: unknown key or a value of the wrong type.
        ValueError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    value = yaml.safe_load(raw) if raw.strip() else None
    typed = _check_fields(cls, {key: value}, f"--set {text}")
    return key, typed[key]


__all__ = ["PipelineConfig", "resolve_config", "parse_assignment", "load_preset", "PRESET_ROOT"]
