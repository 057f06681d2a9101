"""Upstream (LeapLabTHU/Agent-Attention) key names for the ``agent_deit`` family: timm ViT names, unchanged."""

from __future__ import annotations

NON_STD = ["agent_deit_*"]  # isotropic: NLC features (specs/timm.md §6)

EXCLUDE_JIT = {"agent_deit_*": "agent attention passes its decomposed biases as a Python dataclass (AgentBias) "
               "and grids as tuples through visattn.ops.agent_attention; TorchScript cannot compile it"}


def to_upstream_state_dict(state_dict: dict, model) -> dict:
    return dict(state_dict)
