"""nn.Module layers that own projections and call visattn.ops (one file per method)."""

from .bilevel_routing import AttentionLePE, BilevelRoutingAttention

__all__ = ["AttentionLePE", "BilevelRoutingAttention"]
