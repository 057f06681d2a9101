"""Agent attention: model throughput and memory on the default path vs upstream's formulation (issue 5).

Measures, in one run on one GPU (bf16 autocast, ``cudnn.benchmark``):

* img/s at batch 128, 224^2, inference (``no_grad``, eval) and training (forward + cross-entropy +
  backward + SGD step) of ``agent_swin_tiny`` and ``agent_pvt_small`` on the default path
  (``backend=None``: on CUDA the fused ``"triton"`` kernels when training on grids of >= 2048 tokens,
  ``"sdpa"`` otherwise),
  on each of ``"triton"`` and ``"sdpa"`` forced, and on the ``"upstream"`` path (upstream's computation
  order: biases interpolated, materialised and repeated over the batch every call, explicit softmax),
  and of timm's ``swin_tiny_patch4_window7_224`` (and ``agent_deit_small`` vs timm's
  ``deit_small_patch16_224``);
* ``agent_pvt_small`` forward time and peak memory at 448^2 and 896^2 on the default, triton and
  upstream paths.

Usage: ``PYTHONPATH=. python benchmarks/bench_agent.py --out OUT`` writes ``OUT/bench_agent.json`` and
``OUT/bench_agent.md``. ``--quick`` runs tiny sizes (CPU smoke test; timings meaningless).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the agent_* models)
from visattn.layers import AgentAttention

TARGETS = {  # issue 5's performance items
    "agent_swin_tiny infer default/upstream": 1.3, "agent_swin_tiny train default/upstream": 1.3,
    "agent_pvt_small infer default/upstream": 1.3, "agent_pvt_small train default/upstream": 1.3,
    "agent_swin_tiny infer default / timm swin_tiny": 1.0,
}


# backend=None is the default path ("auto": on CUDA "triton" when training on >= 2048 query tokens, else "sdpa")
PATHS = (None, "triton", "sdpa", "upstream")


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, AgentAttention):
            m.backend = backend


def _timed(fn, device, budget_s: float, min_iters: int = 3) -> float:
    """Median seconds per call after warm-up, within about ``budget_s``."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_iters or (time.perf_counter() < t_end and len(times) < 50):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _model(name, backend, device, res):
    kw = dict(img_size=res) if name.startswith(("swin_", "deit_")) else dict(backend=backend)
    return timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kw).to(device)


def throughput(name, backend, mode, batch, res, device, amp, budget):
    model = _model(name, backend, device, res)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sec = _timed(step, device, budget)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model
    return dict(model=name, path=backend or "default", mode=mode, batch=batch, res=res, ms=sec * 1e3,
                img_s=batch / sec, peak_gib=mem)


# agent stages of the two backbones at 224^2: (label, heads, grid, agent grid, head dim)
OP_SHAPES = [
    ("swin s1", 3, (56, 56), (3, 3), 32), ("swin s2", 6, (28, 28), (4, 4), 32),
    ("swin s3", 12, (14, 14), (7, 7), 32), ("swin s4", 24, (7, 7), (7, 7), 32),
    ("pvt s1", 1, (56, 56), (3, 3), 64), ("pvt s2", 2, (28, 28), (4, 4), 64),
    ("pvt s3", 5, (14, 14), (7, 7), 64), ("pvt s4", 8, (7, 7), (7, 7), 64),
]


def op_time(label, H, grid, agent_shape, D, backend, mode, batch, device, budget):
    """One agent-attention call (bf16, pooled agents, AgentBias parameters) at a backbone stage's shape."""
    from visattn.ops import AgentBias, agent_attention

    N = grid[0] * grid[1]
    n = agent_shape[0] * agent_shape[1]
    dt = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter's bf16 dots are wrong
    q, k, v = (torch.randn(batch, N, H, D, device=device, dtype=dt, requires_grad=mode == "train") for _ in range(3))
    ps = dict(an=(H, n, 7, 7), na=(H, n, 7, 7), ah=(1, H, n, grid[0], 1), aw=(1, H, n, 1, grid[1]),
              ha=(1, H, grid[0], 1, n), wa=(1, H, 1, grid[1], n))
    ps = {k_: (torch.randn(s_, device=device) * 0.02).requires_grad_(mode == "train") for k_, s_ in ps.items()}
    bias = AgentBias(**ps, cache={})
    g = torch.randn(batch, N, H, D, device=device, dtype=dt)

    def step():
        if mode == "infer":
            with torch.no_grad():
                agent_attention(q, k, v, agent_shape=agent_shape, grid=grid, bias=bias, backend=backend)
        else:
            out = agent_attention(q, k, v, agent_shape=agent_shape, grid=grid, bias=bias, backend=backend)
            out.backward(g)

    sec = _timed(step, device, budget)
    return dict(op=label, path=backend, mode=mode, batch=batch, ms=sec * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per row")
    ap.add_argument("--ops-only", action="store_true", help="only the agent-attention op rows (no models)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    amp = device.type == "cuda"
    batch, res, budget = (2, 64, 0.2) if args.quick else (128, 224, args.budget)
    hi_res = [(96, 2), (128, 1)] if args.quick else [(448, 16), (896, 4)]
    rows, errors = [], []

    def run(*a):
        try:
            r = throughput(*a)
            rows.append(r)
            print(f"{r['model']:>28} {r['path']:>8} {r['mode']:>5} b{r['batch']:<4} {r['res']:>4}px "
                  f"{r['img_s']:9.1f} img/s {r['ms']:9.2f} ms {r['peak_gib']:7.2f} GiB", flush=True)
        except Exception as e:  # keep going: an OOM or failure on one row must not lose the others
            errors.append(dict(args=[str(x) for x in a[:5]], error=repr(e), tb=traceback.format_exc(limit=3)))
            print("ERROR", a[:5], repr(e), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    t0 = time.time()
    for mode in () if args.ops_only else ("infer", "train"):
        for name in ("agent_swin_tiny", "agent_pvt_small"):
            for backend in PATHS:
                run(name, backend, mode, batch, res, device, amp, budget)
        run("swin_tiny_patch4_window7_224", None, mode, batch, res, device, amp, budget)
    for backend in () if args.ops_only else PATHS:
        run("agent_deit_small", backend, "infer", batch, res, device, amp, budget)
    if not args.ops_only:
        run("deit_small_patch16_224", None, "infer", batch, res, device, amp, budget)
    for r, b in [] if args.ops_only else hi_res:
        for backend in (None, "triton", "upstream"):
            run("agent_pvt_small", backend, "infer", b, r, device, amp, budget)

    op_rows = []
    for label, H, grid, agent_shape, D in [("tiny", 2, (8, 8), (2, 2), 16)] if args.quick else OP_SHAPES:
        for mode in ("infer", "train"):
            for backend in ("triton", "sdpa", "upstream"):
                try:
                    r = op_time(label, H, grid, agent_shape, D, backend, mode, batch, device, budget / 4)
                    op_rows.append(r)
                    print(f"op {label:>8} {backend:>8} {mode:>5} {r['ms']:9.3f} ms", flush=True)
                except Exception as e:
                    errors.append(dict(args=[label, backend, mode], error=repr(e), tb=traceback.format_exc(limit=3)))
                    print("ERROR op", label, backend, mode, repr(e), flush=True)

    def get(model, path, mode, r=res):
        for row in rows:
            if (row["model"], row["path"], row["mode"], row["res"]) == (model, path, mode, r):
                return row
        return None

    ratios = {}
    for m in ("agent_swin_tiny", "agent_pvt_small", "agent_deit_small"):
        for mode in ("infer", "train"):
            for path in ("default", "triton", "sdpa"):
                a, b = get(m, path, mode), get(m, "upstream", mode)
                if a and b:
                    ratios[f"{m} {mode} {path}/upstream"] = a["img_s"] / b["img_s"]
    for mode in ("infer", "train"):
        a, b = get("agent_swin_tiny", "default", mode), get("swin_tiny_patch4_window7_224", "default", mode)
        if a and b:
            ratios[f"agent_swin_tiny {mode} default / timm swin_tiny"] = a["img_s"] / b["img_s"]
    a, b = get("agent_deit_small", "default", "infer"), get("deit_small_patch16_224", "default", "infer")
    if a and b:
        ratios["agent_deit_small infer default / timm deit_small"] = a["img_s"] / b["img_s"]
    for r, _ in hi_res:
        a, b = get("agent_pvt_small", "default", "infer", r), get("agent_pvt_small", "upstream", "infer", r)
        t = get("agent_pvt_small", "triton", "infer", r)
        if t and b:
            ratios[f"agent_pvt_small {r}px fwd time upstream/triton"] = b["ms"] / t["ms"]
        if a and b:
            ratios[f"agent_pvt_small {r}px fwd time upstream/default"] = b["ms"] / a["ms"]
            ratios[f"agent_pvt_small {r}px fwd peak mem upstream/default"] = b["peak_gib"] / max(a["peak_gib"], 1e-9)

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
               amp="bf16 autocast" if amp else "fp32", quick=args.quick, seconds=round(time.time() - t0, 1),
               train_step="forward + cross-entropy + backward + SGD(momentum) step")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_agent.json").write_text(json.dumps(dict(env=env, rows=rows, op_rows=op_rows, ratios=ratios,
                                                               targets=TARGETS, errors=errors), indent=2))
    md = [f"# Agent attention benchmark ({env['device']}, {env['amp']})", "",
          f"torch {env['torch']}, timm {env['timm']}, triton {env.get('triton', '-')}; {env['train_step']}.", "",
          "Path `default` is `backend=None` (auto): on CUDA the fused `triton` kernels when training on "
          ">= 2048 query tokens (the 56x56 stage 1), `sdpa` otherwise.", "",
          "| model | path | mode | batch | res | img/s | ms/iter | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['path']} | {r['mode']} | {r['batch']} | {r['res']} | {r['img_s']:.1f} | "
           f"{r['ms']:.2f} | {r['peak_gib']:.2f} |" for r in rows]
    md += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for k, v in ratios.items():
        t = TARGETS.get(k, 1.0 if "upstream/default" in k and "time" in k else None)
        met = "" if t is None else ("yes" if v >= t else "NO")
        md.append(f"| {k} | {v:.3f} | {'' if t is None else f'>= {t}'} | {met} |")
    md += ["", f"Agent attention op alone (bf16, batch {batch}, AgentBias parameters; train = forward + backward), ms:",
           "", "| stage | mode | triton | sdpa | upstream | upstream/triton |", "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["op"] for r in op_rows):
        for mode in ("infer", "train"):
            t = {r["path"]: r["ms"] for r in op_rows if r["op"] == label and r["mode"] == mode}
            if t:
                cell = lambda p: f"{t[p]:.3f}" if p in t else "-"  # noqa: E731
                ratio = f"{t['upstream'] / t['triton']:.2f}" if "upstream" in t and "triton" in t else "-"
                md.append(f"| {label} | {mode} | {cell('triton')} | {cell('sdpa')} | {cell('upstream')} | {ratio} |")
    if errors:
        md += ["", "Errors:"] + [f"- {e['args']}: {e['error']}" for e in errors]
    (args.out / "bench_agent.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
