"""BiFormer's original key names for the shared timm contract suite (tests/backbones/_contract.py).

``to_upstream_state_dict(state_dict, model)`` writes the layout of the checkpoint the variant was
released with: the nchw 1x1-conv layout for ``biformer_stl_nchw``, the legacy NHWC layout otherwise.
"""

from __future__ import annotations

from visattn.backbones.biformer import to_upstream_state_dict as _export


def to_upstream_state_dict(state_dict: dict, model) -> dict:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    layout = "nchw" if name.endswith("_nchw") else "legacy"
    return _export(state_dict, layout=layout, arch=getattr(model, "arch", "biformer"))
