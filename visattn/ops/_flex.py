"""FlexAttention as visattn's comparison backends call it: one compiled function, output and LSE.

Every ``"flex"`` backend (block-sparse, neighborhood, bi-level routing) goes through
:func:`flex_attention_lse`, so the compile settings and the torch-version differences live here once.
"""

from __future__ import annotations

import torch

_COMPILED = None


def _flex_fn(device: torch.device):
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager on CPU: small shapes in tests
    if _COMPILED is None:
        import torch._dynamo

        # one specialisation per problem shape: benchmarks visit more than dynamo's default limit of 8,
        # after which flex would silently run unfused and materialise the N x N scores
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def flex_attention_lse(q, k, v, block_mask, scale: float, *, score_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``flex_attention`` on ``[B, H, N, D]`` tensors; returns ``(out, lse)`` with lse in float32.

    GQA is enabled when k has fewer heads than q. On the CPU without autograd the inputs are detached,
    because Flex's CPU path rejects tensors that require grad.
    """
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
    flex = _flex_fn(q.device)
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older keyword
        out, lse = flex(q, k, v, return_lse=True, **kw)
    else:
        out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        lse = aux.lse
    return out, lse.float()
