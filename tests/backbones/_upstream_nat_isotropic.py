"""visattn isotropic NAT/DiNAT state dict -> ``classification/isotropic.py`` key names.

Upstream names its blocks ``layers.{i}`` and keeps ``patch_embed.{proj,norm}``, ``norm`` and ``head``;
written from that layout, independently of the family's ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import re

NON_STD = ["*_isotropic_*"]  # isotropic: NLC features, getter wrapper only (specs/timm.md §6)


def to_upstream_state_dict(state_dict: dict, model=None) -> dict:
    return {re.sub(r"^blocks\.(\d+)\.", r"layers.\1.", k): v for k, v in state_dict.items()}
