"""nn.Module layers that own projections and call visattn.ops (one file per method)."""

from .neighborhood import (  # noqa: E402, F401
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
