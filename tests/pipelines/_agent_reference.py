"""Independent float64 reference of AgentSD for one attention call, written from agent.md §2.6 (steps 1-6)
with explicit loops and softmaxes; shared by the AgentSD processor tests. It imports nothing from visattn."""

from __future__ import annotations

import torch


def _softmax(z):
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def reference_agentsd(attn, x, y, hw, sx, sy, offs, ratio, agent_ratio, k_scale2, k_shortcut):
    """Spec §2.6 steps 1-6 for one attention call; x the metric, y the attention input, [B, N, C] float64."""
    B, N, C = y.shape
    h, w = hw
    dsts = sorted(
        (i * sy + int(offs[i, j]) // sx) * w + j * sx + int(offs[i, j]) % sx
        for i in range(h // sy)
        for j in range(w // sx)
    )
    dset = set(dsts)
    srcs = [t for t in range(N) if t not in dset]
    ns = len(srcs)
    r, ra = min(int(N * ratio), ns), min(int(N * agent_ratio), ns)
    use_agents = 2 * (N - ra) < N - r
    H = attn.heads
    D = C // H
    lin = lambda t, m: t @ m.weight.double().T + (m.bias.double() if m.bias is not None else 0)  # noqa: E731
    outs = []
    for b in range(B):
        m = torch.stack([x[b, t] / x[b, t].norm() for t in range(N)])
        S = m[srcs] @ m[dsts].T
        score, best = S.max(dim=1)
        ranked = sorted(range(ns), key=lambda i: (-float(score[i]), i))

        def merged(rr, b=b, ranked=ranked, best=best):
            rows = [y[b, srcs[i]] for i in ranked[rr:]]
            for j, t in enumerate(dsts):
                group = [y[b, t]] + [y[b, srcs[i]] for i in ranked[:rr] if int(best[i]) == j]
                rows.append(torch.stack(group).mean(0))
            return torch.stack(rows)

        feats = merged(r)
        q, k, v = (lin(feats, p).reshape(-1, H, D).transpose(0, 1) for p in (attn.to_q, attn.to_k, attn.to_v))
        if use_agents:
            a = lin(merged(ra), attn.to_q).reshape(-1, H, D).transpose(0, 1)
            s = D**-0.5
            va = _softmax(a @ k.transpose(1, 2) * s) @ v
            o = _softmax(q @ a.transpose(1, 2) * s**k_scale2) @ va + k_shortcut * v
        else:
            o = _softmax(q @ k.transpose(1, 2) * D**-0.5) @ v
        o = lin(o.transpose(0, 1).reshape(-1, C), attn.to_out[0])
        full = torch.empty(N, C, dtype=torch.float64)
        for p, i in enumerate(ranked):
            full[srcs[i]] = o[p - r] if p >= r else o[ns - r + int(best[i])]
        for j, t in enumerate(dsts):
            full[t] = o[ns - r + j]
        outs.append(full)
    return torch.stack(outs), use_agents
