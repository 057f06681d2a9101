"""Benchmark harness shared by every method's suite (DESIGN §6).

Timing is ``triton.testing.do_bench`` medians on CUDA (events, warm-up excluded) and a median of
wall-clock repeats on the CPU. Every row reports time, useful TFLOP/s, speedup over dense SDPA
measured in the same run, the ideal speedup (1 / FLOP density) and efficiency = speedup / ideal.
Results are written as JSON, a Markdown table and a PNG plot.

This lives inside the package (not only in ``benchmarks/``) so that ``visattn bench`` works from an
installed wheel; ``benchmarks/bench_<method>.py`` are thin scripts over it.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    method: str
    case: str
    density: float
    backend: str
    mode: str  # "fwd" or "fwd+bwd"
    ms: float
    tflops: float
    speedup: float  # vs dense SDPA (cuDNN on CUDA) in this run
    ideal: float
    efficiency: float
    vs: dict = field(default_factory=dict)  # speedup of visattn's triton row over comparison backends

    def as_markdown(self) -> str:
        vs = ", ".join(f"{v:.2f}x vs {k}" for k, v in self.vs.items())
        return (
            f"| {self.case} | {self.density:.3f} | {self.backend} | {self.mode} | {self.ms:.3f} | "
            f"{self.tflops:.1f} | {self.speedup:.2f}x | {self.ideal:.2f}x | {self.efficiency:.2f} | {vs} |"
        )


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` (``warmup``/``rep`` are ms on CUDA, call counts on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up (compilation, allocator)
    samples = []
    deadline = time.perf_counter() + max(rep, 1) / 100.0  # roughly rep centiseconds at most
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 20):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_time_ms(fn: Callable[[], object], *, replays: int = 20, rounds: int = 5) -> float:
    """GPU milliseconds of one ``fn()`` with the host taken out: ``fn`` is captured once in a CUDA
    graph and replayed (median over ``rounds`` of ``replays`` back-to-back replays; no L2 flush).

    For ops whose eager call is host bound (launch and autograd overhead longer than the kernels),
    this is the time the GPU needs, e.g. when the op runs inside a model whose other layers keep the
    GPU queue full, or under CUDA graphs. Report it beside the eager time, never instead of it.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (compilation, allocator, lazy init)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / replays)
    return statistics.median(samples)


def gpu_tag(name: str) -> str:
    """File-name tag of a device name: its model token ("NVIDIA H100 80GB HBM3" -> "h100"), not the
    memory type; the last word when no token looks like a model."""
    tokens = [t for t in name.split() if re.fullmatch(r"[A-Za-z]+\d+[A-Za-z]*", t) and t != "NVIDIA"]
    return (tokens or name.split()[-1:] or ["cpu"])[0].lower().replace("/", "_")


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_timings": device.type != "cuda",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown_table(rows: list[Row], env: dict) -> str:
    head = [
        f"# visattn bench on {env['device_name']} (torch {env['torch']}, triton {env.get('triton')})",
        "",
    ]
    if env.get("cpu_timings"):
        head += ["**CPU timings**: no CUDA device; small shapes with the reference, not GPU performance.", ""]
    head += [
        "speedup = dense SDPA time / time (same run); ideal = 1 / FLOP density; efficiency = speedup / ideal.",
        "",
        "| case | density | backend | mode | ms | TFLOP/s | speedup | ideal | efficiency | vs baselines |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [r.as_markdown() for r in rows]) + "\n"


def write_results(rows: list[Row], env: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (when matplotlib is installed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    paths[1].write_text(markdown_table(rows, env))
    png = _plot(rows, env, out / f"{stem}.png")
    if png is not None:
        paths.append(png)
    return paths


def _plot(rows: list[Row], env: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        series.setdefault((r.case, r.backend, r.mode), []).append(r)
    for (case, backend, mode), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.density)
        ax.plot([r.density for r in rs], [r.speedup for r in rs], marker="o", label=f"{backend} {mode} ({case})")
    dens = sorted({r.density for r in rows})
    if dens:
        ax.plot(dens, [1 / d for d in dens], "k--", label="ideal (1/density)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP density")
    ax.set_ylabel("speedup over dense SDPA")
    title = f"visattn bench, {env['device_name']}"
    ax.set_title(title + (" (CPU timings)" if env.get("cpu_timings") else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
