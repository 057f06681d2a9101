"""Tiny offline pipelines for ``visattn generate --tiny`` and the step-tracking tests (spec §10).

* ``dit``: a real ``DiTPipeline`` (no mixin, batched CFG, no callback, DDIM without ``step_index``).
* ``wan``: a bare loop like ``WanPipeline`` (separate cond/uncond calls, ``FlowMatchEuler``), decoded
  by a tiny ``AutoencoderKLWan`` after de-normalising.
* ``flux``: a bare loop with 2x2-packed latents, ``img_ids`` rows/cols and zero ``txt_ids``.
* ``unet``: a bare SD-style loop (``UNet2DConditionModel``, DDIM, batched CFG) with a tiny VAE.

Each object has ``transformer`` or ``unet`` and ``scheduler`` attributes (so ``apply`` finds them)
and ``generate(steps, guidance, seed, height, width, frames, progress) -> np.ndarray`` in
``[0, 1]``, shaped ``[N, H, W, 3]`` (images) or ``[F, H, W, 3]`` (video frames).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .tiny import tiny_model

TINY_PIPELINES = ("dit", "wan", "flux", "unet")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _place(module: torch.nn.Module, device, dtype=None) -> torch.nn.Module:
    # casting logs a diffusers warning even when nothing changes: only move what needs moving
    if torch.device(device).type != "cpu":
        module = module.to(device)
    if dtype is not None and dtype != torch.float32:
        module = module.to(dtype)
    return module


def _to_np(images: torch.Tensor) -> np.ndarray:
    # [N, 3, H, W] in [-1, 1] -> [N, H, W, 3] in [0, 1]
    return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


class TinyDiT:
    """``DiTPipeline`` with random weights (``sample_size`` latent side; the VAE keeps the size)."""

    kind = "image"

    def __init__(self, sample_size: int = 16, dtype=torch.float32, device="cpu") -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

        def build():
            tr = DiTTransformer2DModel(
                sample_size=sample_size,
                num_layers=2,
                patch_size=2,
                attention_head_dim=64,
                num_attention_heads=2,
                in_channels=4,
                out_channels=8,
                attention_bias=True,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
            )
            return DiTPipeline(transformer=tr, vae=AutoencoderKL(), scheduler=DDIMScheduler())

        self.pipe = _seeded(0, build)
        if torch.device(device).type != "cpu" or dtype != torch.float32:
            self.pipe = self.pipe.to(device=device, dtype=dtype)
        self.transformer, self.scheduler = self.pipe.transformer, self.pipe.scheduler

    def generate(
        self,
        steps=2,
        guidance=4.0,
        seed=0,
        height=None,
        width=None,
        frames=None,
        progress=True,
        class_label=1,
        callback=None,
    ):
        self.pipe.set_progress_bar_config(desc="dit", disable=not progress)
        g = torch.Generator(device="cpu").manual_seed(seed)
        out = self.pipe(
            class_labels=[class_label],
            guidance_scale=guidance,
            generator=g,
            num_inference_steps=steps,
            output_type="np",
        )
        return np.asarray(out.images)


class _Loop:
    """Shared pieces of the bare loops."""

    def _steps(self, steps, progress, desc):
        self.scheduler.set_timesteps(steps, device=self.device)
        return tqdm(self.scheduler.timesteps, desc=desc, disable=not progress)


class TinyWan(_Loop):
    """Bare Wan T2V loop: cond and uncond called separately, as ``WanPipeline`` does."""

    kind = "video"

    def __init__(self, dtype=torch.float32, device="cpu", pass_step_index: bool = False) -> None:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

        self.device, self.dtype, self.pass_step_index = torch.device(device), dtype, pass_step_index
        self.transformer = _place(
            tiny_model("wan", in_channels=16, out_channels=16, text_dim=32), device, dtype
        )
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
        self.vae = _place(
            _seeded(
                1,
                lambda: AutoencoderKLWan(
                    base_dim=3,
                    z_dim=16,
                    dim_mult=[1, 1, 1, 1],
                    num_res_blocks=1,
                    temperal_downsample=[False, True, True],
                ),
            ),
            device,
        ).eval()
        g = torch.Generator().manual_seed(2)
        self.cond = torch.randn(1, 12, 32, generator=g).to(device, dtype)
        self.uncond = torch.randn(1, 12, 32, generator=g).to(device, dtype)

    @torch.no_grad()
    def generate(
        self, steps=2, guidance=5.0, seed=0, height=64, width=64, frames=5, progress=True, callback=None, **_
    ):
        height, width, frames = height or 64, width or 64, frames or 5
        lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 16, lat_f, lat_h, lat_w, generator=g).to(self.device, torch.float32)
        for i, t in enumerate(self._steps(steps, progress, "wan")):
            x = latents.to(self.dtype)
            ts = t.expand(1).to(self.device)
            kw = dict(step_index=i, num_inference_steps=steps) if self.pass_step_index else {}
            with self.transformer.cache_context("cond", **kw):
                cond = self.transformer(
                    hidden_states=x, timestep=ts, encoder_hidden_states=self.cond, return_dict=False
                )[0]
            noise = cond
            if guidance > 1:
                with self.transformer.cache_context("uncond", **kw):
                    unc = self.transformer(
                        hidden_states=x, timestep=ts, encoder_hidden_states=self.uncond, return_dict=False
                    )[0]
                noise = unc + guidance * (cond - unc)
            latents = self.scheduler.step(noise.float(), t, latents, return_dict=False)[0]
            if callback is not None:
                callback(self, i, t, {})
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = self.vae.decode(latents * std + mean, return_dict=False)[0]  # [1, 3, F, H, W]
        return _to_np(video[0].transpose(0, 1))


class TinyFlux(_Loop):
    """Bare Flux loop over 2x2-packed latents (``in_channels=16`` = 4 latent channels x 2 x 2)."""

    kind = "image"

    def __init__(self, dtype=torch.float32, device="cpu") -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        self.device, self.dtype = torch.device(device), dtype
        self.transformer = _place(tiny_model("flux", in_channels=16), device, dtype)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.vae = _place(
            _seeded(
                1,
                lambda: AutoencoderKL(
                    latent_channels=4,
                    block_out_channels=(32, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2,
                ),
            ),
            device,
        ).eval()
        g = torch.Generator().manual_seed(2)
        self.text = torch.randn(1, 16, 32, generator=g).to(device, dtype)
        self.pooled = torch.randn(1, 32, generator=g).to(device, dtype)

    @torch.no_grad()
    def generate(
        self,
        steps=2,
        guidance=3.5,
        seed=0,
        height=64,
        width=64,
        frames=None,
        progress=True,
        callback=None,
        **_,
    ):
        height, width = height or 64, width or 64
        lh, lw = height // 2, width // 2  # the tiny VAE downsamples by 2
        ph, pw = lh // 2, lw // 2  # 2x2 packing
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 4, lh, lw, generator=g).to(self.device)
        packed = latents.view(1, 4, ph, 2, pw, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, ph * pw, 16)
        rows, cols = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
        img_ids = (
            torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(self.device, self.dtype)
        )
        txt_ids = torch.zeros(self.text.shape[1], 3, device=self.device, dtype=self.dtype)
        for i, t in enumerate(self._steps(steps, progress, "flux")):
            ts = (t / 1000).expand(1).to(self.device, self.dtype)
            noise = self.transformer(
                hidden_states=packed.to(self.dtype),
                encoder_hidden_states=self.text,
                pooled_projections=self.pooled,
                timestep=ts,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
            packed = self.scheduler.step(noise.float(), t, packed, return_dict=False)[0]
            if callback is not None:
                callback(self, i, t, {})
        latents = packed.view(1, ph, pw, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, lh, lw)
        return _to_np(self.vae.decode(latents, return_dict=False)[0])


class TinyUNet(_Loop):
    """Bare SD-style loop: tiny ``UNet2DConditionModel``, DDIM, batched CFG, tiny ``AutoencoderKL``."""

    kind = "image"

    def __init__(self, dtype=torch.float32, device="cpu") -> None:
        from diffusers import AutoencoderKL, DDIMScheduler

        self.device, self.dtype = torch.device(device), dtype
        self.unet = _place(tiny_model("unet"), device, dtype)
        self.scheduler = DDIMScheduler()
        self.vae = _place(
            _seeded(
                1,
                lambda: AutoencoderKL(
                    latent_channels=4,
                    block_out_channels=(32, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2,
                ),
            ),
            device,
        ).eval()
        g = torch.Generator().manual_seed(2)
        self.text = torch.randn(2, 8, 32, generator=g).to(device, dtype)  # [uncond, cond]

    @torch.no_grad()
    def generate(
        self,
        steps=2,
        guidance=7.5,
        seed=0,
        height=64,
        width=64,
        frames=None,
        progress=True,
        callback=None,
        **_,
    ):
        height, width = height or 64, width or 64
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 4, height // 2, width // 2, generator=g).to(self.device)
        for i, t in enumerate(self._steps(steps, progress, "unet")):
            x = torch.cat([latents] * 2).to(self.dtype)
            noise = self.unet(x, t.to(self.device), encoder_hidden_states=self.text, return_dict=False)[
                0
            ].float()
            unc, cond = noise.chunk(2)
            latents = self.scheduler.step(unc + guidance * (cond - unc), t, latents, return_dict=False)[0]
            if callback is not None:
                callback(self, i, t, {})
        return _to_np(self.vae.decode(latents, return_dict=False)[0])


def tiny_pipeline(name: str, *, dtype=torch.float32, device="cpu", **kw):
    """The tiny offline pipeline ``name`` (one of :data:`TINY_PIPELINES`)."""
    builders = {"dit": TinyDiT, "wan": TinyWan, "flux": TinyFlux, "unet": TinyUNet}
    if name not in builders:
        raise ValueError(f"unknown tiny pipeline {name!r}; supported: {list(TINY_PIPELINES)}")
    return builders[name](dtype=dtype, device=device, **kw)


__all__ = ["TINY_PIPELINES", "tiny_pipeline", "TinyDiT", "TinyWan", "TinyFlux", "TinyUNet"]
