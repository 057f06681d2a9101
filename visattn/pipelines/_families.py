"""Host-family processor bases: the default processors' math around a replaceable attention core.

One class per diffusers attention family (specs/diffusers.md §2-§3). Each ``__call__`` has the same
parameter names, order and return convention as the default processor it replaces, reuses the host
module's layers (``to_q``, ``norm_q``, ``add_q_proj``, ``to_out``, fused ``to_qkv`` / ``to_added_qkv``),
applies QK-norm and RoPE exactly where the default does, and calls ``self._core(q, k, v, mask, seq)``
on post-RoPE ``[B, S, H, D]`` tensors with the call's :class:`SequenceLayout` (``None`` if unknown).
diffusers' private ``_get_qkv_projections`` is not used (it has changed between releases).

Families: Flux (``FluxAttnProcessor``), Wan (``WanAttnProcessor``), LTX (``LTXVideoAttnProcessor``),
HunyuanVideo (``HunyuanVideoAttnProcessor2_0``), CogVideoX (``CogVideoXAttnProcessor2_0``), SD3
(``JointAttnProcessor2_0``) and legacy self/cross attention (``AttnProcessor2_0``: UNet, DiT, PixArt).
"""

from __future__ import annotations

import math

import torch

from ..ops import SequenceLayout
from ._base import VisattnProcessor
from ._rope import diffusers_rope, wan_norm_rope, wan_rope


def _layout_if(ctx_layout: SequenceLayout | None, seq_len: int, text_len: int, position: str):
    """The component layout if it describes this call's sequence, else ``None``."""
    if ctx_layout is None or ctx_layout.text_len != text_len or ctx_layout.num_video + text_len != seq_len:
        return None
    if ctx_layout.text_position != position:
        ctx_layout = ctx_layout.replace(text_position=position)
    return ctx_layout


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # [B, S, H*D] -> [B, S, H, D]


# ---------------------------------------------------------------------------------------------- Flux
class FluxAttnBase(VisattnProcessor):
    """``FluxAttnProcessor`` (double blocks: joint ``[text, image]``; single blocks: pre-concatenated)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            if attn.fused_projections and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((eq, query), (ek, key), (ev, value)))
        if image_rotary_emb is not None:  # over the whole sequence, text ids included
            query, key = diffusers_rope(query, key, image_rotary_emb)

        ctx = self.layout()
        # single blocks see one tensor; the text length comes from the layout hook
        text_len = (
            encoder_hidden_states.shape[1]
            if encoder_hidden_states is not None
            else (ctx.text_len if ctx is not None else 0)
        )
        seq = _layout_if(ctx, query.shape[1], text_len, "start")
        out = self._core(query, key, value, attention_mask, seq)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out


# ----------------------------------------------------------------------------------------------- Wan
class WanAttnBase(VisattnProcessor):
    """``WanAttnProcessor``: ``attn1`` self-attention over the video grid; ``attn2`` cross-attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        encoder_img = None
        if attn.add_k_proj is not None:  # I2V: image context precedes the 512 text tokens
            n_img = encoder_hidden_states.shape[1] - 512
            encoder_img = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        if attn.fused_projections and not attn.is_cross_attention:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        fused = None if rotary_emb is None else wan_norm_rope(query, key, attn.norm_q, attn.norm_k, attn.heads,
                                                             *rotary_emb)
        if fused is not None:  # norms, head split and RoPE in one launch (inference on CUDA)
            (query, key), value = fused, _heads(value, attn.heads)
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)  # across heads, before the split
            query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
            if rotary_emb is not None:
                query, key = wan_rope(query, key, *rotary_emb)  # fused on CUDA (pipelines/_rope.py)

        out_img = None
        if encoder_img is not None:
            if attn.fused_projections:
                k_img, v_img = attn.to_added_kv(encoder_img).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(encoder_img), attn.add_v_proj(encoder_img)
            k_img = _heads(attn.norm_added_k(k_img), attn.heads)
            v_img = _heads(v_img, attn.heads)
            out_img = self.dispatch(query, k_img, v_img).flatten(2, 3).type_as(query)

        if cross:
            # upstream passes no parallel_config to cross-attention; visattn methods never sparsify it
            out = self.fallback("cross-attention runs dense", query, key, value, attention_mask)
        else:
            ctx = self.layout()
            out = self._core(query, key, value, attention_mask, _layout_if(ctx, query.shape[1], 0, "end"))
        out = out.flatten(2, 3).type_as(query)
        if out_img is not None:
            out = out + out_img
        return attn.to_out[1](attn.to_out[0](out))


# ------------------------------------------------------------------------------------- HunyuanVideo
def _diffusers_at_least(version: str) -> bool:
    import re

    import diffusers

    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:3])

    return parts(diffusers.__version__) >= parts(version)


class HunyuanVideoAttnBase(VisattnProcessor):
    """``HunyuanVideoAttnProcessor2_0``: ``[video, text]``, RoPE on video only, boolean text mask.

    Needs diffusers >= 0.36 (earlier releases call SDPA on ``[B, H, S, D]`` in this processor).
    """

    def __init__(self, config, **kw) -> None:
        if not _diffusers_at_least("0.36"):
            import diffusers

            raise NotImplementedError(
                f"visattn's HunyuanVideo processors need diffusers >= 0.36, "
                f"got diffusers=={diffusers.__version__}"
            )
        super().__init__(config, **kw)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pre_concat = attn.add_q_proj is None and encoder_hidden_states is not None  # single blocks
        if pre_concat:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if pre_concat:
                n_txt = encoder_hidden_states.shape[1]
                rq, rk = diffusers_rope(query[:, :-n_txt], key[:, :-n_txt], image_rotary_emb)
                query = torch.cat([rq, query[:, -n_txt:]], dim=1)
                key = torch.cat([rk, key[:, -n_txt:]], dim=1)
            else:
                query, key = diffusers_rope(query, key, image_rotary_emb)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            ek = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            ev = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))

        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        seq = _layout_if(self.layout(), query.shape[1], n_txt, "end")
        out = self._core(query, key, value, attention_mask, seq)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :-n_txt], out[:, -n_txt:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_out = attn.to_add_out(encoder_out)
            return out, encoder_out
        return out


# ------------------------------------------------------------------------------------------ CogVideoX
class CogVideoXAttnBase(VisattnProcessor):
    """``CogVideoXAttnProcessor2_0``: ``[text, video]``, QK-norm per head, RoPE on video when given."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        n_txt = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # the default normalises on [B, H, S, D]; norms act on the last dim, so [B, S, H, D] is the same
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            rk_in = None if attn.is_cross_attention else key[:, n_txt:]
            rq, rk = diffusers_rope(query[:, n_txt:], rk_in, image_rotary_emb)
            query = torch.cat([query[:, :n_txt], rq], dim=1)
            if rk is not None:
                key = torch.cat([key[:, :n_txt], rk], dim=1)
        seq = _layout_if(self.layout(), seq_len, n_txt, "start")
        out = self._core(query, key, value, attention_mask, seq)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([n_txt, out.size(1) - n_txt], dim=1)
        return out, encoder_out


# ------------------------------------------------------------------------------------------------ SD3
class JointAttnBase(VisattnProcessor):
    """``JointAttnProcessor2_0`` (SD3 / SD3.5): ``[image, text]``; the default ignores ``attention_mask``."""

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ):
        n_img = hidden_states.shape[1]
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (_heads(t, attn.heads) for t in (eq, ek, ev))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        seq = _layout_if(self.layout(), query.shape[1], n_txt, "end")
        out = self._core(query, key, value, None, seq)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, encoder_out
        return out


# ------------------------------------------------------------------------------------------------ LTX
def _ltx_rope(x: torch.Tensor, freqs) -> torch.Tensor:
    # on [B, S, H*D] before the head split, as transformer_ltx.py applies it
    cos, sin = freqs
    real, imag = x.unflatten(2, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LTXAttnBase(VisattnProcessor):
    """``LTXVideoAttnProcessor``: ``attn1`` video self-attention, ``attn2`` masked cross-attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        cross = encoder_hidden_states is not None
        batch, seq_len, _ = encoder_hidden_states.shape if cross else hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        context = encoder_hidden_states if cross else hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = _ltx_rope(query, image_rotary_emb), _ltx_rope(key, image_rotary_emb)
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if cross:
            out = self.fallback("cross-attention runs dense", query, key, value, attention_mask)
        else:
            out = self._core(
                query, key, value, attention_mask, _layout_if(self.layout(), query.shape[1], 0, "end")
            )
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------- legacy Attention
def grid_from_latent(latent_hw: tuple[int, int] | None, num_tokens: int) -> tuple[int, int] | None:
    """The (H, W) token grid of a UNet level: ``latent_hw`` halved (ceil) until ``H * W == num_tokens``."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    while h * w > num_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w) if h * w == num_tokens else None


class LegacyAttnBase(VisattnProcessor):
    """``AttnProcessor2_0`` in its drop-in order (spatial norm, 4-D input, mask, group norm, norm_cross,
    projections, QK-norm, attention, output projection, residual, rescale)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch, seq_len, _ = hidden_states.shape if not cross else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if not cross and getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if not cross:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if cross and getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if cross:
            out = self.fallback("cross-attention runs dense", query, key, value, attention_mask)
        else:
            n = query.shape[1]
            ctx = self.layout()
            # self-attention over the image tokens only (PixArt's text goes through attn2)
            seq = (
                SequenceLayout(video_grid=ctx.video_grid) if ctx is not None and ctx.num_video == n else None
            )
            if seq is None:
                grid = grid or grid_from_latent(self.context.latent_hw.get(self.component), n)
                seq = SequenceLayout(video_grid=grid) if grid is not None else None
            out = self._core(query, key, value, attention_mask, seq)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# (attention module class, default processor class) -> family base, for the methods' tables
FAMILIES = {
    ("FluxAttention", "FluxAttnProcessor"): FluxAttnBase,
    ("WanAttention", "WanAttnProcessor"): WanAttnBase,
    ("LTXAttention", "LTXVideoAttnProcessor"): LTXAttnBase,
    ("Attention", "HunyuanVideoAttnProcessor2_0"): HunyuanVideoAttnBase,
    ("Attention", "CogVideoXAttnProcessor2_0"): CogVideoXAttnBase,
    ("Attention", "FusedCogVideoXAttnProcessor2_0"): CogVideoXAttnBase,
    ("Attention", "JointAttnProcessor2_0"): JointAttnBase,
    ("Attention", "FusedJointAttnProcessor2_0"): JointAttnBase,
    ("Attention", "AttnProcessor2_0"): LegacyAttnBase,
    ("Attention", "FusedAttnProcessor2_0"): LegacyAttnBase,
}


def processor_table(classes: dict[type, type]) -> dict[tuple[str, str], type]:
    """A method's ``MethodSpec.processors`` from ``{family base: method processor class}``."""
    return {pair: classes[base] for pair, base in FAMILIES.items() if base in classes}


__all__ = [
    "FluxAttnBase",
    "WanAttnBase",
    "LTXAttnBase",
    "HunyuanVideoAttnBase",
    "CogVideoXAttnBase",
    "JointAttnBase",
    "LegacyAttnBase",
    "FAMILIES",
    "processor_table",
    "grid_from_latent",
]
