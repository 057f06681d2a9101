"""Generate images or videos with a visattn attention method installed in a diffusers pipeline.

  visattn generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method neighborhood --preset wan21_480p \\
      --prompt "a corgi surfing" --frames 81 --height 480 --width 832 --steps 50 --out runs/corgi
  visattn generate --model ./saved_pipeline --method dense --out runs/base     # a local directory
  visattn generate --tiny wan --method neighborhood --steps 2 --out runs/tiny  # offline, built in code

Writes the output (PNG images; videos as MP4 when imageio-ffmpeg or OpenCV is installed, else a GIF,
saying why) and report.json (versions, resolved config, layouts, wall times, attention time and its
share, calls, fallbacks with reasons, density, peak memory). --compare-default reruns with the
pipeline's own processors (visattn not applied) and the same seed and adds the speedup over that
unmodified run and the PSNR, relative L2 and cosine against it; --compare-dense does the same against
visattn's dense method, which times attention like every method, so it adds the attention-time speedup.
Warm-up generations (--warmup) are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

NAME = "generate"
HELP = (
    "generate with a visattn attention method in a diffusers pipeline "
    "(report.json, --compare-default, --compare-dense)"
)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local directory with model_index.json")
    src.add_argument(
        "--tiny", choices=["dit", "wan", "flux", "unet"], help="tiny random-weight pipeline (offline)"
    )
    p.add_argument("--method", default="dense", help="attention method slug (dense, neighborhood, ...)")
    p.add_argument("--preset", help="preset in configs/pipelines/<method>/ (or a YAML path)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config field override, typed against the method config (repeatable)",
    )
    p.add_argument("--revision")
    p.add_argument("--offline", action="store_true", help="no network (also HF_HUB_OFFLINE=1)")
    p.add_argument(
        "--dtype", choices=["auto", *_DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--prompt", default="a corgi surfing a wave at sunset")
    p.add_argument("--negative-prompt")
    p.add_argument(
        "--class-label", type=int, default=207, help="class id for class-conditional pipelines (DiT)"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/generate", help="output folder")
    p.add_argument(
        "--format",
        choices=["auto", "png", "mp4", "gif", "npy"],
        default="auto",
        help="auto: PNG for images; for videos MP4 when a writer is installed (imageio-ffmpeg or "
        "opencv-python), else GIF, printing why. png: images or PNG frames; mp4 (fails early without "
        "a writer) and gif: videos; npy: the float array in [0, 1]",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed warm-up generations (default 0; 1 with --compile, so compiling is not timed)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the repeated blocks (wall times only)"
    )
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="rerun with visattn's dense processors (the models' math, timed like every method) and the "
        "same seed: speedup (wall), denoise_speedup, attention_speedup, PSNR / relative L2 / cosine",
    )
    p.add_argument(
        "--compare-default",
        action="store_true",
        help="rerun with the pipeline's own default processors (no visattn processor installed) and the "
        "same seed: the speedup over an unmodified run (wall time of the generation and of the "
        "denoising loop; attention time is not measured there), PSNR / relative L2 / cosine. For "
        "timings add --warmup 1, so every run is warm",
    )
    p.add_argument("--no-progress", action="store_true")


def _resolve(args):
    import torch

    from visattn.pipelines import get_method, parse_assignment

    spec = get_method(args.method)
    overrides = dict(parse_assignment(spec.config_cls, s) for s in args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return spec, overrides, device, getattr(torch, _DTYPES[name])


def _compile(pipe) -> None:
    import torch

    for comp in ("transformer", "transformer_2", "unet"):
        m = getattr(pipe, comp, None)
        if m is None:
            continue
        if getattr(m, "_repeated_blocks", None):
            m.compile_repeated_blocks(fullgraph=True)
        else:
            m.compile()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


DEFAULT = "default"  # the record name of a run with the pipeline's own processors (--compare-default)


def _one_method(pipe, method, args, device, *, preset, overrides, progress, stats):
    """Apply ``method``, warm up, run one timed generation; returns ``(array, video, record)``.

    ``method=None`` applies nothing: the pipeline's own (diffusers default) processors, which time no
    attention, so the record has wall times only.
    """
    import torch

    from visattn.pipelines import apply

    from ._generate_io import StepClock, run_pipeline

    handle, apply_s = None, None
    if method is not None:
        t0 = time.perf_counter()
        handle = apply(pipe, method, preset=preset, stats=stats, **overrides)
        apply_s = time.perf_counter() - t0
    try:
        clock = StepClock(handle)
        if args.compile:
            _compile(pipe)
        warmup_s = []  # the first includes Triton JIT / autotune: reported apart from the timed run
        for _ in range(args.warmup):
            if handle is not None:
                handle.reset()
            _, times, _ = run_pipeline(pipe, args, args.steps, device, clock, progress=False)
            warmup_s.append(times["generate_s"])
        if handle is not None:
            handle.reset()
            handle.context.stats.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        arr, times, video = run_pipeline(pipe, args, args.steps, device, clock, progress)
        record = {"method": method or DEFAULT, "apply_s": apply_s, "warmup_s": warmup_s, **times}
        if handle is not None:
            record.update(_handle_record(handle, times, stats))
        record["peak_memory_gb"] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        )
        return arr, video, record
    finally:
        if handle is not None:
            handle.remove()


def _handle_record(handle, times, stats: bool) -> dict:
    """What the handle knows after a run: config, layouts, attention time and share, calls, fallbacks."""
    st = handle.stats()
    denom = times["denoise_s"] or times["generate_s"]
    cfg = handle.config
    density = None
    if hasattr(cfg, "density") and handle.context.layouts:
        lay = next(iter(handle.context.layouts.values()))
        density = cfg.density(lay.video_grid)
    return {
        "config": dataclasses.asdict(cfg),
        "layouts": {c: repr(lay) for c, lay in handle.context.layouts.items()},
        "attention_time_s": st["attention_time_s"] if stats else None,
        "attention_share": (st["attention_time_s"] / denom) if stats and denom else None,
        "calls": st["calls"],
        "total_calls": st["total_calls"],
        "dense_by_schedule": st["dense_by_schedule"],
        "fallbacks": st["fallbacks"],
        "density": density,
        "step_source": handle.context.step_source,
    }


def _speedups(rec: dict, base: dict) -> dict[str, float]:
    """Wall-time speedups of ``rec`` over the baseline ``base`` (and attention time where both have it)."""
    out = {"speedup": base["generate_s"] / rec["generate_s"]}
    if rec["denoise_s"] and base["denoise_s"]:
        out["denoise_speedup"] = base["denoise_s"] / rec["denoise_s"]
    if rec.get("attention_time_s") and base.get("attention_time_s"):
        out["attention_speedup"] = base["attention_time_s"] / rec["attention_time_s"]
    return out


def _counted(counts: dict[str, int]) -> str:
    """``"8 (PyramidWanAttnProcessor: 8)"``: the total, then each name or reason with its count."""
    total = sum(counts.values())
    return f"{total} ({', '.join(f'{k}: {v}' for k, v in counts.items())})" if counts else str(total)


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import os

    from ._generate_io import (
        compare,
        load_pipeline,
        mp4_unavailable_reason,
        save_output,
        versions,
        write_report,
    )

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    t_start = time.perf_counter()
    spec, overrides, device, dtype = _resolve(args)  # bad method / --set fail before loading anything
    if args.format == "mp4" and (reason := mp4_unavailable_reason()) is not None:
        raise ImportError(f"--format mp4 cannot write videos: {reason} (or use --format gif)")
    if args.warmup is None:
        args.warmup = 1 if args.compile else 0
    if args.tiny and args.height is None:
        args.height = args.width = 64 if args.width is None else args.width
    out = Path(args.out)
    t0 = time.perf_counter()
    pipe = load_pipeline(args, dtype, device)
    load_s = time.perf_counter() - t0
    progress = not args.no_progress
    stats = not args.compile  # per-call events distort compiled graphs: wall times only
    arr, video, rec = _one_method(
        pipe, spec.slug, args, device, preset=args.preset, overrides=overrides, progress=progress, stats=stats
    )
    stem = f"{spec.slug}_seed{args.seed}"
    rec["files"], rec["output_note"] = save_output(arr, out, stem, video, args.format)
    if rec["output_note"]:
        print(f"visattn generate: {rec['output_note']}", file=sys.stderr)
    report = {
        "versions": versions(),
        "source": args.model or f"tiny:{args.tiny}",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "steps": args.steps,
        "seed": args.seed,
        "load_s": load_s,
        **rec,
    }
    baselines = []  # (report key, method to apply: None = the pipeline's own processors)
    if args.compare_dense and spec.slug != "dense":
        baselines.append(("dense", "dense"))
    if args.compare_default:
        baselines.append((DEFAULT, None))
    for name, method in baselines:
        barr, _, brec = _one_method(
            pipe, method, args, device, preset=None, overrides={}, progress=progress, stats=stats
        )
        bstem = f"{name}_seed{args.seed}"
        brec["files"], brec["output_note"] = save_output(barr, out, bstem, video, args.format)
        report[name] = brec
        report[f"compare_{name}"] = {**_speedups(rec, brec), **compare(arr, barr)}
    report["total_s"] = time.perf_counter() - t_start
    path = write_report(out, report)
    rows = [
        ("method", spec.slug),
        ("source", report["source"]),
        ("device", report["device"]),
        ("generate_s", rec["generate_s"]),
        ("denoise_s", rec["denoise_s"]),
        ("attention_time_s", rec["attention_time_s"]),
        ("attention_share", rec["attention_share"]),
        ("calls", _counted(rec["calls"])),
        ("fallbacks", _counted(rec["fallbacks"])),
        ("density", rec["density"]),
        ("output", ", ".join(rec["files"][:2]) + (" ..." if len(rec["files"]) > 2 else "")),
    ]
    for name, _ in baselines:
        rows += [(f"{k} vs {name}", v) for k, v in report[f"compare_{name}"].items()]
    rows.append(("report", str(path)))
    print(_table(rows))
    return 0
