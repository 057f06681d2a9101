"""GPU tests of the neighborhood processors: the Triton op vs the torch reference inside real models.

Run with ``pytest -m cuda tests/pipelines/test_neighborhood_cuda.py`` on a CUDA machine. Pass rule
(DESIGN §5): the error of the processor on the ``"triton"`` backend in dtype X is at most 2x the error
of the same processor on the ``"torch"`` backend in dtype X, both against the ``"torch"`` backend in
fp32 (IEEE matmuls), with floors fp32 1e-4, fp16 1e-2, bf16 2e-2. Models: the tiny Flux, Wan and
HunyuanVideo (head dim 64) at larger grids, and one attention module per family at the real head
dim 128 (Wan2.1-1.3B's 12 heads; 8 heads for Flux / HunyuanVideo) on slices of the real grids.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")  # the diffusers extra; installed in CI through the test extra

import visattn
import visattn.pipelines as vp
from visattn.pipelines.tiny import tiny_inputs, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOORS = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.to(DEV)
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype) for t in x)
    return x


def _run(model, inputs, backend, dtype):
    with torch.no_grad(), visattn.use_backend(backend):
        out = model(**{k: _cast(v, dtype) for k, v in inputs.items()})
    return (out[0] if isinstance(out, tuple) else out.sample).float()


# (model, inputs size, config): grids of 1-4K tokens with real windows, strides and dilations
_MODELS = [
    ("flux", 48, dict(kernel_size=(17, 21), stride=(4, 8))),
    ("wan", 48, dict(kernel_size=(1, 9, 13), stride=(1, 2, 4))),
    ("hunyuanvideo", 32, dict(kernel_size=(2, 11, 9), stride=(1, 1, 3), dilation=(1, 2, 1))),
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name,size,cfg", _MODELS, ids=[m[0] for m in _MODELS])
def test_tiny_models_triton_vs_torch(name, size, cfg, dtype):
    model = tiny_model(name).to(DEV)
    inputs = tiny_inputs(name, size=size, batch=2)
    if name == "hunyuanvideo":
        inputs["encoder_attention_mask"] = torch.tensor([[1] * 8 + [0] * 4, [1] * 12])
    with vp.apply(model, "neighborhood", cfg, stats=True) as h:
        ref = _run(model, inputs, "torch", torch.float32)
        model.to(dtype)
        low = _run(model, inputs, "torch", dtype)
        out = _run(model, inputs, "triton", dtype)
        assert h.stats()["fallbacks"] == {}
    assert torch.isfinite(out).all()
    err, err_low = (out - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= max(2 * err_low, FLOORS[dtype] * max(1.0, ref.abs().max().item())), (err, err_low)


def _module(family, heads, head_dim, dtype):
    if family == "wan":
        from diffusers.models.transformers.transformer_wan import WanAttention

        return WanAttention(dim=heads * head_dim, heads=heads, dim_head=head_dim, eps=1e-6).to(DEV, dtype)
    if family == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return FluxAttention(
            query_dim=heads * head_dim,
            heads=heads,
            dim_head=head_dim,
            added_kv_proj_dim=heads * head_dim,
            bias=True,
            eps=1e-6,
        ).to(DEV, dtype)
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    return Attention(
        query_dim=heads * head_dim,
        heads=heads,
        dim_head=head_dim,
        added_kv_proj_dim=heads * head_dim,
        out_dim=heads * head_dim,
        context_pre_only=False,
        bias=True,
        qk_norm="rms_norm",
        eps=1e-6,
        processor=HunyuanVideoAttnProcessor2_0(),
    ).to(DEV, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "family,heads,grid,text,ks,st",
    [
        # grids are slices of the real ones, sized so the "torch" reference fits in memory
        ("wan", 12, (3, 30, 52), 0, (3, 16, 32), (1, 8, 8)),
        ("flux", 8, (1, 48, 48), 512, (32, 32), (8, 8)),
        ("hunyuanvideo", 8, (2, 24, 40), 256, (2, 16, 24), (1, 8, 8)),
    ],
)
def test_real_head_dim_module(family, heads, grid, text, ks, st, dtype):
    """One attention call at head dim 128 on a real-resolution slice of each model's grid."""
    from visattn.ops import SequenceLayout
    from visattn.pipelines._context import AttnContext
    from visattn.pipelines.neighborhood import (
        NeighborhoodConfig,
        NeighborhoodFluxAttnProcessor,
        NeighborhoodHunyuanVideoAttnProcessor,
        NeighborhoodWanAttnProcessor,
    )

    cls = {
        "wan": NeighborhoodWanAttnProcessor,
        "flux": NeighborhoodFluxAttnProcessor,
        "hunyuanvideo": NeighborhoodHunyuanVideoAttnProcessor,
    }[family]
    torch.manual_seed(0)
    mod32 = _module(family, heads, 128, torch.float32)
    n_vid = grid[0] * grid[1] * grid[2]
    dim = heads * 128
    hs = torch.randn(1, n_vid, dim, device=DEV)
    ehs = torch.randn(1, text, dim, device=DEV) if text else None
    position = "start" if family == "flux" else "end"
    valid = text - 37 if family == "hunyuanvideo" else None
    ctx = AttnContext()
    lay = SequenceLayout(video_grid=grid, text_len=text, text_position=position)
    mask = None
    if valid is not None:
        ctx.extras["neighborhood.text_valid"] = {"transformer": (valid,)}
        lay = lay.replace(text_valid_len=torch.tensor([valid], device=DEV))
        mask = torch.ones(1, 1, 1, n_vid + text, dtype=torch.bool, device=DEV)
        mask[..., n_vid + valid :] = False
    ctx.layouts["transformer"] = lay

    def call(mod, backend, dtype):
        cfg = NeighborhoodConfig(kernel_size=ks, stride=st, backend=backend)
        proc = cls(
            cfg,
            original=mod.processor,
            key="blocks.0.attn1.processor",
            block_index=0,
            context=ctx,
            component="transformer",
        )
        args = dict(hidden_states=hs.to(dtype), encoder_hidden_states=None if ehs is None else ehs.to(dtype))
        if mask is not None:
            args["attention_mask"] = mask
        with torch.no_grad():
            out = proc(mod, **args)
        out = out if isinstance(out, tuple) else (out,)
        return torch.cat([o.float() for o in out], dim=1)

    ref = call(mod32, "torch", torch.float32)
    mod = mod32.to(dtype)
    low, out = call(mod, "torch", dtype), call(mod, "triton", dtype)
    assert torch.isfinite(out).all()
    err, err_low = (out - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= max(2 * err_low, FLOORS[dtype] * max(1.0, ref.abs().max().item())), (err, err_low)


def test_full_window_triton_matches_default():
    model = tiny_model("wan").to(DEV)
    inputs = tiny_inputs("wan")  # 8 x 16 x 16 tokens
    ref = _run(model, inputs, "torch", torch.float32)
    with vp.apply(model, "neighborhood", kernel_size=(8, 16, 16), backend="triton"):
        out = _run(model, inputs, "triton", torch.float32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
