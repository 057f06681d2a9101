"""PSA benchmark (specs/pyramid.md §6): kernel-only, plan-only and end-to-end at the Wan2.1-1.3B 480p
shape (and HunyuanVideo 720p), against cuDNN SDPA, flash SDPA and FlexAttention with a cached block
mask of the kept blocks; plus the error-vs-density table on the synthetic generator at N = 16384.

Usage:
  python benchmarks/bench_pyramid.py [--quick] [--out DIR] [--skip-error] [--skip-speed]
Writes DIR/pyramid_<device>.json and .md (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from visattn.bench._harness import environment, gpu_tag, time_ms
from visattn.ops import PyramidConfig, pyramid_attention, pyramid_attention_ref, pyramid_plan
from visattn.testing import local_qkv


def _order() -> str:
    """Gilbert token order when the shared token-order module is in the tree, else raster."""
    import importlib.util

    return "gilbert" if importlib.util.find_spec("visattn.ops._token_order") is not None else "raster"


SHAPES = {  # name: (B, H, grid, D)
    "wan21_1p3b_480p": (1, 12, (21, 30, 52), 128),
    "hunyuanvideo_720p": (1, 24, (33, 45, 80), 128),
}


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return run


def _flex_runner(plan, q):
    """FlexAttention over the kept blocks (every level as a full block), block mask built once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, N, H, _ = q.shape
    kept = plan.to_dense() > 0  # [B, H, nq, nk]
    bq, bk = plan.block_q, plan.block_k

    def mask_mod(b, h, qi, ki):
        return kept[b, h, qi // bq, ki // bk]

    bm = create_block_mask(mask_mod, B, H, N, N, device=q.device, BLOCK_SIZE=(bq, bk))
    fn = torch.compile(flex_attention)
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def speed(shape: str, presets: list[str], quick: bool, log=print) -> list[dict]:
    B, H, grid, D = SHAPES[shape]
    N = math.prod(grid)
    dev = _device()
    # structured inputs so threshold presets see realistic score distributions
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
    q, k, v = local_qkv(grid, heads=H, head_dim=D, order=_order(), device=dev, dtype=dtype)
    warm, rep = (10, 30) if quick else (25, 100)
    t = lambda fn: time_ms(fn, dev, warmup=warm, rep=rep)  # noqa: E731
    rows = []
    base = {}
    for name in ("cudnn", "flash"):
        f = _sdpa(name)
        try:
            base[name] = t(lambda f=f: f(q, k, v))
        except Exception as e:  # noqa: BLE001  (a backend missing on this build is reported, not fatal)
            log(f"  {name} SDPA unavailable: {e}")
    log(
        f"{shape}: N={N} cuDNN {base.get('cudnn', float('nan')):.3f} ms, flash {base.get('flash', float('nan')):.3f} ms"
    )
    for preset in presets:
        cfg = PyramidConfig.from_preset(preset)
        plan = pyramid_plan(q, k, config=cfg)
        rho = plan.density().mean().item()
        kern = t(lambda plan=plan: pyramid_attention(q, k, v, plan=plan, backend="triton"))
        plan_ms = t(lambda cfg=cfg: pyramid_plan(q, k, config=cfg))
        e2e = t(lambda cfg=cfg: pyramid_attention(q, k, v, config=cfg, backend="triton"))
        row = dict(
            shape=shape,
            preset=preset,
            density=rho,
            exact_density=plan.exact_density().mean().item(),
            kernel_ms=kern,
            plan_ms=plan_ms,
            end_to_end_ms=e2e,
            **{f"{b}_ms": m for b, m in base.items()},
        )
        try:
            flex = _flex_runner(plan, q)
            row["flex_kept_blocks_ms"] = t(lambda flex=flex: flex(q, k, v))
        except Exception as e:  # noqa: BLE001
            log(f"  flex unavailable: {e}")
        if "cudnn" in base:
            row["kernel_speedup_vs_cudnn"] = base["cudnn"] / kern
            row["e2e_speedup_vs_cudnn"] = base["cudnn"] / e2e
            row["efficiency_vs_cudnn"] = row["kernel_speedup_vs_cudnn"] * rho
        if "flash" in base:
            row["kernel_speedup_vs_flash"] = base["flash"] / kern
            row["e2e_speedup_vs_flash"] = base["flash"] / e2e
        row["plan_fraction_of_kernel"] = plan_ms / kern
        log(
            "  "
            + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items())
        )
        rows.append(row)
    return rows


def sweep(presets: list[str], log=print) -> list[dict]:
    """Kernel-only time of the PSA forward under tile configurations (``_configs.OVERRIDES``), Wan shape."""
    from visattn.kernels import _configs

    B, H, grid, D = SHAPES["wan21_1p3b_480p"]
    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    q, k, v = local_qkv(grid, heads=H, head_dim=D, order=_order(), device=dev, dtype=dtype)
    rows = []
    for preset in presets:
        cfg = PyramidConfig.from_preset(preset)
        plan = pyramid_plan(q, k, config=cfg)
        for bn in (64, 128):
            for pool_n in (32, 64):
                for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                    tc = _configs.TileConfig(128, bn, warps, stages, True, True, pool_n)
                    _configs.OVERRIDES["pyramid_fwd"] = tc
                    try:
                        ms = time_ms(lambda plan=plan: pyramid_attention(q, k, v, plan=plan, backend="triton"), dev)
                    except Exception as e:  # noqa: BLE001  (a config that does not fit is reported)
                        ms = float("nan")
                        log(f"  {tc}: {type(e).__name__}: {str(e)[:120]}")
                    finally:
                        _configs.OVERRIDES.pop("pyramid_fwd", None)
                    row = dict(preset=preset, block_n=bn, pool_n=pool_n, num_warps=warps, num_stages=stages, ms=ms)
                    log("  " + ", ".join(f"{k_}={v_}" for k_, v_ in row.items()))
                    rows.append(row)
    return rows


def error_table(quick: bool, log=print) -> list[dict]:
    """Relative L2 / cosine to dense on the synthetic generator, N = 16384 (16x32x32), H = 4, D = 128."""
    dev = _device()
    grid = (16, 32, 32) if not quick else (8, 32, 32)
    if dev.type == "cpu":  # --smoke: exercise the script only
        grid = (2, 8, 16)
    q, k, v = local_qkv(grid, heads=4, head_dim=128, order=_order(), device=dev, dtype=torch.float32)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    rows = []
    configs = []
    for rho in (0.05, 0.1, 0.15, 0.25, 0.4):
        a = rho / 1.5  # quotas a at x1, a/2 at x2, 2a at x8
        configs.append(
            (
                f"multilevel rho={rho}",
                PyramidConfig(
                    block_q=128, block_k=128, align="none", levels={1: a, 2: 1.5 * a, 4: 1.5 * a, 8: 3.5 * a}
                ),
            )
        )
        configs.append(
            (f"binary rho={rho}", PyramidConfig(block_q=128, block_k=128, align="none", levels={1: rho}))
        )
    configs.append(
        (
            "spec bar: multilevel 10/5/0/20 %",
            PyramidConfig(block_q=128, block_k=128, levels={1: 0.10, 2: 0.15, 4: 0.15, 8: 0.35}),
        )
    )
    configs.append(("spec bar: binary 20 %", PyramidConfig(block_q=128, block_k=128, levels={1: 0.20})))
    configs.append(("wan21_14b", PyramidConfig.from_preset("wan21_14b")))
    for name, cfg in configs:
        plan = pyramid_plan(q, k, config=cfg)
        ref = pyramid_attention_ref(q, k, v, plan, upcast=False, chunk_rows=512)
        lo = [t.to(torch.bfloat16 if dev.type == "cuda" else torch.float16) for t in (q, k, v)]
        out = pyramid_attention(*lo, plan=plan, backend="triton").float()
        # the kernel's own error: against the float64 reference on the same bf16-rounded inputs
        ref_lo = pyramid_attention_ref(*lo, plan, upcast=True, chunk_rows=256).float()
        rel = ((ref - dense).norm() / dense.norm()).item()
        cos = F.cosine_similarity(ref.flatten(), dense.flatten(), dim=0).item()
        kerr = ((out - ref_lo).norm() / ref_lo.norm().clamp_min(1e-30)).item()
        row = dict(
            config=name,
            order=_order(),
            density=plan.density().mean().item(),
            rel_l2=rel,
            cosine=cos,
            kernel_vs_ref_rel_l2=kerr,
        )
        log(
            "  "
            + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items())
        )
        rows.append(row)
    return rows


def _markdown(env, speed_rows, err_rows, sweep_rows=()) -> str:
    out = [f"# PSA benchmark on {env['device_name']} (torch {env['torch']}, triton {env.get('triton')})", ""]
    if speed_rows:
        out += [
            "efficiency = (cuDNN time / kernel time) x density (ideal speedup = 1 / density).",
            "",
            "| shape | preset | rho | kernel ms | plan ms | e2e ms | cuDNN ms | flash ms | flex ms | kernel x cuDNN | "
            "e2e x cuDNN | efficiency | plan / kernel |",
            "|" + "---|" * 13,
        ]
        for r in speed_rows:
            f = lambda key, r=r: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
            out.append(
                f"| {r['shape']} | {r['preset']} | {r['density']:.3f} | {f('kernel_ms')} | {f('plan_ms')} | "
                f"{f('end_to_end_ms')} | {f('cudnn_ms')} | {f('flash_ms')} | {f('flex_kept_blocks_ms')} | "
                f"{f('kernel_speedup_vs_cudnn')} | {f('e2e_speedup_vs_cudnn')} | {f('efficiency_vs_cudnn')} | "
                f"{f('plan_fraction_of_kernel')} |"
            )
        out.append("")
    if err_rows:
        out += [
            "| config | rho | rel L2 to dense | cosine | kernel vs reference (rel L2) |",
            "|---|---|---|---|---|",
        ]
        for r in err_rows:
            out.append(
                f"| {r['config']} | {r['density']:.3f} | {r['rel_l2']:.4f} | {r['cosine']:.4f} | "
                f"{r['kernel_vs_ref_rel_l2']:.2e} |"
            )
    if sweep_rows:
        out += ["", "| preset | block_n | pool_n | warps | stages | kernel ms |", "|---|---|---|---|---|---|"]
        out += [f"| {r['preset']} | {r['block_n']} | {r['pool_n']} | {r['num_warps']} | {r['num_stages']} | "
                f"{r['ms']:.3f} |" for r in sweep_rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, Wan shape only, smaller error grid")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--skip-error", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--presets", default="default,wan21_14b,wan21_1p3b_topk")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the script (TRITON_INTERPRET=1)")
    p.add_argument("--sweep", action="store_true", help="also time forward tile configurations (Wan shape)")
    a = p.parse_args(argv)
    if a.smoke:
        SHAPES["wan21_1p3b_480p"] = (1, 2, (2, 8, 16), 32)
        a.quick = True
    elif not torch.cuda.is_available():
        print("bench_pyramid needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 1
    env = environment(_device())
    presets = a.presets.split(",")
    speed_rows = []
    if not a.skip_speed:
        for shape in ["wan21_1p3b_480p"] if a.quick else list(SHAPES):
            speed_rows += speed(shape, presets if shape == "wan21_1p3b_480p" else presets[:2], a.quick)
    err_rows = [] if a.skip_error else error_table(a.quick)
    sweep_rows = sweep(presets) if a.sweep else []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "pyramid_" + gpu_tag(env["device_name"])
    (out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "speed": speed_rows, "error": err_rows, "sweep": sweep_rows}, indent=2)
    )
    (out / f"{stem}.md").write_text(_markdown(env, speed_rows, err_rows, sweep_rows))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
