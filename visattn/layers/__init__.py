"""nn.Module layers that own projections and call visattn.ops (one file per method)."""

from .agent import AgentAttention
from .bilevel_routing import AttentionLePE, BilevelRoutingAttention
from .pyramid import PyramidAttention
from .rectified import RectifiedAttention
from .neighborhood import (  # noqa: E402
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = [
    "AgentAttention",
    "AttentionLePE",
    "BilevelRoutingAttention",
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "PyramidAttention",
    "RectifiedAttention",
]
