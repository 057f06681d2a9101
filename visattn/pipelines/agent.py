"""AgentSD as a diffusers attention processor: token merging + agent attention in SD UNet self-attention.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024,
https://arxiv.org/abs/2312.08874), AgentSD. Spec: agent.md §2.6, §3.4, §5.1; diffusers.md §2, §4-§6.

Contents: :class:`AgentSDConfig` (and :class:`AgentSDPhase` for step-keyed phases),
:class:`AgentUNetAttnProcessor` (``AttnProcessor2_0``'s call convention, installed on the qualifying
``attn1`` of ``UNet2DConditionModel``'s ``BasicTransformerBlock``s), :func:`unet_downsample_levels` and
the registration of the ``"agent"`` method for ``visattn.pipelines.apply``.

Unlike upstream (which swaps ``__class__`` of every ``BasicTransformerBlock`` and of both attentions,
AA#18), nothing is patched: the processor merges the ``norm1`` output it receives, the similarity
metric (the block input before ``norm1``) comes from a forward pre-hook on the parent block, the
latent size and the real step index come from the framework's hooks, and ``remove()`` restores the
original processor objects and hooks. The ToMe-only path and every dense path keep SDPA through
diffusers' dispatcher; the agent path calls :func:`visattn.ops.agent_attention`.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from diffusers.hooks import ModelHook

from ..ops.agent import agent_attention
from ..ops.agent_merge import (
    agentsd_counts,
    agentsd_grid,
    bipartite_soft_matching,
    dst_offsets,
    dst_partition,
)
from ._base import VisattnProcessor
from ._config import PipelineConfig
from ._context import AttnContext
from ._registry import MethodSpec, register_method

__all__ = ["AgentSDConfig", "AgentSDPhase", "AgentUNetAttnProcessor", "unet_downsample_levels"]


# ---------------------------------------------------------------------------------------------- config
def _check_num(name: str, value, lo: float, hi: float, *, hi_open: bool = False, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (lo <= value and (value < hi if hi_open else value <= hi)):
        kind = "an int" if integer else "a number"
        raise ValueError(
            f"expected {name} to be {kind} in [{lo}, {hi}{')' if hi_open else ']'}, got {name}={value!r}"
        )


@dataclass(frozen=True)
class AgentSDPhase:
    """Settings from step ``start`` on (fields left ``None`` keep the config's base values).

    ``start`` is a step index (int) or a fraction of the step count (float in ``[0, 1]``; the phase
    starts at step ``ceil(start * num_steps)``).
    """

    start: int | float
    ratio: float | None = None
    agent_ratio: float | None = None
    sx: int | None = None
    sy: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.start, bool)
            or not isinstance(self.start, (int, float))
            or self.start < 0
            or (isinstance(self.start, float) and self.start > 1)
        ):
            raise ValueError(
                f"expected a phase start to be a step index >= 0 or a fraction in [0, 1], got "
                f"start={self.start!r}"
            )
        _check_settings(self.ratio, self.agent_ratio, self.sx, self.sy)

    def start_step(self, num_steps: int | None) -> int:
        if isinstance(self.start, int):
            return self.start
        if num_steps is None:
            raise ValueError(
                f"a phase starting at the fraction {self.start} of the steps needs the step count: "
                "the pipeline reported none; set AgentSDConfig.num_steps or start phases at step indices"
            )
        return math.ceil(self.start * num_steps - 1e-9)


def _check_settings(ratio, agent_ratio, sx, sy) -> None:
    if ratio is not None:
        _check_num("ratio", ratio, 0.0, 1.0, hi_open=True)
    if agent_ratio is not None:
        _check_num("agent_ratio", agent_ratio, 0.0, 1.0)
    for name, s in (("sx", sx), ("sy", sy)):
        if s is not None:
            _check_num(name, s, 1, 64, integer=True)


@dataclass(frozen=True)
class _Settings:
    ratio: float
    agent_ratio: float
    sx: int
    sy: int


@dataclass(frozen=True)
class AgentSDConfig(PipelineConfig):
    """AgentSD settings (spec agent.md §2.6, §3.4). Defaults are upstream's ``apply_patch`` defaults.

    Args:
        ratio: fraction of the ``N`` tokens merged away for the features (``r = int(N·ratio)``).
        agent_ratio: fraction merged away to form the agents; ``0`` disables the agent path (ToMe only).
        sx, sy: dst cell size (columns, rows): one dst token per ``sy × sx`` cell.
        max_downsample: only blocks at latent downsampling ``ds <= max_downsample`` are merged.
        k_scale2: ``κ``; the second softmax uses ``attn.scale ** κ``.
        k_shortcut: weight of the ``+ k_shortcut · v`` term of the agent path.
        precision: ``"fp32"`` upcasts q, k, v and the agents before both products (SD 2.x, AA#26);
            ``"auto"`` keeps the input dtype (SDPA kernels accumulate the logits in fp32 anyway).
        use_rand: random dst offsets per cell (forced off for odd batches, as upstream).
        seed: seed of the dst offsets; each call draws from a generator seeded by (seed, step index,
            processor key), so runs are reproducible and independent of call order.
        metric: ``"block_input"`` (upstream: the block input before ``norm1``, captured by a forward
            pre-hook on the parent block) or ``"attn_input"`` (the ``norm1`` output; no hook).
        phases: :class:`AgentSDPhase` entries (or dicts of their fields) keyed by the real step index.
        num_steps: step count that fractional phase starts refer to when the pipeline reports none.
        backend: backend of :func:`visattn.ops.agent_attention` (``None``: ``"auto"``).
        dense_steps, dense_blocks: the framework's schedule (``pipelines/schedule.py``): those steps or
            blocks run the original dense attention.
    """

    slug: ClassVar[str] = "agent"

    ratio: float = 0.5
    agent_ratio: float = 0.8
    sx: int = 2
    sy: int = 2
    max_downsample: int = 1
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    precision: Literal["auto", "fp32"] = "auto"
    use_rand: bool = True
    seed: int = 0
    metric: Literal["block_input", "attn_input"] = "block_input"
    phases: tuple[AgentSDPhase | dict, ...] = ()
    num_steps: int | None = None
    backend: str | None = None
    dense_steps: tuple[int, ...] | float | None = None
    dense_blocks: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        _check_settings(self.ratio, self.agent_ratio, self.sx, self.sy)
        _check_num("max_downsample", self.max_downsample, 1, 1 << 16, integer=True)
        _check_num("k_scale2", self.k_scale2, 0.0, 16.0)
        _check_num("k_shortcut", self.k_shortcut, -1e6, 1e6)
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"expected precision 'auto' or 'fp32', got precision={self.precision!r}")
        if self.metric not in ("block_input", "attn_input"):
            raise ValueError(f"expected metric 'block_input' or 'attn_input', got metric={self.metric!r}")
        if self.num_steps is not None:
            _check_num("num_steps", self.num_steps, 1, 1 << 30, integer=True)
        phases = []
        for p in self.phases:
            if isinstance(p, dict):
                try:
                    p = AgentSDPhase(**p)
                except TypeError as e:
                    raise TypeError(
                        f"a phase takes the fields start, ratio, agent_ratio, sx, sy; got {p!r}"
                    ) from e
            if not isinstance(p, AgentSDPhase):
                raise TypeError(f"expected phases to hold AgentSDPhase or dicts, got {type(p).__name__}")
            phases.append(p)
        object.__setattr__(self, "phases", tuple(phases))

    def settings(self, step_index: int | None, num_steps: int | None = None) -> _Settings:
        """The settings of step ``step_index`` (the base ones when the step is unknown)."""
        s = _Settings(self.ratio, self.agent_ratio, self.sx, self.sy)
        if step_index is None or not self.phases:
            return s
        steps = num_steps if num_steps is not None else self.num_steps
        started = [(p.start_step(steps), i, p) for i, p in enumerate(self.phases)]
        for _, _, p in sorted(x for x in started if x[0] <= step_index):
            s = _Settings(
                *(
                    getattr(s, f) if getattr(p, f) is None else getattr(p, f)
                    for f in ("ratio", "agent_ratio", "sx", "sy")
                )
            )
        return s


# ------------------------------------------------------------------------------------------ structure
def unet_downsample_levels(unet: torch.nn.Module) -> dict[str, int]:
    """``{BasicTransformerBlock module name: ds}`` of a ``UNet2DConditionModel``, from its structure.

    A down block sits at ``2^(downsamplers before it)``, the mid block below all of them, and each
    up block at the level its preceding upsamplers leave (``ds`` is what agent.md §2.6 computes from
    the token count at run time; this map only selects the processors to install).
    """
    levels: dict[str, int] = {}

    def visit(prefix: str, block: torch.nn.Module, ds: int) -> None:
        for name, m in block.named_modules():
            if type(m).__name__ == "BasicTransformerBlock":
                levels[f"{prefix}.{name}"] = ds

    ds = 1
    for i, blk in enumerate(getattr(unet, "down_blocks", ())):
        visit(f"down_blocks.{i}", blk, ds)
        if getattr(blk, "downsamplers", None):
            ds *= 2
    if getattr(unet, "mid_block", None) is not None:
        visit("mid_block", unet.mid_block, ds)
    for i, blk in enumerate(getattr(unet, "up_blocks", ())):
        visit(f"up_blocks.{i}", blk, ds)
        if getattr(blk, "upsamplers", None):
            ds = max(1, ds // 2)
    return levels


_ATTN1 = re.compile(r"^(?P<block>.*transformer_blocks\.\d+)\.attn1\.processor$")


def _block_of(key: str) -> str | None:
    m = _ATTN1.match(key)
    return m.group("block") if m else None


def _stream_seed(seed: int, step_index: int | None, key: str) -> int:
    """A 63-bit seed for one call's dst offsets, from (seed, step, key); stable across runs."""
    mix = (
        seed * 0x9E3779B97F4A7C15
        + ((step_index if step_index is not None else -1) + 2) * 0xBF58476D1CE4E5B9
        + zlib.crc32(key.encode()) * 0x94D049BB133111EB
    )
    return mix % (1 << 63)


# ------------------------------------------------------------------------------------------- processor
class AgentUNetAttnProcessor(VisattnProcessor):
    """AgentSD on a legacy ``Attention`` ``attn1`` (drop-in for ``AttnProcessor2_0``; spec agent.md §2.6).

    Per call, on the ``N`` tokens of the ``norm1`` output ``y`` (with the block input ``x`` as metric):
    dst tokens on an ``sy × sx`` grid, cosine matching of srcs to dsts, ``N − r`` feature tokens and,
    when ``2·(N − r_a) < N − r``, ``N − r_a`` agents; then
    ``O = softmax(q aᵀ s^κ) softmax(a kᵀ s) v + k_shortcut · v`` (or plain SDPA over the features),
    ``to_out``, and unmerge. Blocks deeper than ``max_downsample``, dense steps or blocks of the
    schedule, and context parallelism run the original dense attention through diffusers' dispatcher
    (the last one counted as a fallback).

    Args:
        config: :class:`AgentSDConfig` (default: upstream's defaults).
        original, key, block_index, context, component, module: set by ``visattn.pipelines.apply``.
            Without a context (a processor built by hand) the latent size is unknown and every call
            falls back to dense attention, counted.

    Raises (at call time):
        NotImplementedError: an ``attention_mask`` or ``encoder_hidden_states`` on a call that merges.
    """

    method = "agent"

    def __init__(
        self,
        config: AgentSDConfig | None = None,
        *,
        original=None,
        key: str = "",
        block_index: int | None = None,
        context: AttnContext | None = None,
        component: str = "unet",
        module=None,
        **kwargs,
    ) -> None:
        config = AgentSDConfig() if config is None else config
        if not isinstance(config, AgentSDConfig):
            raise TypeError(f"expected an AgentSDConfig, got config={type(config).__name__}")
        super().__init__(
            config,
            original=original,
            key=key,
            block_index=block_index,
            context=context if context is not None else AttnContext(),
            component=component,
            module=module,
            **kwargs,
        )
        self._block_input: torch.Tensor | None = None  # set by the parent block's pre-hook, used once

    # the pre-hook on the parent BasicTransformerBlock hands over the block input (the metric)
    def set_block_input(self, x: torch.Tensor | None) -> None:
        self._block_input = x

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        block_input, self._block_input = self._block_input, None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:  # normalises over tokens: before any merge
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        plan = self._plan(hidden_states, encoder_hidden_states, attention_mask)
        if plan is None or isinstance(plan, str):  # dense: by design (None) or a counted fallback (reason)
            out = self._dense(
                attn, hidden_states, encoder_hidden_states, attention_mask, fallback_reason=plan
            )
        else:
            out = self._merged(attn, hidden_states, block_input, *plan)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # ------------------------------------------------------------------ decisions (Python ints only)
    def _plan(self, x, encoder_hidden_states, attention_mask):
        """``None`` (dense, not a fallback), a fallback reason, or ``(settings, (h, w), r, r_a, agents)``."""
        if self._parallel_config is not None:
            return "context parallelism (_parallel_config is set)"
        if self.dense_now():
            self.context.stats.add_call("dense_by_schedule")
            return None
        latent_hw = self.context.latent_hw.get(self.component)
        if latent_hw is None:
            return "agent: latent size unknown (install with visattn.pipelines.apply)"
        try:
            ds, h, w = agentsd_grid(latent_hw, x.shape[1])
        except ValueError:
            return f"agent: {x.shape[1]} tokens are not a grid of the latent {tuple(latent_hw)}"
        if ds > self.config.max_downsample:
            self.context.stats.add_call("agent: dense (ds > max_downsample)")
            return None
        s = self.config.settings(self.context.step_index, self.context.num_steps)
        num_src = h * w - (h // s.sy) * (w // s.sx)
        r, r_a, agents = agentsd_counts(h * w, num_src, s.ratio, s.agent_ratio)
        if r == 0 and not agents:  # nothing merged, no agents: exactly dense attention
            return None
        if attention_mask is not None or encoder_hidden_states is not None:
            name = "attention_mask" if attention_mask is not None else "encoder_hidden_states"
            raise NotImplementedError(
                f"AgentUNetAttnProcessor merges self-attention tokens and cannot use {name} (got a tensor); "
                "remove it, or run this block dense (AgentSDConfig.dense_blocks)"
            )
        return s, (h, w), r, r_a, agents

    # ------------------------------------------------------------------ dense (original) attention
    def _dense(self, attn, x, encoder_hidden_states, attention_mask, fallback_reason):
        cross = encoder_hidden_states is not None
        batch, seq_len, _ = (encoder_hidden_states if cross else x).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        context = x
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        elif cross:
            context = encoder_hidden_states
        q, k, v = (
            self._heads(attn, attn.to_q(x)),
            self._heads(attn, attn.to_k(context)),
            self._heads(attn, attn.to_v(context)),
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if fallback_reason is not None:
            out = self.fallback(fallback_reason, q, k, v, attention_mask)
        else:
            out = self.dispatch(q, k, v, attention_mask)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q.dtype)))

    @staticmethod
    def _heads(attn, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (attn.heads, -1))  # [B, S, H*D] -> [B, S, H, D]

    # ------------------------------------------------------------------ AgentSD
    def _metric(self, x: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
        if self.config.metric == "attn_input":
            return x
        if block_input is not None and block_input.shape[:2] == x.shape[:2]:
            return block_input
        self.context.stats.add_fallback("agent: block input not captured; the attention input is the metric")
        return x

    def _merged(self, attn, x, block_input, s: _Settings, grid, r, r_a, agents):
        cfg = self.config
        h, w = grid
        self.context.stats.add_call("agent" if agents else "agent: tome only")
        use_rand = cfg.use_rand and x.shape[0] % 2 == 0  # odd batch: cond/uncond not paired (upstream)
        # a generator on x's device: the draw and the partition stay there (no copy, no stream sync)
        gen = torch.Generator(device=x.device).manual_seed(
            _stream_seed(cfg.seed, self.context.step_index, self.key)
        )
        offsets = dst_offsets(h, w, s.sx, s.sy, generator=gen, use_rand=use_rand, device=x.device)
        src_idx, dst_idx = dst_partition(h, w, s.sx, s.sy, offsets)
        tm = bipartite_soft_matching(self._metric(x, block_input), src_idx, dst_idx, r, r_a if agents else 0)

        if agents:  # [B, N - r, C] features and [B, N - r_a, C] agent tokens
            feats, agent_tokens = tm.merge_both(x)
        else:
            feats = tm.merge(x)
        q = self._heads(attn, attn.to_q(feats))
        k = self._heads(attn, attn.to_k(feats))
        v = self._heads(attn, attn.to_v(feats))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if agents:
            a = self._heads(attn, attn.to_q(agent_tokens))  # [B, N - r_a, H, D]
            if attn.norm_q is not None:
                a = attn.norm_q(a)
            with self.timed(x.device):
                out = self._agent_attention(q, k, v, a, attn.scale)
        else:
            out = self.dispatch(q, k, v)  # ToMe only: SDPA over the features
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q.dtype)))
        return tm.unmerge(out)  # to_out is per token, so it commutes with the unmerge gather

    def _agent_attention(self, q, k, v, a, scale: float) -> torch.Tensor:
        """``softmax(q aᵀ s^κ) softmax(a kᵀ s) v + k_shortcut v`` on ``[B, S, H, D]`` tensors."""
        cfg = self.config
        dtype = q.dtype
        if cfg.precision == "fp32" and dtype != torch.float64:
            q, k, v, a = q.float(), k.float(), v.float(), a.float()
            # autocast would cast SDPA's inputs back to half precision (upstream disables it too)
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = agent_attention(
                    q, k, v, agents=a, scale=(scale, scale**cfg.k_scale2), backend=cfg.backend
                )
                return (out + cfg.k_shortcut * v).to(dtype)
        out = agent_attention(q, k, v, agents=a, scale=(scale, scale**cfg.k_scale2), backend=cfg.backend)
        return (out + cfg.k_shortcut * v).to(dtype)


# ------------------------------------------------------------------------------------------ registry
def _factory(config, *, original, key, block_index, context, component, module):
    return AgentUNetAttnProcessor(
        config,
        original=original,
        key=key,
        block_index=block_index,
        context=context,
        component=component,
        module=module,
    )


class _BlockInputHook(ModelHook):
    """Hands the ``BasicTransformerBlock``'s input (the metric, pre-``norm1``) to its ``attn1`` processor."""

    _is_stateful = False

    def __init__(self, processor: AgentUNetAttnProcessor) -> None:
        super().__init__()
        self.processor = processor

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")  # positional or keyword calls
        if module.attn1.processor is self.processor:
            self.processor.set_block_input(x)
        return args, kwargs


def _install(model: torch.nn.Module, handle) -> None:
    """Keep AgentSD only on UNet blocks at ``ds <= max_downsample``; hook the metric capture on them.

    ``default_targets`` sees a key and a module, not the model, so the model type and the
    downsampling level of a block can only be read here: processors on other models (PixArt and DiT
    also have ``BasicTransformerBlock``s) or on deeper blocks (which would only run dense attention)
    are put back to their originals and dropped from ``handle.processors``.

    Raises:
        ValueError: no processor is left on this model (the message says why).
    """
    comps = {c for c, m in handle.components.items() if m is model}
    ours = [
        (c, k)
        for (c, k), p in handle.processors.items()
        if c in comps and isinstance(p, AgentUNetAttnProcessor)
    ]
    if not ours:
        return
    is_unet = hasattr(model, "down_blocks") and hasattr(model, "up_blocks")
    levels = unet_downsample_levels(model) if is_unet else {}
    modules = dict(model.named_modules())
    kept = []
    for comp, key in ours:
        proc = handle.processors[(comp, key)]
        block = _block_of(key)
        deeper = block not in levels or levels[block] > proc.config.max_downsample
        # only_cross_attention blocks feed attn1 the text states: nothing to merge
        if not is_unet or deeper or getattr(modules.get(block), "only_cross_attention", False):
            modules[key[: -len(".processor")]].set_processor(proc.original)
            del handle.processors[(comp, key)]
        else:
            kept.append((block, proc))
    if not is_unet:
        raise ValueError(
            f"AgentSD runs on UNet2DConditionModel (SD 1.x, 2.x, SDXL), got {type(model).__name__}; "
            "pass components=['unet'] or a UNet"
        )
    if not kept:
        raise ValueError(
            f"AgentSD found no BasicTransformerBlock at a downsampling level <= max_downsample="
            f"{handle.config.max_downsample} in {type(model).__name__} "
            f"(levels: {sorted(set(levels.values()))}); raise max_downsample (SDXL: preset agentsd_sdxl)"
        )
    for block, proc in kept:
        if proc.config.metric == "block_input":
            handle.add_hook(modules[block], _BlockInputHook(proc), "visattn_agent_metric")


register_method(
    MethodSpec(
        slug="agent",
        config_cls=AgentSDConfig,
        processors={("Attention", "AttnProcessor2_0"): _factory},
        default_targets=lambda key, module: _block_of(key) is not None,
        install=_install,
        description="AgentSD: token merging + agent attention on SD UNet self-attention (attn1)",
    )
)
