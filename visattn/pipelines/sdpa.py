"""``sdpa_override``: reroute ``F.scaled_dot_product_attention`` inside a ``with`` block (spec §7).

A dense kernel swap with identical math needs no processors: a scoped ``TorchFunctionMode``
intercepts ``torch.nn.functional.scaled_dot_product_attention`` wherever it is called, which covers
the legacy processors (direct SDPA) and diffusers' ``"native"`` dispatcher backend alike. The
function is never assigned globally (unlike the SageAttention README recipe), so leaving the block
restores everything, also on exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention


class _SDPAOverride(TorchFunctionMode):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.calls += 1
            # callers pass query/key/value positionally or by name (diffusers' native backend): normalise
            args = list(args)
            for i, name in enumerate(("query", "key", "value")):
                if len(args) <= i and name in kwargs:
                    args.append(kwargs.pop(name))
            return self.fn(*args, **kwargs)  # the mode is inactive while its handler runs
        return func(*args, **kwargs)


@contextlib.contextmanager
def sdpa_override(fn: Callable[..., torch.Tensor]) -> Iterator[_SDPAOverride]:
    """Call ``fn`` instead of ``F.scaled_dot_product_attention`` inside the block.

    Args:
        fn: ``fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, ...)`` on
            ``[B, H, S, D]`` like ``F.scaled_dot_product_attention`` (query, key and value always come
            positionally; other arguments by keyword, ``enable_gqa`` only where the caller passes it).

    Yields:
        the mode; its ``calls`` attribute counts rerouted calls.

    Example::

        with visattn.pipelines.sdpa_override(my_sdpa):
            image = pipe(prompt).images[0]
    """
    if not callable(fn):
        raise ValueError(
            f"sdpa_override expects a callable with F.scaled_dot_product_attention's signature, got {fn!r}"
        )
    mode = _SDPAOverride(fn)
    with mode:
        yield mode


__all__ = ["sdpa_override"]
