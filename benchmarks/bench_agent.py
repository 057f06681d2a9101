"""Agent attention: model throughput and memory on the default path vs upstream's formulation (issue 5).

Measures, in one run on one GPU (bf16 autocast, ``cudnn.benchmark``):

* img/s at batch 128, 224^2, inference (``no_grad``, eval) and training (forward + cross-entropy +
  backward + SGD step) of ``agent_swin_tiny`` and ``agent_pvt_small`` on the default path
  (``backend=None``: ``"sdpa"`` on CUDA) and on the ``"upstream"`` path (upstream's computation order:
  biases interpolated, materialised and repeated over the batch every call, explicit softmax), and of
  timm's ``swin_tiny_patch4_window7_224`` (and ``agent_deit_small`` vs timm's ``deit_small_patch16_224``);
* ``agent_pvt_small`` forward time and peak memory at 448^2 and 896^2 on both paths.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per row")
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
    for mode in ("infer", "train"):
        for name in ("agent_swin_tiny", "agent_pvt_small"):
            for backend in (None, "upstream"):
                run(name, backend, mode, batch, res, device, amp, budget)
        run("swin_tiny_patch4_window7_224", None, mode, batch, res, device, amp, budget)
    for backend in (None, "upstream"):
        run("agent_deit_small", backend, "infer", batch, res, device, amp, budget)
    run("deit_small_patch16_224", None, "infer", batch, res, device, amp, budget)
    for r, b in hi_res:
        for backend in (None, "upstream"):
            run("agent_pvt_small", backend, "infer", b, r, device, amp, budget)

    def get(model, path, mode, r=res):
        for row in rows:
            if (row["model"], row["path"], row["mode"], row["res"]) == (model, path, mode, r):
                return row
        return None

    ratios = {}
    for m in ("agent_swin_tiny", "agent_pvt_small", "agent_deit_small"):
        for mode in ("infer", "train"):
            a, b = get(m, "default", mode), get(m, "upstream", mode)
            if a and b:
                ratios[f"{m} {mode} default/upstream"] = a["img_s"] / b["img_s"]
    for mode in ("infer", "train"):
        a, b = get("agent_swin_tiny", "default", mode), get("swin_tiny_patch4_window7_224", "default", mode)
        if a and b:
            ratios[f"agent_swin_tiny {mode} default / timm swin_tiny"] = a["img_s"] / b["img_s"]
    a, b = get("agent_deit_small", "default", "infer"), get("deit_small_patch16_224", "default", "infer")
    if a and b:
        ratios["agent_deit_small infer default / timm deit_small"] = a["img_s"] / b["img_s"]
    for r, _ in hi_res:
        a, b = get("agent_pvt_small", "default", "infer", r), get("agent_pvt_small", "upstream", "infer", r)
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
    (args.out / "bench_agent.json").write_text(json.dumps(dict(env=env, rows=rows, ratios=ratios, targets=TARGETS,
                                                               errors=errors), indent=2))
    md = [f"# Agent attention benchmark ({env['device']}, {env['amp']})", "",
          f"torch {env['torch']}, timm {env['timm']}, triton {env.get('triton', '-')}; {env['train_step']}.", "",
          "| model | path | mode | batch | res | img/s | ms/iter | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['path']} | {r['mode']} | {r['batch']} | {r['res']} | {r['img_s']:.1f} | "
           f"{r['ms']:.2f} | {r['peak_gib']:.2f} |" for r in rows]
    md += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for k, v in ratios.items():
        t = TARGETS.get(k, 1.0 if "upstream/default" in k and "time" in k else None)
        met = "" if t is None else ("yes" if v >= t else "NO")
        md.append(f"| {k} | {v:.3f} | {'' if t is None else f'>= {t}'} | {met} |")
    if errors:
        md += ["", "Errors:"] + [f"- {e['args']}: {e['error']}" for e in errors]
    (args.out / "bench_agent.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
