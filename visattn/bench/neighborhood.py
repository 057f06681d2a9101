"""Benchmark suite of neighborhood attention against dense cuDNN SDPA, FlexAttention and NATTEN.

Default CUDA cases (bf16): the four neighborhood rows of ANCHORS.md and the GNA rows of the
neighborhood issue (2-D 256x256 window 80x80 with and without stride 16x16; 3-D 30x48x80 window
18x24x24 with and without stride 16x8x8). Density is the fraction of useful (query, key) pairs, so
the ideal speedup over dense is ``N / mean window size``. On a CPU-only machine: one small case on
the reference, labelled as CPU timings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops import neighborhood_attention, neighborhood_mask
from ..ops.block_sparse import dense_sdpa
from ._harness import Row, time_ms
from .block_sparse import _dense_ctx, _timer

METHOD = "neighborhood"


@dataclass(frozen=True)
class Case:
    size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = (1,)
    batch: int = 1
    heads: int = 1
    head_dim: int = 128
    dilation: tuple[int, ...] = (1,)

    @property
    def name(self) -> str:
        x = "x".join
        s = f"{x(map(str, self.size))} k{x(map(str, self.kernel_size))}"
        if max(self.stride) > 1:
            s += f" s{x(map(str, self.stride))}"
        if max(self.dilation) > 1:
            s += f" d{x(map(str, self.dilation))}"
        return s + f" B{self.batch} H{self.heads} D{self.head_dim}"

    def args(self):
        n = len(self.size)
        full = lambda t: t if len(t) == n else t * n  # noqa: E731
        return dict(kernel_size=self.kernel_size, stride=full(self.stride), dilation=full(self.dilation))


def default_cases(device: torch.device) -> list[Case]:
    if device.type != "cuda":
        return [Case((24, 24), (7, 7), batch=1, heads=2, head_dim=32)]
    return [
        Case((56, 56), (7, 7), batch=32, heads=2, head_dim=32),
        Case((64, 64), (31, 31), heads=24, head_dim=128),
        Case((128, 128), (13, 13), heads=8, head_dim=64),
        Case((21, 30, 52), (11, 15, 27), heads=12, head_dim=128),
        Case((256, 256), (80, 80), heads=24, head_dim=128),
        Case((256, 256), (80, 80), (16, 16), heads=24, head_dim=128),
        Case((30, 48, 80), (18, 24, 24), heads=24, head_dim=128),
        Case((30, 48, 80), (18, 24, 24), (16, 8, 8), heads=24, head_dim=128),
    ]


def default_densities(device: torch.device) -> list[float]:
    return [1.0]  # unused: a neighborhood's density follows from its window


def default_backends(device: torch.device) -> list[str]:
    return ["triton", "flex", "natten"] if device.type == "cuda" else ["torch"]


def window_density(case: Case) -> float:
    """Fraction of (query, key) pairs attended, exact (from the per-axis masks, which are separable)."""
    rho = 1.0
    for a in range(len(case.size)):
        kw = {k: (v[a],) for k, v in case.args().items()}
        rho *= float(neighborhood_mask((case.size[a],), **kw).float().mean())
    return rho


def run(cases: list[Case], densities, backends: list[str], modes: list[str], dtype: torch.dtype,
        device: torch.device, *, warmup: int = 25, rep: int = 100, seed: int = 0, log=print) -> list[Row]:
    rows: list[Row] = []
    for case in cases:
        B, H, D = case.batch, case.heads, case.head_dim
        N = math.prod(case.size)
        q, k, v = (torch.randn(B, *case.size, H, D, device=device, dtype=dtype) for _ in range(3))
        rho = window_density(case)
        dense_flops = 4.0 * B * H * N * N * D
        for mode in modes:
            for t in (q, k, v):
                t.requires_grad_(mode != "fwd")
            mult = 1.0 if mode == "fwd" else 3.5
            qd, kd, vd = (t.view(B, N, H, D) for t in (q, k, v))

            def dense():
                with _dense_ctx(device):
                    return dense_sdpa(qd, kd, vd).view(q.shape)

            dense_ms = _timer(dense, mode, (q, k, v), device, warmup, rep)
            rows.append(Row(METHOD, case.name, 1.0, "sdpa-cudnn" if device.type == "cuda" else "sdpa", mode,
                            dense_ms, dense_flops * mult / dense_ms * 1e-9, 1.0, 1.0, 1.0))
            log(f"{case.name} {mode}: dense SDPA {dense_ms:.3f} ms")
            by_backend: dict[str, float] = {}
            for backend in backends:
                fn = lambda b=backend: neighborhood_attention(q, k, v, **case.args(), backend=b)  # noqa: E731
                try:
                    ms = _timer(fn, mode, (q, k, v), device, warmup, rep)
                except (NotImplementedError, RuntimeError, ImportError) as e:
                    log(f"  skip {backend}: {str(e).splitlines()[0][:200]}")
                    continue
                by_backend[backend] = ms
                speedup = dense_ms / ms
                rows.append(Row(METHOD, case.name, rho, backend, mode, ms, dense_flops * rho * mult / ms * 1e-9,
                                speedup, 1 / rho, speedup * rho))
                log(f"  {backend:>7}: {ms:.3f} ms  {speedup:.2f}x dense (ideal {1 / rho:.2f}x)")
            ours = by_backend.get("triton")
            if ours is not None:
                for r in rows[-len(by_backend):]:
                    if r.backend == "triton":
                        r.vs = {b: ms / ours for b, ms in by_backend.items() if b != "triton"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
