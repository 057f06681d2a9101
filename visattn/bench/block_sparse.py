"""Benchmark suite of the shared block-sparse core against dense SDPA and FlexAttention.

Default CUDA case: the Wan2.1-1.3B 480p shape (B=1, H=12, N=32760, D=128, bf16) with random
128x128 block plans at densities 1.0, 0.5, 0.25, 0.15 and 0.05, forward and forward+backward.
On a CPU-only machine: a small shape on the reference, labelled as CPU timings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import BlockSparsePlan, block_sparse_attention
from ..ops.block_sparse import dense_sdpa
from ._harness import Row, time_ms

METHOD = "block_sparse"


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq: int
    head_dim: int
    block: int = 128

    @property
    def name(self) -> str:
        return f"B{self.batch} H{self.heads} N{self.seq} D{self.head_dim} blk{self.block}"


def default_cases(device: torch.device) -> list[Case]:
    if device.type == "cuda":
        return [Case(1, 12, 32760, 128)]
    return [Case(1, 2, 1000, 64, 64)]


def default_densities(device: torch.device) -> list[float]:
    return [1.0, 0.5, 0.25, 0.15, 0.05] if device.type == "cuda" else [1.0, 0.25]


def default_backends(device: torch.device) -> list[str]:
    return ["triton", "flex"] if device.type == "cuda" else ["torch"]


def _dense_ctx(device: torch.device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    import contextlib

    return contextlib.nullcontext()


def _timer(fn_fwd, mode: str, inputs, device, warmup, rep) -> float:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn_fwd()
    else:
        grad = torch.randn_like(inputs[0])

        def run():
            out = fn_fwd()
            torch.autograd.backward(out, grad)
            for t in inputs:
                t.grad = None
    return time_ms(run, device, warmup=warmup, rep=rep)


def run(cases: list[Case], densities: list[float], backends: list[str], modes: list[str], dtype: torch.dtype,
        device: torch.device, *, warmup: int = 25, rep: int = 100, seed: int = 0, log=print) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(seed)
    for case in cases:
        B, H, N, D = case.batch, case.heads, case.seq, case.head_dim
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype, generator=None) for _ in range(3))
        dense_flops = 4.0 * B * H * N * N * D
        for mode in modes:
            needs_grad = mode != "fwd"
            for t in (q, k, v):
                t.requires_grad_(needs_grad)
            mult = 1.0 if mode == "fwd" else 3.5  # backward = 2.5x the forward's matmul FLOPs

            def dense():
                with _dense_ctx(device):
                    return dense_sdpa(q, k, v)

            dense_ms = _timer(dense, mode, (q, k, v), device, warmup, rep)
            rows.append(Row(METHOD, case.name, 1.0, "sdpa-cudnn" if device.type == "cuda" else "sdpa", mode,
                            dense_ms, dense_flops * mult / dense_ms * 1e-9, 1.0, 1.0, 1.0))
            log(f"{case.name} {mode}: dense SDPA {dense_ms:.3f} ms")
            for density in densities:
                plan = BlockSparsePlan.random(N, N, density, block_q=case.block, block_k=case.block,
                                              generator=gen, device=device)
                rho = float(plan.density(N, N))
                by_backend: dict[str, float] = {}
                for backend in backends:
                    fn = lambda b=backend: block_sparse_attention(q, k, v, plan, backend=b)  # noqa: E731
                    try:
                        ms = _timer(fn, mode, (q, k, v), device, warmup, rep)
                    except NotImplementedError as e:
                        log(f"  skip {backend}: {str(e).splitlines()[0]}")
                        continue
                    by_backend[backend] = ms
                    speedup = dense_ms / ms
                    rows.append(Row(METHOD, case.name, rho, backend, mode, ms,
                                    dense_flops * rho * mult / ms * 1e-9, speedup, 1 / rho, speedup * rho))
                    log(f"  density {rho:.3f} {backend:>7}: {ms:.3f} ms  {speedup:.2f}x dense (ideal {1/rho:.2f}x)")
                ours = by_backend.get("triton")
                if ours is not None:
                    for r in rows[-len(by_backend):]:
                        if r.backend == "triton":
                            r.vs = {b: ms / ours for b, ms in by_backend.items() if b != "triton"}
    return rows
