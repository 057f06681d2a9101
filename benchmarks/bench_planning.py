"""Planning cost of Rectified SpaAttn and PSA against their sparse kernels, step by step (GPU).

At the Wan2.1-1.3B 480p shape (B=1, H=12, N=32760 = 21x30x52, D=128, bf16, Gilbert-ordered synthetic
q/k/v from ``visattn.testing.local_qkv``) this prints, per configuration, ``triton.testing.do_bench``
medians of every planning sub-step, of the whole plan call, of the sparse kernel with the plan prebuilt
and the ratio plan / kernel (targets: rectified <= 0.10, specs/rectified.md §4; PSA <= 0.15,
specs/pyramid.md §4). "host" is the Python time to enqueue one plan call (no synchronisation): when it
is close to the plan time, launches and torch glue, not GPU work, bound the plan; the "GPU time (CUDA
graph)" row times the plan call replayed from a CUDA graph, i.e. its GPU work alone. Every measurement is
wrapped so one failure prints its error and the rest still runs. Background: benchmarks/NOTES.md,
"Planning cost".

Usage:
  python benchmarks/bench_planning.py [--quick] [--only rectified|pyramid]
About 1-2 minutes on an H100 (``--quick``: under a minute, first-call compilation included).
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch

SHAPE = dict(B=1, H=12, grid=(21, 30, 52), D=128)


def _bench(fn, quick):
    import triton.testing

    warm, rep = (10, 30) if quick else (25, 100)
    return float(triton.testing.do_bench(fn, warmup=warm, rep=rep, return_mode="median"))


def _host_ms(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def _row(label, fn, quick, results, host=False):
    try:
        ms = _bench(fn, quick)
        extra = f"   (host {_host_ms(fn):.3f} ms)" if host else ""
        print(f"    {label:<44s} {ms:8.3f} ms{extra}", flush=True)
        results[label] = ms
        return ms
    except Exception as e:  # noqa: BLE001  (report and go on)
        print(f"    {label:<44s} FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)
        return None


def _graph_row(label, fn, results):
    """GPU time of ``fn`` captured in a CUDA graph (host excluded): what a plan costs inside a pipeline,
    where the host enqueues it while the GPU still runs the previous layer."""
    from visattn.bench._harness import graph_time_ms

    try:
        ms = graph_time_ms(fn)
        print(f"    {label:<44s} {ms:8.3f} ms", flush=True)
        results[label] = ms
    except Exception as e:  # noqa: BLE001  (report and go on)
        print(f"    {label:<44s} FAILED: {type(e).__name__}: {e}", flush=True)


def _ratio(results, plan_key, kern_key, target):
    p, k = results.get(plan_key), results.get(kern_key)
    if p is not None and k:
        print(f"    {'plan / kernel':<44s} {p / k:8.3f}      (target <= {target})", flush=True)


def _plan_ratios(results, plan_key, plan_fn, target):
    """plan / kernel for the eager plan call (timed already as ``plan_key``) and for its GPU time."""
    _ratio(results, plan_key, "kernel, plan prebuilt", target)
    _graph_row("plan call, GPU time (CUDA graph)", plan_fn, results)
    _ratio(results, "plan call, GPU time (CUDA graph)", "kernel, plan prebuilt", target)


def _inputs(dev):
    from visattn.testing import local_qkv

    s = SHAPE
    return local_qkv(s["grid"], heads=s["H"], head_dim=s["D"], order="gilbert", device=dev, dtype=torch.bfloat16)


def rectified(q, k, v, quick):
    from visattn.ops import RectifiedConfig, SequenceLayout

    lay = SequenceLayout(SHAPE["grid"], token_order="gilbert")
    for drop in (0.75, 0.9):
        _rectified_case(q, k, v, lay, RectifiedConfig(drop_rate=drop, first_frame="curve_prefix"), quick)


def _rectified_case(q, k, v, lay, cfg, quick):
    from visattn.kernels.rectified import block_stats_triton, plan_tensors, plan_tensors_triton
    from visattn.ops import rectified_attention, rectified_plan
    from visattn.ops.rectified import _tables

    D = q.shape[-1]
    drop = cfg.drop_rate
    print(f"  rectified drop_rate={drop} (first_frame=curve_prefix, neighbours, IPAR, GAPR)", flush=True)
    res = {}
    try:
        stats = block_stats_triton(q, k, v, lay.video_start, lay.num_video, cfg.block_size, False)
        nbr, ff = _tables(lay, cfg, q.device)
        kw = dict(scale=D**-0.5, block=cfg.block_size, num_video=lay.num_video, n_text_blocks=0, config=cfg,
                  nbr=nbr, first_frame=ff, keep_probs=False)
        plan = rectified_plan(q, k, v, seq_layout=lay, config=cfg)
        print(f"    kept density {plan.density.mean().item():.3f}, rectified fraction "
              f"{plan.rect_fraction.mean().item():.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"    setup FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        return
    _row("1 statistics kernel (q,k,v read once)", lambda: block_stats_triton(
        q, k, v, lay.video_start, lay.num_video, cfg.block_size, False), quick, res)
    _row("2 scores + planner kernels (2 launches)", lambda: plan_tensors_triton(*stats, None, None, **kw),
         quick, res)
    _row("  (torch planner on the same statistics)", lambda: plan_tensors(*stats, None, None, **kw), quick, res)
    _row("plan call (rectified_plan)", lambda: rectified_plan(q, k, v, seq_layout=lay, config=cfg), quick, res,
         host=True)
    _row("kernel, plan prebuilt", lambda: rectified_attention(q, k, v, plan=plan, backend="triton"), quick, res)
    _row("end to end (plan + kernel)", lambda: rectified_attention(
        q, k, v, seq_layout=lay, config=cfg, backend="triton"), quick, res)
    _plan_ratios(res, "plan call (rectified_plan)", lambda: rectified_plan(q, k, v, seq_layout=lay, config=cfg), 0.10)


def pyramid(q, k, v, quick):
    qb, kb = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, N, D] views
    for preset in ("default", "wan21_14b", "wan21_1p3b_topk"):
        _pyramid_case(q, k, v, qb, kb, preset, quick)


def _pyramid_case(q, k, v, qb, kb, preset, quick):
    from visattn.kernels import pyramid as pk
    from visattn.ops import PyramidConfig, pyramid_attention, pyramid_plan
    from visattn.ops._pyramid_rules import build_plan, sample_offsets, sampled_scores

    B, H, N, D = qb.shape
    res = {}
    try:
        cfg = PyramidConfig.from_preset(preset)
        plan = pyramid_plan(q, k, config=cfg)
        s = sampled_scores(qb, kb, cfg, None, D**-0.5, use_triton=True)
        print(f"  pyramid preset={preset} (b_q {cfg.block_q}, b_k {cfg.block_k}, {cfg.mode}): density "
              f"{plan.density().mean().item():.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  pyramid preset={preset} setup FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        return
    sq, sk = int(cfg.block_q * cfg.sample_fraction), int(cfg.block_k * cfg.sample_fraction)
    _row("0 sample offsets", lambda: (sample_offsets(B, H, cfg.block_q, sq, q.device, None),
                                       sample_offsets(B, H, cfg.block_k, sk, q.device, None)), quick, res)
    _row("1 estimator (sampled rows + 1-pass kernel)", lambda: sampled_scores(
        qb, kb, cfg, None, D**-0.5, use_triton=True), quick, res)
    _row("2 planner kernel (sort, levels, lists)", lambda: build_plan(
        s, cfg, seq_len=N, seq_layout=None, use_triton=True), quick, res)
    _row("plan call (pyramid_plan)", lambda: pyramid_plan(q, k, config=cfg), quick, res, host=True)
    _row("  (pooling pass inside the kernel call)", lambda: pk.pyramid_pool(k, v, cfg.block_k), quick, res)
    _row("kernel, plan prebuilt", lambda: pyramid_attention(q, k, v, plan=plan, backend="triton"), quick, res)
    _row("end to end (plan + kernel)", lambda: pyramid_attention(q, k, v, config=cfg, backend="triton"),
         quick, res)
    _plan_ratios(res, "plan call (pyramid_plan)", lambda: pyramid_plan(q, k, config=cfg), 0.15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--only", choices=("rectified", "pyramid"), default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_planning needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; B={SHAPE['B']} H={SHAPE['H']} grid={SHAPE['grid']} D={SHAPE['D']} bf16")
    t0 = time.time()
    q, k, v = _inputs(dev)
    with torch.no_grad():
        if a.only in (None, "rectified"):
            try:
                rectified(q, k, v, a.quick)
            except Exception as e:  # noqa: BLE001
                print(f"rectified FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
        if a.only in (None, "pyramid"):
            try:
                pyramid(q, k, v, a.quick)
            except Exception as e:  # noqa: BLE001
                print(f"pyramid FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
