"""visattn DiNAT_s state dict -> original-repo key names (``layers.{i}``), for the shared contract suite."""

from __future__ import annotations

from ._upstream_nat import to_upstream_state_dict as _nat_to_upstream


def to_upstream_state_dict(state_dict: dict, model=None) -> dict:
    return _nat_to_upstream(state_dict, model, level_key="layers")
