"""visattn's functional ops: public attention functions, their references and plans.

Layouts are part of each op's contract and stated in its docstring.
"""

from .block_sparse import block_sparse_attention, block_sparse_attention_ref
from .block_sparse_plan import BlockSparsePlan
from .agent import AgentBias, agent_attention, agent_attention_ref

__all__ = ["block_sparse_attention", "block_sparse_attention_ref", "BlockSparsePlan",
           "agent_attention", "agent_attention_ref", "AgentBias"]
