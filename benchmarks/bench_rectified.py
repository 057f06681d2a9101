"""Rectified SpaAttn benchmark (specs/rectified.md §6): kernel-only, plan-only and end-to-end at the
Wan2.1-1.3B 480p shape (and HunyuanVideo 720p with 256 padded text tokens), against cuDNN SDPA, flash
SDPA, FlexAttention with a cached block mask of the kept blocks and the plain block-sparse core on
the same blocks; plus the error-vs-density table on the synthetic generator (pyramid.md §6) at
N = 16384, rectified against plain block-sparse attention with the same mask.

Usage:
  python benchmarks/bench_rectified.py [--quick] [--out DIR] [--skip-error] [--skip-speed]
  TRITON_INTERPRET=1 python benchmarks/bench_rectified.py --smoke --out /tmp/x   # exercise the script on CPU
Writes DIR/rectified_<device>.json and .md (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from visattn.bench._harness import environment, gpu_tag, time_ms
from visattn.ops import (
    BlockSparsePlan,
    RectifiedConfig,
    SequenceLayout,
    block_sparse_attention,
    rectified_attention,
    rectified_plan,
)
from visattn.ops.rectified import _apply_plan_torch
from visattn.testing import local_qkv

SHAPES = {  # name: (B, H, grid, D, text_len, text_valid)
    "wan21_1p3b_480p": (1, 12, (21, 30, 52), 128, 0, None),
    "hunyuanvideo_720p": (1, 24, (33, 45, 80), 128, 256, 120),
}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dev) -> torch.dtype:
    # the interpreter refuses bf16 dots (wrong results in Triton's interpreter): fp32 for --smoke
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return run


def _flex_runner(plan, q):
    """FlexAttention over the kept blocks of the plan (video + text tiles), block mask built once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, N, H, _ = q.shape
    lay, b = plan.seq_layout, plan.block_size
    kept = plan.to_dense()[0]  # [B, H, tiles, blocks]
    pos = torch.arange(N, device=q.device)
    nv = plan.num_video_blocks
    blk = torch.where(
        (pos >= lay.video_start) & (pos < lay.video_start + lay.num_video),
        (pos - lay.video_start) // b,
        nv + (pos - lay.text_start).clamp(min=0) // b,
    )

    def mask_mod(bi, h, qi, ki):
        return kept[bi, h, blk[qi], blk[ki]]

    bm = create_block_mask(mask_mod, B, H, N, N, device=q.device, BLOCK_SIZE=(b, b))
    fn = torch.compile(flex_attention)
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)


def _gilbert_qkv(grid, H, D, dtype, dev):
    # the generator's "gilbert" order takes the largest axis as major: W here, i.e. (w, h, t) as Rectified
    assert grid[2] >= max(grid[:2]), "bench grids have W largest"
    return local_qkv(grid, heads=H, head_dim=D, order="gilbert", device=dev, dtype=dtype)


def speed(shape: str, quick: bool, drops=(0.75, 0.9), log=print) -> list[dict]:
    B, H, grid, D, L, tv = SHAPES[shape]
    dev = _device()
    q, k, v = _gilbert_qkv(grid, H, D, _dtype(dev), dev)
    if L:  # text after the video: random text tokens, 256 slots of which `tv` valid
        pad = lambda x: torch.cat([x, torch.randn(B, L, H, D, device=dev, dtype=x.dtype)], 1)  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
    lay = SequenceLayout(grid, text_len=L, text_position="end", text_valid_len=tv, token_order="gilbert")
    N = lay.seq_len
    warm, rep = (10, 30) if quick else (25, 100)
    t = lambda fn: time_ms(fn, dev, warmup=warm, rep=rep)  # noqa: E731
    base = {}
    for name in ("cudnn", "flash"):
        f = _sdpa(name)
        try:
            base[name] = t(lambda: f(q, k, v))
        except Exception as e:  # noqa: BLE001  (a backend missing on this build is reported, not fatal)
            log(f"  {name} SDPA unavailable: {e}")
    log(
        f"{shape}: N={N} cuDNN {base.get('cudnn', float('nan')):.3f} ms, flash {base.get('flash', float('nan')):.3f} ms"
    )
    rows = []
    for drop in drops:
        cfg = RectifiedConfig(drop_rate=drop, first_frame="curve_prefix" if not L else None)
        plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg)
        rho = plan.density.mean().item()
        kern = t(lambda: rectified_attention(q, k, v, plan=plan, backend="triton"))
        plan_ms = t(lambda: rectified_plan(q, k, v, seq_layout=lay, config=cfg))
        e2e = t(lambda: rectified_attention(q, k, v, seq_layout=lay, config=cfg, backend="triton"))
        row = dict(
            shape=shape,
            drop_rate=drop,
            density=rho,
            rect_fraction=plan.rect_fraction.mean().item(),
            kernel_ms=kern,
            plan_ms=plan_ms,
            end_to_end_ms=e2e,
            **{f"{b}_ms": m for b, m in base.items()},
        )
        if not L:  # the plain core on the same kept blocks (no epilogue): the price of the fusion
            bsp = BlockSparsePlan.from_mask(plan.kept_visual(), cfg.block_size, cfg.block_size)
            row["plain_block_sparse_ms"] = t(lambda: block_sparse_attention(q, k, v, bsp, backend="triton"))
        try:
            if dev.type != "cuda":
                raise RuntimeError("skipped off CUDA (--smoke)")
            flex = _flex_runner(plan, q)
            row["flex_kept_blocks_ms"] = t(lambda: flex(q, k, v))
        except Exception as e:  # noqa: BLE001
            log(f"  flex unavailable: {e}")
        for b_ in ("cudnn", "flash"):
            if b_ in base:
                row[f"kernel_speedup_vs_{b_}"] = base[b_] / kern
                row[f"e2e_speedup_vs_{b_}"] = base[b_] / e2e
        if "cudnn" in base:
            row["efficiency_vs_cudnn"] = row["kernel_speedup_vs_cudnn"] * rho  # ideal speedup = 1 / rho
        row["plan_fraction_of_kernel"] = plan_ms / kern
        log(
            "  "
            + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items())
        )
        rows.append(row)
    return rows


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def error_table(quick: bool, log=print) -> list[dict]:
    """Relative L2 to dense, rectified vs plain block-sparse with the same kept blocks (Wan path: no
    text, no neighbour table), N = 16384 (16x32x32), H = 4, D = 128, fp32."""
    dev = _device()
    grid = (16, 32, 32) if not quick else (8, 32, 32)
    if dev.type == "cpu":  # --smoke: exercise the script only
        grid = (2, 8, 16)
    q, k, v = _gilbert_qkv(grid, 4, 128, torch.float32, dev)
    lay = SequenceLayout(grid, token_order="gilbert")
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    configs = [
        (f"drop {d} tau 0.3", RectifiedConfig(drop_rate=d, neighbours=False)) for d in (0.75, 0.85, 0.9)
    ]
    configs += [
        (f"drop 0.75 tau {t_}", RectifiedConfig(cum_threshold=t_, neighbours=False)) for t_ in (0.1, 0.2, 0.5)
    ]
    configs += [
        ("parity: drop 0.75 tail upstream", RectifiedConfig(neighbours=False, tail="upstream")),
        ("wan preset rules: neighbours + curve_prefix", RectifiedConfig(first_frame="curve_prefix")),
    ]
    rows = []
    for name, cfg in configs:
        out, plan = rectified_attention(
            q, k, v, seq_layout=lay, config=cfg, backend="triton", return_plan=True
        )
        bsp = BlockSparsePlan.from_mask(plan.kept_visual(), cfg.block_size, cfg.block_size)
        plain = block_sparse_attention(q, k, v, bsp, backend="triton")
        row = dict(
            config=name,
            density=plan.density.mean().item(),
            rect_fraction=plan.rect_fraction.mean().item(),
            rectified_rel_l2=_rel(out, dense),
            plain_rel_l2=_rel(plain, dense),
            rectified_cosine=F.cosine_similarity(out.flatten(), dense.flatten(), dim=0).item(),
        )
        if not rows:  # kernel vs the same plan applied in float64
            row["kernel_vs_plan_f64_rel_l2"] = _rel(
                out.double(), _apply_plan_torch(q.double(), k.double(), v.double(), plan, 128**-0.5, "BNHD")
            )
        row["rectified_beats_plain"] = row["rectified_rel_l2"] <= row["plain_rel_l2"]
        log(
            "  "
            + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items())
        )
        rows.append(row)
    taus = [r for r in rows if r["config"].startswith("drop 0.75 tau") or r["config"] == "drop 0.75 tau 0.3"]
    taus.sort(key=lambda r: float(r["config"].split()[-1]))
    errs = [r["rectified_rel_l2"] for r in taus]
    log(
        f"  error over tau {[r['config'].split()[-1] for r in taus]}: {errs} "
        f"(monotonic: {all(a >= b for a, b in zip(errs, errs[1:], strict=False))})"
    )
    return rows


def _markdown(env, speed_rows, err_rows) -> str:
    out = [
        f"# Rectified SpaAttn benchmark on {env['device_name']} (torch {env['torch']}, triton {env.get('triton')})",
        "",
    ]
    if speed_rows:
        out += [
            "efficiency = (cuDNN time / kernel time) x density (ideal speedup = 1 / density).",
            "",
            "| shape | drop | rho | rectified % | kernel ms | plain core ms | plan ms | e2e ms | cuDNN ms | flash ms | "
            "flex ms | kernel x cuDNN | e2e x cuDNN | efficiency | plan / kernel |",
            "|" + "---|" * 15,
        ]
        for r in speed_rows:
            f = lambda key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
            out.append(
                f"| {r['shape']} | {r['drop_rate']} | {r['density']:.3f} | {100 * r['rect_fraction']:.1f} | "
                f"{f('kernel_ms')} | {f('plain_block_sparse_ms')} | {f('plan_ms')} | {f('end_to_end_ms')} | "
                f"{f('cudnn_ms')} | {f('flash_ms')} | {f('flex_kept_blocks_ms')} | "
                f"{f('kernel_speedup_vs_cudnn')} | {f('e2e_speedup_vs_cudnn')} | {f('efficiency_vs_cudnn')} | "
                f"{f('plan_fraction_of_kernel')} |"
            )
        out.append("")
    if err_rows:
        out += [
            "| config | rho | rectified % | rectified rel L2 | plain rel L2 | rectified <= plain |",
            "|---|---|---|---|---|---|",
        ]
        for r in err_rows:
            out.append(
                f"| {r['config']} | {r['density']:.3f} | {100 * r['rect_fraction']:.1f} | "
                f"{r['rectified_rel_l2']:.4f} | {r['plain_rel_l2']:.4f} | {r['rectified_beats_plain']} |"
            )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, Wan shape only, smaller error grid")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--skip-error", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the script (TRITON_INTERPRET=1)")
    a = p.parse_args(argv)
    if a.smoke:
        SHAPES["wan21_1p3b_480p"] = (1, 2, (2, 8, 16), 32, 0, None)
        a.quick = True
    elif not torch.cuda.is_available():
        print("bench_rectified needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 1
    env = environment(_device())
    speed_rows = []
    if not a.skip_speed:
        for shape in ["wan21_1p3b_480p"] if a.quick else list(SHAPES):
            speed_rows += speed(shape, a.quick, drops=(0.75,) if shape != "wan21_1p3b_480p" else (0.75, 0.9))
    err_rows = [] if a.skip_error else error_table(a.quick)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "rectified_" + gpu_tag(env["device_name"])
    (out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "speed": speed_rows, "error": err_rows}, indent=2)
    )
    (out / f"{stem}.md").write_text(_markdown(env, speed_rows, err_rows))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
