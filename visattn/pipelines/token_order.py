"""Token order for pipelines: the Gilbert order (``visattn.ops._token_order``, spec rectified.md §2.2)
and model-level adapters that permute the video tokens once per transformer forward (§5).

An adapter is a set of diffusers ``ModelHook``s (no class patching), registered through
``ApplyHandle.add_hook`` so ``remove()`` takes them off. Wan (``WanTransformer3DModel``): the
patch-embedding output is reordered along the flattened (F, H, W) axis (the model's own
``flatten(2).transpose(1, 2)`` then yields curve order), the RoPE tables (cos, sin) and per-token
timestep projections (Wan2.2 TI2V) follow, and ``norm_out``'s input is put back into raster order,
so everything after it (shift/scale, ``proj_out``, unpatchify) is unchanged. Attention processors
find the active order in ``context.extras["token_order"][component] = (video_grid, order name)``.
Other families use the per-call fallback of their processors.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..ops._token_order import TokenOrder, block_neighbours, gilbert_order, order_from_name

EXTRAS_KEY = "token_order"


class _State:
    """The current forward's permutation (device tensors), shared by the adapter's hooks."""

    def __init__(self) -> None:
        self.idx = self.inv = None
        self.n = -1
        self._cache: dict = {}

    def set(self, grid, axis_order, device) -> str:
        key = (grid, tuple(axis_order) if not isinstance(axis_order, str) else axis_order, str(device))
        hit = self._cache.get(key)
        if hit is None:
            order = gilbert_order(grid, axis_order)
            hit = self._cache[key] = (order.perm.to(device), order.inverse.to(device), order.name)
        self.idx, self.inv, name = hit
        self.n = self.idx.numel()
        return name


class _ModelHook(ModelHook):
    """On the transformer: derive the grid, select the permutation, publish it to the context."""

    _is_stateful = False

    def __init__(self, state: _State, context, component: str, axis_order) -> None:
        super().__init__()
        self.state, self.context, self.component, self.axis_order = state, context, component, axis_order

    def pre_forward(self, module, *args, **kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        orders = self.context.extras.setdefault(EXTRAS_KEY, {})
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            pt, ph, pw = module.config.patch_size
            grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
            orders[self.component] = (grid, self.state.set(grid, self.axis_order, x.device))
        else:
            orders.pop(self.component, None)
            self.state.n = -1
        return args, kwargs


class _PatchHook(ModelHook):
    """patch_embedding output [B, C, F, H, W]: reorder the flattened token axis."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        if self.state.n != output[0, 0].numel():
            return output
        return output.flatten(2)[:, :, self.state.idx].view(output.shape)


class _RopeHook(ModelHook):
    """rope output (cos, sin), each [1, N, 1, D]: reorder dim 1."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        if self.state.n < 0 or not isinstance(output, tuple) or output[0].shape[1] != self.state.n:
            return output
        return tuple(t[:, self.state.idx] for t in output)


class _ConditionHook(ModelHook):
    """condition_embedder output (temb, timestep_proj, ...): per-token timestep_proj [B, N, 6C] follows."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        tp = output[1]
        if self.state.n < 0 or tp.dim() != 3 or tp.shape[1] != self.state.n:
            return output
        return (output[0], tp[:, self.state.idx], *output[2:])


class _InverseHook(ModelHook):
    """norm_out input [B, N, C]: back to raster order."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if self.state.n < 0 or not args or args[0].shape[1] != self.state.n:
            return args, kwargs
        return (args[0][:, self.state.inv], *args[1:]), kwargs


def install_wan_token_order(model, handle, component: str, axis_order=("w", "h", "t")) -> bool:
    """Install the Wan adapter on ``model`` (a ``WanTransformer3DModel``); returns whether it did."""
    if type(model).__name__ != "WanTransformer3DModel":
        return False
    state = _State()
    name = "visattn_token_order"
    handle.add_hook(model, _ModelHook(state, handle.context, component, axis_order), name)
    handle.add_hook(model.patch_embedding, _PatchHook(state), name)
    handle.add_hook(model.rope, _RopeHook(state), name)
    handle.add_hook(model.condition_embedder, _ConditionHook(state), name)
    handle.add_hook(model.norm_out, _InverseHook(state), name)
    return True


def active_order(context, component: str, video_grid) -> str | None:
    """The order name an adapter applied to this component's current forward, if its grid matches."""
    hit = context.extras.get(EXTRAS_KEY, {}).get(component)
    return hit[1] if hit is not None and tuple(hit[0]) == tuple(video_grid) else None


__all__ = [
    "TokenOrder",
    "block_neighbours",
    "gilbert_order",
    "order_from_name",
    "install_wan_token_order",
    "active_order",
]
