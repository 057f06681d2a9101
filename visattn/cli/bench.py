"""Benchmark visattn's ops against dense SDPA (cuDNN) and FlexAttention in one process.

With no options, every method runs on its default inputs: on CUDA the Wan2.1 480p shape
(B=1, H=12, N=32760, D=128, bf16) with random 128x128 block plans at densities 1.0-0.05, forward and
forward+backward; on a CPU-only machine small shapes on the reference (reported as CPU timings).
Results go to OUT/bench.json, OUT/bench.md and OUT/bench.png.

Examples:
  visattn bench
  visattn bench --methods block_sparse --dtype fp16 --densities 1,0.15 --modes fwd
  visattn bench --shape 2,16,8192,64 --block 64 --backends triton,flex,torch --out results/
"""

from __future__ import annotations

import argparse
import importlib

NAME = "bench"
HELP = "benchmark the ops vs dense SDPA and FlexAttention"

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from visattn.bench import SUITES

    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods to run (default: all of {', '.join(SUITES)}; only "
                        "block_sparse when --shape is given)")
    p.add_argument("--shape", action="append", default=None, metavar="B,H,N,D",
                   help="batch,heads,tokens,head_dim; repeatable (default: the method's default shapes)")
    p.add_argument("--block", type=int, default=None, help="plan block size (default: 128 on CUDA, 64 on CPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--densities", default=None, help="comma-separated block densities (default: method's)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated from fwd, fwd+bwd (default: both)")
    p.add_argument("--backends", default=None,
                   help="comma-separated visattn backends (default: triton,flex on CUDA; torch on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--warmup", type=int, default=25, help="warm-up ms per measurement on CUDA")
    p.add_argument("--rep", type=int, default=100, help="measured ms per measurement on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default=None, metavar="SUBSTR",
                   help="run only the default cases whose name contains one of these comma-separated strings")


def _floats(s: str, name: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError:
        raise SystemExit(f"visattn bench: expected comma-separated numbers, got {name}={s!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from visattn.bench import SUITES
    from visattn.bench._harness import environment, write_results

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("fwd", "fwd+bwd")]
    if bad:
        raise SystemExit(f"visattn bench: expected modes from fwd, fwd+bwd, got --modes={args.modes!r}")
    if args.methods is None:  # --shape describes block-sparse problems: it selects that suite alone
        args.methods = "block_sparse" if args.shape else ",".join(SUITES)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in SUITES]
    if unknown:
        raise SystemExit(f"visattn bench: unknown methods {unknown}; available: {list(SUITES)}")
    env = environment(device)
    if device.type != "cuda":
        print("visattn bench: no CUDA device; running small shapes on the reference. These are CPU timings.")
    rows = []
    for method in methods:
        suite = importlib.import_module(SUITES[method])
        cases = suite.default_cases(device)
        if args.cases:
            keys = [c for c in args.cases.split(",") if c]
            cases = [c for c in cases if any(key in c.name for key in keys)]
        if args.shape and method != "block_sparse":
            raise SystemExit(f"visattn bench: --shape applies to block_sparse only; use --cases for {method}")
        if args.shape:
            cases = []
            for s in args.shape:
                vals = [int(x) for x in s.split(",")]
                if len(vals) != 4:
                    raise SystemExit(f"visattn bench: expected --shape B,H,N,D, got --shape={s!r}")
                cases.append(suite.Case(*vals))
        if args.block and method == "block_sparse":
            cases = [suite.Case(c.batch, c.heads, c.seq, c.head_dim, args.block) for c in cases]
        densities = _floats(args.densities, "--densities") if args.densities else suite.default_densities(device)
        backends = args.backends.split(",") if args.backends else suite.default_backends(device)
        rows += suite.run(cases, densities, backends, modes, dtype, device,
                          warmup=args.warmup, rep=args.rep, seed=args.seed)
    paths = write_results(rows, env, args.out)
    print(open(paths[1]).read())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
