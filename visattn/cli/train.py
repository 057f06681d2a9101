"""Train an image classifier: any ``timm.create_model`` name (visattn's included) with timm's components.

A recipe (``configs/train/<name>.yaml``) sets the keys; flags override them. Flag and key names are
those of timm's ``train.py`` (``--drop-path``, ``--layer-decay``, ``--model-kwargs``, ``--amp``, ...).
Every run writes OUTPUT/EXPERIMENT/: ``config.yaml``, ``metrics.json``/``metrics.csv`` and
``curves.png`` (updated each epoch), ``last.pth.tar`` (and ``previous.pth.tar``, ``best.pth.tar``; timm
checkpoint format, written atomically) and ``summary.json`` with ``best_top1`` in percent.
``--resume auto`` (or a path) continues exactly: model, optimizer, scheduler, EMA, AMP scaler, sampler
epoch and RNG states are restored, so an interrupted run ends with the same weights as an
uninterrupted one (bit-identical on CPU).

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m visattn train --config ...`` (DDP; the batch
size is per process; ``lr`` scales from ``lr_base``/``lr_base_size`` to the global batch unless set).

Examples:
  visattn train --config configs/train/demo_digits.yaml --output runs
  visattn train --config configs/train/nat_tiny.yaml --data-dir /data/imagenet --amp --amp-dtype bfloat16
  visattn train --config configs/train/demo_digits.yaml --epochs 3 --model-kwargs depth=2 --resume auto
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "train an image classifier from a recipe (timm components, DDP via torchrun)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._config import SPEC

    p.add_argument("--config", "-c", default=None, help="YAML recipe, e.g. configs/train/demo_digits.yaml")
    g = p.add_argument_group("recipe keys (override the config file; see configs/train/*.yaml)")
    for key, (default, kind, text) in SPEC.items():
        flag = "--" + key.replace("_", "-")
        common = dict(dest=key, default=argparse.SUPPRESS, help=f"{text} (default: {default!r})")
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == "floats":
            g.add_argument(flag, type=float, nargs="+", **common)
        elif kind is dict:
            g.add_argument(flag, nargs="*", metavar="KEY=VALUE", **common)
        else:
            g.add_argument(flag, type=kind, **common)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ._checkpoint import CheckpointError
    from ._config import ConfigError
    from ._data import DataError
    from ._models import ModelError

    return (ConfigError, DataError, ModelError, CheckpointError, TypeError, FileExistsError)


def run(args: argparse.Namespace) -> int:
    from ._config import SPEC, load_config, parse_overrides

    errors = _user_errors()
    try:
        overrides = {k: v for k, v in vars(args).items() if k in SPEC}
        if "model_kwargs" in overrides:
            overrides["model_kwargs"] = parse_overrides(overrides["model_kwargs"], flag="--model-kwargs")
        cfg = load_config(args.config, overrides)
        summary = train(cfg)
    except errors as e:
        print(f"visattn train: error: {e}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        print(
            f"visattn train: stopped after {summary['num_updates']} updates (interrupt_after_steps); "
            f"resume with --resume auto",
            file=sys.stderr,
        )
        return 3
    return 0


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32 - 1))
    torch.manual_seed(seed)


def _better(metric: str, new: float, best: float | None) -> bool:
    return best is None or (new < best if metric == "loss" else new > best)


def _gather_rng(d) -> list:
    import torch.distributed as dist

    from ._checkpoint import rng_state

    state = rng_state()
    if not d.enabled:
        return [state]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, state)
    return out


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg`` (from ``load_config``); returns the summary."""
    import torch
    import yaml
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from . import _data
    from ._checkpoint import (
        FORMAT,
        atomic_save,
        check_same_model,
        load_trainer_checkpoint,
        load_weights,
        set_rng_state,
    )
    from ._config import global_batch, resolve_lr
    from ._engine import evaluate, init_distributed, train_one_epoch
    from ._models import check_model_name, create_model
    from ._report import plot_curves, write_metrics, write_summary

    t_start = time.perf_counter()
    check_model_name(cfg["model"])
    d, device = init_distributed(cfg["device"])
    out = Path(cfg["output"]) / (cfg["experiment"] or cfg["model"].replace("/", "_").replace(":", "_"))
    _seed_all(cfg["seed"] + d.rank)
    in_chans = cfg["in_chans"] or 3

    # data first: a missing folder fails before a model is built or a file written
    train_ds = _data.build_dataset(cfg, "train_split", in_chans)
    val_ds = _data.build_dataset(cfg, "val_split", in_chans)
    num_classes = cfg["num_classes"] or _data.num_classes_of(train_ds)

    # the checkpoint to resume is read and checked before anything is written
    ckpt, resume_path = None, None
    if cfg["resume"] == "auto":
        resume_path = out / "last.pth.tar" if (out / "last.pth.tar").exists() else None
    elif cfg["resume"]:
        resume_path = Path(cfg["resume"])
    if resume_path is not None:
        ckpt = load_trainer_checkpoint(resume_path)
        check_same_model(ckpt, cfg, num_classes, in_chans, resume_path)
    elif (out / "last.pth.tar").exists():
        raise FileExistsError(
            f"{str(out)!r} already holds a run (last.pth.tar); continue it with --resume auto "
            "or pick another --experiment / --output"
        )

    overlay = dict(file=cfg["pretrained_path"]) if cfg["pretrained_path"] else None
    if cfg["pretrained_path"] and not Path(cfg["pretrained_path"]).is_file():
        raise _data.DataError(f"pretrained_path not found: {cfg['pretrained_path']!r}")
    # a pretrained_path alone loads; in timm's train.py --pretrained-path without --pretrained is a no-op
    model = create_model(
        cfg["model"],
        model_kwargs=cfg["model_kwargs"],
        pretrained=cfg["pretrained"] or bool(cfg["pretrained_path"]),
        pretrained_cfg_overlay=overlay,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=cfg["drop"],
        drop_path_rate=cfg["drop_path"],
        global_pool=cfg["gp"],
    )
    if cfg["initial_checkpoint"] and ckpt is None:
        load_weights(model, cfg["initial_checkpoint"])
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TypeError(f"{cfg['model']} has no set_grad_checkpointing(); drop grad_checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)

    dc = _data.data_config(model, cfg, in_chans)
    train_ds.transform = _data.train_transform(dc, cfg)
    val_ds.transform = _data.eval_transform(dc)
    train_loader = _data.train_loader(
        train_ds, cfg["batch_size"], cfg["workers"], d.world_size, d.rank, cfg["seed"]
    )
    val_loader = _data.eval_loader(
        val_ds, cfg["validation_batch_size"] or cfg["batch_size"], cfg["workers"], d.world_size, d.rank
    )
    updates_per_epoch = len(train_loader) // cfg["grad_accum_steps"]
    if updates_per_epoch < 1:
        raise _data.DataError(
            f"{len(train_ds)} training images give no full step of global batch "
            f"{global_batch(cfg, d.world_size)}; lower batch_size or grad_accum_steps"
        )

    mixup = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None:
        mixup = Mixup(
            mixup_alpha=cfg["mixup"],
            cutmix_alpha=cfg["cutmix"],
            cutmix_minmax=cfg["cutmix_minmax"],
            prob=cfg["mixup_prob"],
            switch_prob=cfg["mixup_switch_prob"],
            mode=cfg["mixup_mode"],
            label_smoothing=cfg["smoothing"],
            num_classes=num_classes,
        )
        loss_fn = SoftTargetCrossEntropy()
    elif cfg["smoothing"] > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    else:
        loss_fn = torch.nn.CrossEntropyLoss()

    lr = resolve_lr(cfg, d.world_size)
    opt_kw = {}
    if cfg["opt_eps"] is not None:
        opt_kw["eps"] = cfg["opt_eps"]
    if cfg["opt_betas"] is not None:
        opt_kw["betas"] = tuple(cfg["opt_betas"])
    optimizer = create_optimizer_v2(
        model,
        opt=cfg["opt"],
        lr=lr,
        weight_decay=cfg["weight_decay"],
        momentum=cfg["momentum"],
        layer_decay=cfg["layer_decay"],
        **opt_kw,
    )
    scaler = None
    if cfg["amp"] and cfg["amp_dtype"] == "float16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=cfg["sched"],
        num_epochs=cfg["epochs"],
        decay_epochs=cfg["decay_epochs"],
        decay_rate=cfg["decay_rate"],
        cooldown_epochs=cfg["cooldown_epochs"],
        min_lr=cfg["min_lr"],
        warmup_lr=cfg["warmup_lr"],
        warmup_epochs=cfg["warmup_epochs"],
        step_on_epochs=not cfg["sched_on_updates"],
        updates_per_epoch=updates_per_epoch,
    )
    ema = (
        ModelEmaV3(model, decay=cfg["model_ema_decay"], use_warmup=cfg["model_ema_warmup"])
        if cfg["model_ema"]
        else None
    )

    start_epoch, num_updates, history, best, wall_before = 0, 0, [], None, 0.0
    if ckpt is not None:
        meta = ckpt["visattn"]
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        if ema is not None and "state_dict_ema" in ckpt:
            ema.module.load_state_dict(ckpt["state_dict_ema"])
        if scaler is not None and "amp_scaler" in ckpt:
            scaler.load_state_dict(ckpt["amp_scaler"])
        start_epoch, num_updates, history = ckpt["epoch"] + 1, meta["num_updates"], list(meta["history"])
        best, wall_before = meta.get("best"), meta.get("wall_time_s", 0.0)
        rngs = meta["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])

    base = model
    if cfg["torchcompile"]:
        model = torch.compile(model, backend=cfg["torchcompile"])
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(
            f"visattn train: {cfg['model']} on {len(train_ds)}/{len(val_ds)} images, {num_classes} classes, "
            f"input {tuple(dc['input_size'])}, {d.world_size} process(es) on {device.type}, global batch "
            f"{global_batch(cfg, d.world_size)}, lr {lr:.3g}, {num_epochs} epochs -> {out}",
            file=sys.stderr,
        )
    stop = None if cfg["interrupt_after_steps"] is None else num_updates + cfg["interrupt_after_steps"]
    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, num_epochs):
        _data.set_loader_epoch(train_loader, epoch, cfg["seed"], d.rank)
        if mixup is not None and cfg["mixup_off_epoch"] and epoch >= cfg["mixup_off_epoch"]:
            mixup.mixup_enabled = False
        tm, num_updates, interrupted = train_one_epoch(
            model,
            train_loader,
            optimizer,
            loss_fn,
            device=device,
            epoch=epoch,
            num_epochs=num_epochs,
            cfg=cfg,
            d=d,
            mixup=mixup,
            scaler=scaler,
            scheduler=scheduler,
            ema=ema,
            ema_source=base,
            num_updates=num_updates,
            stop_after=stop,
        )
        if interrupted:
            return {"interrupted": True, "num_updates": num_updates, "epoch": epoch}
        ev = evaluate(model.module if d.enabled else model, val_loader, device=device, cfg=cfg, d=d)
        row = {
            "epoch": epoch,
            **tm,
            "top1": ev["top1"],
            "top5": ev["top5"],
            "val_loss": ev["loss"],
            "val_img_per_s": ev["img_per_s"],
        }
        chosen = ev
        if ema is not None:
            ee = evaluate(ema.module, val_loader, device=device, cfg=cfg, d=d)
            row.update(ema_top1=ee["top1"], ema_top5=ee["top5"], ema_val_loss=ee["loss"])
            chosen = ee
        metric = chosen[cfg["eval_metric"]]
        scheduler.step(epoch + 1, metric)
        history.append(row)
        improved = _better(cfg["eval_metric"], metric, None if best is None else best["metric"])
        if improved:
            best = {
                "metric": metric,
                "epoch": epoch,
                "top1": chosen["top1"],
                "top5": chosen["top5"],
                "loss": chosen["loss"],
                "from": "ema" if ema is not None else "model",
            }
        rngs = _gather_rng(d)
        if d.is_main:
            wall = wall_before + time.perf_counter() - t_start
            state = {
                "epoch": epoch,
                "arch": cfg["model"],
                "state_dict": base.state_dict(),
                "optimizer": optimizer.state_dict(),
                "version": 2,
                "args": cfg,
                "metric": metric,
                "visattn": {
                    "format": FORMAT,
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "num_updates": num_updates,
                    "history": history,
                    "best": best,
                    "model_kwargs": cfg["model_kwargs"],
                    "num_classes": num_classes,
                    "in_chans": in_chans,
                    "world_size": d.world_size,
                    "wall_time_s": wall,
                },
            }
            if ema is not None:
                state["state_dict_ema"] = ema.module.state_dict()
            if scaler is not None:
                state["amp_scaler"] = scaler.state_dict()
            atomic_save(state, out / "last.pth.tar", keep_previous=out / "previous.pth.tar")
            if improved:
                atomic_save(state, out / "best.pth.tar")
            write_metrics(out, history)
            plot_curves(out, history)
            summary = {
                "model": cfg["model"],
                "best_top1": best["top1"],
                "best_top5": best["top5"],
                "accuracy_unit": "percent (0-100)",
                "best_epoch": best["epoch"],
                "best_from": best["from"],
                "eval_metric": cfg["eval_metric"],
                "final": row,
                "epochs_done": epoch + 1,
                "num_epochs": num_epochs,
                "num_updates": num_updates,
                "params": sum(p.numel() for p in base.parameters()),
                "world_size": d.world_size,
                "global_batch": global_batch(cfg, d.world_size),
                "lr": lr,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()},
                "wall_time_s": wall,
                "device": str(device),
                "config": cfg,
                "files": {
                    "last": "last.pth.tar",
                    "best": "best.pth.tar",
                    "metrics": "metrics.json",
                    "curves": "curves.png",
                },
            }
            write_summary(out, summary)
            print(
                f"epoch {epoch + 1}/{num_epochs}: loss {tm['train_loss']:.4f}  top1 {ev['top1']:.2f}%"
                + (f"  ema top1 {row['ema_top1']:.2f}%" if ema is not None else "")
                + f"  best {best['top1']:.2f}% (epoch {best['epoch'] + 1})",
                file=sys.stderr,
            )
        if d.enabled:
            import torch.distributed as dist

            dist.barrier()
    if not summary and d.is_main and (out / "summary.json").exists():  # resumed a finished run
        import json

        summary = json.loads((out / "summary.json").read_text())
    return summary
