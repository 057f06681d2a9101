"""Token-order adapters: run a transformer's blocks on permuted video tokens (specs/diffusers.md §6).

Sparse block methods (rectified, pyramid) want video tokens in a locality-preserving order (e.g. a 3-D
Gilbert curve). The adapters permute every tensor indexed by video token **once per transformer
forward**, through diffusers hooks (no class patching), and undo it before the output head:

* Wan: the RoPE tables (``rope`` output), the hidden states entering ``blocks[0]``, per-token timestep
  projections (Wan 2.2 TI2V) entering every block; inverse before ``norm_out``.
* HunyuanVideo: the ``rope`` output rows, the video hidden states entering the first block; inverse
  before ``norm_out`` (the ``token_replace`` image condition is refused).
* Flux: the image rows of the ``pos_embed`` output (text rows first), the image hidden states entering
  the first block; inverse before ``norm_out`` (ControlNet residuals would arrive in raster order).
* CogVideoX: the ``image_rotary_emb`` argument, the video part of the ``patch_embed`` output; inverse
  before ``norm_final``.

The component's :class:`SequenceLayout` gets ``token_order=<name>`` while the blocks run, so
processors that need raster order (neighborhood) fall back, and those that use the order know it.
``order_fn(video_grid) -> TokenOrder`` supplies the permutation (``perm[i]`` = raster index of the
i-th token, ``inverse`` its inverse, CPU int64, and a ``name``), e.g. ``visattn.ops``' Gilbert order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.hooks import ModelHook

from ._context import AttnContext
from .hooks import LayoutHook, bind_forward

_NAME = "visattn_token_order"
SUPPORTED = (
    "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "FluxTransformer2DModel",
    "CogVideoXTransformer3DModel",
)


class _FnHook(ModelHook):
    def __init__(self, pre=None, post=None) -> None:
        super().__init__()
        self._pre, self._post = pre, post

    def pre_forward(self, module, *args, **kwargs):
        return self._pre(module, args, kwargs) if self._pre is not None else (args, kwargs)

    def post_forward(self, module, output):
        return self._post(module, output) if self._post is not None else output


def _replace(module, args, kwargs, name: str, fn):
    """Apply ``fn`` to the forward argument ``name`` wherever it was passed (by position or keyword)."""
    params = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    i = params.index(name) if name in params else None
    if i is not None and i < len(args):
        args = (*args[:i], fn(args[i]), *args[i + 1 :])
    elif name in kwargs:
        kwargs = {**kwargs, name: fn(kwargs[name])}
    return args, kwargs


def _first_arg(args, kwargs, fn):
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: fn(kwargs[key])}


class _State:
    """The permutation of the current forward (indices cached per grid and device)."""

    def __init__(self, order_fn, context: AttnContext, component: str) -> None:
        self.order_fn, self.context, self.component = order_fn, context, component
        self._cache: dict = {}
        self.perm = self.inv = self.name = None
        self.text_len = 0
        self.n_video = 0
        self._temb: tuple | None = None
        self._probe = LayoutHook(AttnContext(), component)  # computes the grid without touching the context

    def begin(self, module, args, kwargs) -> None:
        layout = self._probe.compute(module, bind_forward(module, args, kwargs))
        self.perm = None
        self._temb = None
        if layout is None:
            return
        x = bind_forward(module, args, kwargs).get("hidden_states")
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        key = (layout.video_grid, device)
        if key not in self._cache:
            order = self.order_fn(layout.video_grid)
            self._cache[key] = (order.perm.to(device), order.inverse.to(device), order.name)
        self.perm, self.inv, self.name = self._cache[key]
        self.text_len, self.n_video = layout.text_len, layout.num_video

    def mark_layout(self) -> None:
        lay = self.context.layouts.get(self.component)
        if lay is not None and self.perm is not None:
            self.context.layouts[self.component] = lay.replace(token_order=self.name)

    def rows(self, x: torch.Tensor, dim: int, offset: int = 0, inverse: bool = False) -> torch.Tensor:
        if self.perm is None:
            return x
        idx = self.inv if inverse else self.perm
        if offset == 0 and x.shape[dim] == self.n_video:
            return x.index_select(dim, idx)
        head, video = x.narrow(dim, 0, offset), x.narrow(dim, offset, self.n_video)
        return torch.cat([head, video.index_select(dim, idx)], dim=dim)

    def temb(self, t: torch.Tensor) -> torch.Tensor:
        # Wan 2.2 TI2V per-token timestep projections [B, S, 6, C]: permuted once per forward
        if self.perm is None or t.ndim != 4:
            return t
        if self._temb is None or self._temb[0] is not t:
            self._temb = (t, t.index_select(1, self.perm))
        return self._temb[1]


def install_token_order(
    model: torch.nn.Module, handle, order_fn: Callable, component: str | None = None
) -> None:
    """Register the token-order hooks of ``model`` (see the module docstring) on ``handle``.

    Call from a method's ``MethodSpec.install`` (the hooks go through ``handle.add_hook``, so
    ``handle.remove()`` takes them off).

    Raises:
        ValueError: the model family has no adapter (supported: :data:`SUPPORTED`), or it uses a
            conditioning that indexes tokens by raster position (HunyuanVideo ``token_replace``).
    """
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"no token-order adapter for {name}; supported: {list(SUPPORTED)}")
    if component is None:
        component = next(c for c, m in handle.components.items() if m is model)
    st = _State(order_fn, handle.context, component)

    def root_pre(module, args, kwargs):
        st.begin(module, args, kwargs)
        if name.startswith("CogVideoX"):
            args, kwargs = _replace(
                module,
                args,
                kwargs,
                "image_rotary_emb",
                lambda r: r if r is None else tuple(st.rows(t, 0) for t in r),
            )
        return args, kwargs

    def first_block_pre(module, args, kwargs):
        st.mark_layout()
        return _replace(module, args, kwargs, "hidden_states", lambda x: st.rows(x, 1))

    def inverse_pre(module, args, kwargs):
        if name.startswith("CogVideoX"):
            return _first_arg(args, kwargs, lambda x: st.rows(x, 1, x.shape[1] - st.n_video, inverse=True))
        return _first_arg(args, kwargs, lambda x: st.rows(x, 1, inverse=True))

    handle.add_hook(model, _FnHook(pre=root_pre), _NAME)
    if name.startswith("Wan"):
        handle.add_hook(model.rope, _FnHook(post=lambda m, out: tuple(st.rows(t, 1) for t in out)), _NAME)
        handle.add_hook(model.blocks[0], _FnHook(pre=first_block_pre), _NAME + "_in")
        for block in model.blocks:
            handle.add_hook(block, _FnHook(pre=lambda m, a, k: _replace(m, a, k, "temb", st.temb)), _NAME)
        handle.add_hook(model.norm_out, _FnHook(pre=inverse_pre), _NAME)
    elif name.startswith("HunyuanVideo"):
        if getattr(model.config, "image_condition_type", None) == "token_replace":
            raise ValueError(
                "HunyuanVideo's token_replace image condition indexes tokens by raster position; "
                "it cannot run on permuted tokens"
            )
        handle.add_hook(model.rope, _FnHook(post=lambda m, out: tuple(st.rows(t, 0) for t in out)), _NAME)
        first = (
            model.transformer_blocks[0]
            if len(model.transformer_blocks)
            else model.single_transformer_blocks[0]
        )
        handle.add_hook(first, _FnHook(pre=first_block_pre), _NAME)
        handle.add_hook(model.norm_out, _FnHook(pre=inverse_pre), _NAME)
    elif name.startswith("Flux"):
        handle.add_hook(
            model.pos_embed,
            _FnHook(post=lambda m, out: tuple(st.rows(t, 0, st.text_len) for t in out)),
            _NAME,
        )
        first = (
            model.transformer_blocks[0]
            if len(model.transformer_blocks)
            else model.single_transformer_blocks[0]
        )
        handle.add_hook(first, _FnHook(pre=first_block_pre), _NAME)
        handle.add_hook(model.norm_out, _FnHook(pre=inverse_pre), _NAME)
    else:  # CogVideoX: text first in the patch-embedding output
        handle.add_hook(model.patch_embed, _FnHook(post=lambda m, out: st.rows(out, 1, st.text_len)), _NAME)
        handle.add_hook(
            model.transformer_blocks[0], _FnHook(pre=lambda m, a, k: (st.mark_layout(), (a, k))[1]), _NAME
        )
        handle.add_hook(model.norm_final, _FnHook(pre=inverse_pre), _NAME)


__all__ = ["install_token_order", "SUPPORTED"]
