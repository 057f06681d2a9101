"""Bi-level routing attention (BiFormer) benchmarks: the performance items of issue 4.

1. BiFormer-S stage shapes at 224 (batch 64, bf16): forward and forward+backward of the routed token
   attention for the Triton kernels, BiFormer's gather formulation (``routed_attention_ref(impl=
   "gather")`` in bf16), FlexAttention with the routing ``BlockMask`` and dense cuDNN SDPA over the
   whole map. Routing (region means, top-k) is computed once outside the timed region.
2. Large map (BiFormer #21): 1x600x500, C=64, 2 heads, n_win 8, topk 4: forward+backward peak memory of
   Triton and of the gather formulation (falling back to smaller maps until gather fits).
3. End to end: ``biformer_small`` training step (batch 128, 224, bf16 autocast, SGD) on the Triton and
   the gather backend, and inference throughput beside timm's ``swin_tiny_patch4_window7_224``.

Usage: PYTHONPATH=. python benchmarks/bench_bilevel_routing.py --out DIR [--quick]
Writes DIR/bilevel_routing.json and DIR/bilevel_routing.md.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from visattn.bench._harness import environment, graph_time_ms, time_ms
from visattn.ops import region_routing, routed_attention, routed_attention_ref

STAGES = [  # name, map side, C, heads, topk (BiFormer-S at 224, n_win 7)
    ("stage1 56x56 C64 h2 k1", 56, 64, 2, 1),
    ("stage2 28x28 C128 h4 k4", 28, 128, 4, 4),
    ("stage3 14x14 C256 h8 k16", 14, 256, 8, 16),
]


def _maps(B, H, W, heads, d, dev, dtype=torch.bfloat16):
    return [torch.randn(B, H, W, heads, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]


def _attn_fns(q, k, v, r, scale):
    idx, region = r.index, r.region_size

    def triton():
        return routed_attention(q, k, v, idx, region, scale=scale, backend="triton")

    def gather():
        return routed_attention_ref(q, k, v, idx, region, scale=scale, impl="gather", upcast=False)

    def flex():
        return routed_attention(q, k, v, idx, region, scale=scale, backend="flex")

    def dense():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        B, H, W, h, d = q.shape
        qh, kh, vh = (t.reshape(B, H * W, h, d).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)

    return {"triton": triton, "gather": gather, "flex": flex, "cudnn_dense": dense}


def _fwdbwd_step(fn):
    """``fn().backward(g)`` with a fixed random ``g``."""
    with torch.no_grad():  # a graph kept alive here would pin AccumulateGrad to this stream
        g = torch.randn_like(fn())

    def step():
        fn().backward(g)

    return step


def bench_stages(dev, batch, rep) -> list[dict]:
    rows = []
    for name, L, C, heads, topk in STAGES:
        q, k, v = _maps(batch, L, L, heads, C // heads, dev)
        scale = C**-0.5  # BiFormer's qk_dim ** -0.5
        r = region_routing(q, k, 7, topk=topk, scale=scale)
        N = L * L
        flops_fwd = 4 * batch * heads * N * (topk * N // 49) * (C // heads)
        row = {"case": name, "batch": batch, "fwd_ms": {}, "fwdbwd_ms": {}, "errors": {}}
        for backend, fn in _attn_fns(q, k, v, r, scale).items():
            try:
                with torch.no_grad():
                    row["fwd_ms"][backend] = time_ms(fn, dev, rep=rep)
                row["fwdbwd_ms"][backend] = time_ms(_fwdbwd_step(fn), dev, rep=rep)
            except Exception as e:  # one backend failing must not hide the others
                row["errors"][backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        t = row["fwdbwd_ms"].get("triton")
        row["useful_tflops_fwd_triton"] = (
            flops_fwd / row["fwd_ms"]["triton"] / 1e9 if "triton" in row["fwd_ms"] else None
        )
        row["speedup_fwdbwd"] = {b: ms / t for b, ms in row["fwdbwd_ms"].items() if t and b != "triton"}
        tf = row["fwd_ms"].get("triton")
        row["speedup_fwd"] = {b: ms / tf for b, ms in row["fwd_ms"].items() if tf and b != "triton"}
        row["ideal_vs_dense"] = 49 / topk  # FLOP density topk / P
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_stages_graph(dev, batch, rows) -> None:
    """Adds ``fwdbwd_graph_ms``: each backend's fwd+bwd step captured in a CUDA graph and replayed.

    Run last: a backend whose step cannot be captured can leave the CUDA generator in a capture state
    that fails later allocations of random tensors, so nothing else may come after it.
    """
    for row, (_, L, C, heads, topk) in zip(rows, STAGES):
        q, k, v = _maps(batch, L, L, heads, C // heads, dev)
        scale = C**-0.5
        r = region_routing(q, k, 7, topk=topk, scale=scale)
        row["fwdbwd_graph_ms"], row["graph_errors"] = {}, {}
        for backend, fn in _attn_fns(q, k, v, r, scale).items():
            try:
                row["fwdbwd_graph_ms"][backend] = graph_time_ms(_fwdbwd_step(fn))
            except Exception as e:
                row["graph_errors"][backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        tg = row["fwdbwd_graph_ms"].get("triton")
        row["speedup_fwdbwd_graph"] = {
            b: ms / tg for b, ms in row["fwdbwd_graph_ms"].items() if tg and b != "triton"
        }
        print(json.dumps({k: row[k] for k in ("case", "fwdbwd_graph_ms", "graph_errors")}), flush=True)


def _peak_fwdbwd(fn, q, k, v) -> float:
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    out.float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_memory(dev) -> dict:
    res = {
        "case": "1x600x500 C64 h2 n_win 8 topk 4, fwd+bwd peak MiB beyond inputs",
        "triton": {},
        "gather": {},
    }
    for H, W in [(600, 500), (480, 400), (300, 250), (150, 125)]:
        q, k, v = _maps(1, H, W, 2, 32, dev)
        r = region_routing(q, k, 8, topk=4)
        fns = _attn_fns(q, k, v, r, 64**-0.5)
        for b in ("triton", "gather"):
            if b == "gather" and any(m != "OOM" for m in res["gather"].values()):
                continue  # the largest size gather fits is enough
            try:
                res[b][f"{H}x{W}"] = _peak_fwdbwd(fns[b], q, k, v)
            except torch.OutOfMemoryError:
                res[b][f"{H}x{W}"] = "OOM"
                torch.cuda.empty_cache()
        if res["gather"] and all(v_ != "OOM" for v_ in res["gather"].values()):
            break
    fits = [s for s, m in res["gather"].items() if m != "OOM"]
    if fits:
        s = fits[0]
        res["ratio_gather_over_triton_at"] = {s: res["gather"][s] / max(res["triton"][s], 1e-6)}
    print(json.dumps(res), flush=True)
    return res


def _train_throughput(name, backend, batch, dev, steps, **kw) -> float:
    import timm

    import visattn

    with visattn.use_backend(backend):
        model = timm.create_model(name, **kw).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with visattn.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def _infer_throughput(name, backend, batch, dev, steps) -> float:
    import timm

    import visattn

    with visattn.use_backend(backend):
        model = timm.create_model(name).to(dev).eval()
    x = torch.randn(batch, 3, 224, 224, device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), visattn.use_backend(backend):
        for _ in range(2):
            model(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def bench_models(dev, batch, steps) -> dict:
    res = {"batch": batch, "train_img_s": {}, "infer_img_s": {}, "errors": {}}
    for key, fn in [
        (
            "train biformer_small triton",
            lambda: _train_throughput("biformer_small", "triton", batch, dev, steps),
        ),
        (
            "train biformer_small gather",
            lambda: _train_throughput("biformer_small", "torch", batch, dev, steps),
        ),
        (
            "infer biformer_small triton",
            lambda: _infer_throughput("biformer_small", "triton", batch, dev, steps),
        ),
        (
            "infer swin_tiny_patch4_window7_224",
            lambda: _infer_throughput("swin_tiny_patch4_window7_224", "torch", batch, dev, steps),
        ),
    ]:
        try:
            (res["train_img_s"] if key.startswith("train") else res["infer_img_s"])[key[6:]] = fn()
        except Exception as e:
            res["errors"][key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(key, res, flush=True)
    t = res["train_img_s"]
    if "biformer_small triton" in t and "biformer_small gather" in t:
        res["train_speedup_triton_over_gather"] = t["biformer_small triton"] / t["biformer_small gather"]
    return res


def markdown(env, stages, mem, models) -> str:
    lines = [
        f"# Bi-level routing attention benchmarks ({env.get('device_name')})",
        "",
        f"torch {env.get('torch')}, triton {env.get('triton')}; bf16; times are do_bench medians (ms).",
        "Rows `fwd+bwd GPU (graph)`: the same step captured in a CUDA graph and replayed, so host",
        "overhead (launches, autograd) is excluded for every backend alike (`_harness.graph_time_ms`).",
        "",
        "## BiFormer-S stages at 224 (routed attention only; routing precomputed)",
        "",
        "| case | mode | triton | gather | flex | cuDNN dense | vs gather | vs flex | vs dense | ideal vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in stages:
        for mode, key, sp in (
            ("fwd", "fwd_ms", "speedup_fwd"),
            ("fwd+bwd", "fwdbwd_ms", "speedup_fwdbwd"),
            ("fwd+bwd GPU (graph)", "fwdbwd_graph_ms", "speedup_fwdbwd_graph"),
        ):
            ms = r.get(key, {})
            cell = lambda b: f"{ms[b]:.3f}" if b in ms else "-"  # noqa: E731
            ratio = lambda b: f"{r[sp][b]:.2f}x" if b in r.get(sp, {}) else "-"  # noqa: E731
            lines.append(
                f"| {r['case']} | {mode} | {cell('triton')} | {cell('gather')} | {cell('flex')} | "
                f"{cell('cudnn_dense')} | {ratio('gather')} | {ratio('flex')} | {ratio('cudnn_dense')} | "
                f"{r['ideal_vs_dense']:.2f}x |"
            )
        if r["errors"]:
            lines.append(f"| {r['case']} | errors | {r['errors']} |||||||")
    lines += [
        "",
        "## Large map memory (fwd+bwd peak MiB beyond inputs)",
        "",
        "```",
        json.dumps(mem, indent=1),
        "```",
    ]
    if models:
        lines += [
            "",
            "## End to end (batch %d, 224, bf16 autocast)" % models["batch"],
            "",
            "```",
            json.dumps(models, indent=1),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    ap.add_argument("--skip-models", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_bilevel_routing needs a CUDA GPU")
    dev = torch.device("cuda")
    env = environment(dev)
    t0 = time.time()
    stages = bench_stages(dev, 16 if args.quick else 64, 50 if args.quick else 100)
    mem = bench_memory(dev)
    models = (
        None if args.skip_models else bench_models(dev, 32 if args.quick else 128, 3 if args.quick else 10)
    )
    bench_stages_graph(dev, 16 if args.quick else 64, stages)
    env["wall_s"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bilevel_routing.json").write_text(
        json.dumps(dict(env=env, stages=stages, memory=mem, models=models), indent=1)
    )
    (out / "bilevel_routing.md").write_text(markdown(env, stages, mem, models))
    print(markdown(env, stages, mem, models))


if __name__ == "__main__":
    main()
