"""Evaluate a classifier on an ImageFolder split (or the digits set): top-1/top-5 (percent), loss, img/s.

Weights come from ``--checkpoint`` (a ``visattn train`` checkpoint, a timm ``train.py`` checkpoint or a
bare state dict; keys must match) or ``--pretrained-file`` (loaded through the model's pretrained cfg
overlay, so ``checkpoint_filter_fn`` converts original-repository checkpoints and adapts the head).
A trainer checkpoint also supplies its model kwargs, class count, input channels and data settings.

Examples:
  visattn validate --model test_vit --checkpoint runs/demo_digits/best.pth.tar --dataset digits
  visattn validate --model nat_tiny --pretrained-file nat_tiny.pth --data /data/imagenet --amp
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "validate"
HELP = "evaluate a checkpoint: top-1/top-5, loss, images/s"

_DATA_KEYS = ("img_size", "crop_pct", "mean", "std", "interpolation", "digits_size", "digits_val_fraction")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="timm/visattn model name")
    w = p.add_mutually_exclusive_group()
    w.add_argument(
        "--checkpoint", default=None, help="trainer/timm checkpoint or state dict (keys must match)"
    )
    w.add_argument(
        "--pretrained-file", default=None, help="weights converted by the model's checkpoint_filter_fn"
    )
    w.add_argument("--pretrained", action="store_true", help="the model's default pretrained weights")
    p.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--data", "--data-dir", dest="data", default=None, help="ImageFolder root or split folder")
    p.add_argument(
        "--dataset", default="", choices=("", "folder", "digits"), help="digits: scikit-learn's digits"
    )
    p.add_argument(
        "--split", default="validation", help="split folder under --data (default: validation, or val)"
    )
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--batch-size", "-b", type=int, default=128)
    p.add_argument("--workers", "-j", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="autocast (see --amp-dtype)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--results-file", default=None, help="write the result as JSON here")


def validate(args: argparse.Namespace) -> dict:
    import torch

    from . import _data
    from ._checkpoint import load_weights, read_checkpoint
    from ._config import parse_overrides
    from ._engine import Dist, evaluate
    from ._models import check_model_name, create_model

    check_model_name(args.model)
    ckpt, meta, saved = None, {}, {}
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        if isinstance(ckpt, dict) and isinstance(ckpt.get("visattn"), dict):
            meta = ckpt["visattn"]
            saved = ckpt.get("args") or {}
    same_arch = isinstance(ckpt, dict) and ckpt.get("arch") == args.model
    model_kwargs = meta.get("model_kwargs", {}) if same_arch else {}
    if args.model_kwargs is not None:
        model_kwargs = parse_overrides(args.model_kwargs, flag="--model-kwargs")
    in_chans = args.in_chans or meta.get("in_chans") or 3
    cfg = {k: saved.get(k) for k in _DATA_KEYS}
    cfg.update(
        {
            k: v
            for k, v in (
                ("img_size", args.img_size),
                ("crop_pct", args.crop_pct),
                ("interpolation", args.interpolation),
            )
            if v is not None
        }
    )
    cfg["digits_size"] = cfg["digits_size"] or 32
    cfg["digits_val_fraction"] = cfg["digits_val_fraction"] or 0.2
    if args.dataset == "digits":
        ds = _data.DigitsDataset(
            "validation" if args.split in ("val", "validation") else args.split,
            cfg["digits_size"],
            "L" if in_chans == 1 else "RGB",
            cfg["digits_val_fraction"],
        )
    else:
        ds = _data.image_folder(args.data, args.split, "L" if in_chans == 1 else "RGB")
    num_classes = args.num_classes or meta.get("num_classes") or _data.num_classes_of(ds)
    overlay = dict(file=args.pretrained_file) if args.pretrained_file else None
    if args.pretrained_file and not Path(args.pretrained_file).is_file():
        raise _data.DataError(f"pretrained file not found: {args.pretrained_file!r}")
    model = create_model(
        args.model,
        model_kwargs=model_kwargs,
        pretrained=bool(args.pretrained or overlay),
        pretrained_cfg_overlay=overlay,
        num_classes=num_classes,
        in_chans=in_chans,
    )
    info = {}
    if ckpt is not None:
        info = load_weights(model, args.checkpoint, use_ema=args.use_ema, ckpt=ckpt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    dc = _data.data_config(model, cfg, in_chans)
    ds.transform = _data.eval_transform(dc)
    loader = _data.eval_loader(ds, args.batch_size, args.workers)
    ev = evaluate(
        model,
        loader,
        device=device,
        d=Dist(),
        desc=f"validate {args.model}",
        cfg={
            "amp": args.amp,
            "amp_dtype": args.amp_dtype,
            "channels_last": args.channels_last,
            "progress": sys.stderr.isatty(),
        },
    )
    result = {
        "model": args.model,
        "top1": round(ev["top1"], 4),
        "top5": round(ev["top5"], 4),
        "loss": round(ev["loss"], 6),
        "img_per_s": round(ev["img_per_s"], 2),
        "count": ev["count"],
        "accuracy_unit": "percent (0-100)",
        "checkpoint": args.checkpoint or args.pretrained_file,
        "checkpoint_arch": info.get("arch"),
        "checkpoint_epoch": info.get("epoch"),
        "ema": args.use_ema,
        "input_size": list(dc["input_size"]),
        "device": str(device),
    }
    return result


def run(args: argparse.Namespace) -> int:
    from .train import _user_errors

    try:
        result = validate(args)
    except _user_errors() as e:
        print(f"visattn validate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  "
        f"{result['img_per_s']:.1f} img/s on {result['count']} images"
    )
    print(json.dumps(result))
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(result, indent=1) + "\n")
    return 0
