"""Benchmark whole models: inference and training images/s, step time, peak memory, params and FLOPs.

Several models (visattn backbones and timm peers) run in one process on the same inputs, so their
numbers compare directly. Each (model, backend) row: ``infer_img_s`` (no_grad forward), ``train_img_s``
(forward + backward + SGD step), median step times, peak CUDA memory per mode, parameter count, and
FLOPs of one forward at batch 1 counted by ``torch.utils.flop_counter`` (``gflops``; multiply-adds
count 2, so ``gmacs`` = gflops / 2 is the number papers quote as "FLOPs", e.g. fvcore's).
Results go to OUT/benchmark_models.json and OUT/benchmark_models.md.

Timing: ``--warmup`` untimed steps, then ``--iters`` steps each timed with CUDA events (wall clock with
synchronisation on CPU); the median step gives img/s. A model that runs out of memory or fails gets a
row with its error and the others still run.

Examples:
  visattn benchmark-models --models nat_tiny,swin_tiny_patch4_window7_224,convnext_tiny -b 128 --dtype bf16
  visattn benchmark-models --models test_vit,test_convnext --device cpu --batch-size 4 --img-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

NAME = "benchmark-models"
HELP = "benchmark models: train/infer img/s, peak memory, params, FLOPs (JSON + Markdown)"

DEFAULT_MODELS = (
    "nat_tiny,dinat_tiny,biformer_small,agent_swin_tiny,agent_pvt_small,"
    "swin_tiny_patch4_window7_224,convnext_tiny"
)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"comma-separated model names (default: {DEFAULT_MODELS})"
    )
    p.add_argument("--batch-size", "-b", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument(
        "--img-size", type=int, default=None, help="input side (default: 224, or the model's when unset)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--modes", default="infer,train", help="comma-separated from infer, train")
    p.add_argument(
        "--backends",
        default="",
        help="visattn backends to run each model under, e.g. torch,triton "
        "(default: the automatic choice; timm models ignore it)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last inputs and weights")
    p.add_argument(
        "--torchcompile", default=None, metavar="BACKEND", help="torch.compile the model (e.g. inductor)"
    )
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="set_grad_checkpointing() for the train mode"
    )
    p.add_argument(
        "--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="passed to every model"
    )
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per mode (default: 10 CUDA, 2 CPU)"
    )
    p.add_argument("--iters", type=int, default=None, help="timed steps per mode (default: 30 CUDA, 3 CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmark-results", help="output folder (default: ./benchmark-results)")
    p.add_argument("--seed", type=int, default=0)


def _time_steps(step, device, warmup: int, iters: int) -> list[float]:
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def count_flops(model, size: int, in_chans: int, device) -> float | None:
    """FLOPs of one forward at batch 1 (torch.utils.flop_counter; a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, in_chans, size, size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        return float(fc.get_total_flops())
    except Exception:  # an op the counter cannot trace; the row keeps its timings
        return None
    finally:
        model.train(was_training)


def bench_one(name: str, args, device, dtype, backend: str | None, model_kwargs: dict) -> dict:
    import contextlib

    import torch

    import visattn
    from visattn.cli._models import create_model

    row = {"model": name, "backend": backend or "auto", "batch": args.batch_size, "dtype": args.dtype}
    ctx = visattn.use_backend(backend) if backend else contextlib.nullcontext()
    torch.manual_seed(args.seed)
    with ctx:
        kw = dict(model_kwargs)
        if args.img_size is not None:
            kw.setdefault("img_size", args.img_size)
        try:
            model = create_model(name, model_kwargs=kw)
        except TypeError:  # a model without an img_size argument: it adapts to the input size
            kw.pop("img_size", None)
            model = create_model(name, model_kwargs=kw)
        cfg_size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        size = args.img_size or cfg_size[-1]
        in_chans = cfg_size[0]
        row.update(img_size=size, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if not args.no_flops:
            flops = count_flops(model, size, in_chans, device)
            row.update(
                gflops=None if flops is None else flops / 1e9, gmacs=None if flops is None else flops / 2e9
            )
        run_model = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model
        x = torch.randn(args.batch_size, in_chans, size, size, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        for mode in [m for m in args.modes.split(",") if m]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "infer":
                model.eval()

                def step(run_model=run_model, x=x, amp=amp):
                    with torch.no_grad(), amp:
                        run_model(x)
            else:
                model.train()
                if args.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
                    model.set_grad_checkpointing(True)
                opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
                target = torch.randint(0, model.num_classes, (args.batch_size,), device=device)

                def step(run_model=run_model, x=x, amp=amp, opt=opt, target=target):
                    with amp:
                        loss = torch.nn.functional.cross_entropy(run_model(x), target)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            times = _time_steps(step, device, args.warmup, args.iters)
            ms = statistics.median(times)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_img_s"] = args.batch_size * 1e3 / ms
            row[f"{mode}_peak_mem_gib"] = (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt(v, nd=1) -> str:
    return "—" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"# visattn benchmark-models on {env['device_name']} (torch {env['torch']}, timm {env['timm']})",
        "",
    ]
    if env["cpu_timings"]:
        lines += ["**CPU timings**: no CUDA device; not GPU performance.", ""]
    lines += [
        f"batch {env['batch']}, dtype {env['dtype']}, channels_last {env['channels_last']}, "
        f"compile {env['torchcompile']}; median of {env['iters']} steps after {env['warmup']} warm-up steps. "
        "GMACs = FLOPs / 2 (one forward, batch 1; torch.utils.flop_counter).",
        "",
        "| model | backend | img | params (M) | GMACs | infer img/s | infer ms | infer peak GiB "
        "| train img/s | train ms | train peak GiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["backend"],
                    _fmt(r.get("img_size")),
                    _fmt(r.get("params_m"), 2),
                    _fmt(r.get("gmacs"), 2),
                    _fmt(r.get("infer_img_s")),
                    _fmt(r.get("infer_ms"), 2),
                    _fmt(r.get("infer_peak_mem_gib"), 2),
                    _fmt(r.get("train_img_s")),
                    _fmt(r.get("train_ms"), 2),
                    _fmt(r.get("train_peak_mem_gib"), 2),
                    r.get("error", ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import platform

    import timm
    import torch

    from ._config import ConfigError, parse_overrides
    from ._models import ModelError, check_model_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or (128 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 3)
    dtype = getattr(torch, _DTYPES[args.dtype])
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m for m in args.modes.split(",") if m]
    try:
        if not models:
            raise ModelError("no models given: --models NAME[,NAME...]")
        if any(m not in ("infer", "train") for m in modes) or not modes:
            raise ModelError(f"expected --modes from infer, train, got {args.modes!r}")
        if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
            raise ModelError("expected --batch-size >= 1, --iters >= 1 and --warmup >= 0")
        for m in models:  # every name is checked before anything runs
            check_model_name(m)
        model_kwargs = parse_overrides(args.model_kwargs, "--model-kwargs") if args.model_kwargs else {}
    except (ModelError, ConfigError) as e:
        print(f"visattn benchmark-models: error: {e}", file=sys.stderr)
        return 2
    backends = [b for b in args.backends.split(",") if b] or [None]
    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpu_timings": not cuda,
        "batch": args.batch_size,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "torchcompile": args.torchcompile,
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
    }
    if not cuda:
        print("visattn benchmark-models: no CUDA device; these are CPU timings.", file=sys.stderr)
    rows = []
    for name in models:
        for backend in backends:
            try:
                row = bench_one(name, args, device, dtype, backend, model_kwargs)
            except torch.cuda.OutOfMemoryError:
                row = {"model": name, "backend": backend or "auto", "error": "out of memory"}
            except Exception as e:  # a row per failure; the other models still run
                row = {"model": name, "backend": backend or "auto", "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            print(
                f"{name} [{row['backend']}]: "
                + ", ".join(
                    f"{k}={_fmt(v, 2)}"
                    for k, v in row.items()
                    if k.endswith(("img_s", "gib", "gmacs")) or k == "error"
                ),
                file=sys.stderr,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_models.json").write_text(
        json.dumps({"environment": env, "rows": rows}, indent=1) + "\n"
    )
    md = markdown(rows, env)
    (out / "benchmark_models.md").write_text(md)
    print(md)
    return 1 if any("error" in r for r in rows) else 0
