"""AgentSD: UNet step time of SD 1.5 / SDXL with the AgentSD processors vs the default SDPA processors.

Random-weight UNets built from the published configs (step time does not depend on the weights, so
nothing is downloaded), CFG batch 2, fp16 on CUDA. Per UNet call (one denoising step) it times:

* ``default``: diffusers' ``AttnProcessor2_0`` everywhere;
* ``agentsd phase 1``: sx = sy = 4, ratio 0.4, agent_ratio 0.95 (steps 0-19 of ``agentsd_sd15``);
  ``phase 1 fp32``: the same with ``precision="fp32"`` (``agentsd_sd2``);
* ``agentsd phase 2``: sx = sy = 2, ratio 0.4, agent_ratio 0.5 (steps 20-49: ToMe only);
* ``tome only``: ToMeSD's defaults (ratio 0.5, sx = sy = 2, no agents);

and estimates 50-step UNet time as ``20·phase1 + 30·phase2`` against ``50·default`` (text encoder and
VAE excluded). Upstream's 1.84x (agent.md §1) was measured against einsum attention with the whole
pipeline; against SDPA a smaller ratio is expected and must be reported as measured.

Usage: ``PYTHONPATH=. python benchmarks/bench_agentsd.py --out OUT [--models sd15 sdxl]`` writes
``OUT/bench_agentsd.json`` and ``.md``. ``--quick`` runs the tiny UNet on CPU (smoke test only).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import visattn.pipelines as vp
from visattn.bench._harness import time_ms
from visattn.pipelines.agent import AgentSDConfig

CONFIGS = {
    "agentsd phase 1": dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95),
    "agentsd phase 1 fp32": dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, precision="fp32"),
    "agentsd phase 2": dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5),
    "tome only": dict(sx=2, sy=2, ratio=0.5, agent_ratio=0.0),
}


def build(name: str, device, dtype):
    from diffusers import UNet2DConditionModel

    from visattn.pipelines.tiny import tiny_inputs, tiny_model

    B = 2  # classifier-free guidance batch
    if name == "tiny":
        return (
            tiny_model("unet").to(device, dtype),
            tiny_inputs("unet", batch=B, device=device, dtype=dtype),
            1,
        )
    if name == "sd15":  # runwayml/stable-diffusion-v1-5 unet/config.json
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        inputs = dict(encoder_hidden_states=torch.randn(B, 77, 768))
        side, max_ds = 64, 1
    elif name == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        inputs = dict(
            encoder_hidden_states=torch.randn(B, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.randn(B, 1280), "time_ids": torch.randn(B, 6)},
        )
        side, max_ds = 128, 2
    else:
        raise ValueError(f"unknown model {name!r}; choose sd15, sdxl or tiny")
    unet = unet.to(device, dtype).eval()
    inputs = {
        k: (
            v.to(device, dtype)
            if isinstance(v, torch.Tensor)
            else {kk: vv.to(device, dtype) for kk, vv in v.items()}
        )
        for k, v in inputs.items()
    }
    inputs.update(
        sample=torch.randn(B, 4, side, side, device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device),
        return_dict=False,
    )
    return unet, inputs, max_ds


def bench(name: str, device, dtype, rep: int) -> list[dict]:
    unet, inputs, max_ds = build(name, device, dtype)

    def step():
        with torch.no_grad():
            unet(**inputs)

    rows = [dict(model=name, case="default", ms=time_ms(step, device, rep=rep))]
    for case, fields in CONFIGS.items():
        with vp.apply(unet, "agent", AgentSDConfig(max_downsample=max_ds, **fields), stats=True) as h:
            ms = time_ms(step, device, rep=rep)
            calls = dict(h.stats()["calls"])
            fallbacks = h.stats()["fallbacks"]
        rows.append(dict(model=name, case=case, ms=ms, calls=calls, fallbacks=fallbacks))
    t = {r["case"]: r["ms"] for r in rows}
    est = 20 * t["agentsd phase 1"] + 30 * t["agentsd phase 2"]
    rows.append(
        dict(
            model=name,
            case="50 steps: agentsd_sd15 schedule",
            ms=est,
            speedup_vs_default=50 * t["default"] / est,
            speedup_vs_tome=50 * t["tome only"] / est,
        )
    )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--quick", action="store_true", help="tiny UNet on CPU, fp32 (smoke test)")
    ap.add_argument("--rep", type=int, default=200, help="ms of timing per case on CUDA")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = ["tiny"] if args.quick else args.models
    rows = []
    for m in models:
        rows += bench(m, device, dtype, 1 if args.quick else args.rep)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous UNet is gone with bench()'s frame
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_agentsd.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=2))
    lines = [
        f"# AgentSD UNet step time on {env['device_name']} ({dtype}, CFG batch 2, torch {env['torch']})",
        "",
        "| model | case | ms per UNet call | speedup vs default / tome (50 steps) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        sp = (
            f"{r['speedup_vs_default']:.2f}x / {r['speedup_vs_tome']:.2f}x"
            if "speedup_vs_default" in r
            else ""
        )
        lines.append(f"| {r['model']} | {r['case']} | {r['ms']:.2f} | {sp} |")
    (out / "bench_agentsd.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
