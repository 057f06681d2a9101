"""Datasets and loaders for the training CLIs: ImageFolder trees through timm, and scikit-learn's digits.

The digits set (1797 grayscale 8x8 images, 10 classes) ships inside scikit-learn, so the demo recipe
and CI need no download. It is upsampled once to ``digits_size`` pixels and split with a fixed
stratified split (``random_state=0``). ``write_digits_imagefolder`` writes the same split as PNG files in
an ImageFolder tree, for ``visattn validate --data`` and timm's own scripts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

DIGITS_CLASSES = [str(i) for i in range(10)]


class DataError(ValueError):
    """Missing or unusable data; the message names the path."""


@functools.lru_cache(maxsize=4)
def _digits_arrays(val_fraction: float = 0.2):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(
        d.images, d.target, test_size=val_fraction, random_state=0, stratify=d.target
    )
    return {"train": (x_tr, y_tr), "validation": (x_va, y_va)}


@functools.lru_cache(maxsize=8)
def _digit_images(split: str, size: int, mode: str, val_fraction: float):
    x, y = _digits_arrays(val_fraction)[split]
    return tuple(_digit_image(im, size, mode) for im in x), tuple(int(t) for t in y)


def _digit_image(img8, size: int, mode: str):
    import numpy as np
    from PIL import Image

    arr = np.clip(img8 * 16.0, 0, 255).astype("uint8")  # digits are 0..16
    im = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC)
    return im.convert(mode)


class DigitsDataset(Dataset):
    """scikit-learn's digits as PIL images, upsampled to ``size``; ``transform`` is set by the caller."""

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        mode: str = "RGB",
        val_fraction: float = 0.2,
        transform=None,
    ):
        if split not in ("train", "validation"):
            raise DataError(f"expected digits split train or validation, got {split=}")
        self.images, self.targets = _digit_images(split, size, mode, val_fraction)  # cached, read-only
        self.classes = list(DIGITS_CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


def write_digits_imagefolder(root: str | Path, size: int = 32, val_fraction: float = 0.2) -> Path:
    """Write the digits split as ``root/{train,validation}/<class>/<i>.png``; returns ``root``."""
    root = Path(root)
    for split, (x, y) in _digits_arrays(val_fraction).items():
        for i, (img, t) in enumerate(zip(x, y, strict=True)):
            d = root / split / str(int(t))
            d.mkdir(parents=True, exist_ok=True)
            _digit_image(img, size, "L").save(d / f"{i:04d}.png")
    return root


def _split_dir(root: Path, split: str) -> Path | None:
    for name in dict.fromkeys((split, {"validation": "val", "val": "validation"}.get(split, split))):
        if (root / name).is_dir():
            return root / name
    return None


def build_dataset(cfg: dict[str, Any], split_key: str, in_chans: int):
    """The dataset for ``cfg[split_key]`` (``train_split`` / ``val_split``); no transform yet."""
    split = cfg[split_key]
    mode = "L" if in_chans == 1 else "RGB"
    if cfg["dataset"] == "digits":
        return DigitsDataset(
            "validation" if split in ("val", "validation") else split,
            cfg["digits_size"],
            mode,
            cfg["digits_val_fraction"],
        )
    return image_folder(cfg["data_dir"], split, mode)


def image_folder(data_dir: str | None, split: str | None, mode: str = "RGB"):
    """A timm ``ImageDataset`` over ``data_dir/split`` (or ``data_dir`` itself if it holds class folders)."""
    from timm.data import create_dataset

    if not data_dir:
        raise DataError("no data folder given: set data_dir (an ImageFolder root) or dataset: digits")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {str(root)!r}")
    folder = _split_dir(root, split) if split else None
    if folder is None:
        folder = root
        if split and not any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"data folder {str(root)!r} has no {split!r} split and no class folders")
    try:
        ds = create_dataset(
            "", root=str(folder), split=split or "validation", search_split=False, input_img_mode=mode
        )
    except Exception as e:  # timm raises RuntimeError/FileNotFoundError for empty or odd trees
        raise DataError(f"cannot read images under {str(folder)!r}: {e}") from None
    if len(ds) == 0:
        raise DataError(f"no images found under {str(folder)!r}")
    return ds


def num_classes_of(ds) -> int:
    if hasattr(ds, "classes"):
        return len(ds.classes)
    reader = getattr(ds, "reader", None)
    if reader is not None and hasattr(reader, "class_to_idx"):
        return len(reader.class_to_idx)
    raise DataError("cannot tell the number of classes of the dataset; set num_classes")


def data_config(model, cfg: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """timm's ``resolve_data_config`` from the model's pretrained cfg, with the recipe's overrides."""
    from timm.data import resolve_data_config

    args = {"in_chans": in_chans}
    for key in ("img_size", "crop_pct", "mean", "std", "interpolation"):
        if cfg.get(key) not in (None, ""):
            args[key] = tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
    dc = resolve_data_config(args, model=model)
    for key in ("mean", "std"):  # a 3-channel pretrained cfg on a 1-channel run: average the channels
        if len(dc[key]) != in_chans:
            dc[key] = tuple([sum(dc[key]) / len(dc[key])] * in_chans)
    return dc


def train_transform(dc: dict[str, Any], cfg: dict[str, Any]):
    from timm.data import create_transform

    return create_transform(
        dc["input_size"],
        is_training=True,
        scale=tuple(cfg["scale"]),
        ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"],
        vflip=cfg["vflip"],
        color_jitter=cfg["color_jitter"],
        auto_augment=cfg["aa"],
        interpolation=cfg["train_interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
        re_count=cfg["recount"],
    )


def eval_transform(dc: dict[str, Any]):
    from timm.data import create_transform

    return create_transform(
        dc["input_size"],
        is_training=False,
        interpolation=dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        crop_pct=dc["crop_pct"],
        crop_mode=dc.get("crop_mode"),
    )


def train_loader(ds, batch_size: int, workers: int, world_size: int, rank: int, seed: int) -> DataLoader:
    """Shuffled by a ``DistributedSampler`` on every run (one replica when single-process), so the same
    seed and epoch give the same global order whatever the number of ranks; ``set_epoch`` reshuffles."""
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator(),
        persistent_workers=False,
        pin_memory=False,
    )


def eval_loader(ds, batch_size: int, workers: int, world_size: int = 1, rank: int = 0) -> DataLoader:
    if world_size > 1:  # each rank scores a disjoint share, no padding, so the summed counts are exact
        ds = Subset(ds, range(rank, len(ds), world_size))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Reshuffle and reseed the worker base seed, so an epoch's data and augmentation do not depend on
    what ran before (exact resume)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 1_000_003 + epoch * 101 + rank)
