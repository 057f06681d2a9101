"""Tiny random-weight diffusers models and inputs, built in code (specs/diffusers.md §8; no downloads).

Head dim 64 and at least 1024 tokens (at the default sizes), so sparse kernels have real tiles.
``tiny_model(name)`` returns ``Model(**kwargs).eval()`` (seeded); ``tiny_inputs(name)`` the forward
kwargs at batch 1. The ``size`` argument scales the token grid down for fast tests where given.
Tiny *pipelines* for ``visattn generate --tiny`` live in ``pipelines/_tiny_pipes.py``.
"""

from __future__ import annotations

import torch

TINY_MODELS = ("unet", "wan", "flux", "sd3", "hunyuanvideo", "cogvideox", "ltx", "dit")


def _kwargs(name: str) -> tuple[type, dict]:
    import diffusers as d

    if name == "unet":
        return d.UNet2DConditionModel, dict(
            block_out_channels=(64, 128),
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(1, 2),
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            sample_size=32,
        )
    if name == "wan":
        return d.WanTransformer3DModel, dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=64,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=256,
            ffn_dim=128,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    if name == "flux":
        return d.FluxTransformer2DModel, dict(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[16, 24, 24],
        )
    if name == "sd3":
        return d.SD3Transformer2DModel, dict(
            sample_size=64,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            caption_projection_dim=128,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=96,
            dual_attention_layers=(),
            qk_norm="rms_norm",
        )
    if name == "hunyuanvideo":
        return d.HunyuanVideoTransformer3DModel, dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=64,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(16, 24, 24),
            image_condition_type=None,
        )
    if name == "cogvideox":
        return d.CogVideoXTransformer3DModel, dict(
            num_attention_heads=2,
            attention_head_dim=64,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=8,
            num_layers=1,
            sample_width=32,
            sample_height=32,
            sample_frames=29,
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )
    if name == "ltx":
        return d.LTXVideoTransformer3DModel, dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=64,
            cross_attention_dim=128,
            num_layers=1,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
        )
    if name == "dit":
        return d.DiTTransformer2DModel, dict(
            in_channels=4,
            out_channels=8,
            activation_fn="gelu-approximate",
            num_attention_heads=2,
            attention_head_dim=64,
            attention_bias=True,
            num_layers=1,
            norm_type="ada_norm_zero",
            num_embeds_ada_norm=8,
            patch_size=2,
            sample_size=32,
        )
    raise ValueError(f"unknown tiny model {name!r}; supported: {list(TINY_MODELS)}")


def tiny_model(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> torch.nn.Module:
    """A tiny random-weight diffusers model (``name`` in :data:`TINY_MODELS`), in eval mode."""
    cls, kw = _kwargs(name)
    kw.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**kw)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def tiny_inputs(
    name: str,
    *,
    batch: int = 1,
    seed: int = 0,
    size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict:
    """Forward kwargs of :func:`tiny_model` ``name`` (spec §8 sizes; ``size`` = the latent side length
    for image models / ``(frames, side)`` scale for video models, smaller for fast tests)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    B = batch
    if name == "unet":
        s = size or 32
        return dict(
            sample=r(B, 4, s, s),
            timestep=torch.tensor([10], device=device),
            encoder_hidden_states=r(B, 8, 32),
            return_dict=False,
        )
    if name == "wan":
        f, s = (8, 32) if size is None else (2, size)
        return dict(
            hidden_states=r(B, 4, f, s, s),
            encoder_hidden_states=r(B, 12, 16),
            timestep=torch.tensor([500] * B, device=device),
            return_dict=False,
        )
    if name == "flux":
        s = size or 32
        rows, cols = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
        return dict(
            hidden_states=r(B, s * s, 4),
            encoder_hidden_states=r(B, 16, 32),
            pooled_projections=r(B, 32),
            img_ids=img_ids,
            txt_ids=torch.zeros(16, 3, device=device, dtype=dtype),
            timestep=torch.tensor([1.0] * B, device=device, dtype=dtype),
            return_dict=False,
        )
    if name == "sd3":
        s = size or 64
        return dict(
            hidden_states=r(B, 4, s, s),
            encoder_hidden_states=r(B, 16, 32),
            pooled_projections=r(B, 64),
            timestep=torch.tensor([10] * B, device=device),
            return_dict=False,
        )
    if name == "hunyuanvideo":
        f, s = (4, 16) if size is None else (2, size)
        mask = torch.tensor([[1] * 8 + [0] * 4] * B, device=device)
        return dict(
            hidden_states=r(B, 4, f, s, s),
            timestep=torch.tensor([10] * B, device=device),
            encoder_hidden_states=r(B, 12, 16),
            pooled_projections=r(B, 8),
            encoder_attention_mask=mask,
            guidance=torch.tensor([1.0] * B, device=device, dtype=dtype),
            return_dict=False,
        )
    if name == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        f, s = (8, 32) if size is None else (2, size)
        p = s // 2
        rope = get_3d_rotary_pos_embed(
            embed_dim=64, crops_coords=((0, 0), (p, p)), grid_size=(p, p), temporal_size=f, use_real=True
        )
        rope = tuple(t.to(device=device, dtype=dtype) for t in rope)
        return dict(
            hidden_states=r(B, f, 4, s, s),
            encoder_hidden_states=r(B, 8, 8),
            timestep=torch.tensor([10] * B, device=device),
            image_rotary_emb=rope,
            return_dict=False,
        )
    if name == "ltx":
        f, s = (8, 16) if size is None else (2, size)
        return dict(
            hidden_states=r(B, f * s * s, 4),
            encoder_hidden_states=r(B, 16, 16),
            timestep=torch.tensor([10] * B, device=device),
            encoder_attention_mask=torch.ones(B, 16, dtype=torch.bool, device=device),
            num_frames=f,
            height=s,
            width=s,
            return_dict=False,
        )
    if name == "dit":
        s = size or 32
        return dict(
            hidden_states=r(B, 4, s, s),
            timestep=torch.tensor([10] * B, device=device),
            class_labels=torch.tensor([1] * B, device=device),
            return_dict=False,
        )
    raise ValueError(f"unknown tiny model {name!r}; supported: {list(TINY_MODELS)}")


__all__ = ["TINY_MODELS", "tiny_model", "tiny_inputs"]
