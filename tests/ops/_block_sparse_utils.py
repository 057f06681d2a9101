"""Test helpers for block-sparse attention: an independent oracle, input builders, tolerance rules.

The oracle here shares no code with ``visattn``: it reads the plan's index lists with a Python loop
and runs a dense masked softmax in float64, so a bug in ``BlockSparsePlan.to_mask`` or in
``block_sparse_attention_ref`` cannot hide itself.
"""

from __future__ import annotations

import math

import torch

from visattn import BlockSparsePlan

# per-dtype absolute floors on outputs (DESIGN §5); gradients get GRAD_FACTOR times these
FLOORS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}
GRAD_FACTOR = 2.0


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BNHD" else t


def from_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BNHD" else t


def make_qkv(B, Nq, Nk, H, Hk, D, *, layout="BNHD", dtype=torch.float32, device="cpu", requires_grad=False):
    """Random q, k, v in ``layout`` (values ~N(0, 1), rounded to ``dtype``)."""

    def one(n, h):
        shape = (B, n, h, D) if layout == "BNHD" else (B, h, n, D)
        return torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad)

    return one(Nq, H), one(Nk, Hk), one(Nk, Hk)


def plan_block_mask(plan: BlockSparsePlan, num_kv_blocks: int) -> torch.Tensor:
    """The block mask a plan means, read entry by entry on the host (independent of ``to_mask``).

    Semantics under test: only the first ``clamp(kv_count, 0, max_kv)`` entries of a row are used;
    used entries outside ``[0, num_kv_blocks)`` attend nothing.
    """
    idx = plan.kv_index.cpu().tolist()
    cnt = plan.kv_count.cpu().tolist()
    Bp, Hp, nq, max_kv = plan.kv_index.shape
    mask = torch.zeros(Bp, Hp, nq, num_kv_blocks, dtype=torch.bool)
    for b in range(Bp):
        for h in range(Hp):
            for i in range(nq):
                for j in range(max(0, min(cnt[b][h][i], max_kv))):
                    e = idx[b][h][i][j]
                    if 0 <= e < num_kv_blocks:
                        mask[b, h, i, e] = True
    return mask


def dense_oracle(q, k, v, block_mask, block_q, block_k, *, scale=None, layout="BNHD"):
    """Dense masked attention in float64 from a boolean block mask ``[B|1, H|1, nq, nk]``.

    Returns ``(out, lse)``: ``out`` float64 in ``layout``, ``lse`` float64 ``[B, H, N_q]``; rows that
    attend no key give zeros and ``-inf``.
    """
    q, k, v = (to_bhnd(t.detach(), layout).double().cpu() for t in (q, k, v))
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kv_head = torch.arange(H) // (H // Hk)  # query head h reads key/value head h // group
    k, v = k[:, kv_head], v[:, kv_head]
    rows = torch.arange(Nq) // block_q
    cols = torch.arange(Nk) // block_k
    bm = block_mask.cpu().expand(B, H, -1, -1)
    tok = bm[:, :, rows][:, :, :, cols]  # [B, H, Nq, Nk] token-level mask
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(tok, torch.exp(s - shift[..., None]), torch.zeros_like(s))
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    return from_bhnd(out, layout), lse


def random_block_mask(Bp, Hp, nq, nk, *, density=0.5, empty_rows=True, single_rows=True, generator=None):
    """A random block mask with, where the shape allows, one empty row and one single-block row."""
    mask = torch.rand(Bp, Hp, nq, nk, generator=generator) < density
    if empty_rows and nq >= 2:
        mask[0, 0, 1] = False
    if single_rows:
        mask[-1, -1, 0] = False
        mask[-1, -1, 0, nk - 1] = True  # the (possibly partial) last key block alone
    return mask


def plan_from_random_mask(B, H, Nq, Nk, bq, bk, plan_shape="BH", density=0.5):
    """A plan over a random block mask; ``plan_shape`` "BH", "B1", "1H" or "11" picks broadcast axes."""
    Bp = B if plan_shape[0] == "B" else 1
    Hp = H if plan_shape[1] == "H" else 1
    mask = random_block_mask(Bp, Hp, cdiv(Nq, bq), cdiv(Nk, bk), density=density)
    return BlockSparsePlan.from_mask(mask, bq, bk), mask


def _worst(actual: torch.Tensor, expected: torch.Tensor, k: int = 5) -> str:
    diff = (actual - expected).abs().flatten()
    top = diff.topk(min(k, diff.numel())).indices
    lines = []
    for flat in top.tolist():
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), actual.shape))
        lines.append(f"    at {idx}: got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}")
    return "\n".join(lines)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_no_nan(name: str, t: torch.Tensor) -> None:
    assert not torch.isnan(t).any(), f"{name} holds {int(torch.isnan(t).sum())} NaN(s)"


def assert_close(name, actual, expected, *, dtype, low_ref=None, grad=False):
    """Check ``actual`` against the float64 ``expected``: the flash-attn ratio rule of DESIGN §5.

    The bound is ``max(2 * err(low_ref), floor)`` where ``low_ref`` is the reference run in the low
    precision (or None) and ``floor`` is the per-dtype floor (times ``GRAD_FACTOR`` for gradients).
    Non-finite expected entries must be matched exactly. On failure, print the worst mismatches.
    """
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert_no_nan(name, a)
    fin = torch.isfinite(e)
    if not torch.equal(a[~fin], e[~fin]):
        bad = (~fin & (a != e)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite entries differ at {bad}")
    if not fin.any():
        return
    floor = FLOORS[dtype] * (GRAD_FACTOR if grad else 1.0)
    bound = floor
    if low_ref is not None:
        bound = max(bound, 2.0 * max_err(low_ref.double().cpu()[fin], e[fin]))
    err = (a[fin] - e[fin]).abs().max().item()
    if not err <= bound or math.isnan(err):
        a2 = torch.where(fin, a, torch.zeros_like(a))
        e2 = torch.where(fin, e, torch.zeros_like(e))
        raise AssertionError(f"{name}: max abs error {err:.3e} > bound {bound:.3e}; worst:\n{_worst(a2, e2)}")
