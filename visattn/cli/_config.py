"""Training configuration for ``visattn train``: defaults, YAML recipes, command-line overrides, checks.

A recipe is a flat YAML mapping whose keys are the ``dest`` names of timm's ``train.py`` flags
(``drop_path``, ``layer_decay``, ``model_kwargs``, ``amp``, ...), so recipes and habits carry over
(specs/timm.md §8). Every key has a default here; a key that is not listed is an error that names the
closest valid keys. Values are type-checked before anything is built.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

# key: (default, type, help). Types: bool, int, float, str, "floats" (list of numbers), "ints", dict.
# A default of None means "unset": the model's pretrained cfg or timm's own default applies.
SPEC: dict[str, tuple[Any, Any, str]] = {
    # model
    "model": (None, str, "any timm.create_model name (visattn's are registered on import)"),
    "model_kwargs": ({}, dict, "extra constructor kwargs, type-checked against the model class"),
    "pretrained": (False, bool, "load the model's pretrained weights (needs them locally / cached)"),
    "pretrained_path": (
        None,
        str,
        "local weights loaded through the cfg overlay and checkpoint_filter_fn (implies pretrained)",
    ),
    "initial_checkpoint": (None, str, "state dict loaded with timm's load_checkpoint before training"),
    "num_classes": (None, int, "classifier width (default: the dataset's class count)"),
    "in_chans": (None, int, "input channels (default 3; digits may use 1)"),
    "drop": (0.0, float, "classifier dropout (timm drop_rate)"),
    "drop_path": (None, float, "stochastic depth rate (timm drop_path_rate)"),
    "gp": (None, str, "global pool type"),
    # data
    "dataset": (
        "",
        str,
        "'' or 'folder' for an ImageFolder tree under data_dir; 'digits' for scikit-learn's",
    ),
    "data_dir": (None, str, "dataset root (ImageFolder: with train/ and validation/ (or val/) folders)"),
    "train_split": ("train", str, "training split folder"),
    "val_split": ("validation", str, "validation split folder"),
    "digits_size": (32, int, "digits: side length the 8x8 images are upsampled to"),
    "digits_val_fraction": (0.2, float, "digits: validation fraction of the fixed stratified split"),
    "img_size": (None, int, "input side length (default: the model's pretrained cfg)"),
    "crop_pct": (None, float, "validation centre-crop fraction"),
    "mean": (None, "floats", "normalisation mean"),
    "std": (None, "floats", "normalisation std"),
    "interpolation": ("", str, "validation resize interpolation"),
    "train_interpolation": ("random", str, "training resize interpolation"),
    "workers": (2, int, "data-loader worker processes per rank"),
    # augmentation and loss
    "scale": ([0.08, 1.0], "floats", "RandomResizedCrop scale range"),
    "ratio": ([0.75, 1.3333333333333333], "floats", "RandomResizedCrop aspect-ratio range"),
    "hflip": (0.5, float, "horizontal flip probability"),
    "vflip": (0.0, float, "vertical flip probability"),
    "color_jitter": (0.4, float, "colour jitter strength"),
    "aa": (None, str, "auto-augment policy, e.g. rand-m9-mstd0.5-inc1"),
    "reprob": (0.0, float, "random-erasing probability"),
    "remode": ("pixel", str, "random-erasing mode"),
    "recount": (1, int, "random-erasing count"),
    "mixup": (0.0, float, "mixup alpha (0 = off)"),
    "cutmix": (0.0, float, "cutmix alpha (0 = off)"),
    "cutmix_minmax": (None, "floats", "cutmix min/max ratio (overrides alpha)"),
    "mixup_prob": (1.0, float, "probability of mixup or cutmix per batch"),
    "mixup_switch_prob": (0.5, float, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": ("batch", str, "batch, pair or elem"),
    "mixup_off_epoch": (0, int, "turn mixup off from this epoch (0 = never)"),
    "smoothing": (0.1, float, "label smoothing"),
    # optimiser
    "opt": ("adamw", str, "timm optimizer name"),
    "opt_eps": (None, float, "optimizer epsilon"),
    "opt_betas": (None, "floats", "optimizer betas"),
    "momentum": (0.9, float, "SGD momentum"),
    "weight_decay": (0.05, float, "weight decay"),
    "layer_decay": (None, float, "layer-wise lr decay through the model's group_matcher"),
    "clip_grad": (None, float, "gradient clipping value (None = off)"),
    "clip_mode": ("norm", str, "norm, value or agc"),
    "lr": (None, float, "absolute learning rate; wins over lr_base scaling"),
    "lr_base": (1e-3, float, "learning rate at global batch lr_base_size"),
    "lr_base_size": (1024, int, "global batch size at which lr_base holds"),
    "lr_base_scale": ("linear", str, "linear or sqrt scaling of lr_base with global batch"),
    # schedule
    "sched": ("cosine", str, "timm scheduler name"),
    "epochs": (300, int, "training epochs before cooldown (total = epochs + cooldown_epochs, as timm)"),
    "warmup_epochs": (5, int, "linear warm-up epochs"),
    "warmup_lr": (1e-6, float, "learning rate at the start of warm-up"),
    "min_lr": (1e-5, float, "cosine floor"),
    "cooldown_epochs": (0, int, "extra epochs at min_lr after the cosine decay"),
    "decay_epochs": (90, float, "step schedule period"),
    "decay_rate": (0.1, float, "step schedule factor"),
    "sched_on_updates": (True, bool, "step the schedule every optimizer update (else per epoch)"),
    # batching
    "batch_size": (128, int, "per-process batch size"),
    "validation_batch_size": (None, int, "validation batch size (default: batch_size)"),
    "grad_accum_steps": (1, int, "micro-batches accumulated per optimizer step"),
    # EMA
    "model_ema": (False, bool, "keep a ModelEmaV3 copy and validate it too"),
    "model_ema_decay": (0.9998, float, "EMA decay"),
    "model_ema_warmup": (False, bool, "EMA decay warm-up"),
    # performance
    "amp": (False, bool, "automatic mixed precision"),
    "amp_dtype": ("float16", str, "float16 or bfloat16"),
    "channels_last": (False, bool, "channels-last memory format"),
    "grad_checkpointing": (False, bool, "model.set_grad_checkpointing()"),
    "torchcompile": (None, str, "torch.compile backend, e.g. inductor (None = eager)"),
    "device": (None, str, "cuda or cpu (default: cuda when available; the LOCAL_RANK GPU under torchrun)"),
    # run
    "seed": (42, int, "random seed"),
    "output": ("output/train", str, "output folder; the run goes to OUTPUT/EXPERIMENT"),
    "experiment": (None, str, "run folder name (default: the config file's stem)"),
    "resume": (None, str, "checkpoint to resume from; 'auto' = OUTPUT/EXPERIMENT/last.pth.tar if present"),
    "eval_metric": ("top1", str, "metric that picks best.pth.tar (top1, top5 or loss)"),
    "log_interval": (50, int, "steps between progress-bar refreshes of loss and lr"),
    "progress": (True, bool, "show a tqdm progress bar per epoch (rank 0)"),
    "interrupt_after_steps": (None, int, "testing: stop as if killed after N optimizer steps in this run"),
    "notes": ("", str, "free text: where the recipe comes from"),
}

# keys of create_model that --model-kwargs must not repeat (timm train.py's collision, specs/timm.md §8.1)
MODEL_KEY_OWNERS = {
    "num_classes": "num_classes",
    "in_chans": "in_chans",
    "drop_rate": "drop",
    "drop_path_rate": "drop_path",
    "global_pool": "gp",
    "pretrained": "pretrained",
}


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says which key and why."""


def defaults() -> dict[str, Any]:
    return {
        k: (list(v[0]) if isinstance(v[0], list) else dict(v[0]) if isinstance(v[0], dict) else v[0])
        for k, v in SPEC.items()
    }


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, SPEC, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(SPEC))}")


def _check_type(key: str, value: Any, where: str) -> Any:
    kind = SPEC[key][1]
    if value is None:
        return None
    bad = False
    if kind is bool:
        bad = not isinstance(value, bool)
    elif kind is int:
        bad = isinstance(value, bool) or not isinstance(value, int)
    elif kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-8 (no dot) as a string: accept a plain number
            try:
                value = float(value)
            except ValueError:
                pass
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        value = value if bad else float(value)
    elif kind is str:
        bad = not isinstance(value, str)
    elif kind is dict:
        bad = not isinstance(value, dict)
    elif kind == "floats":
        bad = not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        value = value if bad else [float(v) for v in value]
    if bad:
        want = kind if isinstance(kind, str) else kind.__name__
        raise ConfigError(
            f"expected {key} to be {want}, got {key}={value!r} ({type(value).__name__}) in {where}"
        )
    return value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML recipe at ``path``, then ``overrides``; every key and type checked."""
    import yaml

    cfg = defaults()
    layers: list[tuple[str, dict]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {str(p)!r}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}"
            )
        layers.append((str(p), data))
        if cfg["experiment"] is None:
            cfg["experiment"] = p.stem
    layers.append(("overrides", overrides or {}))
    for where, data in layers:
        for key, value in data.items():
            if key not in SPEC:
                raise _unknown(key, where)
            cfg[key] = _check_type(key, value, where)
    validate_values(cfg)
    return cfg


def validate_values(cfg: dict[str, Any]) -> None:
    if not cfg["model"]:
        raise ConfigError("no model given: set `model:` in the config or pass --model NAME")
    for key in ("epochs", "batch_size", "grad_accum_steps", "lr_base_size"):
        if cfg[key] < 1:
            raise ConfigError(f"expected {key} >= 1, got {key}={cfg[key]}")
    if cfg["dataset"] not in ("", "folder", "digits"):
        raise ConfigError(f"expected dataset to be '', 'folder' or 'digits', got dataset={cfg['dataset']!r}")
    if cfg["amp_dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"expected amp_dtype float16 or bfloat16, got amp_dtype={cfg['amp_dtype']!r}")
    if cfg["eval_metric"] not in ("top1", "top5", "loss"):
        raise ConfigError(f"expected eval_metric top1, top5 or loss, got eval_metric={cfg['eval_metric']!r}")
    if cfg["lr_base_scale"] not in ("linear", "sqrt"):
        raise ConfigError(
            f"expected lr_base_scale linear or sqrt, got lr_base_scale={cfg['lr_base_scale']!r}"
        )
    if not 0.0 < cfg["digits_val_fraction"] < 1.0:
        raise ConfigError(f"expected 0 < digits_val_fraction < 1, got {cfg['digits_val_fraction']}")
    for key, n in (("scale", 2), ("ratio", 2), ("cutmix_minmax", 2), ("opt_betas", 2)):
        if cfg[key] is not None and len(cfg[key]) != n:
            raise ConfigError(f"expected {key} to hold {n} numbers, got {key}={cfg[key]}")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"]) and cfg["batch_size"] % 2:
        raise ConfigError(f"mixup/cutmix need an even batch_size, got batch_size={cfg['batch_size']}")
    owned = sorted(set(cfg["model_kwargs"]) & set(MODEL_KEY_OWNERS))
    if owned:
        keys = ", ".join(f"{k} (use `{MODEL_KEY_OWNERS[k]}`)" for k in owned)
        raise ConfigError(f"model_kwargs must not set keys the trainer passes itself: {keys}")


def parse_kwarg_value(text: str) -> Any:
    """A ``--model-kwargs`` value read as timm's ``ParseKwargs`` reads it: a Python literal, else the string.

    So ``use_kernel=False`` is a bool and ``use_kernel=false`` the string ``'false'``, which the model
    kwargs check then rejects (specs/timm.md §8.1) instead of passing a truthy string on.
    """
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: list[str], flag: str = "--model-kwargs") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected {flag} as key=value, got {item!r}")
        out[key.strip()] = parse_kwarg_value(value)
    return out


def global_batch(cfg: dict[str, Any], world_size: int) -> int:
    return cfg["batch_size"] * world_size * cfg["grad_accum_steps"]


def resolve_lr(cfg: dict[str, Any], world_size: int) -> float:
    """``lr`` if set, else ``lr_base`` scaled from ``lr_base_size`` to the global batch (as timm train.py)."""
    if cfg["lr"] is not None:
        return cfg["lr"]
    ratio = global_batch(cfg, world_size) / cfg["lr_base_size"]
    return cfg["lr_base"] * (ratio**0.5 if cfg["lr_base_scale"] == "sqrt" else ratio)
