"""Decomposed agent biases (Agent Attention, https://arxiv.org/abs/2312.08874, spec agent.md §2.4).

:class:`AgentBias` holds the upstream bias parameters of one agent-attention module (block maps
``an``/``na``, row/column terms ``ah``/``aw``/``ha``/``wa``, prefix terms ``ac``/``ca``) and turns
them into the two additive biases of the op for any query grid, key grid and agent grid:
``B1 [heads, n, P + N_k]`` (agents -> keys) and ``B2 [heads, P + N, n]`` (queries -> agents).
The pair is broadcast over the batch (never repeated) and, under ``torch.no_grad``, cached per shape,
dtype and device, invalidated by the parameters' version counters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["AgentBias"]

_NAMES = ("an", "na", "ah", "aw", "ha", "wa", "ac", "ca")
_MAX_CACHE = 8


def _interp1(x: torch.Tensor, size: int) -> torch.Tensor:
    """I1: linear resize of the last axis (align_corners=False); the identity when sizes agree."""
    if x.shape[-1] == size:
        return x
    lead = x.shape[:-1]
    y = F.interpolate(x.reshape(1, -1, x.shape[-1]), size=size, mode="linear", align_corners=False)
    return y.reshape(*lead, size)


def _interp2(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """I2: bilinear resize of the last two axes (align_corners=False, no antialias)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(1, -1, *x.shape[-2:]), size=tuple(size), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *size)


def _resample_agents(x: torch.Tensor, axis: int, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resample agent axis ``axis`` of ``x`` seen as a ``src`` map to a ``dst`` map with I2."""
    if tuple(src) == tuple(dst):
        return x
    x = x.movedim(axis, -1)
    lead = x.shape[:-1]
    y = _interp2(x.reshape(*lead, *src), dst).reshape(*lead, dst[0] * dst[1])
    return y.movedim(-1, axis)


def _aligned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with every row starting at a multiple of 8 elements (a view of a padded buffer).

    SDPA's memory-efficient kernel needs 8-aligned bias strides; unaligned masks are padded (copied)
    on every call, so the padding is paid once here instead.
    """
    last = x.shape[-1]
    padded = -(-last // 8) * 8
    if padded == last:
        return x.to(dtype).contiguous()
    buf = x.new_zeros(*x.shape[:-1], padded, dtype=dtype)
    buf[..., :last] = x
    return buf[..., :last]


def _pair(value: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"expected {name} to be a pair of ints, got {name}={value!r}") from None
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"expected {name} to be a pair of positive ints, got {name}={value!r}")
    return out  # type: ignore[return-value]


@dataclass(eq=False)
class AgentBias:
    """Upstream's decomposed agent-bias parameters plus the grids they were trained on.

    Shapes (``h`` heads, ``n0`` trained agents on ``agent_grid``, ``(H0, W0)`` trained query grid,
    ``(H0k, W0k)`` trained key grid, ``P`` prefix tokens)::

        an, na: [h, n0, bh, bw]      (block maps; upstream uses 7 x 7)
        ah: [1, h, n0, H0k, 1]   aw: [1, h, n0, 1, W0k]
        ha: [1, h, H0, 1, n0]    wa: [1, h, 1, W0, n0]
        ac: [1, h, n0, P] or None    ca: [1, h, P, n0] or None   (DeiT's cls terms, P = 1)

    The tensors may be ``nn.Parameter`` s that require grad; :meth:`materialize` is differentiable.

    Args:
        agent_grid: the trained agent grid; default ``(sqrt(n0), sqrt(n0))`` (``n0`` a square).
        cache: a dict to keep materialised biases in (e.g. owned by the layer); None: no caching.

    Raises:
        ValueError: inconsistent shapes (the message names the field).
    """

    an: torch.Tensor
    na: torch.Tensor
    ah: torch.Tensor
    aw: torch.Tensor
    ha: torch.Tensor
    wa: torch.Tensor
    ac: torch.Tensor | None = None
    ca: torch.Tensor | None = None
    agent_grid: tuple[int, int] | None = None
    cache: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in _NAMES:
            t = getattr(self, name)
            if t is None and name in ("ac", "ca"):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"expected bias.{name} to be a tensor, got bias.{name}={type(t).__name__}")
        if self.an.dim() != 4 or self.na.shape != self.an.shape:
            raise ValueError(
                f"expected bias.an and bias.na of one shape [heads, agents, bh, bw], got "
                f"bias.an.shape={tuple(self.an.shape)}, bias.na.shape={tuple(self.na.shape)}"
            )
        h, n0 = self.an.shape[:2]
        checks = {
            "ah": (self.ah, (1, h, n0, None, 1)),
            "aw": (self.aw, (1, h, n0, 1, None)),
            "ha": (self.ha, (1, h, None, 1, n0)),
            "wa": (self.wa, (1, h, 1, None, n0)),
        }
        if (self.ac is None) != (self.ca is None):
            raise ValueError("expected bias.ac and bias.ca to be given together, got only one of them")
        if self.ac is not None:
            checks["ac"] = (self.ac, (1, h, n0, None))
            checks["ca"] = (self.ca, (1, h, self.ac.shape[-1] if self.ac.dim() == 4 else -1, n0))
        for name, (t, want) in checks.items():
            if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
                shown = tuple("*" if w is None else w for w in want)
                raise ValueError(f"expected bias.{name}.shape to be {shown} (heads={h}, agents={n0}), "
                                 f"got bias.{name}.shape={tuple(t.shape)}")
        if self.agent_grid is None:
            g = math.isqrt(n0)
            if g * g != n0:
                raise ValueError(f"expected a square agent count or an explicit agent_grid, got agents={n0}")
            self.agent_grid = (g, g)
        self.agent_grid = _pair(self.agent_grid, "agent_grid")
        if self.agent_grid[0] * self.agent_grid[1] != n0:
            raise ValueError(f"expected agent_grid to hold {n0} agents, got agent_grid={self.agent_grid}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, cache: dict | None = None) -> AgentBias:
        """The biases an upstream-layout module holds as ``an_bias``, ``na_bias``, ... attributes."""
        get = lambda n: getattr(module, f"{n}_bias", None)  # noqa: E731
        return cls(*(get(n) for n in _NAMES), agent_grid=getattr(module, "bias_agent_grid", None), cache=cache)

    @property
    def num_heads(self) -> int:
        return self.an.shape[0]

    @property
    def num_agents(self) -> int:
        return self.an.shape[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.ac is None else self.ac.shape[-1]

    @property
    def grid(self) -> tuple[int, int]:
        """The trained query grid ``(H0, W0)``."""
        return (self.ha.shape[2], self.wa.shape[3])

    @property
    def key_grid(self) -> tuple[int, int]:
        """The trained key grid ``(H0k, W0k)``."""
        return (self.ah.shape[3], self.aw.shape[4])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in _NAMES) if t is not None]

    # ------------------------------------------------------------------------------------------
    def materialize(
        self,
        grid: Sequence[int] | None = None,
        key_grid: Sequence[int] | None = None,
        agent_shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_prefix_tokens: int | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B1 [h, n, P + H_k W_k], B2 [h, P + H W, n])`` for these grids (spec §2.4).

        Args:
            grid: query grid ``(H, W)``; default the trained grid.
            key_grid: key grid; default ``grid`` (or the trained key grid when ``grid`` is None).
            agent_shape: agent grid ``(h_a, w_a)``; default the trained agent grid.
            dtype: output dtype; default the parameters' dtype.
            num_prefix_tokens: prefix tokens ``P``; default the ``ac``/``ca`` width (0 without them).
                Without ``ac``/``ca`` the prefix rows/columns get a zero bias.
            use_cache: reuse the cached pair when nothing requires grad (see the class docstring).
        """
        grid = _pair(grid, "grid") or self.grid
        key_grid = _pair(key_grid, "key_grid") or (self.key_grid if grid == self.grid else grid)
        agent_shape = _pair(agent_shape, "agent_shape") or self.agent_grid
        P = self.num_prefix_tokens if num_prefix_tokens is None else int(num_prefix_tokens)
        if self.ac is not None and P != self.ac.shape[-1]:
            raise ValueError(f"expected {self.ac.shape[-1]} prefix token(s) to match bias.ac, got {P}")
        dtype = dtype or self.an.dtype
        tensors = self.tensors()
        cacheable = (use_cache and self.cache is not None and not torch.compiler.is_compiling()
                     and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
        if cacheable:
            key = (grid, key_grid, agent_shape, P, dtype, self.an.device,
                   tuple((t._version, t.data_ptr(), t.dtype) for t in tensors))
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        b1, b2 = self._compute(grid, key_grid, agent_shape, P)
        out = (_aligned(b1, dtype), _aligned(b2, dtype))
        if cacheable:
            if len(self.cache) >= _MAX_CACHE:
                self.cache.clear()
            self.cache[key] = out
        return out

    def _compute(self, grid, key_grid, agent_shape, P):
        h, n0 = self.num_heads, self.num_agents
        # agents -> keys: block map on the key grid plus row and column terms
        b1 = _interp2(self.an, key_grid)
        b1 = b1 + _interp1(self.ah.reshape(h, n0, -1), key_grid[0])[..., :, None]
        b1 = b1 + _interp1(self.aw.reshape(h, n0, -1), key_grid[1])[..., None, :]
        b1 = b1.reshape(h, n0, -1)  # [h, n0, Hk*Wk]
        # queries -> agents, kept agent-major ([h, n0, H*W]) until the end
        b2 = _interp2(self.na, grid)
        b2 = b2 + _interp1(self.ha.reshape(h, -1, n0).transpose(1, 2), grid[0])[..., :, None]
        b2 = b2 + _interp1(self.wa.reshape(h, -1, n0).transpose(1, 2), grid[1])[..., None, :]
        b2 = b2.reshape(h, n0, -1)
        src = self.agent_grid
        b1 = _resample_agents(b1, 1, src, agent_shape)
        b2 = _resample_agents(b2, 1, src, agent_shape)
        n = agent_shape[0] * agent_shape[1]
        if P:
            if self.ac is not None:
                ac = _resample_agents(self.ac.reshape(h, n0, P), 1, src, agent_shape)
                ca = _resample_agents(self.ca.reshape(h, P, n0), 2, src, agent_shape)
            else:
                ac, ca = b1.new_zeros(h, n, P), b2.new_zeros(h, P, n)
            b1 = torch.cat([ac, b1], dim=2)
            return b1, torch.cat([ca, b2.transpose(1, 2)], dim=1)
        return b1, b2.transpose(1, 2)

    # ------------------------------------------------------------------------------------------
    def resample(
        self,
        grid: Sequence[int] | None = None,
        key_grid: Sequence[int] | None = None,
        agent_shape: Sequence[int] | None = None,
    ) -> AgentBias:
        """Parameters resized for a new trained grid and/or agent grid (checkpoint loading, §5.3).

        ``ah``/``aw`` are resized with I1 to ``key_grid`` and ``ha``/``wa`` to ``grid``; the block maps
        keep their size (they are interpolated at run time). A new ``agent_shape`` resamples every
        term along the agent grid with I2. ``key_grid`` defaults to ``grid`` divided by the trained
        reduction ratio.
        """
        grid = _pair(grid, "grid") or self.grid
        if key_grid is None:
            r = (self.grid[0] // self.key_grid[0], self.grid[1] // self.key_grid[1])
            key_grid = (max(1, grid[0] // r[0]), max(1, grid[1] // r[1]))
        key_grid = _pair(key_grid, "key_grid")
        agent_shape = _pair(agent_shape, "agent_shape") or self.agent_grid
        h, n0, src = self.num_heads, self.num_agents, self.agent_grid
        n = agent_shape[0] * agent_shape[1]
        with torch.no_grad():
            ah = _interp1(self.ah.reshape(h, n0, -1), key_grid[0])
            aw = _interp1(self.aw.reshape(h, n0, -1), key_grid[1])
            ha = _interp1(self.ha.reshape(h, -1, n0).transpose(1, 2), grid[0])  # [h, n0, H]
            wa = _interp1(self.wa.reshape(h, -1, n0).transpose(1, 2), grid[1])
            an = _resample_agents(self.an.reshape(h, n0, -1), 1, src, agent_shape).reshape(h, n, *self.an.shape[2:])
            na = _resample_agents(self.na.reshape(h, n0, -1), 1, src, agent_shape).reshape(h, n, *self.na.shape[2:])
            ah, aw, ha, wa = (_resample_agents(t, 1, src, agent_shape) for t in (ah, aw, ha, wa))
            out = dict(
                an=an, na=na,
                ah=ah.reshape(1, h, n, key_grid[0], 1), aw=aw.reshape(1, h, n, 1, key_grid[1]),
                ha=ha.transpose(1, 2).reshape(1, h, grid[0], 1, n), wa=wa.transpose(1, 2).reshape(1, h, 1, grid[1], n),
            )
            if self.ac is not None:
                P = self.ac.shape[-1]
                out["ac"] = _resample_agents(self.ac.reshape(h, n0, P), 1, src, agent_shape).reshape(1, h, n, P)
                out["ca"] = _resample_agents(self.ca.reshape(h, P, n0), 2, src, agent_shape).reshape(1, h, P, n)
        return AgentBias(**{k: v.contiguous() for k, v in out.items()}, agent_grid=agent_shape)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors under upstream names (``{prefix}an_bias``, ...)."""
        return {f"{prefix}{n}_bias": getattr(self, n) for n in _NAMES if getattr(self, n) is not None}
