"""Comparison backends of neighborhood attention: FlexAttention with a cached block mask, and NATTEN.

Neither is picked by ``"auto"``: they exist so benchmarks and tests can run what a user would
otherwise reach for, on the same inputs, through the same op.
"""

from __future__ import annotations

import math

import torch

from . import _dispatch
from ._flex import flex_attention_lse
from .neighborhood_ref import NAParams, neighborhood_windows

_BLOCK_MASKS: dict[tuple, object] = {}


def _flex_can_run(q, k, v, p, extra_kv, rpb, kpm, opts) -> list[str]:
    reasons = _dispatch.flex_reasons()
    if q.dtype == torch.float64 and q.device.type == "cuda":
        reasons.append("FlexAttention's CUDA kernels do not support float64")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rpb)):
        reasons.append("FlexAttention has no backward on the CPU")
    if kpm is not None:
        reasons.append("key_padding_mask is not wired into the flex comparison backend")
    if q.shape[-1] != v.shape[-1]:
        reasons.append("FlexAttention needs D_v == D")
    return reasons


def _mask_mod(p: NAParams, device, n_tokens: int):
    start, end, _, _ = neighborhood_windows(p.size, p.kernel_size, p.stride, p.dilation, p.is_causal, device)
    n = len(p.size)
    strides = [math.prod(p.size[a + 1:]) for a in range(n)]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx >= n_tokens  # extra tokens (appended after the grid) are always attended
        inside = kv_idx < n_tokens
        for a in range(n):
            d = p.dilation[a]
            x = (q_idx // strides[a]) % p.size[a]
            y = (kv_idx // strides[a]) % p.size[a]
            j = y // d
            inside = inside & (x % d == y % d) & (j >= start[a][x]) & (j <= end[a][x])
        return keep | inside

    return mask_mod


def flex_block_mask(p: NAParams, n_extra: int, device):
    """A FlexAttention ``BlockMask`` of the neighborhood (plus ``n_extra`` always-attended keys), cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (p, n_extra, str(device))
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        N = math.prod(p.size)
        bm = create_block_mask(_mask_mod(p, device, N), None, None, N, N + n_extra, device=device,
                               _compile=torch.device(device).type == "cuda")  # fused: no N x N mask in memory
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = bm
    return bm


@_dispatch.register_backend("neighborhood", "flex", can_run=_flex_can_run, auto=False,
                            doc="FlexAttention with a cached block mask (comparison)")
def _run_flex(q, k, v, p: NAParams, scale, extra_kv, rpb, kpm, opts):
    B, H, Hk = q.shape[0], q.shape[-2], k.shape[-2]
    N = math.prod(p.size)
    qf, kf, vf = (t.reshape(B, N, t.shape[-2], t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    n_extra = 0
    if extra_kv is not None:
        n_extra = extra_kv[0].shape[1]
        kf = torch.cat([kf, extra_kv[0].transpose(1, 2)], dim=2)
        vf = torch.cat([vf, extra_kv[1].transpose(1, 2)], dim=2)
    bm = flex_block_mask(p, n_extra, q.device)
    score_mod = None
    if rpb is not None:
        n = len(p.size)
        strides = [math.prod(p.size[a + 1:]) for a in range(n)]

        def score_mod(score, b, h, q_idx, kv_idx):
            idx = [h]
            for a in range(n):
                d = p.dilation[a]
                x = (q_idx // strides[a]) % p.size[a]
                y = (kv_idx // strides[a]) % p.size[a]
                idx.append((y // d - x // d + p.kernel_size[a] - 1).clamp(0, 2 * p.kernel_size[a] - 2))
            bias = rpb[tuple(idx)]
            return score + torch.where(kv_idx < N, bias, torch.zeros_like(bias))

    out, lse = flex_attention_lse(qf, kf, vf, bm, scale, score_mod=score_mod)
    out = out.transpose(1, 2).reshape(B, *p.size, H, v.shape[-1])
    return out, lse.transpose(1, 2).reshape(B, *p.size, H)


def _natten_can_run(q, k, v, p, extra_kv, rpb, kpm, opts) -> list[str]:
    reasons = _dispatch.natten_reasons()
    if rpb is not None:
        reasons.append("NATTEN >= 0.20 has no relative positional bias")
    if kpm is not None:
        reasons.append("NATTEN has no key padding mask")
    if q.dtype == torch.float64:
        reasons.append("NATTEN does not support float64")
    if min(p.kernel_size) < 2:
        reasons.append("NATTEN rejects kernel_size < 2")
    if q.shape[-2] != k.shape[-2]:
        reasons.append("GQA/MQA is passed to NATTEN only with equal head counts here")
    return reasons


@_dispatch.register_backend("neighborhood", "natten", can_run=_natten_can_run, auto=False,
                            doc="NATTEN's own kernels (comparison)")
def _run_natten(q, k, v, p: NAParams, scale, extra_kv, rpb, kpm, opts):
    import natten

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(p.size)]
    ke, ve = extra_kv if extra_kv is not None else (None, None)
    out, lse = fn(q, k, v, p.kernel_size, stride=p.stride, dilation=p.dilation, is_causal=p.is_causal,
                  scale=scale, additional_keys=ke, additional_values=ve, return_lse=True)
    return out, lse.float()
