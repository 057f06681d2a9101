"""visattn: efficient attention for vision backbones and diffusion transformers.

``import visattn`` is light: it imports torch (and registers visattn's timm backbones as they land),
never diffusers and never Triton; kernels compile on first use.
"""

from __future__ import annotations

from . import backbones  # noqa: F401  (registers the timm families)
from .ops import (
    BlockSparsePlan,
    block_sparse_attention,
    block_sparse_attention_ref,
    merge_attentions,
    neighborhood_attention,
    neighborhood_attention_ref,
)
from .ops import AgentBias, agent_attention, agent_attention_ref
from .ops import bilevel_routing_attention, bilevel_routing_attention_ref, region_routing, routed_attention
from .ops import pyramid_attention, pyramid_attention_ref
from .ops import rectified_attention, rectified_attention_ref
from .ops._dispatch import list_backends, use_backend

__version__ = "0.1.0.dev0"

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "BlockSparsePlan",
    "neighborhood_attention",
    "neighborhood_attention_ref",
    "merge_attentions",
    "agent_attention",
    "agent_attention_ref",
    "AgentBias",
    "pyramid_attention",
    "pyramid_attention_ref",
    "rectified_attention",
    "rectified_attention_ref",
    "list_backends",
    "use_backend",
    "__version__",
    "bilevel_routing_attention",
    "bilevel_routing_attention_ref",
    "region_routing",
    "routed_attention",
]
