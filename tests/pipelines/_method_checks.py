"""Checks every sparse video method's processors share (pyramid, rectified): one copy of the contract."""

from __future__ import annotations

import torch

import visattn.pipelines as vp
from visattn.pipelines.apply import enumerate_processors


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out.sample


def check_dense_equivalent_and_exact_remove(model, inputs, method: str, config) -> None:
    """A dense-equivalent config matches the default processors; remove() restores them exactly."""
    before = enumerate_processors(model)
    ref = run(model, inputs)
    with vp.apply(model, method, config, stats=True) as h:
        assert any(isinstance(p, vp.VisattnProcessor) for _, p in enumerate_processors(model).values())
        out = run(model, inputs)
        st = h.stats()
        assert st["total_calls"] > 0
        assert all(not r.startswith(method) for r in st["fallbacks"]), st["fallbacks"]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert all(enumerate_processors(model)[k][1] is before[k][1] for k in before)
    assert torch.equal(run(model, inputs), ref)


def check_sparse_differs(model, inputs, method: str, config) -> None:
    """A sparse config runs without the method's own fallbacks, stays finite and changes the output."""
    dense = run(model, inputs)
    with vp.apply(model, method, config, stats=True) as h:
        out = run(model, inputs)
        assert all(not r.startswith(method) for r in h.stats()["fallbacks"])
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max() > 1e-4
