"""Training and evaluation loops shared by ``visattn train`` and ``visattn validate``.

Distributed runs are started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment): NCCL on CUDA, gloo on CPU. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    want = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but torch sees no CUDA device; use device: cpu")
    if want == "cuda":
        device = torch.device("cuda", d.local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def all_reduce_sum(values: list[float], device: torch.device, d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(device: torch.device, enabled: bool, dtype: str):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5,
    )


def train_one_epoch(
    model,
    loader,
    optimizer,
    loss_fn,
    *,
    device,
    epoch: int,
    num_epochs: int,
    cfg: dict[str, Any],
    d: Dist,
    mixup=None,
    scaler=None,
    scheduler=None,
    ema=None,
    ema_source=None,
    num_updates: int = 0,
    stop_after: int | None = None,
) -> tuple[dict[str, float], int, bool]:
    """One epoch of optimizer updates; returns (metrics, num_updates, interrupted)."""
    accum = cfg["grad_accum_steps"]
    updates_per_epoch = len(loader) // accum
    micro_total = updates_per_epoch * accum  # a trailing partial accumulation is dropped
    model.train()
    loss_sum, seen, steps_here = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = _progress(updates_per_epoch, f"epoch {epoch + 1}/{num_epochs}", d.is_main and cfg["progress"])
    optimizer.zero_grad(set_to_none=True)
    interrupted = False
    for i, (x, y) in enumerate(loader):
        if i >= micro_total:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)
        last_micro = (i + 1) % accum == 0
        sync = contextlib.nullcontext() if (last_micro or not d.enabled) else model.no_sync()
        with sync:
            with autocast(device, cfg["amp"], cfg["amp_dtype"]):
                out = model(x)
                loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch}, step {i}; "
                    "lower lr, enable clip_grad or use amp_dtype bfloat16"
                )
            scaled = loss / accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += loss.item() * x.shape[0]
        seen += x.shape[0]
        if not last_micro:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg["clip_grad"] is not None:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(model.parameters(), cfg["clip_grad"], mode=cfg["clip_mode"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        steps_here += 1
        if ema is not None:
            ema.update(ema_source, step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        if d.is_main and (steps_here % max(1, cfg["log_interval"]) == 0 or steps_here == updates_per_epoch):
            rate = seen * d.world_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                img_s=f"{rate:.0f}",
                refresh=False,
            )
        bar.update(1)
        if stop_after is not None and num_updates >= stop_after:
            interrupted = True
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], device, d)
    return (
        {
            "train_loss": total_loss / max(total_seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "train_img_per_s": total_seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        },
        num_updates,
        interrupted,
    )


@torch.no_grad()
def evaluate(
    model, loader, *, device, cfg: dict[str, Any], d: Dist, desc: str = "validate"
) -> dict[str, float]:
    """Top-1/top-5 (percent), mean cross-entropy and images/s over ``loader`` (each rank a disjoint share)."""
    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    correct1 = correct5 = loss_sum = n = 0.0
    t0 = time.perf_counter()
    bar = _progress(len(loader), desc, d.is_main and cfg.get("progress", False))
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.get("amp", False), cfg.get("amp_dtype", "float16")):
            out = model(x)
        out = out.float()
        loss_sum += loss_fn(out, y).item()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += x.shape[0]
        bar.update(1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], device, d)
    n = max(n, 1.0)
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "img_per_s": n / max(elapsed, 1e-9),
        "count": int(n),
    }
