"""Upstream (LeapLabTHU/Agent-Attention) key names for the ``agent_swin`` family, for the timm contract suite."""

from __future__ import annotations

from visattn.backbones import agent_swin as _family

EXCLUDE_JIT = {"agent_swin_*": "agent attention passes its decomposed biases as a Python dataclass (AgentBias) "
               "and grids as tuples through visattn.ops.agent_attention; TorchScript cannot compile it"}


def to_upstream_state_dict(state_dict: dict, model) -> dict:
    return _family.to_upstream_state_dict(state_dict)
