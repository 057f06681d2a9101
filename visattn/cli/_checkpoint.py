"""Checkpoints of ``visattn train``: timm's format, written atomically, checked before use.

The layout is timm's (``epoch``, ``arch``, ``state_dict``, ``optimizer``, ``state_dict_ema``,
``amp_scaler``, ``args``, ``metric``, ``version``), so timm's ``validate.py`` / ``load_checkpoint`` read
it, plus one ``visattn`` entry with what exact resumption needs and timm's ``CheckpointSaver`` does not
keep: scheduler state, RNG states, update count, metric history and the model's constructor kwargs.
Files are written to a temporary name in the same folder, flushed to disk and renamed over the old one,
so a crash leaves the previous checkpoint intact; the one before is kept as ``previous.pth.tar``.
Everything stored is a tensor or a plain Python value, so files load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
REQUIRED = ("epoch", "arch", "state_dict", "optimizer", "visattn")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, truncated or for another model/run."""


def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainer_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint written by ``visattn train``; raise ``CheckpointError`` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bit rot, not a torch file, disallowed pickle globals
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); nothing was changed. "
            f"{_previous_hint(path)}"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(
            f"{str(path)!r} is not a visattn training checkpoint (missing {missing}); "
            "to start from its weights use initial_checkpoint or pretrained_path"
        )
    meta = ckpt["visattn"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"expected checkpoint format {FORMAT}, got format={meta.get('format')!r} in {path}"
        )
    return ckpt


def _previous_hint(path: Path) -> str:
    prev = path.with_name("previous.pth.tar")
    if prev.is_file() and prev != path:
        return f"The previous good checkpoint is kept: resume from it with --resume {prev}."
    return ""


def check_same_model(
    ckpt: dict[str, Any], cfg: dict[str, Any], num_classes: int, in_chans: int, path
) -> None:
    """Refuse to resume a run of another architecture or head before anything is loaded."""
    meta = ckpt["visattn"]
    mine = {
        "arch": cfg["model"],
        "model_kwargs": cfg["model_kwargs"],
        "num_classes": num_classes,
        "in_chans": in_chans,
    }
    theirs = {
        "arch": ckpt["arch"],
        "model_kwargs": meta.get("model_kwargs", {}),
        "num_classes": meta.get("num_classes"),
        "in_chans": meta.get("in_chans"),
    }
    diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint {str(path)!r} is for another model ({lines}); "
            "resume with the config that wrote it, or start a new run"
        )


def read_checkpoint(path: str | Path) -> Any:
    """The object in a checkpoint file (trainer, timm ``train.py`` or bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # timm train.py stores argparse.Namespace under 'args'; the user trusts their own file here
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]})"
            ) from None


def load_weights(
    model: torch.nn.Module, path: str | Path, use_ema: bool = False, ckpt: Any = None
) -> dict[str, Any]:
    """Load a trainer checkpoint or any timm-format / bare state dict into ``model`` (strict).

    Returns information about the file (``arch`` and ``epoch`` when present). Raises ``CheckpointError``
    when the file is unreadable or its keys/shapes do not fit the model, naming the checkpoint's arch.
    ``ckpt`` is the already-read file content, if the caller has it.
    """
    path = Path(path)
    if ckpt is None:
        ckpt = read_checkpoint(path)
    info = {
        "arch": ckpt.get("arch") if isinstance(ckpt, dict) else None,
        "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None,
    }
    state = ckpt
    if isinstance(ckpt, dict):
        keys = (["state_dict_ema", "model_ema"] if use_ema else []) + ["state_dict", "model"]
        for key in keys:
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                info["key"] = key
                break
        else:
            if use_ema:
                raise CheckpointError(f"--use-ema: {str(path)!r} holds no EMA weights (state_dict_ema)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} holds no state dict")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {(k[10:] if k.startswith("_orig_mod.") else k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        arch = f" (written for {info['arch']!r})" if info["arch"] else ""
        parts = [
            f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})" if shapes else "",
        ]
        raise CheckpointError(
            f"checkpoint {str(path)!r}{arch} does not fit model "
            f"{type(model).__name__}: " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state, strict=True)
    return info
