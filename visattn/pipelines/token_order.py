"""Re-export of the token order (``visattn.ops._token_order``; spec rectified.md §2.2) for pipeline users."""

from ..ops._token_order import TokenOrder, block_neighbours, gilbert_order, order_from_name

__all__ = ["TokenOrder", "block_neighbours", "gilbert_order", "order_from_name"]
