"""nn.Module layers that own projections and call visattn.ops (one file per method)."""

from .agent import AgentAttention

__all__ = ["AgentAttention"]
