"""visattn NAT/DiNAT state dict -> original-repo and Hugging Face key names (inverse of checkpoint_filter_fn).

Used by the shared contract's weight-loading test (``to_upstream_state_dict``) and by test_nat.py.
Written from the key tables of specs/neighborhood.md §5.3, independently of the filter's code.
"""

from __future__ import annotations

import re

import torch


def to_upstream_state_dict(state_dict: dict, model=None, level_key: str = "levels") -> dict:
    """visattn names -> ``SHI-Labs/Neighborhood-Attention-Transformer`` names (``levels.*``; DiNAT_s ``layers.*``)."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^stages\.(\d+)\.downsample\.(.*)$", k)
        if m:
            out[f"{level_key}.{int(m[1]) - 1}.downsample.{m[2]}"] = v
            continue
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma$", rf"{level_key}.\1.blocks.\2.gamma\3", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", rf"{level_key}.\1.blocks.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def to_hf_state_dict(state_dict: dict, prefix: str = "dinat") -> dict:
    """visattn names -> transformers ``DinatForImageClassification`` / ``NatForImageClassification`` names."""
    out = {}
    ls: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", k):
            base = f"{prefix}.encoder.levels.{m[1]}.layers.{m[2]}.attention.self"
            q, kk, vv = v.chunk(3, dim=0)
            out[f"{base}.query.{m[3]}"], out[f"{base}.key.{m[3]}"], out[f"{base}.value.{m[3]}"] = q, kk, vv
            continue
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma$", k):
            ls.setdefault((m[1], m[2]), {})[m[3]] = v
            continue
        if m := re.match(r"^stages\.(\d+)\.downsample\.(.*)$", k):
            out[f"{prefix}.encoder.levels.{int(m[1]) - 1}.downsample.{m[2]}"] = v
            continue
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k):
            layer = f"{prefix}.encoder.levels.{m[1]}.layers.{m[2]}"
            rest = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.rpb": "attention.self.rpb",
                    "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                    "mlp.fc2": "output.dense"}
            for src, dst in rest.items():
                if m[3] == src or m[3].startswith(src + "."):
                    out[layer + "." + dst + m[3][len(src):]] = v
                    break
            else:
                raise KeyError(k)
            continue
        k = re.sub(r"^patch_embed\.proj\.", f"{prefix}.embeddings.patch_embeddings.projection.", k)
        k = re.sub(r"^patch_embed\.norm\.", f"{prefix}.embeddings.norm.", k)
        k = re.sub(r"^norm\.", f"{prefix}.layernorm.", k)
        k = re.sub(r"^head\.fc\.", "classifier.", k)
        out[k] = v
    for (i, j), g in ls.items():
        out[f"{prefix}.encoder.levels.{i}.layers.{j}.layer_scale_parameters"] = torch.stack([g["1"], g["2"]])
    return out
