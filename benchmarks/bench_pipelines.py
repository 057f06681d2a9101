"""One denoiser forward of real diffusion architectures: default processors vs visattn methods.

Builds the architectures in code with random weights (no network, no from_pretrained):

* ``wan``: Wan2.1-T2V-1.3B's ``WanTransformer3DModel`` (30 layers, dim 1536 = 12 heads x 128, FFN
  8960, 16 in/out channels, text dim 4096, patch (1, 2, 2)) at 480p / 81 frames: latent 21x60x104 ->
  21x30x52 = 32760 tokens, 512 text tokens. Methods: ``dense`` and ``neighborhood`` (preset
  ``wan21_480p``, run sparse on every step); any other registered method with ``--methods`` (its
  ``--preset``, else its default config), e.g. ``--methods pyramid --preset wan21_1p3b``.
* ``sd15``: the SD 1.5 ``UNet2DConditionModel`` at 512x512 (64x64 latent, CFG batch 2, 77 text
  tokens). Methods: ``dense`` and ``agent`` (preset ``agentsd_sd15``) when that method is registered.

For each method: median forward time over ``--rep`` runs (CUDA events, no per-call stats), then one
more forward with ``stats=True`` for the attention time (CUDA events around each attention core) and
its share of that forward. Speedups are against diffusers' default processors in the same run.

Usage (H100)::

    python benchmarks/bench_pipelines.py --model wan
    python benchmarks/bench_pipelines.py --model sd15
    python benchmarks/bench_pipelines.py --model wan --layers 2 --rep 3   # quick look

Writes ``benchmarks/results/pipelines_<model>_<gpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def wan_1p3b(layers: int = 30):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _inputs(model_name, device, dtype, frames, height, width, text_len):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    if model_name == "wan":
        lf, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
        return dict(
            hidden_states=r(1, 16, lf, lh, lw),
            encoder_hidden_states=r(1, text_len or 512, 4096),
            timestep=torch.tensor([500], device=device),
            return_dict=False,
        )
    return dict(
        sample=r(2, 4, height // 8, width // 8),
        encoder_hidden_states=r(2, text_len or 77, 768),
        timestep=torch.tensor([500], device=device),
        return_dict=False,
    )


def _time(fn, device, warmup, rep):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            samples.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["wan", "sd15"], default="wan")
    p.add_argument("--methods", help="comma list (default: dense + the model's sparse method)")
    p.add_argument("--preset", help="preset of the sparse method (default per model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--layers", type=int, default=30, help="Wan layers (30 = the real model)")
    p.add_argument("--text-len", type=int, help="text tokens (default: Wan 512, SD 1.5 77)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    import visattn
    import visattn.pipelines as vp
    from visattn.cli._generate_io import versions

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    height = args.height or (480 if args.model == "wan" else 512)
    width = args.width or (832 if args.model == "wan" else 512)
    sparse, preset = ("neighborhood", "wan21_480p") if args.model == "wan" else ("agent", "agentsd_sd15")
    methods = args.methods.split(",") if args.methods else ["dense", sparse]
    available = vp.list_methods()
    skipped = [m for m in methods if m not in available]
    methods = [m for m in methods if m in available]
    if skipped:
        print(f"skipping methods that are not registered: {skipped} (registered: {available})")

    with torch.device(device):
        torch.manual_seed(0)
        model = wan_1p3b(args.layers) if args.model == "wan" else sd15_unet()
    if dtype != torch.float32:
        model = model.to(dtype)
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, mod in model.named_modules():  # as from_pretrained(torch_dtype=...) keeps them
            if any(k in name.split(".") for k in keep):
                mod.float()
    model = model.eval()
    inputs = _inputs(args.model, device, dtype, args.frames, height, width, args.text_len)

    def fwd():
        with torch.no_grad():
            return model(**inputs)

    rows = []
    base_ms = _time(fwd, device, args.warmup, args.rep)
    rows.append({"method": "diffusers default", "forward_ms": base_ms, "speedup": 1.0})
    print(f"diffusers default: {base_ms:.1f} ms / forward")
    for m in methods:
        spec = vp.get_method(m)
        kw = dict(vp.parse_assignment(spec.config_cls, s) for s in args.overrides) if m != "dense" else {}
        pre = None if m == "dense" else (args.preset or (preset if m == sparse else None))
        if "dense_steps" in [f for f in spec.config_cls.field_names()] and m != "dense":
            kw.setdefault("dense_steps", None)  # one bare forward: measure the sparse path
        with vp.apply(model, m, preset=pre, **kw) as h:
            ms = _time(fwd, device, args.warmup, args.rep)
            cfg = h.config
        with vp.apply(model, m, preset=pre, stats=True, **kw) as h:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd()
            st = h.stats()  # synchronises the CUDA events once
            wall = (time.perf_counter() - t0) * 1e3
            layouts = {c: repr(lay) for c, lay in h.context.layouts.items()}
            density = None
            if hasattr(cfg, "density") and h.context.layouts:
                density = cfg.density(next(iter(h.context.layouts.values())).video_grid)
        attn_ms = st["attention_time_s"] * 1e3
        row = {
            "method": m,
            "preset": pre,
            "forward_ms": ms,
            "speedup": base_ms / ms,
            "attention_ms": attn_ms,
            "attention_share": attn_ms / wall if wall else None,
            "calls": st["total_calls"],
            "fallbacks": st["fallbacks"],
            "density": density,
            "config": {k: v for k, v in cfg.to_dict().items()},
            "layouts": layouts,
        }
        rows.append(row)
        print(
            f"{m}: {ms:.1f} ms / forward ({base_ms / ms:.2f}x), attention {attn_ms:.1f} ms "
            f"({row['attention_share']:.1%} of a stats forward), fallbacks {st['fallbacks']}"
        )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    from visattn.bench._harness import gpu_tag

    gpu = gpu_tag(name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pipelines_{args.model}_{gpu}"
    env = {
        **versions(),
        "device": str(device),
        "dtype": args.dtype,
        "model": args.model,
        "frames": args.frames,
        "height": height,
        "width": width,
        "layers": args.layers if args.model == "wan" else None,
        "visattn_backend": visattn.ops._dispatch.current_backend(),
    }
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str) + "\n")
    lines = [
        f"# {args.model} forward, {height}x{width}"
        + (f"x{args.frames}" if args.model == "wan" else "")
        + f", {args.dtype}, {env['gpu'] or 'cpu'}",
        "",
        "| method | preset | forward ms | speedup | attention ms | attention share | density | fallbacks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share, dens = r.get("attention_share"), r.get("density")
        lines.append(
            f"| {r['method']} | {r.get('preset') or ''} | {r['forward_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r.get('attention_ms', float('nan')):.1f} | "
            f"{'' if share is None else f'{share:.1%}'} | "
            f"{'' if dens is None else f'{dens:.3f}'} | {r.get('fallbacks', '')} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
