"""GPU test of the benchmark harness's CUDA-graph timer (``visattn.bench._harness.graph_time_ms``)."""

from __future__ import annotations

import pytest
import torch

from visattn.bench._harness import graph_time_ms, time_ms

pytestmark = pytest.mark.cuda


def test_graph_time_scales_with_work_and_replays_the_step():
    x = torch.randn(4096, 4096, device="cuda")
    w = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    calls = []

    def one():
        calls.append(1)
        return x @ x

    def four():
        for _ in range(4):
            x @ x

    t1, t4 = graph_time_ms(one), graph_time_ms(four)
    # the captured graph is replayed, not the Python function: 3 warm-up calls + 1 capture only
    assert len(calls) == 4
    assert 3.0 < t4 / t1 < 5.0
    # eager timing of the same matmul is within the host-free GPU time's ballpark
    assert 0.5 < time_ms(one, torch.device("cuda")) / t1 < 2.0

    # a backward step (autograd inside the capture) runs and accumulates into .grad on every replay
    def step():
        (x @ w).sum().backward()

    w.grad = None
    graph_time_ms(step, replays=2, rounds=1)
    assert w.grad is not None and torch.isfinite(w.grad).all()
