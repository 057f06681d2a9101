"""Helpers shared by the agent-attention backbone families (spec agent.md §2.5, §5.3).

Not a family module (no registered models): checkpoint unwrapping, the agent-bias resampling step of
every ``checkpoint_filter_fn``, the upstream ``attn_type`` strings and the default cfg.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..layers.agent import AgentAttention
from ..ops.agent_bias import AgentBias

_BIAS_NAMES = ("an", "na", "ah", "aw", "ha", "wa", "ac", "ca")


def agent_cfg(**kwargs) -> dict:
    """A tag-less pretrained cfg (no weights are published by visattn; see §5.3 for local files)."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "license": "unknown", "paper_ids": "arXiv:2312.08874",
        "origin_url": "https://github.com/LeapLabTHU/Agent-Attention", **kwargs,
    }


def unwrap_state_dict(state_dict: dict, use_ema: bool = False) -> dict:
    """The bare state dict inside an upstream ``.pth`` (``model``, ``state_dict_ema``, ``state_dict``)."""
    if use_ema and "state_dict_ema" in state_dict:
        return state_dict["state_dict_ema"]
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            return state_dict[key]
    return state_dict


def stage_attn_types(attn_type: str, depths) -> list[int]:
    """Agent blocks per stage from an upstream ``ATTN_TYPE`` string: ``A`` all, ``B`` none, ``M<k>`` first k.

    ``"AAMB2"`` (Agent-Swin-B): stages 0, 1 agent, stage 2 its first 2 blocks, stage 3 none.
    """
    if not isinstance(attn_type, str) or len(attn_type) < len(depths):
        raise TypeError(f"expected attn_type to be a string like 'AAAB' or 'AAMB2', got {attn_type=}")
    head, tail = attn_type[: len(depths)], attn_type[len(depths):]
    out = []
    for ch, d in zip(head, depths):
        if ch == "A":
            out.append(d)
        elif ch == "B":
            out.append(0)
        elif ch == "M" and tail.isdigit():
            out.append(min(d, int(tail)))
        else:
            raise ValueError(f"expected attn_type letters A, B or M<k>, got {attn_type=}")
    return out


def agent_shape_of(num: int) -> tuple[int, int]:
    g = int(round(num**0.5))
    if g * g != num:
        raise ValueError(f"expected a square agent count, got {num}")
    return (g, g)


def resample_agent_biases(state_dict: dict, model: torch.nn.Module) -> dict:
    """Resample every agent module's biases in ``state_dict`` to the model's grids and agent counts.

    ``ah/aw/ha/wa`` follow the model's trained grid with I1, every term follows the model's agent
    grid with I2 (§2.4); ``an/na`` keep their size. A head-count mismatch raises ``ValueError``
    naming the key.
    """
    for name, m in model.named_modules():
        if not isinstance(m, AgentAttention):
            continue
        prefix = f"{name}." if name else ""
        keys = {n: f"{prefix}{n}_bias" for n in _BIAS_NAMES}
        if not all(keys[n] in state_dict for n in _BIAS_NAMES[:6]):
            continue
        target = m.agent_bias()
        if all(state_dict[keys[n]].shape == getattr(target, n).shape for n in _BIAS_NAMES
               if getattr(target, n) is not None and keys[n] in state_dict):
            continue
        tensors = {n: state_dict[keys[n]] for n in _BIAS_NAMES if keys[n] in state_dict}
        if tensors["an"].shape[0] != m.num_heads:
            raise ValueError(f"expected {m.num_heads} heads in {keys['an']}, got shape {tuple(tensors['an'].shape)}")
        try:
            src = AgentBias(**tensors)
        except ValueError as e:
            raise ValueError(f"cannot resample the agent biases under {prefix!r}: {e}") from None
        new = src.resample(grid=target.grid, key_grid=target.key_grid, agent_shape=target.agent_grid)
        for n, t in new.state_dict().items():
            state_dict[f"{prefix}{n}"] = t
    return state_dict
