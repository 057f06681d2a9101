"""visattn's functional ops: public attention functions, their references and plans.

Layouts are part of each op's contract and stated in its docstring.
"""

from .block_sparse import block_sparse_attention, block_sparse_attention_ref
from .block_sparse_plan import BlockSparsePlan
from ._layout import SequenceLayout
from .rectified import rectified_attention, rectified_attention_ref, rectified_plan
from .rectified_plan import RectifiedConfig, RectifiedPlan
from .pyramid import PyramidConfig, PyramidPlan, pyramid_attention, pyramid_attention_ref, pyramid_plan
from .agent import AgentBias, agent_attention, agent_attention_ref
from .bilevel_routing import (
    RegionRouting,
    bilevel_routing_attention,
    bilevel_routing_attention_ref,
    region_routing,
    routed_attention,
    routed_attention_ref,
)
from .neighborhood import (
    clamp_neighborhood,
    merge_attentions,
    neighborhood_attention,
    neighborhood_attention_ref,
    neighborhood_attention_weights,
    neighborhood_mask,
    neighborhood_windows,
    suggest_block_sparse,
)

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "BlockSparsePlan",
    "SequenceLayout",
    "rectified_attention",
    "rectified_attention_ref",
    "rectified_plan",
    "RectifiedConfig",
    "RectifiedPlan",
    "neighborhood_attention",
    "neighborhood_attention_ref",
    "neighborhood_attention_weights",
    "neighborhood_windows",
    "neighborhood_mask",
    "clamp_neighborhood",
    "suggest_block_sparse",
    "merge_attentions",
    "agent_attention",
    "agent_attention_ref",
    "AgentBias",
]
__all__ += ["pyramid_attention", "pyramid_attention_ref", "pyramid_plan", "PyramidPlan", "PyramidConfig"]
__all__ += ["region_routing", "routed_attention", "routed_attention_ref", "bilevel_routing_attention",
            "bilevel_routing_attention_ref", "RegionRouting"]
