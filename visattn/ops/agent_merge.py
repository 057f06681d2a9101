"""AgentSD token merging: ToMe bipartite soft matching with a second, deeper merge that yields agents.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024,
https://arxiv.org/abs/2312.08874), §AgentSD, built on "Token Merging for Fast Stable Diffusion"
(Bolya & Hoffman, 2023, https://arxiv.org/abs/2303.17604). Spec: agent.md §2.6.

Contents (no diffusers import):

* :func:`agentsd_grid` — the downsampling level and token grid of a UNet transformer block;
* :func:`agentsd_counts` — how many tokens the feature and agent merges remove, and whether the
  agent path runs (``2·(N − r_a) < N − r``);
* :func:`dst_partition` — the src/dst split: one dst per ``sy × sx`` cell at a seeded random offset;
* :func:`bipartite_soft_matching` — cosine scores src × dst (one batched GEMM), best dst per src and
  the rank of every src; returns a :class:`TokenMerge` whose ``merge``/``merge_agents``/``unmerge``
  are gathers and one ``scatter_reduce`` each.

Everything is computed with shapes fixed by ``N``, ``r`` and the grid (Python ints): no host
synchronisation and no data-dependent shape. Deliberate differences from upstream's
``agentsd/merge.py``: src and dst tokens are each kept in raster order and ranks are a stable sort
(upstream's unstable argsorts only differ on exact ties); the offsets come from a caller's
``torch.Generator`` (upstream forks the global RNG); scores of half-precision metrics are computed in
float32 (fewer ties, no overflow of the squared norm); and ``r = 0`` does not by itself disable the
agents (upstream returns early), so ``ratio=0`` with agents gives agent attention over all tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "agentsd_grid",
    "agentsd_counts",
    "dst_offsets",
    "dst_partition",
    "bipartite_soft_matching",
    "TokenMerge",
]


def agentsd_grid(latent_hw: tuple[int, int], num_tokens: int) -> tuple[int, int, int]:
    """``(ds, h, w)`` of a block that sees ``num_tokens`` tokens of a latent of size ``latent_hw``.

    ``ds = ceil(sqrt(floor(H0·W0 / N)))``, ``h = ceil(H0 / ds)``, ``w = ceil(W0 / ds)`` (spec §2.6).

    Raises:
        ValueError: ``h·w != N`` (the tokens are not the latent's grid at one downsampling level).
    """
    H0, W0 = (int(x) for x in latent_hw)
    if H0 < 1 or W0 < 1 or num_tokens < 1:
        raise ValueError(
            f"expected a positive latent size and token count, got latent_hw={latent_hw}, "
            f"num_tokens={num_tokens}"
        )
    ds = max(1, math.ceil(math.sqrt((H0 * W0) // num_tokens)))
    h, w = -(-H0 // ds), -(-W0 // ds)
    if h * w != num_tokens:
        raise ValueError(
            f"expected num_tokens to be the latent grid {H0}x{W0} downsampled by ds={ds} "
            f"({h}x{w}={h * w} tokens), got num_tokens={num_tokens}"
        )
    return ds, h, w


def agentsd_counts(num_tokens: int, num_src: int, ratio: float, agent_ratio: float) -> tuple[int, int, bool]:
    """``(r, r_a, use_agents)`` for ``N`` tokens with ``num_src`` src tokens (spec §2.6 steps 3–4).

    ``r = min(int(N·ratio), num_src)`` feature tokens are merged away, ``r_a = min(int(N·agent_ratio),
    num_src)`` for the agents; the agent path runs iff ``2·(N − r_a) < N − r``.
    """
    r = min(int(num_tokens * ratio), num_src)
    r_a = min(int(num_tokens * agent_ratio), num_src)
    return r, r_a, 2 * (num_tokens - r_a) < num_tokens - r


def dst_offsets(
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    generator: torch.Generator | None = None,
    use_rand: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat offset ``o`` in ``[0, sx·sy)`` of the dst token of each ``sy × sx`` cell: ``[h//sy, w//sx]``.

    Drawn with ``torch.randint`` from ``generator`` (on the generator's device; the default CPU
    generator if None) when ``use_rand``, else zeros (the top-left token of every cell) on ``device``.
    A CUDA generator keeps the draw on the GPU, so no host-to-device copy (and no stream sync) happens.
    """
    shape = (h // sy, w // sx)
    if not use_rand:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(sx * sy, shape, generator=generator, dtype=torch.int64, device=gen_device)


def dst_partition(
    h: int, w: int, sx: int, sy: int, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_idx, dst_idx)``: raster indices of the src and dst tokens of an ``h × w`` grid, each sorted.

    Cell ``(i, j)`` covers rows ``[i·sy, (i+1)·sy)`` and columns ``[j·sx, (j+1)·sx)``; its dst token sits
    at row ``i·sy + o // sx``, column ``j·sx + o % sx`` for its offset ``o``. Rows and columns left over
    when ``sy``/``sx`` do not divide ``h``/``w`` are src. Computed on ``offsets``' device with fixed shapes.

    Raises:
        ValueError: non-positive strides, or ``offsets`` not of shape ``[h // sy, w // sx]``.
    """
    for name, s in (("sx", sx), ("sy", sy)):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"expected {name} to be a positive int, got {name}={s!r}")
    hs, ws = h // sy, w // sx
    if tuple(offsets.shape) != (hs, ws):
        raise ValueError(
            f"expected offsets of shape [h // sy, w // sx] = [{hs}, {ws}], got "
            f"offsets.shape={tuple(offsets.shape)}"
        )
    dev = offsets.device
    offsets = offsets.long()
    rows = torch.arange(hs, device=dev)[:, None] * sy + offsets // sx  # [hs, ws]
    cols = torch.arange(ws, device=dev)[None, :] * sx + offsets % sx
    flat = (rows * w + cols).reshape(-1)
    is_dst = torch.zeros(h * w, dtype=torch.int8, device=dev).scatter_(0, flat, 1)
    # a stable sort of the 0/1 flags lists the src tokens, then the dst tokens, each in raster order
    perm = torch.sort(is_dst, stable=True).indices
    num_src = h * w - hs * ws
    return perm[:num_src], perm[num_src:]


@dataclass
class TokenMerge:
    """The matching of one block call: index tensors only, shared by ``merge``, ``merge_agents``, ``unmerge``.

    Attributes:
        num_tokens: ``N``.
        r: src tokens merged into dsts for the features (``N − r`` feature tokens).
        agent_r: src tokens merged for the agents (``N − agent_r`` agents).
        src_idx: ``[n_s]`` raster indices of the src tokens; ``dst_idx``: ``[n_d]`` of the dst tokens.
        rank: ``[B, n_s]`` src positions (into ``src_idx``) by best score, descending (stable).
        best: ``[B, n_s]`` the best dst (position into ``dst_idx``) of each src, in rank order.
        ranked_tokens: ``[B, n_s]`` raster index of the src at each rank (``src_idx[rank]``).
    """

    num_tokens: int
    r: int
    agent_r: int
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    rank: torch.Tensor
    best: torch.Tensor
    ranked_tokens: torch.Tensor

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``'s src tokens in rank order ``[B, n_s, C]`` and its dst tokens ``[B, n_d, C]``."""
        B, N, C = x.shape
        if N != self.num_tokens or B != self.rank.shape[0]:
            raise ValueError(
                f"expected x of shape [B={self.rank.shape[0]}, N={self.num_tokens}, C], got "
                f"x.shape={tuple(x.shape)}"
            )
        ranked = torch.gather(x, 1, self.ranked_tokens[..., None].expand(-1, -1, C))
        return ranked, x.index_select(1, self.dst_idx)

    def _combine(self, ranked: torch.Tensor, dst: torch.Tensor, r: int) -> torch.Tensor:
        if r == 0:
            return torch.cat([ranked, dst], dim=1)
        C = ranked.shape[-1]
        # each dst becomes the mean of itself and the srcs assigned to it (include_self=True)
        dst = dst.scatter_reduce(1, self.best[:, :r, None].expand(-1, -1, C), ranked[:, :r], reduce="mean")
        return torch.cat([ranked[:, r:], dst], dim=1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` -> feature tokens ``[B, N − r, C]``: unmerged srcs in rank order, then dsts."""
        return self._combine(*self._parts(x), self.r)

    def merge_agents(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` -> agents ``[B, N − agent_r, C]``: srcs ranked after ``agent_r``, then dsts."""
        return self._combine(*self._parts(x), self.agent_r)

    def merge_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(merge(x), merge_agents(x))`` sharing one gather of ``x``."""
        ranked, dst = self._parts(x)
        return self._combine(ranked, dst, self.r), self._combine(ranked, dst, self.agent_r)

    def source_rows(self) -> torch.Tensor:
        """``[B, N]`` int64: the row of the merged features that every original token reads back."""
        B, n_s = self.rank.shape
        r = self.r
        rows = torch.empty(B, self.num_tokens, dtype=torch.int64, device=self.rank.device)
        dst_rows = torch.arange(n_s - r, self.num_tokens - r, device=rows.device)
        rows.scatter_(1, self.dst_idx.expand(B, -1), dst_rows.expand(B, -1))
        ranked_tokens = self.ranked_tokens
        unm_rows = torch.arange(n_s - r, device=rows.device).expand(B, -1)
        rows.scatter_(1, ranked_tokens[:, r:], unm_rows)
        rows.scatter_(1, ranked_tokens[:, :r], self.best[:, :r] + (n_s - r))
        return rows

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Feature rows ``[B, N − r, C]`` -> ``[B, N, C]``; a merged src receives its dst's row."""
        B, M, C = x.shape
        if M != self.num_tokens - self.r:
            raise ValueError(
                f"expected x with N - r = {self.num_tokens - self.r} tokens, got x.shape={tuple(x.shape)}"
            )
        return torch.gather(x, 1, self.source_rows()[..., None].expand(-1, -1, C))


def bipartite_soft_matching(
    metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, r: int, agent_r: int = 0
) -> TokenMerge:
    """Match every src token to its most similar dst token (cosine of ``metric``) and rank the srcs.

    Args:
        metric: ``[B, N, C]`` per-token features (AgentSD: the block input before ``norm1``).
        src_idx, dst_idx: from :func:`dst_partition`, on ``metric``'s device.
        r, agent_r: src tokens to merge for the features and for the agents (``0 <= r <= n_s``).

    Returns:
        A :class:`TokenMerge`. Ties: the first dst wins a src; equal best scores keep src raster order.
    """
    if metric.dim() != 3:
        raise ValueError(f"expected metric of shape [B, N, C], got metric.shape={tuple(metric.shape)}")
    N = metric.shape[1]
    n_s, n_d = src_idx.numel(), dst_idx.numel()
    if n_s + n_d != N:
        raise ValueError(f"expected src_idx and dst_idx to cover the N={N} tokens, got {n_s} + {n_d}")
    for name, val in (("r", r), ("agent_r", agent_r)):
        if not 0 <= val <= n_s:
            raise ValueError(f"expected 0 <= {name} <= {n_s} (the src tokens), got {name}={val}")
    with torch.no_grad():
        m = metric.float() if metric.dtype in (torch.float16, torch.bfloat16) else metric
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # an all-zero token scores 0, not NaN
        scores = torch.bmm(
            m.index_select(1, src_idx), m.index_select(1, dst_idx).transpose(1, 2)
        )  # [B, n_s, n_d]
        node_max, node_idx = scores.max(dim=-1)  # first maximal index on ties
        rank = torch.sort(node_max, dim=-1, descending=True, stable=True).indices  # [B, n_s]
        best = torch.gather(node_idx, 1, rank)
        ranked_tokens = src_idx.expand(rank.shape[0], -1).gather(1, rank)
    return TokenMerge(N, r, agent_r, src_idx, dst_idx, rank, best, ranked_tokens)
